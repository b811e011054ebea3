//! Kinesis Producer Library (KPL) aggregated records, de-aggregated.
//!
//! Producers at volume use the KPL, which packs many user records into one
//! Kinesis record: the 4 magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord` (a table of partition keys, a table of explicit hash
//! keys, and the user records, each with its data), and the 16-byte MD5 of the
//! protobuf bytes (the format of `awslabs/amazon-kinesis-producer`,
//! `aggregation-format.md`). A record without the magic bytes is a plain
//! record and passes through unchanged.
//!
//! Both consumers (`tally speed consume`, `tally archive consume`) and both
//! Lambda handlers read records through [`payload`]: an aggregated record's
//! user records become its lines, in order, so the record keeps one position,
//! its sequence number, and the sinks' exactly-once marks work on it as on any
//! record of many lines. A record whose digest or protobuf is wrong is not
//! dropped: it becomes one line the decoder rejects, carrying the record's
//! bytes (base64) and what is wrong with it, so the archiver quarantines it.

use std::borrow::Cow;

use base64::Engine as _;
use md5::{Digest as _, Md5};

/// The first bytes of a KPL aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Bytes of the MD5 digest at the end of an aggregated record.
const DIGEST_LEN: usize = 16;

/// The protobuf message of an aggregated record (field numbers are the format).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    /// Partition keys the user records refer to by index.
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    /// Explicit hash keys the user records refer to by index.
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    /// The user records, in the order they were put.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<UserRecord>,
}

/// One user record of an [`AggregatedRecord`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserRecord {
    /// Index into the partition key table.
    #[prost(uint64, tag = "1")]
    pub partition_key_index: u64,
    /// Index into the explicit hash key table, when it has one.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// The user record's bytes (here: one or more NDJSON lines).
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    /// Tags (unused by tally).
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// A user record's tag.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The value, when it has one.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Why an aggregated record cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KplError {
    /// Shorter than the magic bytes and the digest.
    Truncated,
    /// The MD5 of the protobuf bytes is not the one the record carries.
    BadDigest,
    /// The protobuf bytes do not decode as an `AggregatedRecord`.
    BadProtobuf(String),
}

impl std::fmt::Display for KplError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KplError::Truncated => f.write_str("KPL aggregated record too short"),
            KplError::BadDigest => {
                f.write_str("KPL aggregated record whose MD5 digest does not match")
            }
            KplError::BadProtobuf(e) => {
                write!(f, "KPL aggregated record that does not decode: {e}")
            }
        }
    }
}

/// The user records of `data` when it is an aggregated record (None: a plain
/// record). Errors: an aggregated record that is truncated, fails its digest,
/// or does not decode.
pub fn deaggregate(data: &[u8]) -> Result<Option<AggregatedRecord>, KplError> {
    let Some(rest) = data.strip_prefix(&MAGIC) else {
        return Ok(None);
    };
    if rest.len() < DIGEST_LEN {
        return Err(KplError::Truncated);
    }
    let (message, digest) = rest.split_at(rest.len() - DIGEST_LEN);
    if Md5::digest(message).as_slice() != digest {
        return Err(KplError::BadDigest);
    }
    <AggregatedRecord as prost::Message>::decode(message)
        .map(Some)
        .map_err(|e| KplError::BadProtobuf(e.to_string()))
}

/// The bytes the sinks read for a Kinesis record's `data`: itself when plain;
/// an aggregated record's user records, each ending in a newline; for a record
/// that cannot be read, one JSON line carrying the error and the record's bytes
/// (base64), which the decoder rejects and the archiver quarantines.
pub fn payload(data: &[u8]) -> Cow<'_, [u8]> {
    match deaggregate(data) {
        Ok(None) => Cow::Borrowed(data),
        Ok(Some(agg)) => {
            let mut out = Vec::with_capacity(data.len());
            for r in agg.records {
                out.extend_from_slice(&r.data);
                if !r.data.ends_with(b"\n") {
                    out.push(b'\n');
                }
            }
            Cow::Owned(out)
        }
        Err(e) => {
            tracing::warn!(error = %e, bytes = data.len(), "unreadable KPL record; passed on to quarantine");
            let line = serde_json::json!({
                "kpl_error": e.to_string(),
                "record_base64": base64::engine::general_purpose::STANDARD.encode(data),
            });
            let mut out = line.to_string().into_bytes();
            out.push(b'\n');
            Cow::Owned(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregate(lines: &[&str]) -> Vec<u8> {
        let agg = AggregatedRecord {
            partition_key_table: vec!["m_1".into()],
            explicit_hash_key_table: vec![],
            records: lines
                .iter()
                .map(|l| UserRecord {
                    partition_key_index: 0,
                    explicit_hash_key_index: None,
                    data: l.as_bytes().to_vec(),
                    tags: vec![],
                })
                .collect(),
        };
        let message = prost::Message::encode_to_vec(&agg);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&message);
        out.extend_from_slice(&Md5::digest(&message));
        out
    }

    #[test]
    fn plain_records_pass_and_aggregated_ones_become_their_lines() {
        assert_eq!(payload(b"{\"a\":1}\n").as_ref(), b"{\"a\":1}\n");
        let rec = aggregate(&["{\"a\":1}", "{\"b\":2}\n"]);
        assert_eq!(payload(&rec).as_ref(), b"{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn a_bad_digest_or_a_short_record_becomes_a_line_to_quarantine() {
        let mut rec = aggregate(&["{\"a\":1}"]);
        let last = rec.len() - 1;
        rec[last] ^= 1;
        assert_eq!(deaggregate(&rec), Err(KplError::BadDigest));
        let line = payload(&rec);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v["kpl_error"].as_str().unwrap().contains("MD5"));
        let back = base64::engine::general_purpose::STANDARD
            .decode(v["record_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, rec, "nothing of the record is lost");
        assert_eq!(deaggregate(&MAGIC), Err(KplError::Truncated));
    }
}
