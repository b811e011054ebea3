//! Source marks kept in a Delta table's own log as application transactions
//! (`txn` actions), committed atomically with the data they cover.
//!
//! A mark is the highest position of a source already written to the table. A
//! Delta transaction version is an `i64` while Kinesis sequence numbers run to
//! 129 digits, so a mark is stored as a few `txn` actions, `tally.mark/{source}#i`,
//! holding [`Position::to_parts`]: the digit count, then 18-digit chunks.
//!
//! The archiver writes them (`tally-batch-layer`); the speed view's rebuild reads
//! them to know how far `raw_events` holds each source.

use crate::source::{Position, SourceId};
use crate::{Context as _, Result};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;

fn app_id(source: &SourceId, part: usize) -> String {
    format!("tally.mark/{source}#{part}")
}

/// The mark of `source` in `table`, if it ever wrote there.
pub async fn read_mark(table: &DeltaTable, source: &SourceId) -> Result<Option<Position>> {
    let Ok(state) = table.snapshot() else {
        return Ok(None);
    };
    let log_store = table.log_store();
    let Some(len) = state
        .transaction_version(log_store.as_ref(), app_id(source, 0))
        .await
        .context("reading a source mark")?
    else {
        return Ok(None);
    };
    let mut parts = vec![len];
    let chunks = (len.max(0) as usize).div_ceil(18);
    for i in 1..=chunks {
        let v = state
            .transaction_version(log_store.as_ref(), app_id(source, i))
            .await
            .context("reading a source mark")?
            .unwrap_or(0);
        parts.push(v);
    }
    Ok(Position::from_parts(&parts))
}

/// The `txn` actions that set `source`'s mark to `position`.
pub fn mark_transactions(source: &SourceId, position: &Position) -> Vec<Transaction> {
    let now = chrono::Utc::now().timestamp_millis();
    position
        .to_parts()
        .into_iter()
        .enumerate()
        .map(|(i, v)| Transaction::new_with_last_update(app_id(source, i), v, Some(now)))
        .collect()
}

/// Commit properties carrying the marks of several sources (a group commit:
/// many sources' rows in one commit) and a description of the commit; the
/// commit's metadata names the sources and positions as JSON arrays.
pub fn commit_with_marks(marks: &[(&SourceId, &Position)], what: &str) -> CommitProperties {
    CommitProperties::default()
        .with_application_transactions(
            marks
                .iter()
                .flat_map(|(s, p)| mark_transactions(s, p))
                .collect::<Vec<_>>(),
        )
        .with_metadata([
            crate::lake::operation(what),
            (
                crate::lake::SOURCE_KEY.to_string(),
                serde_json::json!(marks.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>()),
            ),
            (
                crate::lake::POSITION_KEY.to_string(),
                serde_json::json!(marks.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>()),
            ),
        ])
}

/// Commit properties carrying a mark and a description of the commit.
pub fn commit_with_mark(source: &SourceId, position: &Position, what: &str) -> CommitProperties {
    CommitProperties::default()
        .with_application_transactions(mark_transactions(source, position))
        .with_metadata([
            crate::lake::operation(what),
            (
                crate::lake::SOURCE_KEY.to_string(),
                serde_json::json!(source.as_str()),
            ),
            (
                crate::lake::POSITION_KEY.to_string(),
                serde_json::json!(position.as_str()),
            ),
        ])
}
