//! A lease that keeps two batch runs from working at once, held as numbered
//! objects next to `metrics_hourly`'s log: `_tally/lease/{generation}`.
//!
//! The highest generation is the lease. A run takes it by creating the next
//! generation with put-if-absent (S3 conditional writes; an exclusive create on
//! a local lake), so of two runs that find the lease free or expired at the same
//! moment exactly one wins; no object is ever deleted to take a lease over. The
//! holder renews its generation every quarter of the expiry while it works and
//! marks it released at the end; a generation not renewed for longer than the
//! expiry belongs to a killed run. A holder that finds a newer generation has
//! lost the lease and stops before its next commit (Delta's conflict check
//! catches a commit already under way).

use std::time::Duration;

use deltalake::DeltaTable;
use futures::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode};
use tally_common::bucket::now_micros;
use tally_common::config::DEFAULT_LEASE_SECS;
use tally_common::{Error, Result};

/// Default expiry of the batch lease: a killed run blocks the next one at most
/// this long (`--lease-secs`, [`DEFAULT_LEASE_SECS`]).
pub const DEFAULT_LEASE_EXPIRY: Duration = Duration::from_secs(DEFAULT_LEASE_SECS);

const LEASE_DIR: &str = "_tally/lease";

fn path(generation: u64) -> Path {
    Path::from(format!("{LEASE_DIR}/{generation:020}"))
}

/// What a generation's object says.
struct State {
    owner: String,
    since: i64,
    released: bool,
    /// The holder's expiry (it renews every quarter of it); None from a
    /// holder that predates it.
    expiry: Option<Duration>,
}

/// What a generation's holder writes: that it holds the lease (taking or
/// renewing it), or that it let it go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holding {
    Held,
    Released,
}

fn body(owner: &str, holding: Holding, expiry: Duration) -> object_store::PutPayload {
    let released = holding == Holding::Released;
    serde_json::json!({
        "owner": owner, "since": now_micros(), "released": released,
        "expiry_secs": expiry.as_secs(),
    })
    .to_string()
    .into()
}

/// What generation `generation`'s object says; None when there is no such
/// object. Errors: [`Error::Io`] when it cannot be read, [`Error::Internal`]
/// when it holds something tally never writes (a lease is never guessed free).
async fn read(store: &dyn ObjectStore, generation: u64) -> Result<Option<State>> {
    let what = || format!("reading the batch lease {}", path(generation));
    let got = match store.get(&path(generation)).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Error::io(what(), e)),
    };
    let bytes = got.bytes().await.map_err(|e| Error::io(what(), e))?;
    parse(&bytes).map(Some).ok_or_else(|| {
        Error::internal(format!(
            "{} holds no lease tally wrote: {:?}",
            path(generation),
            String::from_utf8_lossy(&bytes)
        ))
    })
}

/// A generation's object as [`body`] writes it.
fn parse(bytes: &[u8]) -> Option<State> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(State {
        owner: v["owner"].as_str()?.to_string(),
        since: v["since"].as_i64()?,
        released: v["released"].as_bool()?,
        expiry: v["expiry_secs"].as_u64().map(Duration::from_secs),
    })
}

/// The highest generation present, if any.
async fn latest(store: &dyn ObjectStore) -> Result<Option<u64>> {
    let prefix = Path::from(LEASE_DIR);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::io("listing the batch lease", e))?;
    Ok(metas
        .iter()
        .filter_map(|m| m.location.filename()?.parse::<u64>().ok())
        .max())
}

/// Whether `generation` is still the newest (nobody took the lease over).
/// Errors: [`Error::Io`] when the store cannot say.
async fn still_newest(store: &dyn ObjectStore, generation: u64) -> Result<bool> {
    match store.head(&path(generation + 1)).await {
        Ok(_) => Ok(false),
        Err(object_store::Error::NotFound { .. }) => Ok(true),
        Err(e) => Err(Error::io("checking the batch lease", e)),
    }
}

