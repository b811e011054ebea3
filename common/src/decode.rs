//! The record decoder: Kinesis record bytes (or a chunk of an NDJSON file) to
//! validated events and typed rejections.
//!
//! A record is UTF-8 NDJSON, one event per line, optionally gzip-compressed as a
//! whole (recognised by the gzip magic bytes). A UTF-8 byte-order mark at the
//! start of a record is ignored (Windows tools write one at the start of a file);
//! lines end in `\n` or `\r\n`. Every non-blank line ends up
//! either accepted or rejected with a reason; one bad line never affects the
//! others. The decoder never panics on any input (a property test checks this).

use std::borrow::Cow;
use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bucket::MICROS_PER_SECOND;
use crate::event::{Event, EventType};

/// How far in the future (relative to ingest time) an event's `ts` may be.
pub const MAX_FUTURE_MICROS: i64 = 5 * 60 * MICROS_PER_SECOND;
/// The largest accepted `amount` (10^12 minor units).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// A gzip record may not inflate beyond this (a guard against decompression bombs).
pub const MAX_INFLATED_BYTES: u64 = 256 * 1024 * 1024;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The UTF-8 encoding of U+FEFF, the byte-order mark (Unicode §23.8).
pub const UTF8_BOM: [u8; 3] = [0xef, 0xbb, 0xbf];

/// `data` without a UTF-8 byte-order mark at its start.
pub fn strip_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(&UTF8_BOM[..]).unwrap_or(data)
}

/// Why a line (or a whole record) was rejected. Stored in `quarantine.reason` as
/// `code: detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not a JSON object (the parser's message).
    InvalidJson(String),
    /// A required field is absent or null.
    MissingField(&'static str),
    /// A field is present but breaks its rule.
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// `ts` is before 1970-01-01T00:00:00Z, or too large to be an instant in
    /// microseconds: nothing before the epoch is an event of this system, and
    /// every bucket, partition name and timestamp type downstream is defined
    /// from the epoch on.
    OutOfRange(String),
    /// `ts` is more than five minutes after ingest time.
    FutureTimestamp {
        /// How many seconds ahead of ingest time it is.
        ahead_secs: i64,
    },
    /// The record starts with the gzip magic bytes but does not inflate.
    CorruptGzip(String),
}

impl RejectReason {
    /// A stable machine-readable code for the reason.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson(_) => "invalid_json",
            RejectReason::MissingField(_) => "missing_field",
            RejectReason::InvalidField { .. } => "invalid_field",
            RejectReason::OutOfRange(_) => "out_of_range",
            RejectReason::FutureTimestamp { .. } => "future_timestamp",
            RejectReason::CorruptGzip(_) => "corrupt_gzip",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.code())?;
        match self {
            RejectReason::InvalidUtf8 => write!(f, "line is not valid UTF-8"),
            RejectReason::InvalidJson(m) => write!(f, "{m}"),
            RejectReason::MissingField(field) => write!(f, "`{field}` is required"),
            RejectReason::InvalidField { field, problem } => write!(f, "`{field}` {problem}"),
            RejectReason::OutOfRange(m) => write!(f, "{m}"),
            RejectReason::FutureTimestamp { ahead_secs } => write!(
                f,
                "`ts` is {ahead_secs} s after ingest time (at most {} s allowed)",
                MAX_FUTURE_MICROS / MICROS_PER_SECOND
            ),
            RejectReason::CorruptGzip(m) => write!(f, "record does not inflate: {m}"),
        }
    }
}

/// A rejected line: its bytes, why, and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The line's original bytes (the whole record for [`RejectReason::CorruptGzip`]).
    pub payload: Vec<u8>,
    /// Why it was rejected.
    pub reason: RejectReason,
    /// 1-based line number inside the record (0 for a whole-record rejection).
    pub line: u32,
}

/// A decoded record: its text (inflated if it was gzip), the accepted events
/// pointing into that text, and the rejected lines.
#[derive(Debug, Default)]
pub struct DecodedRecord {
    text: Vec<u8>,
    /// Accepted events, in line order.
    pub events: Vec<Event>,
    /// Rejected lines, in line order.
    pub rejected: Vec<Rejected>,
    /// Blank lines skipped.
    pub blank_lines: u32,
}

