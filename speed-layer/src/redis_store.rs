//! The Redis speed store.
//!
//! **Layout** (key prefix [`KEY_PREFIX`], `H` hours since the epoch). Merchants
//! are grouped in [`BUCKETS`] *buckets* ([`bucket`]: a merchant's Redis
//! Cluster slot divided by 64); `b` below is a hash tag of the bucket's first
//! slot ([`bucket_tag`]).
//!
//! - `tally:v6:{b}:H:log` ([`log_key`]): the bucket-hour's *log*, a string of
//!   frames ([`crate::speed_entry`]). Each batch appends one frame per
//!   bucket-hour it touches (two when a part boundary falls inside the
//!   bucket-hour), with its counter sums and distinct-customer
//!   sketch per 15-minute slot for each of the bucket's merchants it has
//!   events of, built by the client. So the engine's work per batch is one
//!   `APPEND` per bucket-hour, not a command per event, counter or merchant:
//!   Redis engine time is what a speed layer at this volume pays for, and
//!   most of it is per command and per stored element.
//! - `tally:v6:{b}:H` ([`hour_key`]): a hash; field `m` holds merchant `m`'s
//!   merged frame for the hour, field `m/r` ([`rebuilt_field`]) its sums
//!   rebuilt from `raw_events` (one frame, replaced whole by each rebuild
//!   pass, [`crate::rebuild`]). A writer whose append took a log past
//!   [`LOG_COMPACT_AT`] bytes (or past a power of two above it) *compacts*
//!   it: the log's settled frames are merged into their merchants' fields
//!   (an `HSET` per 1,000 merchants) and taken off the log's head. A
//!   merchant that had events in many batches since the last compaction gets
//!   one write: the log batches the writes of many batches, as a bigger batch
//!   would. Compaction is best effort (after the batch is applied); one that
//!   did not take, or a writer that died before it, leaves the log to the
//!   next power of two. A reader takes the merchant's fields and the log
//!   (normally under twice [`LOG_COMPACT_AT`] bytes) and adds up the
//!   merchant's frames; the hash counts compactions in
//!   [`COMPACTIONS_FIELD`], read before and after the log, so a read that a
//!   compaction ran through is made again.
//! - The *view*, a hash: `generation`, `covered_from`, `rebuilt`, and per source
//!   `after:SOURCE` (the rebuild's boundary) and `mark:SOURCE` (the highest
//!   position of that source whose batches are applied in this view). On a
//!   single server there is one view, `tally:v6:view`; on a Redis Cluster one
//!   per bucket, `tally:v6:view:{b}`, in the bucket's slot, so a script may
//!   touch a bucket's keys and its view together. A view is the unit that is
//!   lost together: a server that lost its data (a restart without
//!   persistence, a failover to an empty replica) lost its views too; the
//!   first write afterwards creates the view anew with `covered_from` = now,
//!   and readers know that the hours before are not whole until
//!   [`crate::rebuild`] has filled them from `raw_events` and set `rebuilt`.
//!   The first write of each source after that records `after:SOURCE`:
//!   positions up to it belong to the rebuild, positions beyond it to the
//!   consumers, so neither counts an event the other counts and none is lost
//!   between them. Views have no TTL (one, or [`BUCKETS`] on a cluster): a
//!   view that expired would make its hours unknown until a rebuild.
//! - `VIEW:open` (hash, source -> `ID DONE`) and `VIEW:open:SOURCE` (list of
//!   the logs each part wrote): a batch being applied in several parts.
//!
//! **Exactly once.** A batch's merchant-hours are grouped by view, ordered by
//! bucket-hour and merchant, and sent in parts of at most [`PART_SIZE`]
//! merchant-hours, one script call each (a part keeps Redis busy about 0.3 ms
//! here, BENCHMARKS.md "The stream side at scale"). A part compares the batch's positions with the source's mark
//! in the view (or its `after:` boundary, whichever is higher): at or beyond
//! the batch's last record, all of it was applied before (nothing written);
//! inside the batch, a redelivery cut differently from the delivery that
//! applied part of it (the caller re-sends the records beyond the mark);
//! below its first record, the frames are appended. The view's last part
//! advances the mark in the same atomic step as its writes. Each part records
//! in `VIEW:open`, under the id of the view's share of the batch (a digest of
//! source, first and last position and every merchant-hour and payload, so one
//! id is one set of parts), that it is writing (`ID PART !`) and then that it
//! is done (`ID PART+1`), with its logs in `VIEW:open:SOURCE`. The same share
//! again skips the parts done and goes on; a share cut off inside a part (a
//! failed command leaves the writes before it), or any other delivery (cut or
//! decoded differently: another id), first takes the cut-off share's frames
//! out of the logs again (the frames carry the id; a compaction never merges
//! a frame of a share part way), in calls of at most [`PART_SIZE`] logs,
//! then applies as a whole. So a batch cut off at any point, retried or
//! redelivered in any cut, counts once.
//!
//! **Replication.** Replicas are asynchronous: a write acknowledged by a
//! primary that fails before its replica has it is lost with the failover.
//! When every primary has a replica, a batch counts as applied only once its
//! writes reached one (`WAIT 1`, [`REPLICA_WAIT`]); only then may a consumer
//! checkpoint past its records. A write lost in a failover is then one the
//! stream delivers again, and the marks, replicated in the same view as the
//! frames they guard, make that redelivery count once (tested on a loopback
//! cluster). While a primary has no live replica (after a failover, until
//! the failed node is replaced), batches are acknowledged without waiting,
//! with a warning: a second failure in that window can lose the last batches
//! (the wait counts replicas cluster-wide, the fewest any primary has).
//! `WAIT` does not make Redis strongly consistent: a failover may still
//! promote the one replica that missed a write when a shard has several.
//!
//! Positions are compared as decimal strings of any length (Kinesis sequence
//! numbers have 56 digits and may have up to 129); nothing here parses one
//! into a machine integer.
//!
//! Moving between a single server and a cluster is a new store: the views'
//! layout differs, and the rebuild fills the new one from `raw_events`.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::redis_conn::{tag_of_slot, RedisConn, SLOTS};
use redis::{AsyncCommands, Pipeline, Value};
use tally_common::bucket::{now_micros, MICROS_PER_HOUR, MICROS_PER_SECOND};
use tally_common::decode::MAX_FUTURE_MICROS;
use tally_common::metrics::{BucketRow, Counters, MetricValues};
use tally_common::sketch::CustomerUnion;
use tally_common::source::Position;
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::{Error, Result};

use crate::aggregate::SpeedBatch;
use crate::speed_entry::{
    bucket_entry, frame, frames, log_entries, BucketEntry, HourSums, MerchantEntry, SpeedEntry,
    MERGED_ID,
};
use crate::store::{hour_alive, ApplyReport, ViewState};

