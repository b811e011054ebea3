//! Sources and positions: the identity behind exactly-once effects.
//!
//! Every batch of [`Record`]s comes from a *source*, a Kinesis shard or a file,
//! and each record has a *position* in it: the Kinesis sequence number, or the
//! line number of a file. Positions grow within a source. Both the speed store and
//! the master dataset keep, per source, the highest position already applied (a
//! *mark*); a record at or below the mark was applied before and is skipped.
//! A retried, bisected or half-applied batch therefore applies each record's
//! effect exactly once.

use std::cmp::Ordering;
use std::fmt;

use crate::{Error, Result};

/// A source of records: `kinesis/{stream}/{shard}` or `file/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(String);

impl SourceId {
    /// A Kinesis shard of a stream.
    pub fn kinesis(stream: &str, shard: &str) -> Self {
        SourceId(format!("kinesis/{stream}/{shard}"))
    }
    /// The shard of a record delivered to Lambda by a Kinesis event source mapping:
    /// the stream from its event source ARN (`arn:aws:kinesis:…:stream/NAME`), the
    /// shard from its event id (`shardId-000000000000:SEQUENCE`).
    pub fn kinesis_from_lambda(event_source_arn: Option<&str>, event_id: Option<&str>) -> Self {
        let arn = event_source_arn.unwrap_or("unknown");
        let stream = arn.rsplit_once("stream/").map_or(arn, |(_, s)| s);
        let shard = event_id
            .and_then(|id| id.split_once(':').map(|(s, _)| s))
            .unwrap_or("unknown-shard");
        SourceId::kinesis(stream, shard)
    }

    /// A file (or another replayable input) under a stable name.
    pub fn file(name: &str) -> Self {
        SourceId(format!("file/{name}"))
    }
    /// A source from its id as stored (a [`RowOrigin`]'s source, a view's boundary).
    pub fn from_id(id: &str) -> Self {
        SourceId(id.to_string())
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A position in a source: a non-negative decimal integer of any length (Kinesis
/// sequence numbers run to 129 digits), compared numerically.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position(String);

/// Digits per Delta transaction version when a position is stored as several of them.
const DIGITS_PER_PART: usize = 18;

impl Position {
    /// Parse a decimal position (leading zeros are dropped).
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid(format!(
                "{s:?} is not a sequence number (decimal digits)"
            )));
        }
        let trimmed = s.trim_start_matches('0');
        Ok(Position(if trimmed.is_empty() {
            "0".to_string()
        } else {
            trimmed.to_string()
        }))
    }

    /// A position from a counter (a file's line number).
    pub fn from_u64(n: u64) -> Self {
        Position(n.to_string())
    }

    /// The position just before this one; None for 0.
    pub fn pred(&self) -> Option<Self> {
        let mut digits = self.0.clone().into_bytes();
        let mut i = digits.len();
        loop {
            i = i.checked_sub(1)?;
            if digits[i] == b'0' {
                digits[i] = b'9';
            } else {
                digits[i] -= 1;
                break;
            }
        }
        Position::parse(std::str::from_utf8(&digits).ok()?).ok()
    }

    /// The decimal text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The position as parts that each fit a Delta transaction version (`i64`):
    /// first the digit count, then the digits in chunks of 18, most significant
    /// first. Lexicographic order of the parts equals numeric order of positions.
    pub fn to_parts(&self) -> Vec<i64> {
        let digits = self.0.as_bytes();
        let width = digits.len().div_ceil(DIGITS_PER_PART) * DIGITS_PER_PART;
        let padded = format!("{:0>width$}", self.0);
        let mut parts = vec![digits.len() as i64];
        for chunk in padded.as_bytes().chunks(DIGITS_PER_PART) {
            // chunks of ASCII digits, at most 18 long: always a valid i64
            let s = std::str::from_utf8(chunk).unwrap_or("0");
            parts.push(s.parse().unwrap_or(0));
        }
        parts
    }

    /// The inverse of [`Position::to_parts`].
    pub fn from_parts(parts: &[i64]) -> Option<Self> {
        let (&len, chunks) = parts.split_first()?;
        let len = usize::try_from(len).ok()?;
        if chunks.len() != len.div_ceil(DIGITS_PER_PART) || chunks.iter().any(|&c| c < 0) {
            return None;
        }
        let mut s = String::with_capacity(chunks.len() * DIGITS_PER_PART);
        for c in chunks {
            s.push_str(&format!("{c:0>18}"));
        }
        let start = s.len().checked_sub(len)?;
        Position::parse(&s[start..]).ok()
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a row of the master dataset came from, as the `source` column of
/// `raw_events` and `quarantine` holds it: `SOURCE@POSITION:LINE`, the record's
/// source, its position there, and the line within the record (1-based; 0 for
/// a whole record). The archiver writes it, the speed view's rebuild reads it
/// to know which source and position a row is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowOrigin {
    /// The record's source.
    pub source: SourceId,
    /// The record's position in its source.
    pub position: Position,
    /// The line within the record.
    pub line: u32,
}

impl RowOrigin {
    /// Write `SOURCE@POSITION:LINE` to `out` without building a [`RowOrigin`]
    /// (the archiver writes it straight into a column's buffer).
    pub fn write(
        out: &mut impl fmt::Write,
        source: &SourceId,
        position: &Position,
        line: u32,
    ) -> fmt::Result {
        write!(out, "{source}@{position}:{line}")
    }