impl DecodedRecord {
    /// The original line of an accepted event (valid UTF-8 by construction).
    pub fn payload(&self, event: &Event) -> &str {
        let (a, b) = event.span;
        self.text
            .get(a..b)
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or_default()
    }
}

/// Decode one record's bytes, validating against `ingest_time` (epoch µs).
pub fn decode_record(data: &[u8], ingest_time: i64) -> DecodedRecord {
    let mut out = DecodedRecord::default();
    if data.starts_with(&GZIP_MAGIC) {
        let mut inflated = Vec::with_capacity(data.len() * 4);
        let reader = flate2::read::MultiGzDecoder::new(data).take(MAX_INFLATED_BYTES + 1);
        match { reader }.read_to_end(&mut inflated) {
            Ok(n) if n as u64 > MAX_INFLATED_BYTES => {
                out.rejected.push(Rejected {
                    payload: data.to_vec(),
                    reason: RejectReason::CorruptGzip(format!(
                        "inflates to more than {MAX_INFLATED_BYTES} bytes"
                    )),
                    line: 0,
                });
                return out;
            }
            Ok(_) => out.text = inflated,
            Err(e) => {
                out.rejected.push(Rejected {
                    payload: data.to_vec(),
                    reason: RejectReason::CorruptGzip(e.to_string()),
                    line: 0,
                });
                return out;
            }
        }
    } else {
        out.text = data.to_vec();
    }
    if out.text.starts_with(&UTF8_BOM) {
        // line spans index into the text, so the mark is taken out of it
        out.text.drain(..UTF8_BOM.len());
    }
    decode_lines(&mut out, ingest_time);
    out
}

fn decode_lines(out: &mut DecodedRecord, ingest_time: i64) {
    let text = std::mem::take(&mut out.text);
    let mut start = 0usize;
    let mut line_no = 0u32;
    while start < text.len() {
        let end = memchr_newline(&text[start..]).map_or(text.len(), |i| start + i);
        line_no = line_no.saturating_add(1);
        let mut line_end = end;
        if line_end > start && text[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let line = &text[start..line_end];
        if line.iter().all(u8::is_ascii_whitespace) {
            out.blank_lines += 1;
        } else {
            match decode_line(line, ingest_time) {
                Ok(mut ev) => {
                    ev.line = line_no;
                    ev.span = (start, line_end);
                    out.events.push(ev);
                }
                Err(reason) => out.rejected.push(Rejected {
                    payload: line.to_vec(),
                    reason,
                    line: line_no,
                }),
            }
        }
        start = end + 1;
    }
    out.text = text;
}

fn memchr_newline(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\n')
}

/// The wire shape of an event. Unknown fields are ignored here (the original
/// line is kept verbatim in `raw_events.payload`).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    merchant_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
    #[serde(borrow, default)]
    customer_id: Option<Cow<'a, str>>,
}

/// Validate one non-blank line.
pub fn decode_line(line: &[u8], ingest_time: i64) -> Result<Event, RejectReason> {
    let text = std::str::from_utf8(line).map_err(|_| RejectReason::InvalidUtf8)?;
    let wire: Wire<'_> =
        serde_json::from_str(text).map_err(|e| RejectReason::InvalidJson(e.to_string()))?;

    let event_id = wire
        .event_id
        .ok_or(RejectReason::MissingField("event_id"))?;
    check_len("event_id", &event_id, 128)?;
    let merchant_id = wire
        .merchant_id
        .ok_or(RejectReason::MissingField("merchant_id"))?;
    check_merchant_id(&merchant_id)?;
    let kind = wire.kind.ok_or(RejectReason::MissingField("type"))?;
    if kind.is_empty() {
        return Err(invalid("type", "must not be empty"));
    }
    let event_type = EventType::parse(&kind);
    let ts = parse_wire_ts(wire.ts.ok_or(RejectReason::MissingField("ts"))?)?;
    if ts < 0 {
        return Err(RejectReason::OutOfRange(
            "`ts` is before 1970-01-01T00:00:00Z".to_string(),
        ));
    }
    if ts > ingest_time.saturating_add(MAX_FUTURE_MICROS) {
        return Err(RejectReason::FutureTimestamp {
            ahead_secs: (ts - ingest_time) / MICROS_PER_SECOND,
        });
    }
    let amount = match wire.amount {
        Some(raw) if raw.get() != "null" => Some(parse_amount(raw)?),
        _ => None,
    };
    if amount.is_none() && event_type.requires_amount() {
        return Err(RejectReason::InvalidField {
            field: "amount",
            problem: format!("is required for {} events", event_type.as_str()),
        });
    }
    let customer_id = match wire.customer_id {
        Some(c) => {
            check_len("customer_id", &c, 128)?;
            Some(c.into_owned())
        }
        None => None,
    };
    Ok(Event {
        event_id: event_id.into_owned(),
        merchant_id: merchant_id.into_owned(),
        event_type,
        ts,
        amount,
        customer_id,
        line: 0,
        span: (0, 0),
    })
}

