//! Merchants' calendars: the buckets of an hour, day, ISO week or month in an
//! IANA time zone, as epoch-µs instants.
//!
//! Zones come from the IANA tz database as `chrono-tz` embeds it (the same
//! crate Arrow and DataFusion use, so `tally sql`'s `AT TIME ZONE` agrees).
//! A bucket is a calendar unit of the zone's wall clock:
//!
//! - a **day** runs from the first instant of its local date to the first
//!   instant of the next (23 or 25 hours across a DST change; where local
//!   midnight does not exist the day starts when the gap ends, and a date the
//!   zone skipped entirely, like Pacific/Apia's 2011-12-30, has no bucket) —
//!   the rule of ECMAScript Temporal's `ZonedDateTime.startOfDay`;
//! - a **week** is the ISO 8601 week, from the first instant of its Monday;
//! - a **month** from the first instant of its first day;
//! - an **hour** starts at each instant whose wall clock reads `HH:00:00`, and
//!   where a gap ends inside an hour (02:30 after Australia/Lord_Howe's
//!   30-minute spring forward): when clocks fall back an hour the repeated hour
//!   is two buckets (with different offsets), a wall hour skipped whole has
//!   none, and around a 30-minute shift an hour lasts 30 or 90 minutes.
//!
//! Every UTC offset in use since 1972 is a whole number of quarter hours, and
//! transitions happen at quarter hours, so every bucket boundary falls on a
//! 15-minute UTC slot ([`SLOT_MICROS`]): counters kept per slot add up exactly
//! to any bucket of any zone.

use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Days, LocalResult, Months, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    SecondsFormat, TimeDelta, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

use crate::bucket::{MICROS_PER_HOUR, MICROS_PER_SECOND};
use crate::{Error, Result};

/// The storage grain that makes every zone's buckets exact: 15 minutes, in µs.
pub const SLOT_MICROS: i64 = 15 * 60 * MICROS_PER_SECOND;

/// How far a calendar search steps before it gives up: no real zone skips or
/// repeats anywhere near this many units in a row.
const SEARCH_STEPS: u32 = 64;

/// A calendar unit of a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// A local clock hour.
    Hour,
    /// A local date.
    Day,
    /// An ISO 8601 week (Monday to Monday).
    Week,
    /// A calendar month.
    Month,
}

/// A merchant's calendar: an IANA time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    tz: Tz,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar::UTC
    }
}

/// A unit on the wall clock: the local date and hour (for hours) or the local
/// date of its first day (days, weeks, months) that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    unit: Unit,
    wall: NaiveDateTime,
}

impl Key {
    /// The unit `n` units after (negative: before) this one.
    fn step(self, n: i32) -> Key {
        let wall = match self.unit {
            Unit::Hour => self.wall + TimeDelta::hours(i64::from(n)),
            Unit::Day => self.wall + TimeDelta::days(i64::from(n)),
            Unit::Week => self.wall + TimeDelta::days(7 * i64::from(n)),
            Unit::Month if n >= 0 => self.wall + Months::new(n.unsigned_abs()),
            Unit::Month => self.wall - Months::new(n.unsigned_abs()),
        };
        Key { wall, ..self }
    }
}

impl Calendar {
    /// Coordinated Universal Time.
    pub const UTC: Calendar = Calendar { tz: Tz::UTC };

    /// The calendar of an IANA time zone name (`Asia/Kathmandu`, `UTC`; links
    /// such as `US/Eastern` are IANA names too). Errors: [`Error::Invalid`] for
    /// any other text, such as an offset or an abbreviation like `IST`.
    pub fn parse(name: &str) -> Result<Self> {
        // the database also carries a few abbreviation-like legacy names (EST,
        // MST, HST, ...); only Area/Location names and UTC are accepted, so a
        // merchant never picks a fixed offset by accident
        let iana = name == "UTC" || name.contains('/');
        match Tz::from_str(name) {
            Ok(tz) if iana => Ok(Calendar { tz }),
            _ => Err(Error::invalid(format!(
                "{name:?} is not an IANA time zone name (Area/Location, e.g. Europe/Paris, or UTC)"
            ))),
        }
    }

