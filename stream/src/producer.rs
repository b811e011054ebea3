//! NDJSON lines onto a Kinesis stream: grouped by merchant into records (the
//! partition key is the merchant, so one merchant's events keep their order on
//! one shard) and put with PutRecords, retrying only the entries that failed.
//! `tally ingest --kinesis` and `tally gen --kinesis` use it.
//!
//! A merchant sending more than one shard takes (1 MB/s, about 6,700 events/s
//! at 150 bytes)
//! can be **salted** ([`Salting`]): once its events in the current second pass
//! the configured rate, its records get the partition key `merchant_id#n`
//! (n < k, in turn) and an explicit hash key in the n-th k-th of the hash key
//! space, so they spread over the shards. Nothing downstream reads the
//! partition key (events carry their merchant), and exactly-once holds per
//! shard, as for any merchant.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tally_common::{Error, Result};

/// The most a PutRecords request may carry (Kinesis: 5 MiB including partition keys).
const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;

/// Groups NDJSON lines by merchant into records and puts them with PutRecords.
pub struct KinesisProducer {
    client: aws_sdk_kinesis::Client,
    stream: String,
    per_record: usize,
    /// Records being filled, per partition key: data and events in it.
    open: HashMap<String, (Vec<u8>, usize)>,
    /// Full records waiting for PutRecords: partition key and data.
    ready: Vec<(String, Vec<u8>)>,
    /// Events (non-blank lines) taken.
    pub events: u64,
    /// Records put on the stream.
    pub records: u64,
    /// Entries PutRecords refused and that were sent again.
    pub retried: u64,
    salting: Option<Salting>,
    /// Events per merchant in the current second, and when it began.
    rate: (std::time::Instant, HashMap<String, u64>),
    /// Salted merchants and the salt their next record takes.
    hot: HashMap<String, u32>,
    /// Records put with a salted key.
    pub salted_records: u64,
}

/// When and how a hot merchant's partition key is salted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Salting {
    /// Events per second of one merchant above which its key is salted.
    pub above_per_sec: u64,
    /// Salts (`merchant_id#0` .. `#k-1`): at most this many shards per merchant.
    pub ways: u32,
}

/// The partition key of a line: its merchant id, or a fixed key for unparsable lines
/// (they go to quarantine from any shard).
pub fn partition_key(line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Key<'a> {
        #[serde(borrow)]
        merchant_id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Key<'_>>(tally_common::decode::strip_bom(line))
        .ok()
        .and_then(|k| k.merchant_id)
        .filter(|m| !m.is_empty() && m.len() <= 256)
        .map_or_else(|| "_unkeyed".to_string(), |m| m.into_owned())
}

/// The explicit hash key of a salted partition key `merchant#n`: a point in
/// the n-th of `ways` equal slices of Kinesis's 128-bit hash key space
/// (offset within the slice by the merchant), so the salts of one merchant
/// land on different shards of an evenly split stream. None for a key that is
/// not salted (Kinesis hashes it, MD5, as usual).
pub fn salted_hash_key(key: &str, ways: u32) -> Option<String> {
    use std::hash::{Hash as _, Hasher as _};
    let (merchant, n) = key.rsplit_once('#')?;
    let n: u128 = n.parse().ok()?;
    let ways = u128::from(ways.max(1));
    if n >= ways {
        return None;
    }
    let slice = u128::MAX / ways;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    merchant.hash(&mut h);
    let offset = u128::from(h.finish()) % slice.max(1);
    Some((n * slice + offset).to_string())
}

impl KinesisProducer {
    /// A producer onto `stream` putting records of at most `per_record` events
    /// (NDJSON lines of one merchant; at least 1).
    pub fn new(client: aws_sdk_kinesis::Client, stream: &str, per_record: usize) -> Self {
        KinesisProducer {
            client,
            stream: stream.to_string(),
            per_record: per_record.max(1),
            open: Default::default(),
            ready: Vec::new(),
            events: 0,
            records: 0,
            retried: 0,
            salting: None,
            rate: (std::time::Instant::now(), HashMap::new()),
            hot: HashMap::new(),
            salted_records: 0,
        }
    }

    /// Salt the keys of merchants sending faster than `salting` says (once
    /// salted, a merchant stays salted for the producer's life).
    pub fn with_salting(mut self, salting: Salting) -> Self {
        self.salting = Some(salting).filter(|s| s.ways > 1 && s.above_per_sec > 0);
        self
    }

    /// The partition key for the next event of `merchant_key`: the key itself,
    /// or, for a hot merchant, its next salted key.
    fn key_for(&mut self, merchant_key: String) -> String {
        let Some(salting) = self.salting else {
            return merchant_key;
        };
        if !self.hot.contains_key(&merchant_key) {
            let (since, counts) = &mut self.rate;
            if since.elapsed() >= Duration::from_secs(1) {
                *since = std::time::Instant::now();
                counts.clear();
            }
            let n = counts.entry(merchant_key.clone()).or_default();
            *n += 1;
            if *n <= salting.above_per_sec {
                return merchant_key;
            }
            tracing::info!(merchant = %merchant_key, ways = salting.ways, "salting a hot merchant's partition key");
            self.hot.insert(merchant_key.clone(), 0);
        }
        let next = self.hot.entry(merchant_key.clone()).or_default();
        let n = *next;
        *next = (n + 1) % salting.ways;
        format!("{merchant_key}#{n}")
    }