/// The key prefix of every speed-view key of this layout (version 6: a log
/// per bucket and hour compacted into a hash of merged merchant fields, marks
/// per view and source). A new prefix because the layout changed: version 5's keys are not
/// read and expire by their TTL; the new views start empty and are rebuilt
/// from `raw_events`.
pub const KEY_PREFIX: &str = "tally:v6";

/// The prefix of every view key: the single server's view is this key itself,
/// a cluster's are `tally:v6:view:{b}` (see the module docs).
pub const VIEW_PREFIX: &str = "tally:v6:view";

/// Buckets of merchants: each bucket-hour is one log and one hash. Few
/// enough that a batch writes many merchants of a bucket with one command (a
/// 10,000-event batch of 100,000 Zipf merchants touches about 3,700
/// merchant-hours, 15 per bucket); many enough that a cluster's primaries
/// share them evenly (a bucket is 64 consecutive slots' merchants and lives
/// in the first of them, so primaries holding equal slot ranges hold equal
/// numbers of buckets) and that a bucket-hour's hash stays small (a
/// 5 M-merchant server: about 20,000 fields).
pub const BUCKETS: u16 = 256;

/// Merchant-hours per script call: bounds how long one call keeps Redis
/// from other clients (BENCHMARKS.md "The stream side at scale").
pub const PART_SIZE: usize = 1024;

/// Logs per undo call (a log may hold up to about twice [`LOG_COMPACT_AT`]
/// bytes, each rewritten whole by an undo).
pub const UNDO_CHUNK: usize = 64;

/// A log is compacted when an append takes it past this many bytes, or past
/// a power of two above it (the apply script's literal `32768`): what a
/// reader reads of a bucket-hour's log is normally under twice this, and the
/// more batches a log holds, the fewer merged fields per event a compaction
/// writes.
pub const LOG_COMPACT_AT: usize = 32 * 1024;

/// Apply one part of a batch to one view.
/// KEYS: view, `VIEW:open`, `VIEW:open:SOURCE`, then the part's bucket-hour
/// logs. ARGV: source, last position, first position, ttl, boundary (the
/// position before the batch's first record, '' when none), batch id (hex; a
/// digest of the view's whole share of the batch), part index, parts in this
/// view, the part's logs (for the open list), then one frame per log.
/// Returns {status, fresh, ...}: fresh is 1 when this call made the view (the
/// server had lost its data or never held any). Status 1: applied, followed
/// by the 1-based indices of logs to compact; 0: applied before (or the
/// rebuild's); -1, mark: the mark falls inside the batch (re-send only the
/// records beyond it); -2, open: a batch of this source was cut off part way
/// (take it out first); -3: an earlier part of this batch has not been
/// applied.
///
/// While a part writes, the open entry reads `ID PART !` and the open list
/// holds its logs: a part cut off inside (a failed command leaves the writes
/// before it) is taken out whole like a cut-off batch, never resumed.
const APPLY_LUA: &str = r#"
local function ge(a, b) return #a > #b or (#a == #b and a >= b) end
-- the highest power of two at or below n
local function pow2(n) local p = 1 while p * 2 <= n do p = p * 2 end return p end
local src, last, first, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id, part, parts = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local v = redis.call('HMGET', KEYS[1], 'generation', 'rebuilt', 'after:' .. src, 'mark:' .. src)
local fresh = 0
if not v[1] then
  -- a later part finding no view: the server lost it between parts; the
  -- retry's first part makes the view (and reports it)
  if part ~= 0 then return {-3, 0} end
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'generation', now, 'covered_from', now, 'rebuilt', '0')
  v[2] = '0'
  fresh = 1
end
local after = v[3]
if not after then
  -- once the rebuild is done, a source new to the view lost nothing: it owns all
  after = ARGV[5]
  if v[2] == '1' then after = '' end
  redis.call('HSET', KEYS[1], 'after:' .. src, after)
end
local mark = v[4]
if after ~= '' and (not mark or ge(after, mark)) then mark = after end
if mark then
  if ge(mark, last) then return {0, fresh} end
  if ge(mark, first) then return {-1, fresh, mark} end
end
local open = redis.call('HGET', KEYS[2], src)
if open then
  local oid, done, dirty = string.match(open, '^(%x+) (%d+)( ?!?)$')
  if oid ~= id or dirty ~= '' then return {-2, fresh, open} end
  done = tonumber(done)
  if part < done then return {0, fresh} end
  if part > done then return {-3, fresh} end
elseif part ~= 0 then
  return {-3, fresh}
end
redis.call('HSET', KEYS[2], src, id .. ' ' .. part .. ' !')
redis.call('RPUSH', KEYS[3], ARGV[9])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
local out = {1, fresh}
for j = 4, #KEYS do
  local frame = ARGV[j + 6]
  local len = redis.call('APPEND', KEYS[j], frame)
  -- NX: a log emptied by a compaction keeps the TTL of its first write
  if len == #frame then redis.call('EXPIRE', KEYS[j], ttl, 'NX') end
  -- past 32 KiB, and just past a power of two: compacted once each time it
  -- doubles should a compaction not take
  if len > 32768 and pow2(len) > len - #frame then out[#out + 1] = j - 3 end
end
if part == parts - 1 then
  redis.call('HSET', KEYS[1], 'mark:' .. src, last)
  redis.call('HDEL', KEYS[2], src)
  redis.call('DEL', KEYS[3])
else
  redis.call('HSET', KEYS[2], src, id .. ' ' .. (part + 1))
end
return out
"#;

