//! UTC hour and day buckets: floors, alignment and ranges over epoch microseconds.
//!
//! Every timestamp inside tally is an `i64` count of microseconds since the Unix
//! epoch (UTC), the unit of Delta's `timestamp` type. UTC has no daylight saving
//! and Unix time has no leap seconds, so an hour is always 3,600,000,000 µs and a
//! day 24 of them: bucket arithmetic is plain integer arithmetic, with floor
//! division so instants before 1970 land in the right bucket too.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;
/// Microseconds in one hour.
pub const MICROS_PER_HOUR: i64 = 3_600 * MICROS_PER_SECOND;
/// Microseconds in one day.
pub const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// The size of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One UTC hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Granularity {
    /// The bucket length in microseconds.
    pub const fn micros(self) -> i64 {
        match self {
            Granularity::Hour => MICROS_PER_HOUR,
            Granularity::Day => MICROS_PER_DAY,
        }
    }

    /// The start of the bucket containing `t`.
    pub const fn floor(self, t: i64) -> i64 {
        t.div_euclid(self.micros()) * self.micros()
    }

    /// Whether `t` is the start of a bucket.
    pub const fn is_aligned(self, t: i64) -> bool {
        t.rem_euclid(self.micros()) == 0
    }

    /// The longest range the API serves at this granularity (31 days of hours, 366 days of days).
    pub const fn max_buckets(self) -> i64 {
        match self {
            Granularity::Hour => 31 * 24,
            Granularity::Day => 366,
        }
    }

    /// The granularity's name as the API spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            other => Err(Error::invalid(format!(
                "unknown granularity {other:?}: use \"hour\" or \"day\""
            ))),
        }
    }
}

/// The start of the UTC hour containing `t`.
pub const fn hour_floor(t: i64) -> i64 {
    Granularity::Hour.floor(t)
}

/// The start of the UTC day containing `t`.
pub const fn day_floor(t: i64) -> i64 {
    Granularity::Day.floor(t)
}

/// A half-open range `[start, end)` of aligned buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRange {
    /// Start of the first bucket (inclusive).
    pub start: i64,
    /// End of the last bucket (exclusive).
    pub end: i64,
    /// Bucket size.
    pub granularity: Granularity,
}

impl BucketRange {
    /// A range from `start` (inclusive) to `end` (exclusive), both aligned, non-empty
    /// and at most [`Granularity::max_buckets`] long.
    pub fn new(start: i64, end: i64, granularity: Granularity) -> Result<Self> {
        let g = granularity.as_str();
        if !granularity.is_aligned(start) {
            return Err(Error::invalid(format!(
                "`from` {} is not aligned to the {g}",
                format_ts(start)
            )));
        }
        if !granularity.is_aligned(end) {
            return Err(Error::invalid(format!(
                "`to` {} is not aligned to the {g}",
                format_ts(end)
            )));
        }
        if end <= start {
            return Err(Error::invalid("`to` must be after `from`"));
        }
        let n = (end - start) / granularity.micros();
        if n > granularity.max_buckets() {
            return Err(Error::invalid(format!(
                "range of {n} {g}s is too long: at most {} {g}s per request",
                granularity.max_buckets()
            )));
        }
        Ok(BucketRange {
            start,
            end,
            granularity,
        })
    }

    /// Number of buckets in the range.
    pub fn len(&self) -> usize {
        ((self.end - self.start) / self.granularity.micros()) as usize
    }

    /// Whether the range has no bucket (never true for a range made by [`BucketRange::new`]).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The start of every bucket, in order.
    pub fn starts(&self) -> impl Iterator<Item = i64> + '_ {
        let step = self.granularity.micros();
        (0..self.len() as i64).map(move |i| self.start + i * step)
    }
}

/// Hours `[start, end)` one by one (both floored to hours), for jobs that walk history.
pub fn hours_between(start: i64, end: i64) -> impl Iterator<Item = i64> {
    let first = hour_floor(start);
    let n = if end > first {
        (end - first + MICROS_PER_HOUR - 1) / MICROS_PER_HOUR
    } else {
        0
    };
    (0..n).map(move |i| first + i * MICROS_PER_HOUR)
}

/// Parse an RFC 3339 instant (`2026-11-24T00:00:00Z`, any offset) to epoch microseconds.
pub fn parse_ts(s: &str) -> Result<i64> {
    let dt = DateTime::parse_from_rfc3339(s).map_err(|e| {
        Error::invalid(format!(
            "{s:?} is not an RFC 3339 time like 2026-11-24T00:00:00Z ({e})"
        ))
    })?;
    Ok(dt.timestamp_micros())
}

/// Format epoch microseconds as RFC 3339 UTC with a `Z` suffix and no needless fraction.
pub fn format_ts(t: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(t) {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => format!("@{t}µs"),
    }
}

/// The UTC calendar date of `t` as `YYYY-MM-DD` (the `event_date` / `date` partition value).
pub fn date_string(t: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(t) {
        Some(dt) => dt.format("%Y-%m-%d").to_string(),
        None => "invalid".to_string(),
    }
}

/// The UTC month of `t` as `YYYY-MM` (the `month` partition value of `metrics_daily`).
pub fn month_string(t: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(t) {
        Some(dt) => dt.format("%Y-%m").to_string(),
        None => "invalid".to_string(),
    }
}

