//! The metrics endpoint's request, parsed and validated from the merchant id of
//! the path and the raw query string, before anything is read. A pure function
//! of its input (fuzzed: `fuzz/fuzz_targets/metrics_query.rs`), so every
//! malformed request is a clear 400 and never a panic.
//!
//! The rules are stated once here and published as-is in the OpenAPI document
//! (`serving-layer/src/openapi.rs` reads the constants below), so a client
//! generated from the document sends exactly what this parser accepts: the
//! patterns are checked here by hand, character class by character class, and
//! a unit test holds the two together.

use crate::bucket::{clip, parse_ts};
use crate::calendar::{Calendar, Unit};
use crate::decode::is_valid_merchant_id;
use crate::metrics::{parse_metric_list, Metric, METRICS};
use crate::{Error, Result};

/// The query parameters of the metrics endpoint; any other is a 400.
pub const KNOWN_PARAMETERS: [&str; 5] = ["from", "to", "granularity", "metrics", "tz"];

/// The merchant id of the path (the event rule: 1–64 of `[A-Za-z0-9_.:-]`).
pub const MERCHANT_ID_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,64}$";

/// `from` and `to`: an RFC 3339 instant written with a year from
/// [`FIRST_YEAR`] to [`LAST_YEAR`], an upper-case `T`, seconds 00–59, at most
/// nine fraction digits, and `Z` or a `±hh:mm` offset.
pub const INSTANT_PATTERN: &str = "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// The first year `from` and `to` may be written with: no event is older than 1970.
pub const FIRST_YEAR: u32 = 1970;
/// The last year `from` and `to` may be written with (RFC 3339 has four-digit years).
pub const LAST_YEAR: u32 = 9999;

/// A valid request of one merchant's metrics. Whether `from` and `to` are
/// bucket boundaries depends on the zone, which may be the merchant's own
/// setting: [`MetricsRequest::buckets`] checks that once the zone is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsRequest {
    /// Range start (inclusive), epoch µs.
    pub from: i64,
    /// Range end (exclusive), epoch µs.
    pub to: i64,
    /// The bucket unit (default `hour`).
    pub granularity: Unit,
    /// `tz=`: the zone for this request, overriding the merchant's.
    pub time_zone: Option<Calendar>,
    /// The metrics asked for, in API order.
    pub metrics: Vec<Metric>,
}

impl MetricsRequest {
    /// The buckets `[start, end)` of the range in `calendar`. Errors:
    /// [`Error::Invalid`] when `from` or `to` is not a bucket boundary there,
    /// `to` is not after `from`, or the range holds more buckets than the
    /// unit allows ([`Unit::max_buckets`]).
    pub fn buckets(&self, calendar: &Calendar) -> Result<Vec<(i64, i64)>> {
        if self.to <= self.from {
            return Err(Error::invalid("`to` must be after `from`"));
        }
        calendar.buckets(
            self.granularity,
            self.from,
            self.to,
            self.granularity.max_buckets(),
        )
    }
}

/// `metrics`: a comma-separated list of known metric names, no spaces.
pub fn metrics_pattern() -> String {
    let names: Vec<&str> = METRICS.iter().map(|d| d.name).collect();
    let one = format!("({})", names.join("|"));
    format!("^{one}(,{one})*$")
}