    /// Every zone name [`Calendar::parse`] accepts, sorted.
    pub fn names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = chrono_tz::TZ_VARIANTS
            .iter()
            .map(|tz| tz.name())
            .filter(|n| *n == "UTC" || n.contains('/'))
            .collect();
        names.sort_unstable();
        names
    }

    /// The zone's IANA name.
    pub fn name(&self) -> &'static str {
        self.tz.name()
    }

    /// The zone's offset from UTC at instant `t` (epoch µs), in seconds.
    pub fn offset_secs(&self, t: i64) -> i32 {
        self.tz
            .offset_from_utc_datetime(&instant(t).naive_utc())
            .fix()
            .local_minus_utc()
    }

    /// Instant `t` (epoch µs) as RFC 3339 with the zone's offset at that instant
    /// (`2026-11-24T00:00:00+05:30`; `Z` for UTC), seconds precision.
    pub fn format(&self, t: i64) -> String {
        if self.tz == Tz::UTC {
            return instant(t).to_rfc3339_opts(SecondsFormat::Secs, true);
        }
        instant(t)
            .with_timezone(&self.tz)
            .to_rfc3339_opts(SecondsFormat::Secs, false)
    }

    /// The start of the `unit` bucket that holds instant `t` (epoch µs): the
    /// latest bucket boundary at or before `t`.
    pub fn floor(&self, unit: Unit, t: i64) -> i64 {
        let key = self.key(unit, self.wall(t));
        let latest = |k: Key| {
            self.boundaries(k)
                .into_iter()
                .flatten()
                .filter(|&b| b <= t)
                .max()
        };
        // a fall-back across a boundary can show a wall time of the unit before
        // after the next unit began, so the unit after the wall's is looked at too
        let after = latest(key.step(1));
        let mut k = key;
        for _ in 0..SEARCH_STEPS {
            if let Some(b) = latest(k) {
                return after.map_or(b, |x| x.max(b));
            }
            k = k.step(-1);
        }
        after.unwrap_or(t)
    }

    /// The start of the `unit` bucket after the one that holds `t`: the first
    /// bucket boundary after `t`.
    pub fn next(&self, unit: Unit, t: i64) -> i64 {
        let mut k = self.key(unit, self.wall(t));
        for _ in 0..SEARCH_STEPS {
            if let Some(b) = self
                .boundaries(k)
                .into_iter()
                .flatten()
                .filter(|&b| b > t)
                .min()
            {
                return b;
            }
            k = k.step(1);
        }
        // unreachable for real zones; a plain unit length keeps callers moving
        t + MICROS_PER_HOUR
    }

    /// Whether `t` is the start of a `unit` bucket.
    pub fn is_boundary(&self, unit: Unit, t: i64) -> bool {
        self.floor(unit, t) == t
    }

    /// The `unit` buckets `[start, end)` from `from` up to `to` (both bucket
    /// boundaries, epoch µs), at most `limit` of them. Errors: [`Error::Invalid`]
    /// when `from` or `to` is not a boundary, or the range holds more than
    /// `limit` buckets.
    pub fn buckets(&self, unit: Unit, from: i64, to: i64, limit: usize) -> Result<Vec<(i64, i64)>> {
        for (what, t) in [("from", from), ("to", to)] {
            if !self.is_boundary(unit, t) {
                return Err(Error::invalid(format!(
                    "{what} {} is not the start of a {} in {}",
                    self.format(t),
                    unit.name(),
                    self.name()
                )));
            }
        }
        let mut out = Vec::new();
        let mut s = from;
        while s < to {
            if out.len() == limit {
                return Err(Error::invalid(format!(
                    "the range holds more than {limit} {}s",
                    unit.name()
                )));
            }
            let e = self.next(unit, s);
            out.push((s, e));
            s = e;
        }
        Ok(out)
    }

    /// The first instant (epoch µs) of local date `d`; None when the zone
    /// skipped the whole date.
    pub fn day_start(&self, d: NaiveDate) -> Option<i64> {
        let midnight = d.and_time(NaiveTime::MIN);
        match self.tz.from_local_datetime(&midnight) {
            LocalResult::Single(t) => Some(micros(t)),
            LocalResult::Ambiguous(a, b) => Some(micros(a).min(micros(b))),
            LocalResult::None => {
                let g = self.first_at_or_after(midnight);
                (self.wall(g).date() == d).then_some(g)
            }
        }
    }

    /// The first instant whose wall clock reads `wall` or later, for a `wall`
    /// inside a gap (a time the clocks skipped): the instant the gap ends,
    /// found by bisection to the second over two days around it.
    fn first_at_or_after(&self, wall: NaiveDateTime) -> i64 {
        let guess = wall.and_utc().timestamp_micros();
        let (mut lo, mut hi) = (guess - 48 * MICROS_PER_HOUR, guess + 48 * MICROS_PER_HOUR);
        // invariant: the wall clock reads before `wall` at lo, `wall` or later at hi
        while hi - lo > MICROS_PER_SECOND {
            let mid = lo + (hi - lo) / 2;
            if self.wall(mid) < wall {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi - hi.rem_euclid(MICROS_PER_SECOND)
    }

    fn wall(&self, t: i64) -> NaiveDateTime {
        instant(t).with_timezone(&self.tz).naive_local()
    }

    fn key(&self, unit: Unit, wall: NaiveDateTime) -> Key {
        let d = wall.date();
        let first = match unit {
            Unit::Hour => {
                return Key {
                    unit,
                    wall: d.and_time(NaiveTime::MIN) + TimeDelta::hours(i64::from(wall.hour())),
                }
            }
            Unit::Day => d,
            Unit::Week => d - Days::new(u64::from(d.weekday().num_days_from_monday())),
            Unit::Month => d.with_day(1).unwrap_or(d),
        };
        Key {
            unit,
            wall: first.and_time(NaiveTime::MIN),
        }
    }

    /// The instants at which the unit named by `k` starts: none (skipped), one,
    /// or for an hour repeated by a fall-back two.
    fn boundaries(&self, k: Key) -> [Option<i64>; 2] {
        match k.unit {
            Unit::Hour => match self.tz.from_local_datetime(&k.wall) {
                LocalResult::Single(t) => [Some(micros(t)), None],
                LocalResult::Ambiguous(a, b) => [Some(micros(a)), Some(micros(b))],
                // HH:00 was skipped: the hour starts where the gap ends if that
                // is still within it (02:30 after a 30-minute spring forward),
                // and does not exist if the gap took all of it
                LocalResult::None => {
                    let g = self.first_at_or_after(k.wall);
                    [(self.key(Unit::Hour, self.wall(g)) == k).then_some(g), None]
                }
            },
            _ => [self.day_start(k.wall.date()), None],
        }
    }
}

impl Unit {
    /// Every unit, in the order the API documents them.
    pub const ALL: [Unit; 4] = [Unit::Hour, Unit::Day, Unit::Week, Unit::Month];

    /// The most buckets of this unit one request may ask for: 31 days of hours
    /// (745: a fall-back day repeats one), 366 days, 260 weeks, 120 months.
    pub const fn max_buckets(self) -> usize {
        match self {
            Unit::Hour => 31 * 24 + 1,
            Unit::Day => 366,
            Unit::Week => 260,
            Unit::Month => 120,
        }
    }

    /// The unit's name as the API spells it (`hour`, `day`, `week`, `month`).
    pub fn name(self) -> &'static str {
        match self {
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
        }
    }
}