/// The hour of day (0–23, UTC) of `t`.
pub const fn hour_of_day(t: i64) -> i32 {
    (t.rem_euclid(MICROS_PER_DAY) / MICROS_PER_HOUR) as i32
}

/// The current time in epoch microseconds.
pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        parse_ts(s).unwrap()
    }

    #[test]
    fn floors_at_month_year_and_leap_day_ends() {
        assert_eq!(
            hour_floor(ts("2024-02-29T23:59:59.999999Z")),
            ts("2024-02-29T23:00:00Z")
        );
        assert_eq!(
            day_floor(ts("2024-02-29T23:59:59.999999Z")),
            ts("2024-02-29T00:00:00Z")
        );
        assert_eq!(
            day_floor(ts("2024-03-01T00:00:00Z")),
            ts("2024-03-01T00:00:00Z")
        );
        assert_eq!(
            day_floor(ts("2026-12-31T23:30:00Z")) + MICROS_PER_DAY,
            ts("2027-01-01T00:00:00Z")
        );
        assert_eq!(date_string(ts("2024-02-29T12:00:00Z")), "2024-02-29");
        assert_eq!(month_string(ts("2026-12-31T23:59:59Z")), "2026-12");
        assert_eq!(hour_of_day(ts("2026-12-31T23:59:59Z")), 23);
        // an offset is converted to UTC before bucketing
        assert_eq!(
            hour_floor(ts("2026-01-01T00:30:00+01:00")),
            ts("2025-12-31T23:00:00Z")
        );
        assert_eq!(date_string(ts("2026-01-01T00:30:00+01:00")), "2025-12-31");
    }

    #[test]
    fn floors_before_the_epoch_and_at_extremes() {
        assert_eq!(hour_floor(-1), -MICROS_PER_HOUR);
        assert_eq!(day_floor(-1), -MICROS_PER_DAY);
        assert_eq!(hour_floor(0), 0);
        assert_eq!(hour_floor(MICROS_PER_HOUR - 1), 0);
        // epoch milliseconds at the edge of what an i64 of micros holds
        let max_ms = i64::MAX / 1000;
        let t = max_ms * 1000;
        assert!(hour_floor(t) <= t && t - hour_floor(t) < MICROS_PER_HOUR);
        assert!(Granularity::Hour.is_aligned(hour_floor(i64::MIN / 2)));
    }

    #[test]
    fn ranges_check_alignment_order_and_length() {
        let d = ts("2024-02-28T00:00:00Z");
        let r = BucketRange::new(d, d + 2 * MICROS_PER_DAY, Granularity::Day).unwrap();
        let starts: Vec<_> = r.starts().map(date_string).collect();
        assert_eq!(starts, ["2024-02-28", "2024-02-29"]);
        assert!(BucketRange::new(d + 1, d + MICROS_PER_DAY, Granularity::Day).is_err());
        assert!(BucketRange::new(d, d + MICROS_PER_HOUR, Granularity::Day).is_err());
        assert!(BucketRange::new(d, d, Granularity::Hour).is_err());
        assert!(BucketRange::new(d + MICROS_PER_HOUR, d, Granularity::Hour).is_err());
        assert!(BucketRange::new(d, d + 31 * MICROS_PER_DAY, Granularity::Hour).is_ok());
        assert!(BucketRange::new(
            d,
            d + 31 * MICROS_PER_DAY + MICROS_PER_HOUR,
            Granularity::Hour
        )
        .is_err());
        assert!(BucketRange::new(d, d + 366 * MICROS_PER_DAY, Granularity::Day).is_ok());
        assert!(BucketRange::new(d, d + 367 * MICROS_PER_DAY, Granularity::Day).is_err());
        let r = BucketRange::new(d, d + 3 * MICROS_PER_HOUR, Granularity::Hour).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.starts().last(), Some(d + 2 * MICROS_PER_HOUR));
    }

    #[test]
    fn year_end_day_range_crosses_into_the_new_year() {
        let d = ts("2026-12-30T00:00:00Z");
        let r = BucketRange::new(d, d + 3 * MICROS_PER_DAY, Granularity::Day).unwrap();
        let starts: Vec<_> = r.starts().map(date_string).collect();
        assert_eq!(starts, ["2026-12-30", "2026-12-31", "2027-01-01"]);
    }

    #[test]
    fn hours_between_covers_partial_hours() {
        let h = ts("2026-11-24T10:00:00Z");
        let v: Vec<_> = hours_between(h + 5, h + 2 * MICROS_PER_HOUR + 1).collect();
        assert_eq!(v, [h, h + MICROS_PER_HOUR, h + 2 * MICROS_PER_HOUR]);
        assert_eq!(hours_between(h, h).count(), 0);
    }

    #[test]
    fn formats_round_trip() {
        for s in [
            "2026-11-24T00:00:00Z",
            "2024-02-29T23:00:00Z",
            "1969-12-31T23:00:00Z",
        ] {
            assert_eq!(format_ts(ts(s)), s);
        }
        assert!(parse_ts("2026-11-24 00:00").is_err());
        assert_eq!("hour".parse::<Granularity>().unwrap(), Granularity::Hour);
        assert!("week".parse::<Granularity>().is_err());
    }
}