/// A held lease, renewed in the background; released by [`Lease::release`] (or
/// left to expire if the process dies).
pub struct Lease {
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    generation: u64,
    expiry: Duration,
    renewer: tokio::task::JoinHandle<()>,
}

/// Renew generation `generation` every quarter of `expiry` while it is the newest.
fn renew(
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    generation: u64,
    expiry: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(expiry / 4).await;
            match still_newest(store.as_ref(), generation).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!("the batch lease was taken over; this run no longer holds it");
                    return;
                }
                // renewed anyway: the run's own check before each commit fails on it
                Err(e) => tracing::warn!(error = %e, "could not check the batch lease"),
            }
            if let Err(e) = store
                .put(&path(generation), body(&owner, Holding::Held, expiry))
                .await
            {
                tracing::warn!(error = %e, "could not renew the batch lease");
            }
        }
    })
}

impl Lease {
    /// Take the batch lease of the lake whose `metrics_hourly` is `table`, waiting up
    /// to `wait` for a live holder to finish.
    pub async fn acquire(table: &DeltaTable, expiry: Duration, wait: Duration) -> Result<Lease> {
        let store = table.log_store().object_store(None);
        let owner = format!("{}@{}", std::process::id(), uuid::Uuid::new_v4());
        let deadline = std::time::Instant::now() + wait;
        loop {
            let current = latest(store.as_ref()).await?;
            if let Some(g) = current {
                if let Some(s) = read(store.as_ref(), g).await? {
                    let age = Duration::from_micros((now_micros() - s.since).max(0) as u64);
                    // the holder's expiry, not ours: it renews by its own
                    let expiry = s.expiry.unwrap_or(expiry);
                    if !s.released && age <= expiry {
                        if std::time::Instant::now() >= deadline {
                            return Err(Error::Busy(format!(
                                "another batch run ({}) holds the lease, renewed {}s ago; \
                                 wait for it to finish (--wait-secs N waits up to N seconds; \
                                 a lease not renewed for {}s, its holder's --lease-secs, is taken over)",
                                s.owner,
                                age.as_secs(),
                                expiry.as_secs()
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    if !s.released {
                        tracing::warn!(holder = %s.owner, ?age, "taking over an expired batch lease (a killed run?)");
                    }
                }
            }
            let next = current.map_or(0, |g| g + 1);
            match store
                .put_opts(
                    &path(next),
                    body(&owner, Holding::Held, expiry),
                    PutMode::Create.into(),
                )
                .await
            {
                Ok(_) => {
                    // generations before the previous one are history
                    if let Some(g) = current {
                        for old in g.saturating_sub(8)..g {
                            let _ = store.delete(&path(old)).await;
                        }
                    }
                    let renewer = renew(store.clone(), owner.clone(), next, expiry);
                    return Ok(Lease {
                        store,
                        owner,
                        generation: next,
                        expiry,
                        renewer,
                    });
                }
                // another run took this generation first: look again
                Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(Error::io("taking the batch lease", e)),
            }
        }
    }

    /// Fail when another run has taken the lease over (this one stopped renewing
    /// it for longer than the expiry).
    pub async fn check(&self) -> Result<()> {
        if still_newest(self.store.as_ref(), self.generation).await? {
            Ok(())
        } else {
            Err(Error::Busy(
                "another batch run took the lease over (this run stalled longer than the lease expiry); stopping"
                    .into(),
            ))
        }
    }

    /// Stop renewing and mark the lease released if it is still ours. Best
    /// effort: a lease that cannot be released expires by itself.
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.mark_released().await {
            tracing::warn!(error = %e, "could not release the batch lease; it expires by itself");
        }
    }

    async fn mark_released(&self) -> Result<()> {
        if !still_newest(self.store.as_ref(), self.generation).await? {
            return Ok(());
        }
        if let Some(s) = read(self.store.as_ref(), self.generation).await? {
            if s.owner == self.owner {
                self.store
                    .put(
                        &path(self.generation),
                        body(&self.owner, Holding::Released, self.expiry),
                    )
                    .await
                    .map_err(|e| Error::io("releasing the batch lease", e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;
    use tally_common::lake::{Lake, Table};

    fn local(dir: &std::path::Path) -> LocalFileSystem {
        LocalFileSystem::new_with_prefix(dir).unwrap()
    }

    #[tokio::test]
    async fn a_lease_is_absent_only_when_its_object_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        assert!(read(&store, 0).await.unwrap().is_none());
        assert!(still_newest(&store, 0).await.unwrap());

        store
            .put(
                &path(0),
                body("me", Holding::Held, Duration::from_secs(120)),
            )
            .await
            .unwrap();
        let s = read(&store, 0).await.unwrap().unwrap();
        assert_eq!((s.owner.as_str(), s.released), ("me", false));
        store
            .put(
                &path(1),
                body("you", Holding::Released, Duration::from_secs(120)),
            )
            .await
            .unwrap();
        assert!(!still_newest(&store, 0).await.unwrap());
        assert!(read(&store, 1).await.unwrap().unwrap().released);

        // a body tally never writes is a broken invariant, never an expired lease
        for garbled in [
            "",
            "not json",
            r#"{"owner":"x"}"#,
            r#"{"owner":"x","since":"1","released":false}"#,
        ] {
            store.put(&path(2), garbled.into()).await.unwrap();
            let e = read(&store, 2).await.err().unwrap();
            assert!(matches!(e, Error::Internal(_)), "{garbled:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_lease_that_cannot_be_read_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        // the lease directory is a file: every generation is unreadable, not absent
        std::fs::create_dir_all(dir.path().join("_tally")).unwrap();
        std::fs::write(dir.path().join(LEASE_DIR), "").unwrap();
        let store = local(dir.path());
        assert!(matches!(read(&store, 0).await, Err(Error::Io { .. })));
        assert!(matches!(
            still_newest(&store, 0).await,
            Err(Error::Io { .. })
        ));
    }

    #[tokio::test]
    async fn a_garbled_lease_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
        let table = lake.open_or_create(Table::MetricsHourly).await.unwrap();
        let store = table.log_store().object_store(None);
        store.put(&path(0), "garbled".into()).await.unwrap();
        let e = Lease::acquire(&table, DEFAULT_LEASE_EXPIRY, Duration::ZERO)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(
            read(store.as_ref(), 1).await.unwrap().is_none(),
            "no new generation"
        );

        // a released lease is taken by the next generation
        store
            .put(
                &path(0),
                body("old", Holding::Released, Duration::from_secs(120)),
            )
            .await
            .unwrap();
        let lease = Lease::acquire(&table, DEFAULT_LEASE_EXPIRY, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(lease.generation, 1);
        lease.check().await.unwrap();
        lease.release().await;
        assert!(read(store.as_ref(), 1).await.unwrap().unwrap().released);
    }

    /// A live holder is judged by its own expiry: a run started with a short
    /// `--lease-secs` does not take over a holder renewing every 30 s of its
    /// 120 s, 2 s after its last renewal; one that stopped renewing for longer
    /// than its own expiry is taken over.
    #[tokio::test]
    async fn a_holder_is_judged_by_its_own_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
        let table = lake.open_or_create(Table::MetricsHourly).await.unwrap();
        let store = table.log_store().object_store(None);
        let renewed = |ago: i64, expiry_secs: u64| -> object_store::PutPayload {
            serde_json::json!({"owner": "holder", "since": now_micros() - ago * 1_000_000,
                               "released": false, "expiry_secs": expiry_secs})
            .to_string()
            .into()
        };
        store.put(&path(0), renewed(2, 120)).await.unwrap();
        let e = Lease::acquire(&table, Duration::from_secs(1), Duration::ZERO)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Busy(_)), "{e}");
        assert!(e.to_string().contains("--wait-secs"), "{e}");
        store.put(&path(0), renewed(5, 3)).await.unwrap();
        let lease = Lease::acquire(&table, DEFAULT_LEASE_EXPIRY, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(lease.generation, 1);
        lease.release().await;
    }
}
