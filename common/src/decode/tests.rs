//! Decoder rules, one test per rule, plus a property test over arbitrary bytes.

use std::io::Write;

use proptest::prelude::*;

use super::*;
use crate::bucket::parse_ts;

fn now() -> i64 {
    parse_ts("2026-11-24T12:00:00Z").unwrap()
}

fn one(line: &str) -> Result<Event, RejectReason> {
    decode_line(line.as_bytes(), now())
}

const GOOD: &str = r#"{"event_id":"e1","merchant_id":"m_42","type":"order","ts":"2026-11-24T10:15:00Z","amount":1500,"customer_id":"c9"}"#;

#[test]
fn accepts_a_well_formed_order() {
    let ev = one(GOOD).unwrap();
    assert_eq!(ev.event_id, "e1");
    assert_eq!(ev.merchant_id, "m_42");
    assert_eq!(ev.event_type, EventType::Order);
    assert_eq!(ev.ts, parse_ts("2026-11-24T10:15:00Z").unwrap());
    assert_eq!(ev.amount, Some(1500));
    assert_eq!(ev.customer_id.as_deref(), Some("c9"));
}

#[test]
fn both_timestamp_forms_mean_the_same_instant() {
    let ms = parse_ts("2026-11-24T10:15:00.123Z").unwrap() / 1000;
    let a = one(&format!(
        r#"{{"event_id":"a","merchant_id":"m","type":"page_view","ts":{ms}}}"#
    ))
    .unwrap();
    let b = one(r#"{"event_id":"a","merchant_id":"m","type":"page_view","ts":"2026-11-24T11:15:00.123+01:00"}"#).unwrap();
    assert_eq!(a.ts, b.ts);
    assert_eq!(a.ts, ms * 1000);
}

#[test]
fn timestamp_rules() {
    let bad = |ts: &str| {
        one(&format!(
            r#"{{"event_id":"a","merchant_id":"m","type":"page_view","ts":{ts}}}"#
        ))
        .unwrap_err()
    };
    assert_eq!(bad("\"2026-11-24T10:15:00\"").code(), "invalid_field"); // no offset
    assert_eq!(bad("\"yesterday\"").code(), "invalid_field");
    assert_eq!(bad("1.5").code(), "invalid_field");
    assert_eq!(bad("true").code(), "invalid_field");
    assert_eq!(bad("null").code(), "missing_field");
    assert_eq!(bad("9223372036854775807").code(), "out_of_range"); // overflows µs
    assert_eq!(bad("-9223372036854775808").code(), "out_of_range");
    // nothing before the epoch: every bucket, partition and timestamp type downstream
    // starts there (a 1600 event once stopped the batch layer for everyone)
    assert_eq!(bad("\"1600-01-01T00:00:00Z\"").code(), "out_of_range");
    assert_eq!(
        bad("\"1969-12-31T23:59:59.999999Z\"").code(),
        "out_of_range"
    );
    assert_eq!(bad("\"1970-01-01T01:00:00+02:00\"").code(), "out_of_range");
    assert_eq!(bad("-1").code(), "out_of_range");
    assert_eq!(bad("\"-0001-01-01T00:00:00Z\"").code(), "invalid_field");
    assert_eq!(
        one(r#"{"event_id":"a","merchant_id":"m","type":"page_view","ts":0}"#)
            .unwrap()
            .ts,
        0
    );
    // at most five minutes ahead of ingest time
    let ahead = bad("\"2026-11-24T12:05:01Z\"");
    assert!(matches!(
        ahead,
        RejectReason::FutureTimestamp { ahead_secs: 301 }
    ));
    assert_eq!(
        ahead.to_string(),
        "future_timestamp: `ts` is 301 s after ingest time (at most 300 s allowed)"
    );
    assert!(one(
        r#"{"event_id":"a","merchant_id":"m","type":"page_view","ts":"2026-11-24T12:05:00Z"}"#
    )
    .is_ok());
    assert_eq!(
        one(r#"{"event_id":"a","merchant_id":"m","type":"page_view"}"#).unwrap_err(),
        RejectReason::MissingField("ts")
    );
}

#[test]
fn a_leap_second_counts_in_the_second_before_it() {
    let at = |ts: &str| {
        one(&format!(
            r#"{{"event_id":"a","merchant_id":"m","type":"page_view","ts":"{ts}"}}"#
        ))
        .unwrap()
        .ts
    };
    let before = parse_ts("2016-12-31T23:59:59Z").unwrap();
    assert_eq!(at("2016-12-31T23:59:60Z"), before);
    assert_eq!(at("2016-12-31T23:59:60.25Z"), before + 250_000);
    assert_eq!(at("2017-01-01T00:59:60+01:00"), before);
    // so it stays in 2016's last hour and day
    assert_eq!(
        crate::bucket::hour_floor(at("2016-12-31T23:59:60.999999Z")),
        parse_ts("2016-12-31T23:00:00Z").unwrap()
    );
}

#[test]
fn a_byte_order_mark_at_the_start_of_a_record_is_ignored() {
    let with_bom = [
        &UTF8_BOM[..],
        GOOD.as_bytes(),
        b"\r\n",
        GOOD.as_bytes(),
        b"\r\n",
    ]
    .concat();
    let d = decode_record(&with_bom, now());
    assert_eq!(d.rejected, []);
    assert_eq!(d.events.len(), 2);
    assert_eq!(d.payload(&d.events[0]), GOOD);
    assert_eq!(d.payload(&d.events[1]), GOOD);
    // a gzip record whose text starts with one
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&with_bom).unwrap();
    let d = decode_record(&gz.finish().unwrap(), now());
    assert_eq!((d.events.len(), d.rejected.len()), (2, 0));
    // only at the start: elsewhere it is a character of a line, which is not JSON
    let inner = [GOOD.as_bytes(), b"\n", &UTF8_BOM[..], GOOD.as_bytes()].concat();
    let d = decode_record(&inner, now());
    assert_eq!((d.events.len(), d.rejected.len()), (1, 1));
    assert_eq!(d.rejected[0].reason.code(), "invalid_json");
    assert_eq!(strip_bom(&with_bom)[0], b'{');
}

#[test]
fn id_rules() {
    let with = |id: &str, m: &str| {
        one(&format!(
            r#"{{"event_id":{id},"merchant_id":{m},"type":"page_view","ts":0}}"#
        ))
    };
    assert!(with("\"e\"", "\"A-z_0.9:x\"").is_ok());
    assert_eq!(with("\"\"", "\"m\"").unwrap_err().code(), "invalid_field");
    assert!(with(&format!("\"{}\"", "é".repeat(128)), "\"m\"").is_ok()); // chars, not bytes
    assert_eq!(
        with(&format!("\"{}\"", "x".repeat(129)), "\"m\"")
            .unwrap_err()
            .code(),
        "invalid_field"
    );
    assert!(with("\"e\"", &format!("\"{}\"", "m".repeat(64))).is_ok());
    assert!(with("\"e\"", &format!("\"{}\"", "m".repeat(65))).is_err());
    assert!(with("\"e\"", "\"m/1\"").is_err());
    assert!(with("\"e\"", "\"m 1\"").is_err());
    assert!(with("\"e\"", "\"\"").is_err());
    assert!(with("\"e\"", "7").is_err());
    assert_eq!(
        one(r#"{"merchant_id":"m","type":"page_view","ts":0}"#).unwrap_err(),
        RejectReason::MissingField("event_id")
    );
    assert_eq!(
        one(r#"{"event_id":"e","type":"page_view","ts":0}"#).unwrap_err(),
        RejectReason::MissingField("merchant_id")
    );
    assert_eq!(
        one(r#"{"event_id":"e","merchant_id":"m","ts":0}"#).unwrap_err(),
        RejectReason::MissingField("type")
    );
}

#[test]
fn amount_rules() {
    let order = |amount: &str| {
        one(&format!(
            r#"{{"event_id":"a","merchant_id":"m","type":"order","ts":0{amount}}}"#
        ))
    };
    assert_eq!(order(",\"amount\":0").unwrap().amount, Some(0));
    assert_eq!(
        order(",\"amount\":1000000000000").unwrap().amount,
        Some(MAX_AMOUNT)
    );
    assert!(order(",\"amount\":1000000000001").is_err());
    assert!(order(",\"amount\":-1").is_err());
    assert!(order(",\"amount\":1.5").is_err());
    assert!(order(",\"amount\":\"15\"").is_err());
    assert!(order(",\"amount\":1e3").is_err());
    assert!(order("").is_err());
    assert!(order(",\"amount\":null").is_err());
    let refund = one(r#"{"event_id":"a","merchant_id":"m","type":"refund","ts":0}"#);
    assert_eq!(refund.unwrap_err().code(), "invalid_field");
    // a page view needs no amount, but one it carries must still be valid
    assert!(one(r#"{"event_id":"a","merchant_id":"m","type":"page_view","ts":0}"#).is_ok());
    assert!(
        one(r#"{"event_id":"a","merchant_id":"m","type":"page_view","ts":0,"amount":-3}"#).is_err()
    );
}

#[test]
fn customer_rules() {
    let c = |cust: &str| {
        one(&format!(
            r#"{{"event_id":"a","merchant_id":"m","type":"page_view","ts":0,"customer_id":{cust}}}"#
        ))
    };
    assert_eq!(c("\"c1\"").unwrap().customer_id.as_deref(), Some("c1"));
    assert_eq!(c("null").unwrap().customer_id, None);
    assert!(c("\"\"").is_err());
    assert!(c(&format!("\"{}\"", "c".repeat(129))).is_err());
    assert!(c("12").is_err());
}

#[test]
fn unknown_fields_and_types_are_kept() {
    let line = r#"{"event_id":"a","merchant_id":"m","type":"cart_add","ts":0,"sku":"x","nested":{"k":[1,2]}}"#;
    let rec = decode_record(line.as_bytes(), now());
    assert_eq!(rec.events.len(), 1);
    assert_eq!(
        rec.events[0].event_type,
        EventType::Other("cart_add".into())
    );
    assert_eq!(rec.payload(&rec.events[0]), line);
}

#[test]
fn not_json_or_not_utf8_is_rejected_with_reason() {
    assert_eq!(one("{not json").unwrap_err().code(), "invalid_json");
    assert_eq!(one("[1,2]").unwrap_err().code(), "invalid_json");
    assert_eq!(one("\"str\"").unwrap_err().code(), "invalid_json");
    assert_eq!(
        decode_line(b"{\"event_id\":\"\xff\"}", now()).unwrap_err(),
        RejectReason::InvalidUtf8
    );
    // duplicate keys are ambiguous: rejected, not resolved silently
    assert_eq!(
        one(r#"{"event_id":"a","event_id":"b","merchant_id":"m","type":"page_view","ts":0}"#)
            .unwrap_err()
            .code(),
        "invalid_json"
    );
}

#[test]
fn multi_event_records_keep_good_lines_around_bad_ones() {
    let text = format!("{GOOD}\n\n  \nnope\r\n{GOOD}\r\n\n");
    let rec = decode_record(text.as_bytes(), now());
    assert_eq!(rec.events.len(), 2);
    assert_eq!(rec.events[0].line, 1);
    assert_eq!(rec.events[1].line, 5);
    assert_eq!(rec.payload(&rec.events[1]), GOOD); // \r stripped
    assert_eq!(rec.rejected.len(), 1);
    assert_eq!(rec.rejected[0].line, 4);
    assert_eq!(rec.rejected[0].payload, b"nope");
    assert_eq!(rec.blank_lines, 3);
}

#[test]
fn gzip_records_are_recognised_by_magic_bytes() {
    let text = format!("{GOOD}\n{GOOD}\nbad\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let bytes = gz.finish().unwrap();
    let rec = decode_record(&bytes, now());
    assert_eq!(rec.events.len(), 2);
    assert_eq!(rec.rejected.len(), 1);
    assert_eq!(rec.payload(&rec.events[0]), GOOD);

    let mut corrupt = bytes.clone();
    corrupt.truncate(bytes.len() / 2);
    let rec = decode_record(&corrupt, now());
    assert!(rec.events.is_empty());
    assert_eq!(rec.rejected.len(), 1);
    assert_eq!(rec.rejected[0].reason.code(), "corrupt_gzip");
    assert_eq!(rec.rejected[0].payload, corrupt); // the whole record is kept
}

#[test]
fn reasons_render_as_code_and_detail() {
    let r = one(r#"{"event_id":"a","merchant_id":"m","type":"order","ts":0}"#).unwrap_err();
    assert_eq!(
        r.to_string(),
        "invalid_field: `amount` is required for order events"
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_every_line_is_accounted_for(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rec = decode_record(&data, now());
        if !data.starts_with(&[0x1f, 0x8b]) {
            let lines = data.split(|&b| b == b'\n').count() - usize::from(data.ends_with(b"\n") || data.is_empty());
            prop_assert_eq!(rec.events.len() + rec.rejected.len() + rec.blank_lines as usize, lines);
            for r in &rec.rejected {
                prop_assert!(r.line >= 1);
                prop_assert!(!r.reason.to_string().is_empty());
            }
        } else {
            // either the record inflates and its lines are decoded, or it is rejected whole
            if let Some(r) = rec.rejected.iter().find(|r| r.reason.code() == "corrupt_gzip") {
                prop_assert!(rec.events.is_empty());
                prop_assert_eq!(&r.payload, &data);
            }
        }
    }

    #[test]
    fn json_like_lines_are_accepted_or_rejected(id in "[a-z0-9]{0,3}", m in "[a-z_/ ]{0,3}", kind in "(order|refund|page_view|x|)", amount in proptest::option::of(-5i64..5), ts in proptest::option::of(0i64..2_000_000_000_000)) {
        let mut line = format!(r#"{{"event_id":"{id}","merchant_id":"{m}","type":"{kind}""#);
        if let Some(a) = amount { line.push_str(&format!(",\"amount\":{a}")); }
        if let Some(t) = ts { line.push_str(&format!(",\"ts\":{t}")); }
        line.push('}');
        let rec = decode_record(line.as_bytes(), now());
        prop_assert_eq!(rec.events.len() + rec.rejected.len(), 1);
        if let Some(ev) = rec.events.first() {
            prop_assert!(!ev.event_id.is_empty() && is_valid_merchant_id(&ev.merchant_id));
            prop_assert!(ev.ts <= now() + MAX_FUTURE_MICROS);
            prop_assert!(!ev.event_type.requires_amount() || ev.amount.is_some());
        }
    }
}

/// Inputs the fuzzer found or that are kept for it (`fuzz/regressions/decode`):
/// every non-blank line is accepted or rejected, none panics.
#[test]
fn fuzz_regressions() {
    let dir = crate::test_crate_dir().join("../fuzz/regressions/decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let data = std::fs::read(entry.path()).unwrap();
        let r = decode_record(&data, 1_795_600_000_000_000);
        if !data.starts_with(&[0x1f, 0x8b]) {
            let lines = data
                .split(|&b| b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .count();
            assert_eq!(
                r.events.len() + r.rejected.len(),
                lines,
                "{:?}",
                entry.path()
            );
        }
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}
