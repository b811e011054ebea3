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
}

/// What a generation's holder writes: that it holds the lease (taking or
/// renewing it), or that it let it go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holding {
    Held,
    Released,
}

fn body(owner: &str, holding: Holding) -> object_store::PutPayload {
    let released = holding == Holding::Released;
    serde_json::json!({"owner": owner, "since": now_micros(), "released": released})
        .to_string()
        .into()
}

async fn read(store: &dyn ObjectStore, generation: u64) -> Option<State> {
    let g = store.get(&path(generation)).await.ok()?;
    let bytes = g.bytes().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Some(State {
        owner: v["owner"].as_str().unwrap_or("?").to_string(),
        since: v["since"].as_i64().unwrap_or(0),
        released: v["released"].as_bool().unwrap_or(false),
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
async fn still_newest(store: &dyn ObjectStore, generation: u64) -> bool {
    store.head(&path(generation + 1)).await.is_err()
}

/// A held lease, renewed in the background; released by [`Lease::release`] (or
/// left to expire if the process dies).
pub struct Lease {
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    generation: u64,
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
            if !still_newest(store.as_ref(), generation).await {
                tracing::error!("the batch lease was taken over; this run no longer holds it");
                return;
            }
            if let Err(e) = store
                .put(&path(generation), body(&owner, Holding::Held))
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
                if let Some(s) = read(store.as_ref(), g).await {
                    let age = Duration::from_micros((now_micros() - s.since).max(0) as u64);
                    if !s.released && age <= expiry {
                        if std::time::Instant::now() >= deadline {
                            return Err(Error::Busy(format!(
                                "another batch run ({}) holds the lease, renewed {}s ago; \
                                 wait for it to finish (a lease not renewed for {}s is taken over)",
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
                    body(&owner, Holding::Held),
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
        if still_newest(self.store.as_ref(), self.generation).await {
            Ok(())
        } else {
            Err(Error::Busy(
                "another batch run took the lease over (this run stalled longer than the lease expiry); stopping"
                    .into(),
            ))
        }
    }

    /// Stop renewing and mark the lease released if it is still ours.
    pub async fn release(self) {
        self.renewer.abort();
        if still_newest(self.store.as_ref(), self.generation).await {
            if let Some(s) = read(self.store.as_ref(), self.generation).await {
                if s.owner == self.owner {
                    let _ = self
                        .store
                        .put(&path(self.generation), body(&self.owner, Holding::Released))
                        .await;
                }
            }
        }
    }
}
