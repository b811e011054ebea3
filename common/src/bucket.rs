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

/// The size of a bucket. Only UTC hours and days are implemented; `week` and
/// `month` of the contract come with time zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One UTC hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Granularity {
    /// Every granularity, in the order the API documents them.
    pub const ALL: [Granularity; 2] = [Granularity::Hour, Granularity::Day];

    /// The bucket length in microseconds.
    pub const fn micros(self) -> i64 {
        match self {
            Granularity::Hour => MICROS_PER_HOUR,
            Granularity::Day => MICROS_PER_DAY,
        }
    }

    /// The start of the bucket containing `t`, or None when that start is before
    /// the first instant an `i64` holds (the first bucket-long stretch of
    /// `i64::MIN`, some 290,000 years BC).
    pub const fn checked_floor(self, t: i64) -> Option<i64> {
        t.checked_sub(t.rem_euclid(self.micros()))
    }

    /// The start of the bucket containing `t`. Never overflows: for the few `t`
    /// whose bucket starts before `i64::MIN` ([`Granularity::checked_floor`] is
    /// None) it is the first aligned instant instead. No valid event or request
    /// time comes near (both are years 1970 to 9999).
    pub const fn floor(self, t: i64) -> i64 {
        match self.checked_floor(t) {
            Some(start) => start,
            None => i64::MIN + (self.micros() - i64::MIN.rem_euclid(self.micros())),
        }
    }

    /// Whether `t` is the start of a bucket.
    pub const fn is_aligned(self, t: i64) -> bool {
        t.rem_euclid(self.micros()) == 0
    }

    /// Check that `[start, end)` is whole buckets: both ends aligned, `end`
    /// after `start`. Errors: [`Error::Invalid`] naming the end at fault.
    pub fn check_range(self, start: i64, end: i64) -> Result<()> {
        let g = self.as_str();
        if !self.is_aligned(start) {
            return Err(Error::invalid(format!(
                "`from` {} is not aligned to the {g}",
                format_ts(start)
            )));
        }
        if !self.is_aligned(end) {
            return Err(Error::invalid(format!(
                "`to` {} is not aligned to the {g}",
                format_ts(end)
            )));
        }
        if end <= start {
            return Err(Error::invalid("`to` must be after `from`"));
        }
        Ok(())
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
                "unknown granularity {:?}: use {}",
                clip(other),
                Granularity::ALL
                    .map(|g| format!("{:?}", g.as_str()))
                    .join(" or ")
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
        granularity.check_range(start, end)?;
        let g = granularity.as_str();
        // i128: `end - start` of two arbitrary i64 instants may not fit an i64
        let n = (i128::from(end) - i128::from(start)) / i128::from(granularity.micros());
        if n > i128::from(granularity.max_buckets()) {
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

/// Hours `[start, end)` one by one (`start` floored to its hour), for jobs that
/// walk history. Stepping by addition that stops at `end`, so no instant overflows.
pub fn hours_between(start: i64, end: i64) -> impl Iterator<Item = i64> {
    std::iter::successors(Some(hour_floor(start)), |h| h.checked_add(MICROS_PER_HOUR))
        .take_while(move |h| *h < end)
}

/// Parse an RFC 3339 instant (`2026-11-24T00:00:00Z`, any offset) to epoch
/// microseconds. RFC 3339 years have four digits, so every instant it can write
/// fits (years 0000 to 9999 are about ±2.5·10^17 µs of an i64's ±9.2·10^18).
pub fn parse_ts(s: &str) -> Result<i64> {
    let dt = DateTime::parse_from_rfc3339(s).map_err(|e| {
        Error::invalid(format!(
            "{:?} is not an RFC 3339 time like 2026-11-24T00:00:00Z ({e})",
            clip(s)
        ))
    })?;
    Ok(dt.timestamp_micros())
}

/// At most the first 80 characters of `s`, for echoing caller input in a message.
pub(crate) fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
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
        // the very ends of an i64 floor without overflowing
        for g in Granularity::ALL {
            for t in [i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1] {
                let f = g.floor(t);
                assert!(g.is_aligned(f), "{g:?} {t}");
            }
            assert_eq!(g.checked_floor(i64::MIN), None);
            assert!(i64::MAX - g.floor(i64::MAX) < g.micros());
            assert_eq!(g.checked_floor(i64::MAX), Some(g.floor(i64::MAX)));
        }
    }

    #[test]
    fn ranges_and_walks_of_extreme_instants_do_not_overflow() {
        // a range whose length does not fit an i64 is just too long
        for g in Granularity::ALL {
            let (lo, hi) = (g.floor(i64::MIN), g.floor(i64::MAX));
            let e = BucketRange::new(lo, hi, g).unwrap_err();
            assert!(e.to_string().contains("too long"), "{e}");
            assert!(BucketRange::new(hi, lo, g).is_err());
            assert!(BucketRange::new(hi - g.micros(), hi, g).is_ok());
        }
        let top = hour_floor(i64::MAX);
        assert_eq!(hours_between(top - MICROS_PER_HOUR, i64::MAX).count(), 2);
        // the hour containing an unaligned start is walked, even when it is the end
        assert_eq!(hours_between(i64::MAX, i64::MAX).collect::<Vec<_>>(), [top]);
        assert_eq!(
            hours_between(i64::MIN, i64::MIN + 2 * MICROS_PER_HOUR).count(),
            2
        );
        // years 0000 and 9999, the ends of what RFC 3339 can write
        assert!(ts("0000-01-01T00:00:00Z") < 0);
        assert_eq!(
            format_ts(ts("9999-12-31T23:59:59.999999+00:00")),
            "9999-12-31T23:59:59.999999Z"
        );
        for bad in [
            "+275760-09-13T00:00:00Z",
            "-271821-04-20T00:00:00Z",
            "10000-01-01T00:00:00Z",
        ] {
            assert!(parse_ts(bad).is_err(), "{bad}");
        }
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
