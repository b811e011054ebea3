//! A run's plan: what it computes, split into items that run anywhere (side by
//! side in one process with `--jobs`, or as the items of Step Functions'
//! distributed Map, one Lambda invocation each), and what its publish step
//! commits. The plan is staged as JSON ([`crate::stage`]) so that every
//! process computing an item, and the publishing one, work from the same
//! snapshot versions and the same `computed_at`.
//!
//! Items come in two waves: [`Item::Hour`] parts first (each writes its share
//! of the hour's `customer_hours` rows and of its `metrics_hourly` rows), then
//! [`Item::Day`] parts (each computes its share of a complete day's
//! `metrics_daily` rows from the day's `customer_hours` rows, those just
//! written by the hour items and those stored for the other hours: the day's
//! raw rows are not read a second time).

use std::collections::{BTreeMap, BTreeSet};

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::DeltaTable;
use serde::{Deserialize, Serialize};
use tally_common::bucket::{day_floor, MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::{Context as _, Result};

use crate::dirty::{column, micros_column};
use crate::parts::Parts;

/// One unit of a run's computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    /// Part `part` of `parts` of one UTC hour (`hour`, epoch µs): its
    /// `customer_hours` rows, written to the table's directory uncommitted,
    /// and its share of the hour's `metrics_hourly` rows, staged.
    Hour {
        /// Start of the hour, epoch µs.
        hour: i64,
        /// This part, `0..parts`.
        part: u32,
        /// Parts of the hour.
        parts: u32,
    },
    /// Part `part` of `parts` of one complete UTC day (`day`, epoch µs): its
    /// share of the day's `metrics_daily` rows, staged.
    Day {
        /// Start of the day, epoch µs.
        day: i64,
        /// This part, `0..parts`.
        part: u32,
        /// Parts of the day.
        parts: u32,
    },
}

/// Where a run moves the batch layer's marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// Hours starting before this are closed (epoch µs).
    pub closed_end: i64,
    /// The watermark after the run (a reprocessing run leaves it as it is).
    pub watermark: Option<i64>,
    /// In an hourly run, the day before which every day with data has its daily
    /// row after the run (`metrics_daily`'s mark); None when reprocessing.
    pub daily_through: Option<i64>,
}

impl Marks {
    /// Whether the day starting at `day` is complete as far as this run goes:
    /// before the daily mark in an hourly run, wholly closed when reprocessing.
    pub fn day_complete(&self, day: i64) -> bool {
        match self.daily_through {
            Some(through) => day < through,
            None => day + MICROS_PER_DAY <= self.closed_end,
        }
    }
}

/// A planned run: everything its items and its publish step need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The run's id: its staging area and the `tally.run` of its commits.
    pub run_id: String,
    /// `[from, to)` (epoch µs) when reprocessing; None for an hourly run.
    pub reprocess: Option<(i64, i64)>,
    /// What every row written says it was computed at (epoch µs).
    pub computed_at: i64,
    /// The `raw_events` version computed from (-1: no table yet).
    pub raw_version: i64,
    /// The `metrics_hourly` version planned against (None: empty table):
    /// publishing after another run published fails with a conflict.
    pub hourly_version: Option<i64>,
    /// The `customer_hours` version whose files the day items read.
    pub customer_hours_version: Option<i64>,
    /// The watermark before the run.
    pub watermark_before: Option<i64>,
    /// The raw version the last hourly run processed.
    pub raw_version_before: Option<i64>,
    /// `metrics_daily`'s mark before the run.
    pub daily_mark_before: Option<i64>,
    /// Where the run moves the marks.
    pub marks: Marks,
    /// Hours recomputed (epoch µs), ascending.
    pub hours: Vec<i64>,
    /// Complete days whose daily rows are recomputed (epoch µs), ascending.
    pub days: Vec<i64>,
    /// Days whose raw partitions are compacted after publishing.
    pub compact_days: Vec<i64>,
    /// The items: the hours' parts, then the days'.
    pub items: Vec<Item>,
    /// Rows moved to quarantine while planning (a dry run: rows it would move).
    pub quarantined: u64,
    /// Dates (epoch µs of their start) whose `customer_hours` files holding
    /// several hours (written outside tally, e.g. by an OPTIMIZE) this run
    /// replaces: every hour of such a date with raw data is recomputed, and
    /// its day's items read none of those files.
    #[serde(default)]
    pub rewritten_dates: Vec<i64>,
}

impl Plan {
    /// The hours recomputed on `day`.
    pub fn hours_of(&self, day: i64) -> Vec<i64> {
        self.hours
            .iter()
            .copied()
            .filter(|&h| day_floor(h) == day)
            .collect()
    }

