//! Which complete days need their `metrics_daily` row.
//!
//! A day's row is due once every hour of it is processed, i.e. once the batch
//! watermark passes its end, whichever runs processed its hours: the run that
//! moves the watermark past midnight may find none of the day's hours dirty.
//! `metrics_daily`'s own log keeps a mark, committed with the last daily row a
//! run writes (or alone when no day was missing its row): every day before it
//! that holds raw data has its row. A run computes the days from the mark to the
//! new watermark, plus complete days whose raw data changed. A lake written
//! before the mark existed has none: then the complete days without a row are
//! found once, from the table itself.

use std::collections::BTreeSet;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use tally_common::bucket::{day_floor, MICROS_PER_DAY};
use tally_common::lake::{register, Table};
use tally_common::{Context as _, Result};

use crate::sql::run_query;

/// App id of the daily mark in `metrics_daily`'s log: D in days since the epoch,
/// every day before D that holds raw data has its daily row.
pub const DAILY_THROUGH_APP: &str = "tally.batch/daily_through";

/// The `txn` action setting the mark to the day starting at `through` (epoch µs).
pub(crate) fn mark_txn(through: i64) -> Transaction {
    Transaction::new_with_last_update(
        DAILY_THROUGH_APP,
        through.div_euclid(MICROS_PER_DAY),
        Some(chrono::Utc::now().timestamp_millis()),
    )
}

/// The daily mark of `metrics_daily` (epoch µs of the day), if recorded.
pub async fn read_mark(daily: &DeltaTable) -> Result<Option<i64>> {
    let Ok(state) = daily.snapshot() else {
        return Ok(None);
    };
    let v = state
        .transaction_version(daily.log_store().as_ref(), DAILY_THROUGH_APP)
        .await
        .context("reading the daily mark")?;
    Ok(v.and_then(|d| d.checked_mul(MICROS_PER_DAY)))
}

/// Days before `through` that hold raw data and may lack their daily row: those
/// from the daily mark on or, on a table written before the mark existed, those
/// without a row.
pub(crate) async fn unfinished_days(
    daily: &DeltaTable,
    mark: Option<i64>,
    present: &BTreeSet<i64>,
    through: i64,
) -> Result<BTreeSet<i64>> {
    let days: BTreeSet<i64> = present
        .iter()
        .map(|&h| day_floor(h))
        .filter(|&d| d < through && mark.is_none_or(|m| d >= m))
        .collect();
    if mark.is_some() || days.is_empty() || daily.snapshot().is_err() {
        return Ok(days);
    }
    let ctx = SessionContext::new();
    register(&ctx, Table::MetricsDaily.name(), daily).await?;
    let written = run_query(
        &ctx,
        "SELECT DISTINCT CAST(day AS BIGINT) AS day FROM metrics_daily",
    )
    .await?;
    let mut written_days = BTreeSet::new();
    for b in &written {
        let c = cast(b.column(0), &DataType::Int64).context("reading metrics_daily days")?;
        let c = c.as_primitive::<Int64Type>();
        written_days.extend((0..c.len()).filter(|&i| !c.is_null(i)).map(|i| c.value(i)));
    }
    Ok(days.difference(&written_days).copied().collect())
}
