//! The metrics endpoint's request, parsed and validated from the merchant id of
//! the path and the raw query string, before anything is read. A pure function
//! of its input (fuzzed: `fuzz/fuzz_targets/metrics_query.rs`), so every
//! malformed request is a clear 400 and never a panic.

use crate::bucket::{parse_ts, BucketRange, Granularity};
use crate::decode::is_valid_merchant_id;
use crate::metrics::{parse_metric_list, Metric};
use crate::{Error, Result};

/// A valid request of one merchant's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsRequest {
    /// The buckets asked for.
    pub range: BucketRange,
    /// The metrics asked for, in the order given.
    pub metrics: Vec<Metric>,
}

/// Parse `merchant` and `query` (`from`, `to`, `granularity`, `metrics`; other
/// parameters are ignored, a repeated one is an error).
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
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match key.as_ref() {
            "from" => &mut from,
            "to" => &mut to,
            "granularity" => &mut granularity,
            "metrics" => &mut metrics,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(Error::invalid(format!(
                "malformed query string: `{key}` is given more than once"
            )));
        }
    }
    let required = |v: Option<String>, name: &str| {
        v.ok_or_else(|| Error::invalid(format!("`{name}` is required (RFC 3339)")))
    };
    let from = parse_ts(&required(from, "from")?)?;
    let to = parse_ts(&required(to, "to")?)?;
    let granularity: Granularity = granularity.as_deref().unwrap_or("hour").parse()?;
    let range = BucketRange::new(from, to, granularity)?;
    let metrics = parse_metric_list(metrics.as_deref())?;
    Ok(MetricsRequest { range, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_request_parses() {
        let r = parse_metrics_request(
            "m_1",
            Some("from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z&granularity=hour&metrics=orders,net_sales&x=1"),
        )
        .unwrap();
        assert_eq!(r.range.granularity, Granularity::Hour);
        assert_eq!(r.range.end - r.range.start, 24 * 3_600_000_000);
        assert_eq!(r.metrics, [Metric::Orders, Metric::NetSales]);
    }

    #[test]
    fn malformed_requests_are_invalid_input() {
        let ok = "from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z";
        for (merchant, query) in [
            ("m 1", Some(ok)),
            ("m_1", None),
            ("m_1", Some("from=2026-11-24T00:00:00Z")),
            (
                "m_1",
                Some("from=2026-11-24T00:30:00Z&to=2026-11-25T00:00:00Z"),
            ),
            (
                "m_1",
                Some("from=2026-11-24T00:00:00Z&to=2026-11-24T00:00:00Z&from=x"),
            ),
            ("m_1", Some(&format!("{ok}&granularity=week"))),
            ("m_1", Some(&format!("{ok}&metrics=orders,bogus"))),
            (
                "m_1",
                Some("from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z"),
            ),
            ("m_1", Some("from=%FF%FE&to=%00")),
        ] {
            match parse_metrics_request(merchant, query) {
                Err(Error::Invalid(_)) => {}
                other => panic!("{merchant} {query:?}: {other:?}"),
            }
        }
    }

    /// Inputs the fuzzer found or that are kept for it: each must give an answer, not a panic.
    #[test]
    fn fuzz_regressions() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/metrics_query");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            let text = String::from_utf8_lossy(&data);
            let (merchant, query) = text.split_once('?').unwrap_or((&text, ""));
            let _ = parse_metrics_request(merchant, Some(query));
        }
    }
}
