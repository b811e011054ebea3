//! Which hours need the batch layer (`dirty_hours`): found from the Delta log
//! alone.
//!
//! The raw table's commits since the version the last run processed name, in
//! their `add` and `remove` actions, the hour partitions whose data changed;
//! nothing is scanned. Compaction's rewrites carry `dataChange: false` and are
//! ignored. The current snapshot's files ([`raw_files`]) also say which hours
//! hold data and, from their statistics, which files may hold a row the batch
//! layer cannot compute ([`crate::quarantine`]).

use std::collections::BTreeSet;

use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int32Type, Int64Type, TimeUnit};
use deltalake::DeltaTable;
use tally_common::bucket::{date_string, hours_between, parse_ts, MICROS_PER_HOUR};
use tally_common::lake::read_commit;
use tally_common::watermark::BatchProgress;
use tally_common::{Context as _, Result};

use crate::quarantine::{computable_hour, COMPUTABLE_FROM, COMPUTABLE_UNTIL};

/// Hour start (epoch µs) of a raw partition `event_date=YYYY-MM-DD/event_hour=H`,
/// or None when the values do not name a UTC hour exactly as the archiver writes
/// them (another writer may put anything there).
pub fn partition_hour(date: &str, hour: &str) -> Option<i64> {
    let h: i64 = hour.trim().parse().ok()?;
    let day = parse_ts(&format!("{date}T00:00:00Z")).ok()?;
    // `event_date = 'D'` must select the partition: the text has to be the canonical one
    ((0..24).contains(&h) && date_string(day) == date).then_some(day + h * MICROS_PER_HOUR)
}

/// Hours whose data changed in raw versions `(after, upto]` (files added, or
/// removed by a delete, an overwrite or the batch layer's own quarantine), or
/// None when a commit file is gone (log cleanup), in which case the caller must
/// fall back. Partitions that name no hour are left to [`raw_files`].
pub async fn hours_changed(
    raw: &DeltaTable,
    after: i64,
    upto: i64,
) -> Result<Option<BTreeSet<i64>>> {
    let mut hours = BTreeSet::new();
    for v in (after + 1).max(0)..=upto {
        let Some(commit) = read_commit(raw, v as u64).await? else {
            return Ok(None);
        };
        // added and removed files alike: a delete that empties a partition leaves
        // only a `remove`, and that hour changed too, or its old metric rows would stay
        for file in commit.files.iter().filter(|f| f.data_change) {
            let pv = &file.partition_values;
            if let (Some(d), Some(h)) = (pv.get("event_date"), pv.get("event_hour")) {
                if let Some(t) = partition_hour(d, h) {
                    hours.insert(t);
                }
            }
        }
    }
    Ok(Some(hours))
}

/// The hours a run computes: a reprocessing range's (`range`, epoch µs) closed
/// hours, or the closed hours from the watermark on plus those whose raw data
/// changed since the version the last run processed. `present` holds the hours
/// with data, `closed_end` the end of the closed hours. Only hours the batch
/// layer computes.
pub(crate) async fn dirty_hours(
    raw: &DeltaTable,
    present: &BTreeSet<i64>,
    progress: &BatchProgress,
    closed_end: i64,
    range: Option<(i64, i64)>,
) -> Result<BTreeSet<i64>> {
    if let Some((from, to)) = range {
        let to = to.min(closed_end).min(COMPUTABLE_UNTIL);
        return Ok(hours_between(from.max(COMPUTABLE_FROM), to).collect());
    }
    let w = progress.watermark;
    // every hour before the new watermark is processed once this run is done:
    // also one that a run with a later clock took and that changed since
    let end = w.map_or(closed_end, |w| w.max(closed_end));
    let closed = |h: &i64| *h < end && computable_hour(*h);
    let mut d: BTreeSet<i64> = present
        .iter()
        .copied()
        .filter(|h| closed(h) && w.is_none_or(|w| *h >= w))
        .collect();
    if let Some(v) = progress.raw_version {
        let raw_version = raw.version().map(|v| v as i64).unwrap_or(-1);
        match hours_changed(raw, v, raw_version).await? {
            Some(changed) => d.extend(changed.into_iter().filter(closed)),
            None => {
                tracing::warn!("raw_events log entries since version {v} are gone; recomputing every closed hour");
                d.extend(present.iter().copied().filter(closed));
            }
        }
    }
    Ok(d)
}

/// One data file of `raw_events` as the log describes it: its partition and the
/// statistics the quarantine check needs (None where the writer left them out).
#[derive(Debug, Clone, Default)]
pub struct RawFile {
    /// Path relative to the table root, as in the log.
    pub path: String,
    /// The `event_date` partition value.
    pub event_date: Option<String>,
    /// The `event_hour` partition value.
    pub event_hour: Option<i32>,
    /// Rows in the file.
    pub num_records: Option<i64>,
    /// Nulls in `event_id`, `merchant_id`, `event_type`, `event_time` together.
    pub required_nulls: Option<i64>,
    /// Smallest and largest `event_time` (epoch µs).
    pub event_time: Option<(i64, i64)>,
    /// Nulls in `amount`.
    pub amount_nulls: Option<i64>,
    /// Smallest and largest `amount`.
    pub amount: Option<(i64, i64)>,
}

