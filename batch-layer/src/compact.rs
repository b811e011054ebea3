//! Compaction of the master dataset: closed hour partitions rewritten into files
//! near a target size with Delta's optimize, row counts checked before and after,
//! and vacuum with a retention window that keeps what readers and time travel need.

use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::arrow::array::AsArray;
use deltalake::arrow::datatypes::Int64Type;
use deltalake::{DeltaTable, FilterOp, FilterValue};
use tally_common::bucket::date_string;
use tally_common::lake::{Lake, Table};
use tally_common::{Context as _, Error, Result};

use crate::archive::writer_properties;

/// Default target file size of compaction.
pub const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;
/// Default retention of vacuum: files removed from the table less than this long ago stay.
pub const VACUUM_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Files removed (rewritten).
    pub files_removed: u64,
    /// Files added.
    pub files_added: u64,
}

fn rows_in(table: &DeltaTable, date: &str) -> Result<i64> {
    let adds = table
        .snapshot()
        .context("raw_events snapshot")?
        .add_actions_table(true)
        .context("listing files")?;
    let (Some(d), Some(n)) = (
        adds.column_by_name("partition.event_date"),
        adds.column_by_name("num_records"),
    ) else {
        return Ok(0);
    };
    let d = d.as_string::<i32>();
    let n = n.as_primitive::<Int64Type>();
    Ok((0..adds.num_rows())
        .filter(|&i| d.value(i) == date)
        .map(|i| n.value(i))
        .sum())
}

/// Compact the raw partitions of the given closed days (epoch µs day starts).
pub async fn compact_days(lake: &Lake, days: &BTreeSet<i64>) -> Result<CompactReport> {
    let mut report = CompactReport::default();
    let Some(mut table) = lake.open(Table::RawEvents).await? else {
        return Ok(report);
    };
    for &day in days {
        let date = date_string(day);
        let before = rows_in(&table, &date)?;
        let filters = [(
            "event_date",
            FilterOp::Eq,
            FilterValue::Scalar(date.as_str()),
        )];
        let (t, metrics) = table
            .clone()
            .optimize()
            .with_filters(&filters)
            .with_target_size(NonZeroU64::new(TARGET_FILE_SIZE).unwrap_or(NonZeroU64::MIN))
            .with_writer_properties(writer_properties())
            .await
            .context(format!("compacting raw_events {date}"))?;
        table = t;
        let after = rows_in(&table, &date)?;
        if before != after {
            return Err(Error::invalid(format!(
                "compaction of raw_events {date} changed the row count from {before} to {after}; \
                 restore the table to its previous version"
            )));
        }
        report.files_removed += metrics.num_files_removed;
        report.files_added += metrics.num_files_added;
    }
    Ok(report)
}

/// Vacuum `table` with a retention window (never shorter than Delta's own minimum).
pub async fn vacuum(lake: &Lake, table: Table, retention: Duration) -> Result<usize> {
    let Some(t) = lake.open(table).await? else {
        return Ok(0);
    };
    let (_, metrics) = t
        .vacuum()
        .with_retention_period(chrono::Duration::from_std(retention).map_err(Error::invalid)?)
        .await
        .context(format!("vacuuming {}", table.name()))?;
    Ok(metrics.files_deleted.len())
}
