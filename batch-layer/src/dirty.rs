//! Which hours need the batch layer: found from the Delta log alone.
//!
//! The raw table's commits since the version the last run processed name, in
//! their `add` actions, the hour partitions that received data; nothing is
//! scanned. Compaction's rewrites carry `dataChange: false` and are ignored.

use std::collections::BTreeSet;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::Int32Type;
use deltalake::DeltaTable;
use tally_common::bucket::{parse_ts, MICROS_PER_HOUR};
use tally_common::{Context as _, Result};

/// Hour start (epoch µs) of a raw partition `event_date=YYYY-MM-DD/event_hour=H`.
pub fn partition_hour(date: &str, hour: &str) -> Option<i64> {
    let h: i64 = hour.trim().parse().ok()?;
    let day = parse_ts(&format!("{date}T00:00:00Z")).ok()?;
    (0..24).contains(&h).then_some(day + h * MICROS_PER_HOUR)
}

/// Hours that received data in raw versions `(after, upto]`, or None when a
/// commit file is gone (log cleanup), in which case the caller must fall back.
pub async fn hours_changed(
    raw: &DeltaTable,
    after: i64,
    upto: i64,
) -> Result<Option<BTreeSet<i64>>> {
    let log = raw.log_store();
    let mut hours = BTreeSet::new();
    for v in (after + 1).max(0)..=upto {
        let Some(bytes) = log
            .read_commit_entry(v as u64)
            .await
            .context(format!("reading raw_events commit {v}"))?
        else {
            return Ok(None);
        };
        for line in bytes.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let Some(add) = action.get("add") else {
                continue;
            };
            if add.get("dataChange").and_then(|d| d.as_bool()) == Some(false) {
                continue;
            }
            let pv = &add["partitionValues"];
            if let (Some(d), Some(h)) = (pv["event_date"].as_str(), pv["event_hour"].as_str()) {
                if let Some(t) = partition_hour(d, h) {
                    hours.insert(t);
                }
            }
        }
    }
    Ok(Some(hours))
}

/// Every hour partition that holds files in the table's current snapshot.
pub fn hours_present(raw: &DeltaTable) -> Result<BTreeSet<i64>> {
    let mut hours = BTreeSet::new();
    let Ok(state) = raw.snapshot() else {
        return Ok(hours);
    };
    let adds = state
        .add_actions_table(true)
        .context("listing raw_events files")?;
    let (Some(dates), Some(hs)) = (
        adds.column_by_name("partition.event_date"),
        adds.column_by_name("partition.event_hour"),
    ) else {
        return Ok(hours);
    };
    let dates = dates.as_string_opt::<i32>();
    let hs_int = hs.as_primitive_opt::<Int32Type>();
    for i in 0..adds.num_rows() {
        let d = dates.map(|a| a.value(i).to_string());
        let h = hs_int
            .filter(|a| !a.is_null(i))
            .map(|a| a.value(i).to_string());
        if let (Some(d), Some(h)) = (d, h) {
            if let Some(t) = partition_hour(&d, &h) {
                hours.insert(t);
            }
        }
    }
    Ok(hours)
}
