//! The Redis speed store.
//!
//! Per merchant-hour two keys share the hash tag `{merchant_id}`, so every
//! per-merchant command and script touches one cluster slot:
//!
//! - `tally:v4:{m}:H:c`: hash of counter sums per 15-minute slot of the hour
//!   (`Q:orders`, `Q:gross_sales`, ... for slot `Q` = 0 to 3), of the sums
//!   rebuilt from `raw_events` (`r:Q:orders`, ...; see [`crate::rebuild`]) and
//!   of marks (`~mark:SOURCE` -> highest applied position of that source),
//! - `tally:v4:{m}:H:s`: list of distinct-customer sketches, each entry one
//!   slot's sketch from one batch: the slot's number as one byte, then the
//!   sketch (Apache DataSketches HLL, [`tally_common::sketch`], built by the
//!   client). Readers union a slot's entries; a writer that finds the list
//!   long replaces its entries by their union per slot ([`COMPACT_AT`]);
//!   `...:H:rs` holds the rebuild's sketches, replaced whole by each pass.
//!   Sketches are the batch layer's format, so a bucket straddling the
//!   watermark has distinct customers, and the engine's work per batch is one
//!   `RPUSH` per merchant-hour, not a `PFADD` per event.
//!
//! where `H` is hours since the epoch. One more key per cluster slot, the
//! *view* `tally:v4:view:{T}` (`T` a tag of that slot, so a merchant's keys and
//! its slot's view are in one slot: [`crate::redis_conn::view_key`]; a hash:
//! `generation`, `covered_from`, `rebuilt`, and per source `after:SOURCE`),
//! says from when the slot's view is whole. A server that lost its data (a
//! restart without persistence, a failover to an empty replica) lost the views
//! of its slots too; the first write afterwards into such a slot creates its
//! view anew with `covered_from` = now, and from then on readers know that the
//! hours before are not whole until [`crate::rebuild`] has filled them from
//! `raw_events` and set `rebuilt`. The first write of each source after that
//! records `after:SOURCE`: positions up to it belong to the rebuild, positions
//! beyond it to the consumers, so neither counts an event the other counts and
//! none is lost between them. Views are per slot because a Redis Cluster loses
//! data by shard (a script may not touch keys of two slots); on a single server
//! they all go together. They have no TTL (16,384 small hashes): a view that
//! expired would make its slot's hours unknown until a rebuild.
//!
//! **Replication.** Replicas are asynchronous: a write acknowledged by a
//! primary that fails before its replica has it is lost with the failover.
//! When every primary has a replica, a batch counts as applied only once its
//! writes reached one (`WAIT 1`, [`REPLICA_WAIT`]); only then may a consumer
//! checkpoint past its records. A write lost in a failover is then one the
//! stream delivers again, and the marks, replicated in the same hash as the
//! counters they guard, make that redelivery count once (tested on a loopback
//! cluster). While a primary has no live replica (after a failover, until
//! the failed node is replaced), batches are acknowledged without waiting,
//! with a warning: a second failure in that window can lose the last batches
//! (the wait counts replicas cluster-wide, the fewest any primary has).
//! `WAIT` does not make Redis strongly consistent: a failover may still
//! promote the one replica that missed a write when a shard has several.
//!
//! One Lua script per merchant-hour compares the update's position with the
//! source's mark (or its `after:` boundary, whichever is higher) and, only when
//! it is beyond, adds the counters and the sketches and advances the mark: a
//! redelivered or half-applied batch has an exactly-once effect on the
//! counters (a sketch union is idempotent anyway). Every key written gets the
//! store's TTL at every write, whatever wrote it first. A whole batch is one
//! pipelined round trip.
//!
//! Positions are compared as decimal strings of any length (Kinesis sequence
//! numbers have 56 digits and may have up to 129); nothing here parses one into
//! a machine integer.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::redis_conn::{view_key, RedisConn};
use redis::{AsyncCommands, Pipeline, Value};
use tally_common::bucket::{now_micros, MICROS_PER_HOUR, MICROS_PER_SECOND};
use tally_common::decode::MAX_FUTURE_MICROS;
use tally_common::metrics::{counter_defs, BucketRow, Counters, MetricValues};
use tally_common::sketch::CustomerUnion;
use tally_common::source::Position;
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::{Error, Result};

use crate::aggregate::{HourUpdate, SpeedBatch};
use crate::store::{hour_alive, ApplyReport, ViewState};

/// The key prefix of every speed-view key of this layout (version 4: counters
/// per 15-minute slot, client-built sketches, a view per cluster slot). A new
/// prefix because the views moved: version 3's counters beside new per-slot
/// views would read as lost and be rebuilt on top of themselves (counted
/// twice); version 3's keys are not read and expire by their TTL.
pub const KEY_PREFIX: &str = "tally:v4";