/// Parse `merchant` and `query` (`from`, `to`, `granularity`, `metrics`, `tz`).
/// An unknown or repeated parameter is an error, never ignored.
pub fn parse_metrics_request(merchant: &str, query: Option<&str>) -> Result<MetricsRequest> {
    if !is_valid_merchant_id(merchant) {
        return Err(Error::invalid(
            "merchant_id must be 1-64 characters of letters, digits and _ . : -",
        ));
    }
    let mut from = None;
    let mut to = None;
    let mut granularity = None;
    let mut metrics = None;
    let mut tz = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match key.as_ref() {
            "from" => &mut from,
            "to" => &mut to,
            "granularity" => &mut granularity,
            "metrics" => &mut metrics,
            "tz" => &mut tz,
            other => {
                return Err(Error::invalid(format!(
                    "unknown query parameter {:?}: the parameters are {}",
                    clip(other),
                    KNOWN_PARAMETERS.join(", ")
                )))
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(Error::invalid(format!(
                "malformed query string: `{key}` is given more than once"
            )));
        }
    }
    let time_zone = tz
        .map(|tz| {
            Calendar::parse(&tz).map_err(|_| {
                Error::invalid(format!(
                    "unknown time zone {:?}: use an IANA name such as Asia/Kolkata or UTC",
                    clip(&tz)
                ))
            })
        })
        .transpose()?;
    let from = parse_instant("from", from)?;
    let to = parse_instant("to", to)?;
    let granularity: Unit = granularity.as_deref().unwrap_or("hour").parse()?;
    if to <= from {
        return Err(Error::invalid("`to` must be after `from`"));
    }
    // the exact count needs the zone ([`MetricsRequest::buckets`]); a range
    // longer than the longest such units can be refused already
    let longest = match granularity {
        Unit::Hour => 2 * 3_600_000_000,
        Unit::Day => 25 * 3_600_000_000,
        Unit::Week => 7 * 24 * 3_600_000_000 + 3_600_000_000,
        Unit::Month => 31 * 24 * 3_600_000_000 + 3_600_000_000,
    };
    if (to - from) / longest > granularity.max_buckets() as i64 {
        return Err(Error::invalid(format!(
            "the range is too long: at most {} {}s",
            granularity.max_buckets(),
            granularity.name()
        )));
    }
    let metrics = parse_metric_list(metrics.as_deref())?;
    Ok(MetricsRequest {
        from,
        to,
        granularity,
        time_zone,
        metrics,
    })
}

/// `from` or `to`: required, of [`INSTANT_PATTERN`], and a real date and time.
fn parse_instant(name: &str, value: Option<String>) -> Result<i64> {
    let value = value.ok_or_else(|| Error::invalid(format!("`{name}` is required (RFC 3339)")))?;
    if let Some(year) = value.get(..4).and_then(|y| y.parse::<u32>().ok()) {
        if value.as_bytes().get(4) == Some(&b'-') && !(FIRST_YEAR..=LAST_YEAR).contains(&year) {
            return Err(Error::invalid(format!(
                "`{name}` {:?} is out of range: years {FIRST_YEAR} to {LAST_YEAR} are served",
                clip(&value)
            )));
        }
    }
    if !is_instant(&value) {
        return Err(Error::invalid(format!(
            "`{name}` {:?} is not an RFC 3339 time like 2026-11-24T00:00:00Z (years \
             {FIRST_YEAR} to {LAST_YEAR}, upper-case T, Z or a ±hh:mm offset)",
            clip(&value)
        )));
    }
    parse_ts(&value).map_err(|_| {
        Error::invalid(format!(
            "`{name}` {:?} is not a real date and time",
            clip(&value)
        ))
    })
}