/// Take a cut-off batch's frames out of some of the logs its parts wrote
/// (called in chunks of at most [`UNDO_CHUNK`] logs, so no call keeps Redis
/// long; removing a batch's frames twice is harmless). Each call first makes
/// the open entry dirty (`ID PART !`): an undo cut off between its calls
/// leaves the batch refused for resuming, so its next delivery undoes it
/// again, whole, rather than resume parts whose frames are gone.
/// KEYS: `VIEW:open`, `VIEW:open:SOURCE`, the logs. ARGV: source, the open
/// entry expected (as read for the first call, its dirty form after), the
/// batch id (8 bytes), 1 for the last chunk (which clears the open entry and
/// list), the dirty form. Returns 1, or 0 when the open entry changed
/// meanwhile (nothing done).
const UNDO_LUA: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
for j = 3, #KEYS do
  local s = redis.call('GET', KEYS[j])
  if s then
    local out, pos, changed = {}, 1, false
    while pos <= #s do
      local len = struct.unpack('<I4', s, pos)
      local frame = string.sub(s, pos, pos + 11 + len)
      if string.sub(frame, 5, 12) == ARGV[3] then changed = true else out[#out + 1] = frame end
      pos = pos + 12 + len
    end
    if changed then redis.call('SET', KEYS[j], table.concat(out), 'KEEPTTL') end
  end
end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
end
return 1
"#;

/// Compact a log, as read: merge its settled frames into their merchants'
/// fields and replace its head by the frames of batches part way (kept as
/// they are: they may have to be taken out), when its first bytes are still
/// those read and the batches part way are still the same. Appends since the
/// read stay after it. (The fields change only with the log's head, so the
/// head's digest vouches for the fields read too.)
/// The view's generation is checked too: a log rebuilt byte for byte after
/// a loss (the same batch delivered again) is another view's. Each
/// compaction counts itself in the hash's [`COMPACTIONS_FIELD`], so a reader
/// sees whether one ran between its reads.
/// KEYS: the log, the bucket-hour hash, `VIEW:open`, the view. ARGV: bytes
/// read, their SHA-1, the ids of the batches part way (sorted, hex,
/// comma-separated), the frames kept, ttl, the view's generation as read,
/// then pairs of merchant and merged frame. Returns 1, or 0 when nothing was
/// done.
const COMPACT_LUA: &str = r#"
local n = tonumber(ARGV[1])
if redis.call('HGET', KEYS[4], 'generation') ~= ARGV[6] then return 0 end
local head = redis.call('GETRANGE', KEYS[1], 0, n - 1)
if #head ~= n or redis.sha1hex(head) ~= ARGV[2] then return 0 end
local open = {}
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
  local id = string.match(v, '^(%x+)')
  if id then open[#open + 1] = id end
end
table.sort(open)
if table.concat(open, ',') ~= ARGV[3] then return 0 end
-- in chunks: unpack takes a few thousand values at most
for i = 7, #ARGV, 2000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + 1999, #ARGV)))
end
redis.call('HINCRBY', KEYS[2], '/compactions', 1)
redis.call('EXPIRE', KEYS[2], ARGV[5], 'NX')
redis.call('SET', KEYS[1], ARGV[4] .. redis.call('GETRANGE', KEYS[1], n, -1), 'KEEPTTL')
return 1
"#;

/// The field of a bucket-hour's hash counting the compactions of its log
/// (`/` is not in a merchant id).
pub const COMPACTIONS_FIELD: &str = "/compactions";

/// A merchant's bucket, 0 to [`BUCKETS`] − 1: its Redis Cluster slot (CRC16
/// /XMODEM of the id modulo 16,384, the Redis Cluster specification's key
/// hash; merchant ids have no `{`) divided by 64.
pub fn bucket(merchant: &str) -> u16 {
    let slot = crc16::State::<crc16::XMODEM>::calculate(merchant.as_bytes()) % SLOTS;
    slot / (SLOTS / BUCKETS)
}

/// The hash tag of bucket `b`: a tag of the bucket's first slot, so buckets
/// spread over a cluster's primaries as their slot ranges do.
pub fn bucket_tag(b: u16) -> &'static str {
    tag_of_slot(b * (SLOTS / BUCKETS))
}

/// The key of merchant `merchant`'s bucket at `hour` (epoch µs, any time in
/// the hour): `tally:v6:{b}:H`, a hash whose field `merchant` holds the
/// merchant-hour's merged frame and [`rebuilt_field`] its rebuilt sums.
pub fn hour_key(merchant: &str, hour: i64) -> String {
    format!(
        "{KEY_PREFIX}:{{{}}}:{}",
        bucket_tag(bucket(merchant)),
        hour.div_euclid(MICROS_PER_HOUR)
    )
}

/// The log of merchant `merchant`'s bucket at `hour` (epoch µs, any time in
/// the hour): [`hour_key`] plus `:log`, in the same slot.
pub fn log_key(merchant: &str, hour: i64) -> String {
    format!("{}:log", hour_key(merchant, hour))
}

/// The field of a merchant-hour's sums rebuilt from `raw_events`, in its
/// [`hour_key`] hash: `merchant/r` (`/` is not in a merchant id, so it names
/// no merchant).
pub fn rebuilt_field(merchant: &str) -> String {
    format!("{merchant}/r")
}

/// The id of one view's share of a delivery: the first 8 bytes of the SHA-1
/// of its source, first and last position, the part size, and every
/// bucket-hour key, field and payload in order. The same id means the same
/// parts (a redelivery decoded differently, e.g. an event no longer in the
/// future, or cut differently, has another id and is never resumed by the
/// wrong parts).
fn share_id<'a>(
    source: &str,
    first: &str,
    last: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>,
) -> [u8; 8] {
    let mut h = sha1_smol::Sha1::new();
    for s in [source, first, last, &PART_SIZE.to_string()] {
        h.update(s.as_bytes());
        h.update(&[0]);
    }
    for (key, field, payload) in entries {
        for b in [key.as_bytes(), field.as_bytes(), payload] {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
    let d = h.digest().bytes();
    d[..8].try_into().expect("20 bytes")
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<[u8; 8]> {
    let mut out = [0u8; 8];
    if s.len() != 16 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Keys as one list entry (`VIEW:open:SOURCE`): each a u32 length (little-endian) then its bytes.
fn encode_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
    }
    out
}

fn decode_keys(mut b: &[u8]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        out.push(String::from_utf8(b.get(4..4 + len)?.to_vec()).ok()?);
        b = &b[4 + len..];
    }
    Some(out)
}

/// A part's bucket-hour logs in order, each with its run of merchant-hours
/// (indices into the batch's updates).
fn runs<'p>(part: &'p Part, prepared: &'p Prepared) -> Vec<(&'p str, &'p [usize])> {
    let mut out = Vec::new();
    let mut start = 0;
    for (j, &i) in part.updates.iter().enumerate() {
        let next = part.updates.get(j + 1).map(|&n| prepared.keys[n].as_str());
        if next != Some(prepared.keys[i].as_str()) {
            out.push((prepared.keys[i].as_str(), &part.updates[start..=j]));
            start = j + 1;
        }
    }
    out
}

/// One script call's share of a batch: merchant-hours of one view.
struct Part {
    view: String,
    /// Indices into the batch's updates.
    updates: Vec<usize>,
    index: usize,
    count: usize,
    /// The view's share's id ([`share_id`]).
    id: [u8; 8],
}

/// A batch's merchant-hours, ready to send, by update: bucket-hour logs,
/// merchant ids and encoded entries.
struct Prepared<'a> {
    keys: Vec<String>,
    fields: Vec<&'a str>,
    payloads: Vec<Vec<u8>>,
}