/// The prefix of the view keys, one per cluster slot (see the module docs and
/// [`crate::redis_conn::view_key`]).
pub const VIEW_PREFIX: &str = "tally:v4:view:";

/// The view key of `merchant`'s slot: the one its hour keys' scripts check.
pub fn merchant_view_key(merchant: &str) -> String {
    view_key(&hour_key(merchant, 0))
}

/// Sketch entries of one merchant-hour beyond which a writer compacts them
/// (the apply script's literal `32`).
pub const COMPACT_AT: i64 = 32;

/// Check the source's mark, apply the increments and sketches, advance the mark.
/// KEYS: counters hash (which also holds the marks, as fields `~mark:SOURCE`),
/// sketch list, the view of their slot.
/// ARGV: source, last position, first position, ttl, boundary (the position
/// before the batch's first record, '' when none), n, n*(field, delta), sketch entries...
/// Returns 1 (applied), 2 (applied, and the view was new: the server had lost its
/// data or never held any), plus 2 when the sketch list is now longer than
/// `COMPACT_AT` entries (3, 4), 0 (all of it applied before, or the rebuild's), or the
/// mark when it falls inside the update's records (a redelivery cut differently
/// after a crash): the caller then re-sends only the records beyond the mark.
const APPLY_LUA: &str = r#"
local function ge(a, b) return #a > #b or (#a == #b and a >= b) end
local src = ARGV[1]
local ttl = ARGV[4]
local fresh = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[3], 'generation', now, 'covered_from', now, 'rebuilt', '0')
  fresh = 1
end
local after = redis.call('HGET', KEYS[3], 'after:' .. src)
if not after then
  -- once the rebuild is done, a source new to the view lost nothing: it owns all
  after = ARGV[5]
  if redis.call('HGET', KEYS[3], 'rebuilt') == '1' then after = '' end
  redis.call('HSET', KEYS[3], 'after:' .. src, after)
end
local mark = redis.call('HGET', KEYS[1], '~mark:' .. src)
if after ~= '' and (not mark or ge(after, mark)) then mark = after end
local p = ARGV[2]
if mark then
  if ge(mark, p) then return 0 end
  if ge(mark, ARGV[3]) then return mark end
end
local n = tonumber(ARGV[6])
for i = 0, n - 1 do
  redis.call('HINCRBY', KEYS[1], ARGV[7 + 2 * i], ARGV[8 + 2 * i])
end
local first = 7 + 2 * n
local long = 0
if #ARGV >= first then
  local len = redis.call('RPUSH', KEYS[2], unpack(ARGV, first))
  redis.call('EXPIRE', KEYS[2], ttl)
  if len > 32 then long = 2 end
end
redis.call('HSET', KEYS[1], '~mark:' .. src, p)
redis.call('EXPIRE', KEYS[1], ttl)
return 1 + fresh + long
"#;

/// Replace the first entries of a sketch list by their union, when they are
/// still the entries the caller merged.
/// KEYS: sketch list. ARGV: n (entries merged), SHA-1 of their concatenation,
/// ttl, merged entries... Returns 1, or 0 when the list's head changed.
const COMPACT_LUA: &str = r#"
local n = tonumber(ARGV[1])
local head = redis.call('LRANGE', KEYS[1], 0, n - 1)
if #head ~= n or redis.sha1hex(table.concat(head)) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[1], n, -1)
for i = #ARGV, 4, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// A sketch-list entry: slot `q`'s sketch.
pub(crate) fn sketch_entry(q: usize, sketch: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(sketch.len() + 1);
    e.push(q as u8);
    e.extend_from_slice(sketch);
    e
}

/// The counters-hash field of slot `q`'s metric `name` (`r:` prefixed for
/// the rebuilt sums).
pub(crate) fn quarter_field(q: usize, name: &str) -> String {
    format!("{q}:{name}")
}

/// Union each slot's entries of a sketch list. Entries that do not parse are
/// skipped (logged): a sketch is an estimate, its counters stay exact.
pub(crate) fn union_entries(entries: &[Vec<u8>]) -> [CustomerUnion; 4] {
    let mut out: [CustomerUnion; 4] = Default::default();
    for e in entries {
        let Some((&q, sketch)) = e.split_first() else {
            continue;
        };
        if let Some(u) = out.get_mut(usize::from(q)) {
            if let Err(err) = u.add_bytes(sketch) {
                tracing::warn!(error = %err, "a speed-view sketch does not parse; skipped");
            }
        }
    }
    out
}