impl RawFile {
    /// The hour its partition names, if it names one.
    pub fn hour(&self) -> Option<i64> {
        partition_hour(self.event_date.as_deref()?, &self.event_hour?.to_string())
    }
}

/// Every data file of the table's current snapshot.
pub fn raw_files(raw: &DeltaTable) -> Result<Vec<RawFile>> {
    let Ok(state) = raw.snapshot() else {
        return Ok(Vec::new());
    };
    let adds = state
        .add_actions_table(true)
        .context("listing raw_events files")?;
    let n = adds.num_rows();
    let paths = column(&adds, "path", &DataType::Utf8)?;
    let Some(paths) = paths else {
        return Ok(Vec::new());
    };
    let paths = paths.as_string::<i32>();
    let dates = column(&adds, "partition.event_date", &DataType::Utf8)?;
    let hours = column(&adds, "partition.event_hour", &DataType::Int32)?;
    let i64_col = |name: &str| column(&adds, name, &DataType::Int64);
    let micros = |name: &str| micros_column(&adds, name);
    let records = i64_col("num_records")?;
    let required: Vec<Option<ArrayRef>> = ["event_id", "merchant_id", "event_type", "event_time"]
        .iter()
        .map(|c| i64_col(&format!("null_count.{c}")))
        .collect::<Result<_>>()?;
    let (t_min, t_max) = (micros("min.event_time")?, micros("max.event_time")?);
    let amount_nulls = i64_col("null_count.amount")?;
    let (a_min, a_max) = (i64_col("min.amount")?, i64_col("max.amount")?);

    let get_i64 = |a: &Option<ArrayRef>, i: usize| -> Option<i64> {
        let a = a.as_ref()?;
        let a = a.as_primitive::<Int64Type>();
        (!a.is_null(i)).then(|| a.value(i))
    };
    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let required_nulls = required.iter().map(|c| get_i64(c, i)).sum::<Option<i64>>();
        files.push(RawFile {
            path: paths.value(i).to_string(),
            event_date: dates.as_ref().and_then(|d| {
                let d = d.as_string::<i32>();
                (!d.is_null(i)).then(|| d.value(i).to_string())
            }),
            event_hour: hours.as_ref().and_then(|h| {
                let h = h.as_primitive::<Int32Type>();
                (!h.is_null(i)).then(|| h.value(i))
            }),
            num_records: get_i64(&records, i),
            required_nulls,
            event_time: get_i64(&t_min, i).zip(get_i64(&t_max, i)),
            amount_nulls: get_i64(&amount_nulls, i),
            amount: get_i64(&a_min, i).zip(get_i64(&a_max, i)),
        });
    }
    Ok(files)
}

/// A column of the add-actions table cast to `to`, or None when absent (no file
/// has that statistic, or the table has no such partition column).
pub(crate) fn column(adds: &RecordBatch, name: &str, to: &DataType) -> Result<Option<ArrayRef>> {
    let Some(c) = adds.column_by_name(name) else {
        return Ok(None);
    };
    let c = if c.data_type() == to {
        c.clone()
    } else {
        cast(c, to).context(format!("reading {name} from a Delta log"))?
    };
    Ok(Some(c))
}

/// A timestamp statistic of the add-actions table as epoch µs integers (null
/// on overflow; statistics come back as timestamps of any unit), or None when
/// absent.
pub(crate) fn micros_column(adds: &RecordBatch, name: &str) -> Result<Option<ArrayRef>> {
    match column(
        adds,
        name,
        &DataType::Timestamp(TimeUnit::Microsecond, None),
    )? {
        Some(a) => Ok(Some(
            cast(&a, &DataType::Int64).context(format!("reading {name}"))?,
        )),
        None => Ok(None),
    }
}

/// Every hour partition that holds files in `files`.
pub fn hours_present(files: &[RawFile]) -> BTreeSet<i64> {
    files.iter().filter_map(RawFile::hour).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_hours_are_exact_utc_hours() {
        let day = parse_ts("2025-11-24T00:00:00Z").unwrap();
        assert_eq!(
            partition_hour("2025-11-24", "3"),
            Some(day + 3 * MICROS_PER_HOUR)
        );
        assert_eq!(partition_hour("2025-11-24", "0"), Some(day));
        assert_eq!(
            partition_hour("1600-01-01", "0"),
            Some(parse_ts("1600-01-01T00:00:00Z").unwrap())
        );
        for (d, h) in [
            ("2025-11-24", "24"),
            ("2025-11-24", "-1"),
            ("2025-11-24", "x"),
            ("2025-11-24T00:00:00Z", "1"),
            ("2025-13-01", "1"),
            ("invalid", "1"),
            ("+10000-01-01", "1"),
            ("", ""),
        ] {
            assert_eq!(partition_hour(d, h), None, "{d} {h}");
        }
    }
}