/// Whether `s` matches [`INSTANT_PATTERN`].
fn is_instant(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .map(|d| d.iter().fold(0u32, |n, &c| n * 10 + u32::from(c - b'0')))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return false;
    };
    let separators = at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':');
    let fields = (FIRST_YEAR..=LAST_YEAR).contains(&year)
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 59;
    if !(separators && fields) {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return false;
        }
        i += 1 + n;
    }
    match b.get(i..) {
        Some(b"Z") => true,
        Some([b'+' | b'-', ..]) if b.len() == i + 6 => {
            matches!(
                (digits(i + 1..i + 3), digits(i + 4..i + 6)),
                (Some(h), Some(m)) if h <= 23 && m <= 59
            ) && at(i + 3, b':')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OK: &str = "from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z";

    /// The 400's message of a request, whether the parser or the bucket check
    /// (in its `tz`, else UTC) refuses it.
    fn refusal(merchant: &str, query: &str) -> String {
        let checked = parse_metrics_request(merchant, Some(query)).and_then(|r| {
            r.buckets(&r.time_zone.unwrap_or_default())?;
            Ok(r)
        });
        match checked {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("{merchant}?{query}: {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_parses() {
        let r = parse_metrics_request(
            "m_1",
            Some("from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z&granularity=hour&metrics=orders,net_sales&tz=UTC"),
        )
        .unwrap();
        assert_eq!(r.granularity, Unit::Hour);
        assert_eq!(r.to - r.from, 24 * 3_600_000_000);
        assert_eq!(r.metrics, [Metric::Orders, Metric::NetSales]);
        assert_eq!(r.time_zone, Some(Calendar::UTC));
        assert_eq!(r.buckets(&Calendar::UTC).unwrap().len(), 24);
        // offsets, fractions and both ends of the years served
        for query in [
            "from=2026-11-24T05:30:00%2B05:30&to=2026-11-24T01:00:00.000000000Z",
            "from=1970-01-01T00:00:00Z&to=1970-01-01T01:00:00Z",
            "from=9999-12-31T22:00:00Z&to=9999-12-31T23:00:00Z&granularity=hour",
            "from=9999-12-30T00:00:00Z&to=9999-12-31T00:00:00Z&granularity=day",
            // written in 1970, an instant of 1969: allowed, it is just empty
            "from=1970-01-01T00:00:00%2B01:00&to=1970-01-01T00:00:00Z",
            "from=2026-11-23T18:15:00Z&to=2026-11-24T18:15:00Z&granularity=day&tz=Asia/Kathmandu",
            "from=2026-11-02T00:00:00Z&to=2026-11-30T00:00:00Z&granularity=week",
            "from=2025-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&granularity=month",
        ] {
            let r = parse_metrics_request("m_1", Some(query)).expect(query);
            r.buckets(&r.time_zone.unwrap_or_default()).expect(query);
        }
    }

    #[test]
    fn malformed_requests_are_invalid_input() {
        for (merchant, query) in [
            ("m 1", OK),
            ("m_1", ""),
            ("m_1", "from=2026-11-24T00:00:00Z"),
            ("m_1", "from=2026-11-24T00:30:00Z&to=2026-11-25T00:00:00Z"),
            (
                "m_1",
                "from=2026-11-24T00:00:00Z&to=2026-11-24T00:00:00Z&from=x",
            ),
            ("m_1", &format!("{OK}&granularity=week")),
            ("m_1", &format!("{OK}&granularity=day&tz=Asia/Kolkata")),
            ("m_1", &format!("{OK}&granularity=")),
            ("m_1", &format!("{OK}&metrics=orders,bogus")),
            ("m_1", &format!("{OK}&metrics=")),
            ("m_1", &format!("{OK}&metrics=orders,,net_sales")),
            ("m_1", &format!("{OK}&metrics=orders,%20net_sales")),
            ("m_1", "from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z"),
            ("m_1", "from=%FF%FE&to=%00"),
            // shapes chrono would take but the document does not describe
            ("m_1", "from=2026-11-24t00:00:00z&to=2026-11-25T00:00:00Z"),
            ("m_1", "from=2026-11-24 00:00:00Z&to=2026-11-25T00:00:00Z"),
            ("m_1", "from=2026-11-23T23:59:60Z&to=2026-11-25T00:00:00Z"),
            (
                "m_1",
                "from=2026-11-24T00:00:00.0000000000Z&to=2026-11-25T00:00:00Z",
            ),
            ("m_1", "from=2026-11-24T00:00:00.Z&to=2026-11-25T00:00:00Z"),
            (
                "m_1",
                "from=2026-11-24T00:00:00%2B0000&to=2026-11-25T00:00:00Z",
            ),
            (
                "m_1",
                "from=2026-11-24T00:00:00Z%0A&to=2026-11-25T00:00:00Z",
            ),
            (
                "m_1",
                "from=%EF%BC%92026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z",
            ),
            // not a real day
            ("m_1", "from=2026-02-29T00:00:00Z&to=2026-03-01T00:00:00Z"),
            ("m_1", "from=2026-04-31T00:00:00Z&to=2026-05-01T00:00:00Z"),
        ] {
            refusal(merchant, query);
        }
    }

    #[test]
    fn unknown_parameters_and_time_zones_are_refused_not_ignored() {
        let msg = refusal("m_1", &format!("{OK}&x=1"));
        assert!(msg.contains("unknown query parameter \"x\""), "{msg}");
        let msg = refusal("m_1", &format!("{OK}&tz=Europe/Pariss"));
        assert!(msg.contains("unknown time zone \"Europe/Pariss\""), "{msg}");
        for tz in ["", "utc", "Z", "%2B00:00", "IST", "EST"] {
            refusal("m_1", &format!("{OK}&tz={tz}"));
        }
        let msg = refusal("m_1", &format!("{OK}&tz=UTC&tz=UTC"));
        assert!(msg.contains("more than once"), "{msg}");
        // a parameter with no `=` is still a parameter (an empty `&&` is no parameter)
        refusal("m_1", &format!("{OK}&verbose"));
        assert!(parse_metrics_request("m_1", Some(&format!("&{OK}&&"))).is_ok());
    }

    #[test]
    fn instants_far_from_now_are_400_with_a_clear_message() {
        for (from, to) in [
            ("1600-01-01T00:00:00Z", "1600-01-02T00:00:00Z"),
            ("0000-01-01T00:00:00Z", "0000-01-01T01:00:00Z"),
            ("1969-12-31T00:00:00Z", "1970-01-01T00:00:00Z"),
            ("9999-12-31T23:00:00Z", "10000-01-01T00:00:00Z"),
            ("%2B275760-09-13T00:00:00Z", "%2B275760-09-13T01:00:00Z"),
            ("-271821-04-20T00:00:00Z", "-271821-04-20T01:00:00Z"),
            ("-9223372036854775808", "9223372036854775807"),
            ("99999999999999999999", "1"),
        ] {
            let msg = refusal("m_1", &format!("from={from}&to={to}&granularity=day"));
            assert!(
                msg.contains("out of range") || msg.contains("not an RFC 3339 time"),
                "{from} {to}: {msg}"
            );
        }
        let msg = refusal("m_1", "from=1600-01-01T00:00:00Z&to=1600-01-02T00:00:00Z");
        assert!(msg.contains("years 1970 to 9999 are served"), "{msg}");
        // the widest range there is: both ends valid, far too long
        let msg = refusal(
            "m_1",
            "from=1970-01-01T00:00:00Z&to=9999-12-31T00:00:00Z&granularity=day",
        );
        assert!(msg.contains("too long"), "{msg}");
        let msg = refusal(
            "m_1",
            "from=9999-12-31T00:00:00Z&to=1970-01-01T00:00:00Z&granularity=day",
        );
        assert!(msg.contains("after"), "{msg}");
    }

    proptest! {
        /// Everything the documented pattern describes is taken (once it is a real
        /// date and time): the document never promises what the parser refuses.
        #[test]
        fn the_instant_pattern_and_the_parser_agree(
            s in proptest::string::string_regex(
                INSTANT_PATTERN.trim_start_matches('^').trim_end_matches('$')
            ).unwrap()
        ) {
            prop_assert!(is_instant(&s), "{}", s);
            let real = chrono::DateTime::parse_from_rfc3339(&s).is_ok();
            prop_assert_eq!(parse_instant("from", Some(s.clone())).is_ok(), real, "{}", s);
        }

        #[test]
        fn the_metrics_pattern_and_the_parser_agree(
            s in proptest::string::string_regex(
                metrics_pattern().trim_start_matches('^').trim_end_matches('$')
            ).unwrap()
        ) {
            prop_assert!(parse_metric_list(Some(&s)).is_ok(), "{}", s);
        }
    }

    /// Inputs the fuzzer found or that are kept for it: each must give an answer,
    /// not a panic, and what is accepted must be a valid range of the years served.
    #[test]
    fn fuzz_regressions() {
        let dir = crate::test_crate_dir().join("../fuzz/regressions/metrics_query");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            let text = String::from_utf8_lossy(&data);
            let (merchant, query) = text.split_once('?').unwrap_or((&text, ""));
            if let Ok(r) = parse_metrics_request(merchant, Some(query)) {
                assert!(r.from < r.to);
                assert!(r.from >= parse_ts("1970-01-01T00:00:00+23:59").unwrap());
                assert!(r.to <= parse_ts("9999-12-31T23:59:59.999999999-23:59").unwrap());
                let _ = r.buckets(&r.time_zone.unwrap_or_default());
            }
            n += 1;
        }
        assert!(n >= 8, "only {n} regression inputs in {}", dir.display());
    }
}
