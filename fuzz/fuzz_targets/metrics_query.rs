//! The API's request parsing on arbitrary input: `merchant?query` as the path
//! segment and the query string of `/v1/merchants/{merchant}/metrics`. It must
//! answer (a request or invalid input), never panic, and what it accepts must be
//! a valid range within the years served.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_common::query::parse_metrics_request;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (merchant, query) = text.split_once('?').unwrap_or((&text, ""));
    if let Ok(r) = parse_metrics_request(merchant, Some(query)) {
        assert!(r.range.start < r.range.end);
        assert!(r.range.granularity.is_aligned(r.range.start));
        assert!(r.range.granularity.is_aligned(r.range.end));
        assert!(!r.metrics.is_empty());
        // only instants written with years 1970 to 9999 (any offset) get through
        assert!(r.range.start >= -(24 * 3_600_000_000 - 60_000_000));
        assert!(r.range.end <= 253_402_300_799_999_999 + 24 * 3_600_000_000);
    }
});
