//! Compaction of the master dataset: closed hour partitions rewritten into files
//! near a target size with Delta's optimize, each rewrite checked (the rows of
//! the files it removed against the rows of the files it added), and vacuum with
//! a retention window that keeps what readers and time travel need.
//!
//! The archiver keeps appending while compaction runs (late events of a closed
//! day land in the very partitions being rewritten). Optimize commits beside
//! such blind appends, so the table after it holds more rows than before: only
//! the optimize commit's own `remove` and `add` actions say whether it kept
//! every row. A commit that loses a race with another writer is retried, then
//! left to the next run: compaction is an optimisation, never a reason for an
//! hourly run to fail.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::parquet::file::metadata::ParquetMetaDataReader;
use deltalake::{DeltaTable, FilterOp, FilterValue};
use object_store::path::Path;
use object_store::ObjectStoreExt as _;
use tally_common::bucket::date_string;
use tally_common::lake::{read_commit, FileChange, Lake, Table};
use tally_common::{Context as _, Error, Result};

use crate::archive::{backoff, is_retryable, writer_properties};
use crate::dirty::raw_files;

/// Default target file size of compaction.
pub const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;
/// Default retention of vacuum: files removed from the table less than this long ago stay.
pub const VACUUM_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Attempts at compacting one day before leaving it to the next run.
const ATTEMPTS: u32 = 3;

/// What compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Files removed (rewritten).
    pub files_removed: u64,
    /// Files added.
    pub files_added: u64,
    /// Rows rewritten (read from the removed files, written to the added ones).
    pub rows_rewritten: u64,
    /// Days left to the next run after losing races with other writers.
    pub days_deferred: u64,
}