fn instant(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t).unwrap_or_default()
}

fn micros<T: TimeZone>(t: DateTime<T>) -> i64 {
    t.timestamp_micros()
}

impl FromStr for Unit {
    type Err = Error;

    /// `hour`, `day`, `week` or `month`. Errors: [`Error::Invalid`] naming them.
    fn from_str(s: &str) -> Result<Self> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Unit::ALL
                    .iter()
                    .map(|u| format!("{:?}", u.name()))
                    .collect();
                Error::invalid(format!(
                    "unknown granularity {:?}: use {}",
                    crate::bucket::clip(s),
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::parse_ts;

    fn t(s: &str) -> i64 {
        parse_ts(s).unwrap()
    }

    fn cal(name: &str) -> Calendar {
        Calendar::parse(name).unwrap()
    }

    /// The buckets of `unit` from the one holding `from` to the one holding `to`.
    fn walk(c: &Calendar, unit: Unit, from: &str, to: &str) -> Vec<(String, i64)> {
        let (from, to) = (c.floor(unit, t(from)), c.floor(unit, t(to)));
        let mut out = Vec::new();
        let mut s = from;
        while s <= to {
            let e = c.next(unit, s);
            out.push((c.format(s), (e - s) / 60_000_000));
            s = e;
        }
        out
    }

    #[test]
    fn names_are_iana_names_only() {
        for ok in [
            "UTC",
            "Asia/Kathmandu",
            "America/Argentina/Buenos_Aires",
            "US/Eastern",
        ] {
            assert_eq!(cal(ok).name(), ok);
        }
        for bad in ["", "utc", "EST", "IST", "+05:30", "Mars/Olympus", "Europe/"] {
            let e = Calendar::parse(bad).unwrap_err().to_string();
            assert!(e.contains("IANA"), "{bad}: {e}");
        }
    }

    #[test]
    fn days_across_dst_are_23_and_25_hours() {
        let ny = cal("America/New_York");
        let days = walk(
            &ny,
            Unit::Day,
            "2026-03-07T12:00:00Z",
            "2026-03-09T12:00:00Z",
        );
        assert_eq!(
            days,
            [
                ("2026-03-07T00:00:00-05:00".to_string(), 24 * 60),
                ("2026-03-08T00:00:00-05:00".to_string(), 23 * 60),
                ("2026-03-09T00:00:00-04:00".to_string(), 24 * 60),
            ]
        );
        let days = walk(
            &ny,
            Unit::Day,
            "2026-11-01T12:00:00Z",
            "2026-11-02T12:00:00Z",
        );
        assert_eq!(days[0], ("2026-11-01T00:00:00-04:00".to_string(), 25 * 60));
        assert_eq!(days[1], ("2026-11-02T00:00:00-05:00".to_string(), 24 * 60));
    }

    #[test]
    fn a_repeated_hour_is_two_buckets_and_a_skipped_one_none() {
        let ny = cal("America/New_York");
        let fall = walk(
            &ny,
            Unit::Hour,
            "2026-11-01T04:00:00Z",
            "2026-11-01T07:00:00Z",
        );
        let starts: Vec<&str> = fall.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            starts,
            [
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
        assert!(fall.iter().all(|(_, m)| *m == 60));
        let spring = walk(
            &ny,
            Unit::Hour,
            "2026-03-08T06:00:00Z",
            "2026-03-08T07:00:00Z",
        );
        assert_eq!(
            spring,
            [
                ("2026-03-08T01:00:00-05:00".to_string(), 60),
                ("2026-03-08T03:00:00-04:00".to_string(), 60)
            ]
        );
    }

    #[test]
    fn offsets_that_are_not_whole_hours() {
        assert_eq!(
            cal("Asia/Kathmandu").floor(Unit::Day, t("2026-11-24T03:00:00Z")),
            t("2026-11-23T18:15:00Z")
        );
        assert_eq!(
            cal("Asia/Kolkata").floor(Unit::Hour, t("2026-11-24T03:00:00Z")),
            t("2026-11-24T02:30:00Z")
        );
        assert_eq!(
            cal("Asia/Kolkata").format(t("2026-11-23T18:30:00Z")),
            "2026-11-24T00:00:00+05:30"
        );
        // Lord Howe falls back 30 minutes (02:00+11 -> 01:30+10:30 at 15:00Z):
        // its local 01:00 hour lasts 90 minutes; it springs forward 30 minutes
        // (02:00+10:30 -> 02:30+11 at 15:30Z): an hour from 02:30 of 30 minutes
        let lh = cal("Australia/Lord_Howe");
        let fall = walk(
            &lh,
            Unit::Hour,
            "2026-04-04T13:00:00Z",
            "2026-04-04T15:30:00Z",
        );
        assert_eq!(
            fall,
            [
                ("2026-04-05T00:00:00+11:00".to_string(), 60),
                ("2026-04-05T01:00:00+11:00".to_string(), 90),
                ("2026-04-05T02:00:00+10:30".to_string(), 60)
            ]
        );
        let spring = walk(
            &lh,
            Unit::Hour,
            "2026-10-03T14:30:00Z",
            "2026-10-03T16:00:00Z",
        );
        assert_eq!(
            spring,
            [
                ("2026-10-04T01:00:00+10:30".to_string(), 60),
                ("2026-10-04T02:30:00+11:00".to_string(), 30),
                ("2026-10-04T03:00:00+11:00".to_string(), 60)
            ]
        );
    }

    #[test]
    fn days_whose_midnight_does_not_exist_or_that_were_skipped() {
        // Sao Paulo sprang forward at midnight on 2015-10-18: the day began at 01:00
        let sp = cal("America/Sao_Paulo");
        let d = NaiveDate::from_ymd_opt(2015, 10, 18).unwrap();
        assert_eq!(sp.day_start(d), Some(t("2015-10-18T03:00:00Z")));
        assert_eq!(
            sp.format(t("2015-10-18T03:00:00Z")),
            "2015-10-18T01:00:00-02:00"
        );
        // Samoa skipped 2011-12-30 whole: no bucket, the 29th runs into the 31st
        let apia = cal("Pacific/Apia");
        assert_eq!(
            apia.day_start(NaiveDate::from_ymd_opt(2011, 12, 30).unwrap()),
            None
        );
        let days = walk(
            &apia,
            Unit::Day,
            "2011-12-29T12:00:00Z",
            "2011-12-30T12:00:00Z",
        );
        assert_eq!(
            days,
            [
                ("2011-12-29T00:00:00-10:00".to_string(), 24 * 60),
                ("2011-12-31T00:00:00+14:00".to_string(), 24 * 60)
            ]
        );
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let k = cal("Asia/Kathmandu");
        // Wednesday 2026-11-25 03:00 local
        let w = k.floor(Unit::Week, t("2026-11-24T21:15:00Z"));
        assert_eq!(k.format(w), "2026-11-23T00:00:00+05:45");
        assert_eq!(k.next(Unit::Week, w) - w, 7 * 24 * MICROS_PER_HOUR);
        let m = k.floor(Unit::Month, t("2026-11-24T21:15:00Z"));
        assert_eq!(k.format(m), "2026-11-01T00:00:00+05:45");
        assert_eq!(
            k.format(k.next(Unit::Month, m)),
            "2026-12-01T00:00:00+05:45"
        );
        let ny = cal("America/New_York");
        let march = ny.floor(Unit::Month, t("2026-03-20T00:00:00Z"));
        // 31 days less the hour DST took
        assert_eq!(
            ny.next(Unit::Month, march) - march,
            (31 * 24 - 1) * MICROS_PER_HOUR
        );
        // ISO weeks across a year end: 2027-01-01 is a Friday of week 53 of 2026
        let u = Calendar::UTC;
        assert_eq!(
            u.format(u.floor(Unit::Week, t("2027-01-01T10:00:00Z"))),
            "2026-12-28T00:00:00Z"
        );
    }

    #[test]
    fn buckets_check_alignment_and_limits() {
        let k = cal("Asia/Kolkata");
        let from = t("2026-11-23T18:30:00Z");
        let b = k
            .buckets(Unit::Day, from, from + 3 * 24 * MICROS_PER_HOUR, 366)
            .unwrap();
        assert_eq!(b.len(), 3);
        let e = k
            .buckets(Unit::Day, t("2026-11-24T00:00:00Z"), from, 366)
            .unwrap_err();
        assert!(e.to_string().contains("is not the start of a day"), "{e}");
        let e = k
            .buckets(Unit::Day, from, from + 3 * 24 * MICROS_PER_HOUR, 2)
            .unwrap_err();
        assert!(e.to_string().contains("more than 2 days"), "{e}");
    }

    /// Every boundary falls on a 15-minute slot, so slots add up to buckets.
    #[test]
    fn boundaries_fall_on_slots() {
        for z in ZONES {
            let c = cal(z);
            for unit in [Unit::Hour, Unit::Day] {
                let mut s = c.floor(unit, t("2026-01-01T00:00:00Z"));
                while s < t("2027-01-01T00:00:00Z") {
                    assert_eq!(s.rem_euclid(SLOT_MICROS), 0, "{z} {}", c.format(s));
                    s = c.next(unit, s);
                }
            }
        }
    }

    const ZONES: [&str; 8] = [
        "America/New_York",
        "Europe/London",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "America/St_Johns",
        "UTC",
        "America/Sao_Paulo",
    ];

    /// Python's zoneinfo (its own reading of the system's tz database) scans a
    /// year in 15-minute slots and reports where the local date, or the local
    /// hour, changes or the clock reads HH:00: the boundaries must be equal.
    const PYTHON_BOUNDARIES: &str = r#"
import sys, json, zoneinfo, datetime as dt
zone, year = sys.argv[1], int(sys.argv[2])
z = zoneinfo.ZoneInfo(zone)
t = dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc) - dt.timedelta(days=2)
end = dt.datetime(year + 1, 1, 1, tzinfo=dt.timezone.utc)
prev = None
days, hours = [], []
while t < end:
    w = t.astimezone(z).replace(tzinfo=None)
    if prev is not None:
        if w.date() != prev.date() and w.date() > prev.date():
            days.append(int(t.timestamp()))
        if (w.minute == 0 and w.second == 0) or (w.date(), w.hour) != (prev.date(), prev.hour) and w > prev:
            hours.append(int(t.timestamp()))
    prev = w
    t += dt.timedelta(minutes=15)
print(json.dumps({"day": days, "hour": hours}))
"#;

    #[test]
    fn boundaries_agree_with_python_zoneinfo() {
        for z in ZONES {
            let out = std::process::Command::new("python3")
                .args(["-c", PYTHON_BOUNDARIES, z, "2026"])
                .output()
                .expect("python3 is needed for this test (apt-get install python3 tzdata)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let c = cal(z);
            for (unit, key) in [(Unit::Day, "day"), (Unit::Hour, "hour")] {
                let want: Vec<i64> = want[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap() * MICROS_PER_SECOND)
                    .collect();
                let (first, last) = (want[0], *want.last().unwrap());
                let mut got = vec![first];
                assert_eq!(c.floor(unit, first), first, "{z} {key}");
                while *got.last().unwrap() < last {
                    got.push(c.next(unit, *got.last().unwrap()));
                }
                assert_eq!(got.len(), want.len(), "{z} {key}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(c.format(*g), c.format(*w), "{z} {key}");
                }
            }
        }
    }
}