    /// The hours recomputed, by day.
    pub fn hours_by_day(&self) -> BTreeMap<i64, Vec<i64>> {
        let mut by_day: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for &h in &self.hours {
            by_day.entry(day_floor(h)).or_default().push(h);
        }
        by_day
    }

    /// Whether the `customer_hours` file `f` is superseded by this run: it
    /// holds one of the recomputed hours, or several hours of a rewritten date.
    pub fn supersedes(&self, f: &CustomerHoursFile) -> bool {
        match f.hour {
            Some(h) => self.hours.binary_search(&h).is_ok(),
            None => self
                .rewritten_dates
                .iter()
                .any(|&d| tally_common::bucket::date_string(d) == f.date),
        }
    }

    /// Indices of the hour items (the first wave) and the day items (the second).
    pub fn waves(&self) -> (Vec<usize>, Vec<usize>) {
        (0..self.items.len()).partition(|&i| matches!(self.items[i], Item::Hour { .. }))
    }
}

/// The items of `hours` and `days`: each split into parts by `parts`, from the
/// raw rows (`rows_by_hour`, from the Delta log) it reads.
pub fn plan_items(
    hours: &BTreeSet<i64>,
    days: &BTreeSet<i64>,
    rows_by_hour: &BTreeMap<i64, u64>,
    parts: Parts,
) -> Vec<Item> {
    let rows = |h: &i64| rows_by_hour.get(h).copied().unwrap_or(0);
    let mut items = Vec::new();
    for &hour in hours {
        let n = parts.for_rows(rows(&hour));
        items.extend((0..n).map(|part| Item::Hour {
            hour,
            part,
            parts: n,
        }));
    }
    for &day in days {
        let day_rows = (0..24).map(|k| rows(&(day + k * MICROS_PER_HOUR))).sum();
        let n = parts.for_rows(day_rows);
        items.extend((0..n).map(|part| Item::Day {
            day,
            part,
            parts: n,
        }));
    }
    items
}

/// One file of `customer_hours`, as its Delta log describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerHoursFile {
    /// Path relative to the table root (as in the log).
    pub path: String,
    /// The `date` partition value.
    pub date: String,
    /// Size in bytes.
    pub size: i64,
    /// The hour its rows hold (epoch µs), from the statistics; every file the
    /// batch layer writes holds one hour. None when min and max differ or are
    /// missing.
    pub hour: Option<i64>,
}

/// The files of `customer_hours` at its loaded version.
pub fn customer_hours_files(table: &DeltaTable) -> Result<Vec<CustomerHoursFile>> {
    let Ok(state) = table.snapshot() else {
        return Ok(Vec::new());
    };
    let adds = state
        .add_actions_table(true)
        .context("listing customer_hours files")?;
    let Some(paths) = column(&adds, "path", &DataType::Utf8)? else {
        return Ok(Vec::new());
    };
    let paths = paths.as_string::<i32>();
    let dates = column(&adds, "partition.date", &DataType::Utf8)?;
    let sizes = column(&adds, "size_bytes", &DataType::Int64)?;
    let (lo, hi) = (
        micros_column(&adds, "min.hour")?,
        micros_column(&adds, "max.hour")?,
    );
    let get = |a: &Option<deltalake::arrow::array::ArrayRef>, i: usize| -> Option<i64> {
        let a = a.as_ref()?.as_primitive::<Int64Type>();
        (!a.is_null(i)).then(|| a.value(i))
    };
    Ok((0..paths.len())
        .map(|i| {
            let (l, h) = (get(&lo, i), get(&hi, i));
            CustomerHoursFile {
                path: paths.value(i).to_string(),
                date: dates
                    .as_ref()
                    .map(|d| d.as_string::<i32>())
                    .filter(|d| !d.is_null(i))
                    .map(|d| d.value(i).to_string())
                    .unwrap_or_default(),
                size: get(&sizes, i).unwrap_or(0),
                hour: l.filter(|&l| Some(l) == h),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_split_hours_then_days() {
        let h0 = 1_795_478_400_000_000;
        let hours: BTreeSet<i64> = [h0, h0 + MICROS_PER_HOUR].into();
        let days: BTreeSet<i64> = [h0].into();
        let rows: BTreeMap<i64, u64> = [(h0, 45_000_000)].into();
        let items = plan_items(&hours, &days, &rows, Parts::default());
        // 45 M rows: 3 parts of the first hour, 1 of the second, 3 of the day
        assert_eq!(items.len(), 7);
        assert_eq!(
            items[0],
            Item::Hour {
                hour: h0,
                part: 0,
                parts: 3
            }
        );
        assert!(matches!(items[3], Item::Hour { parts: 1, .. }));
        assert!(matches!(
            items[6],
            Item::Day {
                part: 2,
                parts: 3,
                ..
            }
        ));
        let json = serde_json::to_value(items[6]).unwrap();
        assert_eq!(json["kind"], "day");
    }
}