/// Compact the raw partitions of the given closed days (epoch µs day starts).
pub async fn compact_days(lake: &Lake, days: &BTreeSet<i64>) -> Result<CompactReport> {
    let mut report = CompactReport::default();
    let Some(mut table) = lake.open(Table::RawEvents).await? else {
        return Ok(report);
    };
    for &day in days {
        let date = date_string(day);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let filters = [(
                "event_date",
                FilterOp::Eq,
                FilterValue::Scalar(date.as_str()),
            )];
            let result = table
                .clone()
                .optimize()
                .with_filters(&filters)
                .with_target_size(NonZeroU64::new(TARGET_FILE_SIZE).unwrap_or(NonZeroU64::MIN))
                .with_writer_properties(writer_properties())
                .await;
            match result {
                Ok((after, metrics)) => {
                    if metrics.num_files_removed > 0 {
                        report.rows_rewritten += check_rewrite(&table, &after, &date).await?;
                    }
                    report.files_removed += metrics.num_files_removed;
                    report.files_added += metrics.num_files_added;
                    table = after;
                    break;
                }
                Err(e) if is_retryable(&e) => {
                    // another writer removed or replaced files this rewrite read
                    table
                        .update_state()
                        .await
                        .context("refreshing raw_events")?;
                    if attempt >= ATTEMPTS {
                        tracing::warn!(%date, error = %e, "compaction lost races with other writers; leaving it to the next run");
                        report.days_deferred += 1;
                        break;
                    }
                    tracing::info!(%date, attempt, error = %e, "compaction lost a race; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e).context(format!("compacting raw_events {date}")),
            }
        }
    }
    Ok(report)
}

/// Check the optimize commit that made `after` out of `before`: the rows of the
/// files it removed (as `before` lists them) must be the rows of the files it
/// added. Returns that count.
async fn check_rewrite(before: &DeltaTable, after: &DeltaTable, date: &str) -> Result<u64> {
    let read_version = before.version().unwrap_or(0);
    let (version, (removed, added)) =
        optimize_commit(after, read_version).await?.ok_or_else(|| {
            Error::internal(format!(
                "compaction of raw_events {date} reported a rewrite, but no optimize commit after \
                 version {read_version} is in the log"
            ))
        })?;
    let known: HashMap<String, Option<i64>> = raw_files(before)?
        .into_iter()
        .map(|f| (f.path, f.num_records))
        .collect();
    let mut read = 0i64;
    for path in &removed {
        read += match known.get(path).copied().flatten() {
            Some(n) => n,
            None => footer_rows(before, path).await?,
        };
    }
    let mut written = 0i64;
    for (path, rows) in &added {
        written += match rows {
            Some(n) => *n,
            None => footer_rows(after, path).await?,
        };
    }
    if read != written {
        return Err(Error::internal(format!(
            "compaction of raw_events {date} (commit {version}) wrote {written} rows in {} files \
             for the {read} rows of the {} files it replaced; restore raw_events to version {} \
             (the replaced files stay on storage until vacuum)",
            added.len(),
            removed.len(),
            version.saturating_sub(1)
        )));
    }
    Ok(read.max(0) as u64)
}

/// A commit's removed paths and added (path, rows from its statistics).
type Rewrite = (Vec<String>, Vec<(String, Option<i64>)>);

/// The optimize commit that read `read_version`, among the commits up to
/// `table`'s version (other writers' commits may come before and after it):
/// its version and what it removed and added.
async fn optimize_commit(table: &DeltaTable, read_version: u64) -> Result<Option<(u64, Rewrite)>> {
    let Some(last) = table.version() else {
        return Ok(None);
    };
    for version in (read_version + 1..=last).rev() {
        let Some(commit) = read_commit(table, version).await? else {
            continue;
        };
        if commit.operation.as_deref() != Some("OPTIMIZE")
            || commit.read_version != Some(read_version)
        {
            continue;
        }
        let mut rewrite: Rewrite = (Vec::new(), Vec::new());
        for file in commit.files {
            let Some(path) = file.path else { continue };
            match file.change {
                FileChange::Removed => rewrite.0.push(path),
                FileChange::Added => rewrite.1.push((path, file.num_records)),
            }
        }
        return Ok(Some((version, rewrite)));
    }
    Ok(None)
}

/// The row count in a data file's Parquet footer, for a file the log has no
/// statistics for.
async fn footer_rows(table: &DeltaTable, path: &str) -> Result<i64> {
    let store = table.log_store().object_store(None);
    let location = Path::from_url_path(path)
        .map_err(|e| Error::internal(format!("the log names raw_events file {path:?}: {e}")))?;
    let what = format!("reading the footer of raw_events file {path}");
    let corrupt = |why: &dyn std::fmt::Display| Error::internal(format!("{what}: {why}"));
    // a Parquet file ends with its metadata, the metadata's length (4 bytes LE) and `PAR1`
    let size = store
        .head(&location)
        .await
        .map_err(|e| Error::io(what.clone(), e))?
        .size;
    if size < 12 {
        return Err(corrupt(&"the file is too short to be Parquet"));
    }
    let tail = store
        .get_range(&location, size - 8..size)
        .await
        .map_err(|e| Error::io(what.clone(), e))?;
    let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if &tail[4..] != b"PAR1" || len + 8 > size {
        return Err(corrupt(&"no Parquet footer"));
    }
    let metadata = store
        .get_range(&location, size - 8 - len..size - 8)
        .await
        .map_err(|e| Error::io(what.clone(), e))?;
    let metadata = ParquetMetaDataReader::decode_metadata(&metadata).map_err(|e| corrupt(&e))?;
    Ok(metadata.file_metadata().num_rows())
}

/// Vacuum `table` with a retention window (never shorter than Delta's own minimum).
pub async fn vacuum(lake: &Lake, table: Table, retention: Duration) -> Result<usize> {
    let Some(t) = lake.open(table).await? else {
        return Ok(0);
    };
    // full mode: files no commit names (those of items whose run never
    // published) go too, once older than the retention
    let result = t
        .vacuum()
        .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
        .with_retention_period(chrono::Duration::from_std(retention).map_err(Error::config)?)
        .await;
    match result {
        Ok((_, metrics)) => Ok(metrics.files_deleted.len()),
        Err(e) if is_retryable(&e) => {
            // vacuum's own log entries raced another writer's commit: the files
            // stay until the next day's vacuum
            tracing::warn!(table = table.name(), error = %e, "vacuum lost a race; leaving it to the next run");
            Ok(0)
        }
        Err(e) => Err(e).context(format!("vacuuming {}", table.name())),
    }
}