    /// Take one NDJSON line (blank lines are dropped; a missing newline is
    /// added); full records are put once 500 of them are ready.
    pub async fn push_line(&mut self, line: &[u8]) -> Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let key = self.key_for(partition_key(line));
        let entry = self.open.entry(key.clone()).or_default();
        entry.0.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            entry.0.push(b'\n');
        }
        entry.1 += 1;
        self.events += 1;
        if entry.1 >= self.per_record || entry.0.len() > 512 * 1024 {
            if let Some((data, _)) = self.open.remove(&key) {
                self.ready.push((key, data));
            }
        }
        if self.ready.len() >= 500 {
            self.flush_ready().await?;
        }
        Ok(())
    }

    /// Put the lines `next` yields, keeping to their pace: `next` fills the
    /// line and returns when it is due (time since the start; `None` for as
    /// fast as possible), or returns `None` at the end. Lines are flushed at
    /// least every 1,000 and whenever the next is more than 200 ms ahead, so
    /// what is put never runs ahead of the clock by more than that.
    pub async fn put_paced(
        &mut self,
        mut next: impl FnMut(&mut String) -> Option<Option<std::time::Duration>>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let (mut line, mut since_flush) = (String::new(), 0u32);
        while let Some(due) = next(&mut line) {
            self.push_line(line.as_bytes()).await?;
            since_flush += 1;
            if let Some(due) = due {
                let ahead = due.saturating_sub(started.elapsed());
                if since_flush >= 1_000 || ahead > std::time::Duration::from_millis(200) {
                    self.flush_all().await?;
                    since_flush = 0;
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        self.flush_all().await
    }

    /// Put every record, full or not.
    pub async fn flush_all(&mut self) -> Result<()> {
        let open: Vec<_> = self.open.drain().map(|(k, (d, _))| (k, d)).collect();
        self.ready.extend(open);
        while !self.ready.is_empty() {
            self.flush_ready().await?;
        }
        Ok(())
    }

    async fn flush_ready(&mut self) -> Result<()> {
        // a PutRecords request carries at most 500 records and 5 MiB (data and
        // partition keys together)
        let mut take = 0;
        let mut bytes = 0;
        for (k, d) in self.ready.iter().take(500) {
            let size = k.len() + d.len();
            if take > 0 && bytes + size > MAX_PUT_RECORDS_BYTES {
                break;
            }
            bytes += size;
            take += 1;
        }
        let mut pending: Vec<(String, Vec<u8>)> = self.ready.drain(..take).collect();
        // merchant ids never hold '#' (the decoder refuses them): a salted key
        self.salted_records += pending.iter().filter(|(k, _)| k.contains('#')).count() as u64;
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            let sent = pending.len();
            let entries = pending
                .iter()
                .map(|(k, d)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(k)
                        .set_explicit_hash_key(
                            self.salting.and_then(|s| salted_hash_key(k, s.ways)),
                        )
                        .data(Blob::new(d.clone()))
                        .build()
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::aws_from("a PutRecords entry", e))?;
            let out = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await;
            let out = match out {
                Ok(o) => o,
                Err(e)
                    if attempt < 10
                        && !e.as_service_error().is_some_and(|s| {
                            s.is_invalid_argument_exception()
                                || s.is_resource_not_found_exception()
                                || s.is_access_denied_exception()
                        }) =>
                {
                    tracing::warn!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "PutRecords failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => {
                    return Err(Error::aws_from(
                        &format!("PutRecords to {}", self.stream),
                        e,
                    ))
                }
            };
            let failed: Vec<(String, Vec<u8>)> = out
                .records
                .iter()
                .zip(pending.drain(..))
                .filter(|(r, _)| r.error_code.is_some())
                .map(|(_, p)| p)
                .collect();
            self.records += (sent - failed.len()) as u64;
            if failed.is_empty() {
                return Ok(());
            }
            self.retried += failed.len() as u64;
            pending = failed;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Err(Error::aws(format!(
            "PutRecords to {}: {} entries still failing after retries",
            self.stream,
            pending.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn salted_keys_land_in_their_own_slice_of_the_hash_key_space() {
        for n in 0..4u128 {
            let k: u128 = salted_hash_key(&format!("m_7#{n}"), 4)
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(k / (u128::MAX / 4), n);
        }
        assert_eq!(salted_hash_key("m_7", 4), None);
        assert_eq!(salted_hash_key("m_7#4", 4), None);
    }

    use super::{partition_key, salted_hash_key};

    #[test]
    fn lines_are_keyed_by_merchant_and_unparsable_ones_share_a_key() {
        assert_eq!(partition_key(b"{\"merchant_id\":\"m_7\",\"x\":1}\n"), "m_7");
        assert_eq!(
            partition_key(b"\xef\xbb\xbf{\"merchant_id\":\"m_7\"}"),
            "m_7"
        );
        assert_eq!(partition_key(b"{not json"), "_unkeyed");
        assert_eq!(partition_key(b"{\"merchant_id\":\"\"}"), "_unkeyed");
        let long = format!("{{\"merchant_id\":\"{}\"}}", "m".repeat(257));
        assert_eq!(partition_key(long.as_bytes()), "_unkeyed");
    }
}