    /// Read `SOURCE@POSITION:LINE` (the source may hold `@` itself, the
    /// position and line are decimal); None when `s` is not of that form.
    pub fn parse(s: &str) -> Option<Self> {
        let (source, at) = s.rsplit_once('@')?;
        let (position, line) = at.split_once(':')?;
        if source.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(RowOrigin {
            source: SourceId::from_id(source),
            position: Position::parse(position).ok()?,
            line: line.parse().ok()?,
        })
    }
}

impl fmt::Display for RowOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RowOrigin::write(f, &self.source, &self.position, self.line)
    }
}

/// One record of a source as the layers receive it: its position and its bytes
/// (NDJSON lines: a Kinesis record's data, or a line of a file), borrowed from
/// whoever read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Where the record is in its source.
    pub position: Position,
    /// The record's bytes, one or more NDJSON lines.
    pub data: &'a [u8],
}

impl<'a> Record<'a> {
    /// A record at `position` holding `data`.
    pub fn new(position: Position, data: &'a [u8]) -> Self {
        Record { position, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Position {
        Position::parse(s).unwrap()
    }

    #[test]
    fn lambda_records_name_their_shard() {
        let s = SourceId::kinesis_from_lambda(
            Some("arn:aws:kinesis:us-east-1:123456789012:stream/events"),
            Some("shardId-000000000003:4959033827149025660855969253836157"),
        );
        assert_eq!(s.as_str(), "kinesis/events/shardId-000000000003");
    }

    #[test]
    fn row_origins_round_trip_and_refuse_anything_else() {
        let o = RowOrigin {
            source: SourceId::file("/data/a@b.ndjson"),
            position: p("49590338271490256608559692538361571095921575989136588898"),
            line: 7,
        };
        let text = o.to_string();
        assert_eq!(
            text,
            "file//data/a@b.ndjson@49590338271490256608559692538361571095921575989136588898:7"
        );
        assert_eq!(RowOrigin::parse(&text), Some(o));
        for bad in [
            "",
            "kinesis/s/shard",
            "kinesis/s/shard@12",
            "kinesis/s/shard@12:",
            "kinesis/s/shard@x:1",
            "kinesis/s/shard@12:1:2",
            "kinesis/s/shard@12:+1",
            "@12:1",
        ] {
            assert_eq!(RowOrigin::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn positions_compare_numerically() {
        assert!(p("9") < p("10"));
        assert!(p("0010") == p("10"));
        assert!(
            p("49590338271490256608559692538361571095921575989136588898")
                > p("49590338271490256608559692538361571095921575989136588897")
        );
        assert!(Position::parse("").is_err());
        assert!(Position::parse("12a").is_err());
        assert!(Position::parse("-1").is_err());
    }

    #[test]
    fn pred_counts_down_at_any_length() {
        assert_eq!(p("10").pred(), Some(p("9")));
        assert_eq!(p("1").pred(), Some(p("0")));
        assert_eq!(p("0").pred(), None);
        assert_eq!(
            p("49590338271490256608559692538361571095921575989136588900").pred(),
            Some(p(
                "49590338271490256608559692538361571095921575989136588899"
            ))
        );
        assert_eq!(p("1000").pred(), Some(p("999")));
    }

    #[test]
    fn parts_round_trip_and_keep_order() {
        let samples = [
            "0",
            "7",
            "999999999999999999",
            "1000000000000000000",
            "49590338271490256608559692538361571095921575989136588898",
            &"9".repeat(129),
        ];
        for s in samples {
            assert_eq!(Position::from_parts(&p(s).to_parts()), Some(p(s)), "{s}");
        }
        for w in samples.windows(2) {
            assert!(
                p(w[0]).to_parts() < p(w[1]).to_parts(),
                "{} < {}",
                w[0],
                w[1]
            );
        }
        assert_eq!(Position::from_parts(&[3, 1, 2]), None);
        assert_eq!(Position::from_parts(&[]), None);
    }
}