fn invalid(field: &'static str, problem: &str) -> RejectReason {
    RejectReason::InvalidField {
        field,
        problem: problem.to_string(),
    }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), RejectReason> {
    // byte length bounds the char count from above, so only count chars when needed
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > max && s.chars().count() > max {
        return Err(RejectReason::InvalidField {
            field,
            problem: format!("is longer than {max} characters"),
        });
    }
    Ok(())
}

/// Whether `s` is a valid merchant id: 1–64 chars of `[A-Za-z0-9_.:-]`.
pub fn is_valid_merchant_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn check_merchant_id(s: &str) -> Result<(), RejectReason> {
    if is_valid_merchant_id(s) {
        Ok(())
    } else if s.is_empty() {
        Err(invalid("merchant_id", "must not be empty"))
    } else if s.len() > 64 {
        Err(invalid("merchant_id", "is longer than 64 characters"))
    } else {
        Err(invalid(
            "merchant_id",
            "may only contain letters, digits and _ . : -",
        ))
    }
}

fn parse_wire_ts(raw: &RawValue) -> Result<i64, RejectReason> {
    let s = raw.get();
    if s.starts_with('"') {
        let text: Cow<'_, str> =
            serde_json::from_str(s).map_err(|_| invalid("ts", "is not a valid string"))?;
        let dt = chrono::DateTime::parse_from_rfc3339(&text).map_err(|e| {
            RejectReason::InvalidField {
                field: "ts",
                problem: format!("is not an RFC 3339 time with offset ({e})"),
            }
        })?;
        rfc3339_micros(&dt)
            .ok_or_else(|| RejectReason::OutOfRange("`ts` is out of range".to_string()))
    } else if s == "null" {
        Err(RejectReason::MissingField("ts"))
    } else {
        let ms: i64 = s.parse().map_err(|_| {
            invalid(
                "ts",
                "must be an RFC 3339 string or an integer of epoch milliseconds",
            )
        })?;
        ms.checked_mul(1000)
            .ok_or_else(|| RejectReason::OutOfRange("`ts` is out of range".to_string()))
    }
}

/// The instant of a parsed RFC 3339 time in epoch µs, None when it does not fit.
///
/// Unix time has no leap seconds: RFC 3339 §5.6 allows `23:59:60`, which chrono
/// keeps as a fraction of 1 s or more within second 59. Such a time counts in the
/// second before it (`23:59:60.25` is `23:59:59.25`), never in the next minute,
/// hour or day.
pub fn rfc3339_micros<Tz: chrono::TimeZone>(dt: &chrono::DateTime<Tz>) -> Option<i64> {
    use chrono::Timelike as _;
    let micros = i64::from(dt.nanosecond() % 1_000_000_000) / 1_000;
    dt.timestamp()
        .checked_mul(MICROS_PER_SECOND)?
        .checked_add(micros)
}

fn parse_amount(raw: &RawValue) -> Result<i64, RejectReason> {
    let s = raw.get();
    let v: i64 = s
        .parse()
        .map_err(|_| invalid("amount", "must be an integer of minor currency units"))?;
    if !(0..=MAX_AMOUNT).contains(&v) {
        return Err(invalid("amount", "must be between 0 and 10^12"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
