//! A lease that keeps two batch runs from working at once, held as an object
//! created with put-if-absent (S3 conditional writes; an exclusive create on a
//! local lake) next to `metrics_hourly`'s log. A run that finds a live lease
//! stops with a clear message (or waits, when asked). The holder renews the
//! lease every quarter of its expiry while it works, so a lease not renewed for
//! longer than the expiry belongs to a killed run and is taken over.

use std::time::Duration;

use deltalake::DeltaTable;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode};
use tally_common::bucket::now_micros;
use tally_common::{Error, Result};

const LEASE_PATH: &str = "_tally/batch.lease";

/// A held lease, renewed in the background; released by [`Lease::release`] (or
/// left to expire if the process dies).
pub struct Lease {
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    renewer: tokio::task::JoinHandle<()>,
}

/// The lease's content: its owner, and when it was taken or last renewed.
fn body(owner: &str) -> object_store::PutPayload {
    serde_json::json!({"owner": owner, "since": now_micros()})
        .to_string()
        .into()
}

async fn holder(store: &dyn ObjectStore) -> Option<(String, i64)> {
    let g = store.get(&path()).await.ok()?;
    let bytes = g.bytes().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Some((
        v["owner"].as_str().unwrap_or("?").to_string(),
        v["since"].as_i64().unwrap_or(0),
    ))
}

/// Renew the lease every quarter of `expiry` while it is still ours.
fn renew(
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    expiry: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(expiry / 4).await;
            match holder(store.as_ref()).await {
                Some((o, _)) if o == owner => {
                    if let Err(e) = store.put(&path(), body(&owner)).await {
                        tracing::warn!(error = %e, "could not renew the batch lease");
                    }
                }
                _ => {
                    tracing::error!("the batch lease was taken over; this run no longer holds it");
                    return;
                }
            }
        }
    })
}

fn path() -> Path {
    Path::from(LEASE_PATH)
}

impl Lease {
    /// Take the batch lease of the lake whose `metrics_hourly` is `table`, waiting up
    /// to `wait` for a live holder to finish.
    pub async fn acquire(table: &DeltaTable, expiry: Duration, wait: Duration) -> Result<Lease> {
        let store = table.log_store().object_store(None);
        let owner = format!("{}@{}", std::process::id(), uuid::Uuid::new_v4());
        let deadline = std::time::Instant::now() + wait;
        loop {
            let put = store
                .put_opts(&path(), body(&owner), PutMode::Create.into())
                .await;
            match put {
                Ok(_) => {
                    let renewer = renew(store.clone(), owner.clone(), expiry);
                    return Ok(Lease {
                        store,
                        owner,
                        renewer,
                    });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let Some((holder, since)) = holder(store.as_ref()).await else {
                        continue;
                    };
                    let age = Duration::from_micros((now_micros() - since).max(0) as u64);
                    if age > expiry {
                        tracing::warn!(%holder, ?age, "taking over an expired batch lease (a killed run?)");
                        let _ = store.delete(&path()).await;
                        continue;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::Busy(format!(
                            "another batch run ({holder}) has been working for {}s; \
                             wait for it to finish (its lease expires after {}s)",
                            age.as_secs(),
                            expiry.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(Error::Busy(format!("cannot take the batch lease: {e}"))),
            }
        }
    }

    /// Stop renewing and release the lease if it is still ours.
    pub async fn release(self) {
        self.renewer.abort();
        if let Some((o, _)) = holder(self.store.as_ref()).await {
            if o == self.owner {
                let _ = self.store.delete(&path()).await;
            }
        }
    }
}
