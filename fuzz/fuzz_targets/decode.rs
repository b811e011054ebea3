//! The record decoder on arbitrary bytes (NDJSON, gzip by magic bytes): it must
//! sort every line into accepted or rejected, never panic, and account for each
//! non-blank line exactly once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_common::decode::decode_record;

fuzz_target!(|data: &[u8]| {
    let now = 1_795_600_000_000_000;
    let r = decode_record(data, now);
    for e in &r.events {
        // an accepted event's payload span lies inside the record
        let _ = r.payload(e);
    }
    if !data.starts_with(&[0x1f, 0x8b]) {
        let lines = data
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .count();
        assert_eq!(r.events.len() + r.rejected.len(), lines);
    }
});