/// The key prefix of one merchant-hour (`tally:v4:{m}:H`).
pub fn hour_key(merchant: &str, hour: i64) -> String {
    format!(
        "{KEY_PREFIX}:{{{merchant}}}:{}",
        hour.div_euclid(MICROS_PER_HOUR)
    )
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
    /// Connect to `url` (redis:// or rediss://); keys expire `ttl_secs` after their last update.
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

    fn pipeline(&self, batch: &SpeedBatch) -> Pipeline {
        let mut pipe = redis::pipe();
        // the rebuild owns what came before the batch's first record, should the view be new
        let boundary = batch
            .first_position
            .as_ref()
            .and_then(Position::pred)
            .map_or_else(String::new, |p| p.as_str().to_string());
        for u in &batch.updates {
            add_update(
                &mut pipe,
                &self.script_sha,
                batch.source.as_str(),
                self.ttl_secs,
                &boundary,
                u,
            );
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
        let views = self.slot_views().await?;
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

    /// Every slot's view key and state (None: the slot has no view), in one
    /// pipeline (by slot on a cluster).
    pub async fn slot_views(&self) -> Result<Vec<(String, Option<ViewState>)>> {
        let keys: Vec<String> = crate::redis_conn::all_slot_tags()
            .map(|t| format!("{VIEW_PREFIX}{{{t}}}"))
            .collect();
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

    /// Which server holds each slot's view: view key -> index of its primary
    /// (slots lost together are on one; a slot being migrated has none).
    pub async fn view_servers(&self) -> Result<HashMap<String, usize>> {
        let ranges = self.conn.primary_ranges().await.map_err(|e| self.err(e))?;
        let mut out = HashMap::with_capacity(usize::from(crate::redis_conn::SLOTS));
        for slot in 0..crate::redis_conn::SLOTS {
            if let Some(i) = ranges
                .iter()
                .position(|r| r.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            {
                let tag = crate::redis_conn::tag_of_slot(slot);
                out.insert(format!("{VIEW_PREFIX}{{{tag}}}"), i);
            }
        }
        Ok(out)
    }

    /// Whether every slot's view is whole, from a look at one slot per server
    /// holding keys (a server that lost its data lost every view it held; a
    /// rebuild makes every slot's view at once): cheap enough for
    /// [`crate::rebuild::keep_rebuilt`]'s check every couple of seconds.
    /// Errors: Redis unreachable.
    pub async fn views_whole(&self) -> Result<bool> {
        let probes: Vec<String> = match &self.conn {
            RedisConn::Single(_) => vec![view_key("0")],
            RedisConn::Cluster(_) => {
                let slots = self
                    .conn
                    .primary_first_slots()
                    .await
                    .map_err(|e| self.err(e))?;
                slots
                    .into_iter()
                    .map(|s| view_key(crate::redis_conn::tag_of_slot(s)))
                    .collect()
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

fn add_update(
    pipe: &mut Pipeline,
    sha: &str,
    source: &str,
    ttl: u64,
    boundary: &str,
    u: &HourUpdate,
) {
    let k = hour_key(&u.merchant_id, u.hour);
    let mut fields: Vec<(String, i64)> = Vec::new();
    for (q, counters) in u.quarters.iter().enumerate() {
        fields.extend(
            counter_defs()
                .map(|(d, _, _, slot)| (quarter_field(q, d.name), counters.values[slot]))
                .filter(|(_, v)| *v != 0),
        );
    }
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(sha)
        .arg(3)
        .arg(format!("{k}:c"))
        .arg(format!("{k}:s"))
        .arg(view_key(&k))
        .arg(source)
        .arg(u.position.as_str())
        .arg(u.first_position.as_str())
        .arg(ttl)
        .arg(boundary)
        .arg(fields.len());
    for (name, v) in fields {
        cmd.arg(name).arg(v);
    }
    for q in 0..4 {
        if let Some(sketch) = u.sketch(q) {
            cmd.arg(sketch_entry(q, &sketch));
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
    /// its last write, so an hour older than the TTL may have expired while the
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

/// The write side, as [`crate::SpeedStore`] has it.
impl RedisStore {
    /// Apply a batch's updates (all of them, atomically per merchant-hour) in one
    /// pipelined round trip, retried with backoff up to the store's attempts.
    pub async fn apply(&self, batch: &SpeedBatch) -> Result<ApplyReport> {
        if batch.updates.is_empty() {
            return Ok(ApplyReport::default());
        }
        let pipe = self.pipeline(batch);
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.apply_once(&pipe).await {
                Ok(results) => {
                    let mut report = ApplyReport::default();
                    let mut long = Vec::new();
                    for (i, r) in results.into_iter().enumerate() {
                        match r {
                            Value::Int(n @ 1..=4) => {
                                report.applied += 1;
                                report.view_created |= n == 2 || n == 4;
                                if n >= 3 {
                                    long.push(i);
                                }
                            }
                            Value::Int(_) => report.skipped += 1,
                            other => {
                                let mark: String = redis::from_redis_value(other)
                                    .map_err(|e| unexpected("script", e))?;
                                report.overlaps.push((i, Position::parse(&mark)?));
                            }
                        }
                    }
                    self.await_replicas().await?;
                    for i in long {
                        let u = &batch.updates[i];
                        // best effort: a list left long is still read right
                        if let Err(e) = self.compact(&hour_key(&u.merchant_id, u.hour)).await {
                            tracing::warn!(error = %e, "compacting speed-view sketches failed");
                        }
                    }
                    return Ok(report);
                }
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // a restarted or failed-over server lost its script cache; the marks make
                    // re-running the already-applied part of the pipeline harmless
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

    /// Replace the sketch entries of merchant-hour `k` by one union per slot.
    async fn compact(&self, k: &str) -> Result<()> {
        let key = format!("{k}:s");
        let mut c = self.conn.clone();
        let entries: Vec<Vec<u8>> = c.lrange(&key, 0, -1).await.map_err(|e| self.err(e))?;
        if entries.len() <= 1 {
            return Ok(());
        }
        let digest = {
            use sha1_smol::Sha1;
            let mut h = Sha1::new();
            for e in &entries {
                h.update(e);
            }
            h.digest().to_string()
        };
        let merged = union_entries(&entries);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPACT_LUA)
            .arg(1)
            .arg(&key)
            .arg(entries.len())
            .arg(digest)
            .arg(self.ttl_secs);
        for (q, u) in merged.iter().enumerate() {
            if !u.is_empty() {
                cmd.arg(sketch_entry(q, &u.to_bytes()));
            }
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

impl SpeedView for RedisStore {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>> {
        Box::pin(async move {
            // the counters by name (never every field: the hash also holds the marks,
            // whose positions are 56-digit numbers), then the rebuilt sums
            let mut fields: Vec<String> = Vec::new();
            for q in 0..4 {
                for (d, ..) in counter_defs() {
                    fields.push(quarter_field(q, d.name));
                    fields.push(format!("r:{}", quarter_field(q, d.name)));
                }
            }
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET")
                .arg(merchant_view_key(merchant))
                .arg("covered_from")
                .arg("rebuilt");
            let keys: Vec<String> = hours.iter().map(|&h| hour_key(merchant, h)).collect();
            for k in &keys {
                pipe.cmd("HMGET").arg(format!("{k}:c")).arg(&fields);
                pipe.cmd("LRANGE").arg(format!("{k}:s")).arg(0).arg(-1);
                pipe.cmd("LRANGE").arg(format!("{k}:rs")).arg(0).arg(-1);
            }
            let mut c = self.conn.clone();
            let values: Vec<Value> = pipe.query_async(&mut c).await.map_err(|e| self.err(e))?;
            let mut it = values.into_iter();
            let view: Vec<Option<String>> =
                redis::from_redis_value(it.next().unwrap_or(Value::Nil))
                    .map_err(|e| unexpected("view", e))?;
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
            let per_quarter = 2 * counter_defs().count();
            for (i, &hour) in hours.iter().enumerate() {
                let values: Vec<Option<i64>> =
                    redis::from_redis_value(it.next().unwrap_or(Value::Nil))
                        .map_err(|e| unexpected("counters", e))?;
                let mut entries: Vec<Vec<u8>> =
                    redis::from_redis_value(it.next().unwrap_or(Value::Nil))
                        .map_err(|e| unexpected("sketches", e))?;
                let rebuilt: Vec<Vec<u8>> =
                    redis::from_redis_value(it.next().unwrap_or(Value::Nil))
                        .map_err(|e| unexpected("rebuilt sketches", e))?;
                entries.extend(rebuilt);
                let unions = union_entries(&entries);
                let mut hour_counters = Counters::default();
                let mut hour_union = CustomerUnion::new();
                let mut quarters: [BucketRow; 4] = Default::default();
                for (q, (row, chunk)) in quarters
                    .iter_mut()
                    .zip(values.chunks(per_quarter))
                    .enumerate()
                {
                    let mut counters = Counters::default();
                    for ((_, _, _, slot), pair) in counter_defs().zip(chunk.chunks(2)) {
                        counters.values[slot] = pair
                            .iter()
                            .flatten()
                            .fold(0i64, |a, v| a.saturating_add(*v));
                    }
                    hour_counters.merge(&counters);
                    hour_union.merge(&unions[q]);
                    *row = BucketRow {
                        values: MetricValues {
                            counters,
                            unique_customers: Some(unions[q].estimate().estimate),
                        },
                        sketch: (!unions[q].is_empty()).then(|| unions[q].to_bytes().into()),
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
