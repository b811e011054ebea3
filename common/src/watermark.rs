//! The batch watermark and the batch layer's progress, recorded in
//! `metrics_hourly`'s own Delta log as application transactions, committed
//! atomically with the metric rows they describe:
//!
//! - `tally.batch/watermark`: W in hours since the epoch; every hour before W is
//!   authoritative in `metrics_hourly`,
//! - `tally.batch/raw_version`: the `raw_events` version the last run processed,
//! - `tally.batch/logic_version`: the metric logic version of the last run.
//!
//! An hour is closed, and so due for the batch layer, a grace period after its
//! end ([`DEFAULT_GRACE_MINUTES`]).

use deltalake::DeltaTable;

use crate::bucket::MICROS_PER_HOUR;
use crate::{Context as _, Result};

/// Minutes after an hour's end before the hour is closed and the batch layer
/// takes it (`--grace-minutes`): events arriving late within it still count.
pub const DEFAULT_GRACE_MINUTES: i64 = 5;

/// App id of the watermark (hours since the epoch).
pub const WATERMARK_APP: &str = "tally.batch/watermark";
/// App id of the last processed `raw_events` version.
pub const RAW_VERSION_APP: &str = "tally.batch/raw_version";
/// App id of the logic version of the last run.
pub const LOGIC_VERSION_APP: &str = "tally.batch/logic_version";

/// The batch layer's recorded progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchProgress {
    /// The watermark, epoch µs (hour aligned); None before the first run.
    pub watermark: Option<i64>,
    /// The `raw_events` version processed by the last run.
    pub raw_version: Option<i64>,
    /// The logic version of the last run.
    pub logic_version: Option<i64>,
}

/// Read the progress recorded in `metrics_hourly`.
pub async fn read_progress(metrics_hourly: &DeltaTable) -> Result<BatchProgress> {
    let Ok(state) = metrics_hourly.snapshot() else {
        return Ok(BatchProgress::default());
    };
    let log = metrics_hourly.log_store();
    let get = |app: &'static str| {
        let log = log.clone();
        async move {
            state
                .transaction_version(log.as_ref(), app)
                .await
                .context("reading the batch watermark")
        }
    };
    Ok(BatchProgress {
        watermark: get(WATERMARK_APP).await?.map(|h| h * MICROS_PER_HOUR),
        raw_version: get(RAW_VERSION_APP).await?,
        logic_version: get(LOGIC_VERSION_APP).await?,
    })
}