/// The Redis speed store; cheap to clone (one multiplexed, self-reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    url_for_errors: String,
    ttl_secs: u64,
    script_sha: String,
    max_attempts: u32,
    /// Replicas every write must reach before a batch counts as applied
    /// (`WAIT`): 1 when every primary has a replica, else 0; looked at again
    /// every [`REPLICAS_RECHECK`] (after a failover a shard has no replica
    /// until its old primary comes back as one).
    wait_replicas: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When (epoch µs) `wait_replicas` is looked at next.
    replicas_next_check: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// How often the replicas a write must reach are counted again.
pub const REPLICAS_RECHECK: Duration = Duration::from_secs(30);

/// How long a batch waits for its writes to reach a replica (`WAIT`) before
/// the attempt counts as failed.
pub const REPLICA_WAIT: Duration = Duration::from_secs(2);

impl RedisStore {
    /// Connect to `url` (redis:// or rediss://); a merchant-hour's keys expire
    /// `ttl_secs` after their first write.
    pub async fn connect(url: &str, ttl_secs: u64) -> Result<Self> {
        let shown = redact(url);
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(format!("bad Redis URL {shown}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2);
        let manager = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| {
            Error::Timeout(format!(
                "Redis at {shown} did not accept a connection within 5 s: is redis-server running? \
                 set TALLY_REDIS_URL, or unset it for the embedded store"
            ))
        })?
        .map_err(|e| unreachable_error(&shown, e))?;
        let conn = match cluster_enabled(&manager).await {
            false => RedisConn::Single(manager),
            true => {
                // the node named is one way in; the client learns the others
                let cluster = redis::cluster::ClusterClientBuilder::new(vec![url])
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(10))
                    .retries(4)
                    .build()
                    .map_err(|e| Error::config(format!("bad Redis Cluster URL {shown}: {e}")))?;
                let c =
                    tokio::time::timeout(Duration::from_secs(10), cluster.get_async_connection())
                        .await
                        .map_err(|_| {
                            Error::Timeout(format!(
                        "the Redis Cluster at {shown} did not accept connections within 10 s"
                    ))
                        })?
                        .map_err(|e| unreachable_error(&shown, e))?;
                tracing::info!(url = %shown, "Redis is a cluster: keys are spread over its primaries");
                RedisConn::Cluster(c)
            }
        };
        let script_sha = redis::Script::new(APPLY_LUA).get_hash().to_string();
        warn_if_evicting(&conn, &shown).await;
        let wait_replicas = match conn.min_replicas().await {
            Ok(n) => n.min(1),
            Err(e) => {
                // counted again every REPLICAS_RECHECK; until then writes do not wait
                tracing::warn!(url = %shown, error = %e, "cannot count Redis replicas; speed batches do not wait for one until they can be counted");
                0
            }
        };
        let wait_replicas = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(wait_replicas));
        let replicas_next_check = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(
            now_micros() + REPLICAS_RECHECK.as_micros() as i64,
        ));
        let store = RedisStore {
            conn,
            url_for_errors: shown,
            ttl_secs,
            script_sha,
            max_attempts: 3,
            wait_replicas,
            replicas_next_check,
        };
        store.load_script().await?;
        Ok(store)
    }

    /// How many times a failing batch is tried before the error is returned.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    async fn load_script(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPLY_LUA)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A failed command: Redis out of reach (connection refused, dropped or
    /// timed out), or a command it refused (e.g. `OOM` under `noeviction`).
    fn err(&self, e: redis::RedisError) -> Error {
        if e.is_timeout() {
            Error::Timeout(format!(
                "Redis at {} did not answer: {e}",
                self.url_for_errors
            ))
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            unreachable_error(&self.url_for_errors, e)
        } else if matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
            || e.kind() == redis::ErrorKind::AuthenticationFailed
        {
            Error::speed_from(
                format!(
                    "Redis at {} refused tally's credentials: give its AUTH token \
                     (TALLY_REDIS_AUTH_SECRET_ARN, or the password in TALLY_REDIS_URL)",
                    self.url_for_errors
                ),
                e,
            )
        } else {
            Error::speed_from(
                format!("Redis at {} refused a command", self.url_for_errors),
                e,
            )
        }
    }

    /// The view of a bucket's keys: the server's one view, or on a cluster
    /// the bucket's own (`tally:v6:view:{b}`).
    pub fn bucket_view(&self, bucket: u16) -> String {
        match &self.conn {
            RedisConn::Single(_) => VIEW_PREFIX.to_string(),
            RedisConn::Cluster(_) => format!("{VIEW_PREFIX}:{{{}}}", bucket_tag(bucket)),
        }
    }

    /// The view of `merchant`'s keys (every hour of a merchant is in one).
    pub fn merchant_view(&self, merchant: &str) -> String {
        self.bucket_view(bucket(merchant))
    }

    /// Every view key: one on a single server, one per bucket on a cluster.
    pub fn all_views(&self) -> Vec<String> {
        match &self.conn {
            RedisConn::Single(_) => vec![VIEW_PREFIX.to_string()],
            RedisConn::Cluster(_) => (0..BUCKETS).map(|b| self.bucket_view(b)).collect(),
        }
    }

    /// The batch's merchant-hours grouped by view (first-seen order), each
    /// view's ordered by bucket-hour key and merchant (so the same records
    /// always give the same parts, and a part writes each bucket-hour with
    /// one command), in parts of [`PART_SIZE`].
    fn parts(&self, batch: &SpeedBatch, prepared: &Prepared) -> Vec<Part> {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for (i, u) in batch.updates.iter().enumerate() {
            let view = self.merchant_view(&u.merchant_id);
            let g = *at.entry(view.clone()).or_insert_with(|| {
                groups.push((view, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        for (_, updates) in &mut groups {
            updates.sort_by(|&a, &b| {
                (&prepared.keys[a], prepared.fields[a])
                    .cmp(&(&prepared.keys[b], prepared.fields[b]))
            });
        }
        let source = batch.source.as_str();
        let first = batch.first_position.as_ref().map_or("", |p| p.as_str());
        let last = batch.last_position.as_ref().map_or("", |p| p.as_str());
        let mut parts = Vec::new();
        for (view, updates) in groups {
            let id = share_id(
                source,
                first,
                last,
                updates.iter().map(|&i| {
                    (
                        prepared.keys[i].as_str(),
                        prepared.fields[i],
                        &prepared.payloads[i][..],
                    )
                }),
            );
            let count = updates.len().div_ceil(PART_SIZE);
            for (index, chunk) in updates.chunks(PART_SIZE).enumerate() {
                parts.push(Part {
                    view: view.clone(),
                    updates: chunk.to_vec(),
                    index,
                    count,
                    id,
                });
            }
        }
        parts
    }

    /// One pipeline of the script calls of `parts[todo]`.
    fn pipeline(
        &self,
        batch: &SpeedBatch,
        prepared: &Prepared,
        parts: &[Part],
        todo: &[usize],
    ) -> Pipeline {
        let source = batch.source.as_str();
        let first = batch.first_position.as_ref().map_or("", |p| p.as_str());
        let last = batch.last_position.as_ref().map_or("", |p| p.as_str());
        // the rebuild owns what came before the batch's first record, should the view be new
        let boundary = batch
            .first_position
            .as_ref()
            .and_then(Position::pred)
            .map_or_else(String::new, |p| p.as_str().to_string());
        let mut pipe = redis::pipe();
        for &p in todo {
            let part = &parts[p];
            let runs = runs(part, prepared);
            let keys: Vec<&str> = runs.iter().map(|(k, _)| *k).collect();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(&self.script_sha)
                .arg(3 + keys.len())
                .arg(&part.view)
                .arg(format!("{}:open", part.view))
                .arg(format!("{}:open:{source}", part.view))
                .arg(&keys)
                .arg(source)
                .arg(last)
                .arg(first)
                .arg(self.ttl_secs)
                .arg(&boundary)
                .arg(to_hex(&part.id))
                .arg(part.index)
                .arg(part.count)
                .arg(encode_keys(keys.iter().copied()));
            for (_, run) in runs {
                // one frame per log: the batch's sums for each of its merchants
                let entry = BucketEntry {
                    merchants: run
                        .iter()
                        .map(|&i| MerchantEntry {
                            merchant: prepared.fields[i].to_string(),
                            entry: prepared.payloads[i].clone().into(),
                        })
                        .collect(),
                };
                cmd.arg(frame(&part.id, &prost::Message::encode_to_vec(&entry)));
            }
        }
        pipe
    }

    /// The serving store on the same server and connection.
    pub fn serving_store(&self) -> crate::RedisServingStore {
        crate::RedisServingStore::new(self.conn.clone(), self.url_for_errors.clone())
    }

    /// The time to live of every key written, seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// A connection for the rebuild's own commands.
    pub(crate) fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The error for a failed command.
    pub(crate) fn command_error(&self, e: redis::RedisError) -> Error {
        self.err(e)
    }

    /// The view key's state; None when the server holds no view (it lost its data,
    /// or never held any).
    pub async fn view_state(&self) -> Result<Option<ViewState>> {
        let views = self.view_states().await?;
        let mut whole: Option<ViewState> = None;
        for (_, v) in views {
            let Some(v) = v else { return Ok(None) };
            whole = Some(match whole {
                None => v,
                Some(w) => ViewState {
                    generation: w.generation.max(v.generation),
                    covered_from: w.covered_from.max(v.covered_from),
                    rebuilt: w.rebuilt && v.rebuilt,
                    after: Vec::new(),
                },
            });
        }
        Ok(whole)
    }

    /// Every view's key and state (None: no view), in one pipeline (by slot
    /// on a cluster): one view on a single server, [`BUCKETS`] on a cluster.
    pub async fn view_states(&self) -> Result<Vec<(String, Option<ViewState>)>> {
        let keys = self.all_views();
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hgetall(k);
        }
        let mut c = self.conn.clone();
        let replies: Vec<Vec<(String, String)>> =
            pipe.query_async(&mut c).await.map_err(|e| self.err(e))?;
        Ok(keys
            .into_iter()
            .zip(replies)
            .map(|(k, f)| (k, ViewState::from_fields(f)))
            .collect())
    }

    /// Which server holds each view: view key -> index of its primary (views
    /// lost together are on one; a slot being migrated has none).
    pub async fn view_servers(&self) -> Result<HashMap<String, usize>> {
        if !self.conn.is_cluster() {
            return Ok(HashMap::from([(VIEW_PREFIX.to_string(), 0)]));
        }
        let ranges = self.conn.primary_ranges().await.map_err(|e| self.err(e))?;
        let mut out = HashMap::with_capacity(usize::from(BUCKETS));
        for bucket in 0..BUCKETS {
            let slot = bucket * (SLOTS / BUCKETS);
            if let Some(i) = ranges
                .iter()
                .position(|r| r.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            {
                out.insert(self.bucket_view(bucket), i);
            }
        }
        Ok(out)
    }

    /// Whether every view is whole, from a look at one view per server
    /// holding keys (a server that lost its data lost every view it held; a
    /// rebuild makes every view at once): cheap enough for
    /// [`crate::rebuild::keep_rebuilt`]'s check every couple of seconds.
    /// Errors: Redis unreachable.
    pub async fn views_whole(&self) -> Result<bool> {
        let probes: Vec<String> = match &self.conn {
            RedisConn::Single(_) => vec![VIEW_PREFIX.to_string()],
            RedisConn::Cluster(_) => {
                // per primary, the view of the first bucket it holds (a primary
                // holding no bucket's slot holds no view)
                let mut probes: Vec<(usize, String)> = Vec::new();
                for (view, server) in self.view_servers().await? {
                    match probes.iter_mut().find(|(s, _)| *s == server) {
                        Some(p) if p.1 <= view => {}
                        Some(p) => p.1 = view,
                        None => probes.push((server, view)),
                    }
                }
                probes.into_iter().map(|(_, v)| v).collect()
            }
        };
        let mut pipe = redis::pipe();
        for k in &probes {
            pipe.hget(k, "rebuilt");
        }
        let mut c = self.conn.clone();
        let replies: Vec<Option<String>> =
            pipe.query_async(&mut c).await.map_err(|e| self.err(e))?;
        Ok(!replies.is_empty() && replies.iter().all(|r| r.as_deref() == Some("1")))
    }

    async fn apply_once(&self, pipe: &Pipeline) -> redis::RedisResult<Vec<Value>> {
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await
    }

    /// Wait until this connection's writes reached a replica of every primary
    /// (`WAIT`), when every primary has one: what lets a caller checkpoint past
    /// a batch (see the module docs). Tried up to the store's attempts.
    /// Errors: a primary's replica did not acknowledge within [`REPLICA_WAIT`].
    async fn await_replicas(&self) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_micros();
        if now >= self.replicas_next_check.load(Relaxed) {
            self.replicas_next_check
                .store(now + REPLICAS_RECHECK.as_micros() as i64, Relaxed);
            if let Ok(n) = self.conn.min_replicas().await {
                self.wait_replicas.store(n.min(1), Relaxed);
            }
        }
        let mut attempt = 1;
        loop {
            let wanted = self.wait_replicas.load(Relaxed);
            if wanted == 0 {
                return Ok(());
            }
            let mut c = self.conn.clone();
            let acked: i64 = redis::cmd("WAIT")
                .arg(wanted)
                .arg(REPLICA_WAIT.as_millis() as u64)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            if acked >= wanted as i64 {
                return Ok(());
            }
            // a shard may have lost its replica (a failover): count again
            let now_have = self.conn.min_replicas().await.unwrap_or(wanted).min(1);
            self.wait_replicas.store(now_have, Relaxed);
            if now_have < wanted {
                tracing::warn!(
                    "a Redis primary has no replica (after a failover?): speed-view writes are \
                     acknowledged unreplicated until it has one again"
                );
                return Ok(());
            }
            if attempt >= self.max_attempts {
                return Err(Error::speed(format!(
                    "Redis at {}: a speed-view write did not reach a replica within {} s (WAIT); \
                     the batch counts as not applied and is delivered again",
                    self.url_for_errors,
                    REPLICA_WAIT.as_secs()
                )));
            }
            attempt += 1;
        }
    }
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

/// Warn when the server may evict keys: an evicted counter would be a silent
/// loss the view key cannot see (it notices only a server that lost everything).
/// Managed servers may refuse `CONFIG`; then the deployment's parameter group
/// (`maxmemory-policy noeviction`, `infra/terraform/`) is what holds.
async fn warn_if_evicting(conn: &RedisConn, url: &str) {
    let replies = conn
        .on_each_primary(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
        .await;
    for v in replies.into_iter().flatten() {
        let v: Vec<String> = redis::from_redis_value(v).unwrap_or_default();
        if let Some(p) = v.get(1).filter(|p| p.as_str() != "noeviction") {
            tracing::warn!(url, policy = %p, "Redis may evict speed-view keys under memory pressure; set maxmemory-policy noeviction");
        }
    }
}

/// Whether the server is a node of a Redis Cluster (`INFO cluster`).
async fn cluster_enabled(conn: &ConnectionManager) -> bool {
    let mut c = conn.clone();
    let info: redis::RedisResult<String> =
        redis::cmd("INFO").arg("cluster").query_async(&mut c).await;
    info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

fn unreachable_error(url: &str, e: redis::RedisError) -> Error {
    Error::speed_from(
        format!(
            "cannot reach Redis at {url}: is redis-server running? \
             set TALLY_REDIS_URL, or unset it for the embedded store"
        ),
        e,
    )
}

impl RedisStore {
    /// Whether the hour starting at `hour` is whole in a view whole from
    /// `covered_from` (None: no view at all) at `now`: events reach the view at
    /// most [`MAX_FUTURE_MICROS`] before their hour, and a key lives `ttl` after
    /// its first write, so an hour older than the TTL may have expired while the
    /// batch layer was stalled.
    fn covers(&self, covered_from: Option<i64>, hour: i64, now: i64) -> bool {
        let ttl = i64::try_from(self.ttl_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(MICROS_PER_SECOND);
        hour_alive(hour, now, ttl)
            && covered_from.is_some_and(|c| hour.saturating_sub(MAX_FUTURE_MICROS) >= c)
    }
}

fn unexpected<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> Error {
    Error::speed_from(format!("unexpected {what} reply from Redis"), e)
}

/// A part call's reply: its status, whether it made the view, and what follows.
fn part_reply(v: Value) -> Result<(i64, bool, Vec<Value>)> {
    let mut items: Vec<Value> = redis::from_redis_value(v).map_err(|e| unexpected("script", e))?;
    if items.len() < 2 {
        return Err(Error::speed("a short reply from the speed-view script"));
    }
    let rest = items.split_off(2);
    let fresh: i64 = redis::from_redis_value(items.pop().unwrap_or(Value::Nil))
        .map_err(|e| unexpected("script", e))?;
    let status: i64 = redis::from_redis_value(items.pop().unwrap_or(Value::Nil))
        .map_err(|e| unexpected("script", e))?;
    Ok((status, fresh == 1, rest))
}

/// The write side, as [`crate::SpeedStore`] has it.
impl RedisStore {
    /// Apply a batch's updates (atomically per part: one view's merchant-hours,
    /// at most [`PART_SIZE`] of them) in one pipelined round trip, retried with
    /// backoff up to the store's attempts; a batch of this source cut off part
    /// way in a view is first taken out there (see the module docs).
    pub async fn apply(&self, batch: &SpeedBatch) -> Result<ApplyReport> {
        if batch.updates.is_empty() {
            return Ok(ApplyReport::default());
        }
        let source = batch.source.as_str();
        let prepared = Prepared {
            keys: batch
                .updates
                .iter()
                .map(|u| log_key(&u.merchant_id, u.hour))
                .collect(),
            fields: batch
                .updates
                .iter()
                .map(|u| u.merchant_id.as_str())
                .collect(),
            payloads: batch
                .updates
                .iter()
                .map(|u| prost::Message::encode_to_vec(&SpeedEntry::from_update(u)))
                .collect(),
        };
        let parts = self.parts(batch, &prepared);
        let mut todo: Vec<usize> = (0..parts.len()).collect();
        let mut report = ApplyReport::default();
        // logs to compact, with their views
        let mut long: Vec<(String, String)> = Vec::new();
        let mut undo_rounds = 0;
        while !todo.is_empty() {
            let results = self
                .run_parts(&self.pipeline(batch, &prepared, &parts, &todo))
                .await?;
            let mut undo: Vec<(String, String)> = Vec::new();
            let mut again = Vec::new();
            let mut out_of_order = false;
            for (&p, r) in todo.iter().zip(results) {
                let part = &parts[p];
                let (status, fresh, rest) = part_reply(r)?;
                report.view_created |= fresh;
                let first_string = |rest: Vec<Value>| -> Result<String> {
                    redis::from_redis_value(rest.into_iter().next().unwrap_or(Value::Nil))
                        .map_err(|e| unexpected("script", e))
                };
                match status {
                    1 => {
                        report.applied += part.updates.len();
                        let logs = runs(part, &prepared);
                        for v in rest {
                            let j: usize =
                                redis::from_redis_value(v).map_err(|e| unexpected("script", e))?;
                            if let Some((log, _)) = j.checked_sub(1).and_then(|j| logs.get(j)) {
                                long.push((log.to_string(), part.view.clone()));
                            }
                        }
                    }
                    0 => report.skipped += part.updates.len(),
                    -1 => {
                        let mark = Position::parse(&first_string(rest)?)?;
                        report
                            .overlaps
                            .extend(part.updates.iter().map(|&i| (i, mark.clone())));
                    }
                    -2 => {
                        let open = first_string(rest)?;
                        if !undo.iter().any(|(v, _)| *v == part.view) {
                            undo.push((part.view.clone(), open));
                        }
                        again.push(p);
                    }
                    _ => out_of_order = true,
                }
            }
            if out_of_order {
                // an earlier part failed (its error failed the pipeline, which was
                // retried) or the view was lost meanwhile: deliver it again
                return Err(Error::speed(format!(
                    "Redis at {}: a part of a speed batch of {source} came before the part \
                     it follows (an earlier one failed, or the view was lost meanwhile); \
                     the batch is delivered again",
                    self.url_for_errors
                )));
            }
            if undo.is_empty() {
                break;
            }
            undo_rounds += 1;
            if undo_rounds > 3 {
                return Err(Error::speed(format!(
                    "Redis at {}: batches of {source} cut off part way kept appearing; not applied",
                    self.url_for_errors
                )));
            }
            for (view, open) in undo {
                tracing::warn!(%source, %view, %open, "a speed batch was cut off part way; taking it out before applying its redelivery");
                self.undo(&view, source, &open).await?;
            }
            todo = again;
        }
        self.await_replicas().await?;
        // best effort: a long log is still read right, and compacted at its next doubling
        use futures::StreamExt as _;
        futures::stream::iter(long)
            .for_each_concurrent(8, |(log, view)| async move {
                if let Err(e) = self.compact(&log, &view).await {
                    tracing::warn!(error = %e, %log, "compacting a speed-view log failed");
                }
            })
            .await;
        Ok(report)
    }

    /// Send one pipeline of part calls, retried with backoff.
    async fn run_parts(&self, pipe: &Pipeline) -> Result<Vec<Value>> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.apply_once(pipe).await {
                Ok(results) => return Ok(results),
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // a restarted or failed-over server lost its script cache; the marks make
                    // re-running the already-applied parts harmless
                    self.load_script().await?;
                }
                Err(e) if attempt >= self.max_attempts => return Err(self.err(e)),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "speed batch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
            attempt += 1;
        }
    }

    /// Take the frames of `source`'s batch cut off part way (`open`, as the
    /// view's open entry reads) out of the logs its parts wrote.
    async fn undo(&self, view: &str, source: &str, open: &str) -> Result<()> {
        let list = format!("{view}:open:{source}");
        let id = open.split(' ').next().and_then(from_hex).ok_or_else(|| {
            Error::speed(format!("a speed view's open entry `{open}` does not parse"))
        })?;
        let mut c = self.conn.clone();
        let entries: Vec<Vec<u8>> = c.lrange(&list, 0, -1).await.map_err(|e| self.err(e))?;
        let mut keys = Vec::new();
        for e in &entries {
            keys.extend(decode_keys(e).ok_or_else(|| {
                Error::speed(format!("the speed view's list {list} does not parse"))
            })?);
        }
        keys.sort();
        keys.dedup();
        let chunks: Vec<&[String]> = if keys.is_empty() {
            vec![&[]]
        } else {
            keys.chunks(UNDO_CHUNK).collect()
        };
        let n = chunks.len();
        let dirty = match open.ends_with(" !") {
            true => open.to_string(),
            false => format!("{open} !"),
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let expected = if i == 0 { open } else { dirty.as_str() };
            let done: i64 = redis::cmd("EVAL")
                .arg(UNDO_LUA)
                .arg(2 + chunk.len())
                .arg(format!("{view}:open"))
                .arg(&list)
                .arg(chunk)
                .arg(source)
                .arg(expected)
                .arg(&id[..])
                .arg(u8::from(i + 1 == n))
                .arg(&dirty)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            if done == 0 {
                // another writer of this source took it out (or went on) meanwhile
                break;
            }
        }
        Ok(())
    }

    /// Compact `log` (of `view`): merge its settled frames into their
    /// merchants' fields, keep the frames of batches part way (see
    /// `COMPACT_LUA`). Nothing is done when the log changed at its head
    /// meanwhile (another writer compacted it, or a cut-off batch was taken
    /// out).
    async fn compact(&self, log: &str, view: &str) -> Result<()> {
        let hash = log.strip_suffix(":log").unwrap_or(log);
        let open_key = format!("{view}:open");
        let mut c = self.conn.clone();
        let (value, open, generation): (Option<Vec<u8>>, Vec<String>, Option<String>) =
            redis::pipe()
                .get(log)
                .hvals(&open_key)
                .hget(view, "generation")
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
        let (Some(value), Some(generation)) = (value, generation) else {
            return Ok(());
        };
        let mut open: Vec<String> = open
            .iter()
            .filter_map(|o| o.split(' ').next().map(str::to_string))
            .collect();
        open.sort();
        let open_ids: Vec<[u8; 8]> = open.iter().filter_map(|o| from_hex(o)).collect();
        let mut kept: Vec<u8> = Vec::new();
        // merchant -> its settled entries, first-seen order
        let mut settled: Vec<(String, Vec<bytes::Bytes>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for f in frames(&value)? {
            if open_ids.contains(&f.id) {
                kept.extend_from_slice(f.bytes);
                continue;
            }
            for m in bucket_entry(f.payload)?.merchants {
                let k = *at.entry(m.merchant.clone()).or_insert_with(|| {
                    settled.push((m.merchant.clone(), Vec::new()));
                    settled.len() - 1
                });
                settled[k].1.push(m.entry);
            }
        }
        if settled.is_empty() {
            return Ok(());
        }
        let merchants: Vec<&str> = settled.iter().map(|(m, _)| m.as_str()).collect();
        let fields: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(hash)
            .arg(&merchants)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let digest = sha1_smol::Sha1::from(&value).digest().to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPACT_LUA)
            .arg(4)
            .arg(log)
            .arg(hash)
            .arg(&open_key)
            .arg(view)
            .arg(value.len())
            .arg(digest)
            .arg(open.join(","))
            .arg(kept)
            .arg(self.ttl_secs)
            .arg(generation);
        for ((merchant, entries), field) in settled.iter().zip(fields) {
            let mut sums = HourSums::default();
            if let Some(v) = field {
                sums.add_value(&v)?;
            }
            for e in entries {
                sums.add_payload(e)?;
            }
            cmd.arg(merchant).arg(sums.to_entry().to_frame(&MERGED_ID));
        }
        let _: i64 = cmd.query_async(&mut c).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The stored checkpoint of a consumer.
    pub async fn checkpoint(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        c.get(format!("{KEY_PREFIX}:checkpoint:{key}"))
            .await
            .map_err(|e| self.err(e))
    }

    /// Store a consumer's checkpoint (it expires with the store's TTL).
    pub async fn set_checkpoint(&self, key: &str, value: &str) -> Result<()> {
        let mut c = self.conn.clone();
        // like every key the speed layer writes, a checkpoint expires: a consumer
        // idle for longer re-reads from its start position, and the marks and the
        // view's boundaries keep that exactly once
        c.set_ex(
            format!("{KEY_PREFIX}:checkpoint:{key}"),
            value,
            self.ttl_secs,
        )
        .await
        .map_err(|e| self.err(e))
    }
}

/// Per hour read: the merchant's merged field, rebuilt field and the log.
type HourRead = [Option<Vec<u8>>; 3];

impl RedisStore {
    /// The view's `covered_from` and `rebuilt`, and per hour what
    /// [`HourRead`] holds. A compaction moves frames from a log to the
    /// fields: each hour's compaction count is read before and after its
    /// log, and a read that saw one run in between is made again (a
    /// bucket-hour is compacted at most every few batches).
    /// Errors: Redis unreachable; compactions kept running between reads.
    async fn read_hours(
        &self,
        merchant: &str,
        hours: &[i64],
    ) -> Result<(Vec<Option<String>>, Vec<HourRead>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.merchant_view(merchant))
            .arg("covered_from")
            .arg("rebuilt");
        for &h in hours {
            let key = hour_key(merchant, h);
            pipe.cmd("HMGET")
                .arg(&key)
                .arg(merchant)
                .arg(rebuilt_field(merchant))
                .arg(COMPACTIONS_FIELD);
            pipe.get(log_key(merchant, h));
            pipe.hget(&key, COMPACTIONS_FIELD);
        }
        let mut c = self.conn.clone();
        for _ in 0..5 {
            let values: Vec<Value> = pipe.query_async(&mut c).await.map_err(|e| self.err(e))?;
            let mut it = values.into_iter();
            let mut next = || it.next().unwrap_or(Value::Nil);
            let view: Vec<Option<String>> =
                redis::from_redis_value(next()).map_err(|e| unexpected("view", e))?;
            let mut out = Vec::with_capacity(hours.len());
            let mut torn = false;
            for _ in hours {
                let [merged, rebuilt, before]: [Option<Vec<u8>>; 3] =
                    redis::from_redis_value(next()).map_err(|e| unexpected("merchant-hour", e))?;
                let log: Option<Vec<u8>> =
                    redis::from_redis_value(next()).map_err(|e| unexpected("log", e))?;
                let after: Option<Vec<u8>> =
                    redis::from_redis_value(next()).map_err(|e| unexpected("merchant-hour", e))?;
                torn |= before != after;
                out.push([merged, rebuilt, log]);
            }
            if !torn {
                return Ok((view, out));
            }
        }
        Err(Error::speed(format!(
            "Redis at {}: merchant {merchant}'s hours were compacted during each of 5 reads",
            self.url_for_errors
        )))
    }
}

impl SpeedView for RedisStore {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>> {
        Box::pin(async move {
            let (hours_read_view, hours_read) = self.read_hours(merchant, hours).await?;
            let mut it = hours_read.into_iter();
            let view = hours_read_view;
            let covered_from = match (
                view.first().cloned().flatten(),
                view.get(1).cloned().flatten(),
            ) {
                (None, _) => None,
                (Some(_), Some(r)) if r == "1" => Some(i64::MIN),
                (Some(c), _) => Some(c.parse::<i64>().unwrap_or(i64::MAX)),
            };
            let mut reading = SpeedReading::default();
            let mut per_hour: Vec<CustomerUnion> = Vec::with_capacity(hours.len());
            let now = now_micros();
            for (i, &hour) in hours.iter().enumerate() {
                let [merged, rebuilt, log] = it.next().unwrap_or_default();
                let mut sums = HourSums::default();
                for v in [merged, rebuilt].iter().flatten() {
                    sums.add_value(v)?;
                }
                for (_, e) in log_entries(log.as_deref().unwrap_or_default())? {
                    if e.merchant == merchant {
                        sums.add_payload(&e.entry)?;
                    }
                }
                let mut hour_counters = Counters::default();
                let mut hour_union = CustomerUnion::new();
                let mut quarters: [BucketRow; 4] = Default::default();
                for (q, row) in quarters.iter_mut().enumerate() {
                    let (counters, union) = (&sums.quarters[q], &sums.unions[q]);
                    hour_counters.merge(counters);
                    hour_union.merge(union);
                    *row = BucketRow {
                        values: MetricValues {
                            counters: *counters,
                            unique_customers: Some(union.estimate().estimate),
                        },
                        sketch: (!union.is_empty()).then(|| union.to_bytes().into()),
                    };
                }
                reading.hours.push(MetricValues {
                    counters: hour_counters,
                    unique_customers: Some(hour_union.estimate().estimate),
                });
                reading.quarters.push(quarters);
                per_hour.push(hour_union);
                if !self.covers(covered_from, hour, now) {
                    reading.not_covered.push(i);
                }
            }
            for group in unions {
                let mut all = CustomerUnion::new();
                for &i in group {
                    if let Some(u) = per_hour.get(i) {
                        all.merge(u);
                    }
                }
                reading.unions.push(all.estimate().estimate);
            }
            Ok(reading)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let _: String = redis::cmd("PING")
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn a_bucket_is_64_slots_and_its_keys_live_in_its_first() {
        let mut seen = vec![0usize; usize::from(BUCKETS)];
        for i in 0..20_000 {
            let m = format!("m_{i}");
            let b = bucket(&m);
            seen[usize::from(b)] += 1;
            // Redis Cluster's own slot of the id is in the bucket's 64
            let slot = (b * 64..(b + 1) * 64)
                .find(|&s| Slot::new(s) == Some(Slot::for_key(&m)))
                .expect("the id's slot is one of its bucket's");
            assert_eq!(slot / 64, b);
            let key = hour_key(&m, 7 * MICROS_PER_HOUR);
            assert_eq!(Slot::for_key(&key), Slot::new(b * 64).unwrap());
            assert!(key.ends_with(":7"), "{key}");
        }
        // every bucket gets merchants: no bucket is more than twice the mean
        let mean = 20_000 / usize::from(BUCKETS);
        assert!(seen.iter().all(|&n| n > 0 && n < 2 * mean), "{seen:?}");
    }

    #[test]
    fn open_keys_round_trip_and_a_cut_entry_is_an_error() {
        let keys = ["tally:v6:{1}:7:log", "tally:v6:{2}:7:log", ""];
        let e = encode_keys(keys);
        assert_eq!(decode_keys(&e).unwrap(), keys);
        assert!(decode_keys(&e[..e.len() - 1]).is_none());
        assert_eq!(rebuilt_field("m_1"), "m_1/r");
        assert!(!tally_common::decode::is_valid_merchant_id(&rebuilt_field(
            "m_1"
        )));
        assert_eq!(log_key("m_1", 0), format!("{}:log", hour_key("m_1", 0)));
    }
}
