//! A lease that keeps two batch runs from working at once, held as an object
//! created with put-if-absent (S3 conditional writes; an exclusive create on a
//! local lake) next to `metrics_hourly`'s log. A run that finds a live lease
//! stops with a clear message; a lease older than its expiry (a killed run) is
//! taken over.

use std::time::Duration;

use deltalake::DeltaTable;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode};
use tally_common::bucket::now_micros;
use tally_common::{Error, Result};

const LEASE_PATH: &str = "_tally/batch.lease";

/// A held lease; released by [`Lease::release`] (or left to expire if the process dies).
pub struct Lease {
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
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
            let body = serde_json::json!({"owner": owner, "since": now_micros()}).to_string();
            let put = store
                .put_opts(&path(), body.into(), PutMode::Create.into())
                .await;
            match put {
                Ok(_) => return Ok(Lease { store, owner }),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let held = store.get(&path()).await.ok();
                    let (holder, since) = match held {
                        Some(g) => {
                            let bytes = g.bytes().await.unwrap_or_default();
                            let v: serde_json::Value =
                                serde_json::from_slice(&bytes).unwrap_or_default();
                            (
                                v["owner"].as_str().unwrap_or("?").to_string(),
                                v["since"].as_i64().unwrap_or(0),
                            )
                        }
                        None => continue,
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

    /// Release the lease if it is still ours.
    pub async fn release(self) {
        if let Ok(g) = self.store.get(&path()).await {
            let bytes = g.bytes().await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if v["owner"].as_str() == Some(self.owner.as_str()) {
                let _ = self.store.delete(&path()).await;
            }
        }
    }
}
