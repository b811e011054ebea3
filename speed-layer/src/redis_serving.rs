//! The serving store in Redis (ElastiCache): the batch view loaded for point
//! reads, beside the speed view on the same server (see
//! [`tally_common::serving_store`] for the model).
//!
//! Keys (without a TTL unless said; a load removes what leaves its window):
//!
//! - `tally:sv1:{m}:YYYY-MM`: a hash per merchant and UTC month; field `DD.s`
//!   (day of month, slot) holds the merchant's encoded
//!   [`DayRows`](tally_common::serving_store::DayRows) of that date. The hash tag
//!   `{m}` is the speed view's, so one merchant's reads of both land on one
//!   cluster slot.
//! - `tally:sv1:state`: a hash, `load` (the generation of the load that
//!   published it) and `json` (the [`StoreState`]), replaced only by a
//!   compare-and-set script on `load`.
//! - `tally:sv1:generation`: the generation counter (`INCR`).
//! - `tally:sv1:lease`: the loader holding the lease, with a TTL (renewed by
//!   its holder before each date).
//!
//! The server must not evict these keys: a missing value could be an
//! eviction, not "no rows", and an evicted lease would let two loads overlap,
//! so [`ServingStore::check_retention`] refuses any `maxmemory-policy` but
//! `noeviction` (as `infra/terraform/redis.tf` deploys).

use redis::AsyncCommands as _;
use tally_common::bucket::{date_string, month_string};
use tally_common::serving_store::{DayWrite, ServingStore, StoreState};
use tally_common::speed_view::BoxFuture;
use tally_common::{Error, Result};

use crate::redis_conn::RedisConn;

/// The key prefix of every serving-store key of this layout.
pub const SERVING_PREFIX: &str = "tally:sv1";
/// The state key.
pub const STATE_KEY: &str = "tally:sv1:state";
/// The generation counter (`INCR`).
pub const GENERATION_KEY: &str = "tally:sv1:generation";
/// The loaders' lease (holder, with a TTL).
pub const LEASE_KEY: &str = "tally:sv1:lease";

/// Take or renew the lease: KEYS[1] lease; ARGV holder, ttl ms. Returns 1 or 0.
const LEASE_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Give the lease back: KEYS[1] lease; ARGV holder.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Publish ARGV[3] (the state's JSON) with load ARGV[2] if the state's load is
/// ARGV[1] ('' = no state). KEYS: the state key. Returns 1, or 0 (not published).
const PUBLISH_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'load')
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'load', ARGV[2], 'json', ARGV[3])
return 1
"#;

/// A load does not start on a server whose memory is this full (percent of
/// `maxmemory`).
const FULL_PERCENT: u64 = 85;

/// How long a publish waits for the loaded values to reach a replica (ms).
const PUBLISH_WAIT_MS: u64 = 10_000;

/// Keys scanned per `SCAN` call when dropping old months.
const SCAN_COUNT: usize = 1000;

/// The serving store on a Redis server; cheap to clone.
#[derive(Clone)]
pub struct RedisServingStore {
    conn: RedisConn,
    shown: String,
}

/// The hash of `merchant`'s month holding `day`, and the field of `day` in `slot`.
pub fn day_location(merchant: &str, day: i64, slot: u8) -> (String, String) {
    let date = date_string(day);
    let key = format!(
        "{SERVING_PREFIX}:{{{merchant}}}:{}",
        &date[..7.min(date.len())]
    );
    let field = format!("{}.{slot}", date.get(8..10).unwrap_or("00"));
    (key, field)
}

/// Set a merchant's zone unless a later setting is there. KEYS: settings
/// hash. ARGV: zone, set at (epoch µs). Returns 1, or 0 when a later one is kept.
const SET_ZONE_LUA: &str = r#"
local at = redis.call('HGET', KEYS[1], 'updated_at')
if at and tonumber(at) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'time_zone', ARGV[1], 'updated_at', ARGV[2])
return 1
"#;

/// The hash of `merchant`'s settings (fields `time_zone`, `updated_at`), beside its months
/// under the same hash tag. No TTL: a setting lasts until changed.
pub fn settings_key(merchant: &str) -> String {
    format!("{SERVING_PREFIX}:{{{merchant}}}:settings")
}

impl RedisServingStore {
    /// The store on `conn` (a connection of [`crate::RedisStore`]); `shown` names
    /// the server in errors (no password).
    pub(crate) fn new(conn: RedisConn, shown: String) -> Self {
        RedisServingStore { conn, shown }
    }

    fn err(&self, what: &str, e: redis::RedisError) -> Error {
        if e.is_timeout() {
            Error::Timeout(format!(
                "Redis at {} did not answer ({what}): {e}",
                self.shown
            ))
        } else {
            Error::serving_from(format!("Redis at {}: {what}", self.shown), e)
        }
    }

    /// `INFO section` of each server holding keys (every primary of a cluster).
    async fn info(&self, section: &str) -> Result<Vec<String>> {
        let replies = self
            .conn
            .on_each_primary(redis::cmd("INFO").arg(section))
            .await
            .map_err(|e| self.err("INFO", e))?;
        replies
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(|e| self.err("INFO", e.into())))
            .collect()
    }
}

impl RedisServingStore {
    /// [`ServingStore::check_retention`] for one server's `INFO memory`.
    fn check_node(&self, info: &str) -> Result<()> {
        match info_field(info, "maxmemory_policy") {
            Some(p) if p != "noeviction" => Err(Error::config(format!(
                "Redis at {} may evict keys (maxmemory-policy {p}): the serving store would \
                 take an evicted merchant-date for one without rows, and an evicted lease \
                 would let two loads overlap. Set maxmemory-policy noeviction",
                self.shown
            ))),
            _ => {
                // the speed view shares this server: a load must not fill it
                // (at maxmemory, noeviction refuses the speed layer's writes too)
                let field = |n: &str| info_field(info, n).and_then(|v| v.parse::<u64>().ok());
                match (field("used_memory"), field("maxmemory")) {
                    (Some(used), Some(max)) if max > 0 && used * 100 >= max * FULL_PERCENT => {
                        Err(Error::serving(format!(
                            "Redis at {} is {}% full ({used} of {max} bytes) on a node: loading \
                             the serving store could crowd out the speed view. Grow the node (or \
                             the cluster's shards), or shorten the serving window \
                             (TALLY_SERVING_WINDOW_DAYS) or the speed TTL (docs/CAPACITY.md)",
                            self.shown,
                            used * 100 / max
                        )))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// The value of `name` in an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

impl ServingStore for RedisServingStore {
    fn state(&self) -> BoxFuture<'_, Result<Option<StoreState>>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let (load, json): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(STATE_KEY)
                .arg("load")
                .arg("json")
                .query_async(&mut c)
                .await
                .map_err(|e| self.err("reading the state", e))?;
            let Some(json) = json else { return Ok(None) };
            Ok(Some(StoreState::from_json(&json).unwrap_or_else(|e| {
                // never read, replaced by the next load
                tracing::warn!(error = %e, "the serving store's state does not parse");
                StoreState::unreadable(load.unwrap_or(0))
            })))
        })
    }

    fn read<'a>(
        &'a self,
        merchant: &'a str,
        days: &'a [(i64, u8)],
    ) -> BoxFuture<'a, Result<Vec<Option<bytes::Bytes>>>> {
        Box::pin(async move {
            if days.is_empty() {
                return Ok(Vec::new());
            }
            // one HMGET per month hash, in one pipeline
            let mut months: Vec<(String, Vec<(usize, String)>)> = Vec::new();
            for (i, &(day, slot)) in days.iter().enumerate() {
                let (key, field) = day_location(merchant, day, slot);
                match months.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, fields)) => fields.push((i, field)),
                    None => months.push((key, vec![(i, field)])),
                }
            }
            let mut pipe = redis::pipe();
            for (key, fields) in &months {
                let cmd = pipe.cmd("HMGET").arg(key);
                for (_, f) in fields {
                    cmd.arg(f);
                }
            }
            let mut c = self.conn.clone();
            let replies: Vec<Vec<Option<Vec<u8>>>> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.err("reading a merchant's dates", e))?;
            let mut out = vec![None; days.len()];
            for ((_, fields), values) in months.iter().zip(replies) {
                for ((i, _), v) in fields.iter().zip(values) {
                    out[*i] = v.map(bytes::Bytes::from);
                }
            }
            Ok(out)
        })
    }

    fn write<'a>(&'a self, values: &'a [DayWrite]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if values.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for v in values {
                let (key, field) = day_location(&v.merchant, v.day, v.slot);
                let clear: Vec<String> = v
                    .clear
                    .iter()
                    .map(|&(d, s)| day_location(&v.merchant, d, s))
                    .filter(|(k, _)| *k == key)
                    .map(|(_, f)| f)
                    .collect();
                if !clear.is_empty() {
                    pipe.hdel(&key, clear).ignore();
                }
                pipe.hset(key, field, v.value.as_slice()).ignore();
            }
            let mut c = self.conn.clone();
            let () = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.err("writing loaded rows", e))?;
            Ok(())
        })
    }

    fn publish<'a>(
        &'a self,
        expected: Option<u64>,
        state: &'a StoreState,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // the values reach a replica before the state that names them: a
            // failover then never serves a state whose values it lacks (with
            // no replica there is nothing to wait for)
            let wanted = self.conn.min_replicas().await.unwrap_or(0).min(1);
            if wanted > 0 {
                let acked: i64 = redis::cmd("WAIT")
                    .arg(wanted)
                    .arg(PUBLISH_WAIT_MS)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.err("waiting for the replicas", e))?;
                if acked < wanted as i64 {
                    return Err(Error::serving(format!(
                        "Redis at {}: the loaded values did not reach a replica within {} ms; \
                         not publishing (the next load publishes them)",
                        self.shown, PUBLISH_WAIT_MS
                    )));
                }
            }
            let done: i64 = redis::Script::new(PUBLISH_LUA)
                .key(STATE_KEY)
                .arg(expected.map_or_else(String::new, |l| l.to_string()))
                .arg(state.load.to_string())
                .arg(state.to_json())
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err("publishing the state", e))?;
            Ok(done == 1)
        })
    }

    fn next_generation(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            c.incr(GENERATION_KEY, 1u64)
                .await
                .map_err(|e| self.err("taking a generation", e))
        })
    }

    fn lease<'a>(
        &'a self,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let got: i64 = redis::Script::new(LEASE_LUA)
                .key(LEASE_KEY)
                .arg(holder)
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err("taking the loaders' lease", e))?;
            Ok(got == 1)
        })
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let _: i64 = redis::Script::new(RELEASE_LUA)
                .key(LEASE_KEY)
                .arg(holder)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err("giving the loaders' lease back", e))?;
            Ok(())
        })
    }

    fn drop_before(&self, before: i64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let before_month = month_string(before);
            let before_day = date_string(before);
            let pattern = format!("{SERVING_PREFIX}:{{*}}:*");
            let mut c = self.conn.clone();
            let mut dropped = 0u64;
            // SCAN walks one server's keys: every primary of a cluster in turn
            let holders = self
                .conn
                .key_holders()
                .await
                .map_err(|e| self.err("listing the cluster's primaries", e))?;
            for holder in &holders {
                let mut cursor: u64 = 0;
                loop {
                    let reply = self
                        .conn
                        .query_on(
                            holder.as_ref(),
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(SCAN_COUNT),
                        )
                        .await
                        .map_err(|e| self.err("scanning for old months", e))?;
                    let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)
                        .map_err(|e| self.err("scanning for old months", e.into()))?;
                    for key in keys {
                        // month hashes only (`...:YYYY-MM`), never the settings
                        let Some(month) = key.rsplit(':').next().filter(|m| m.len() == 7) else {
                            continue;
                        };
                        if month < before_month.as_str() {
                            let n: u64 = c.del(&key).await.map_err(|e| self.err("DEL", e))?;
                            dropped += n;
                        } else if month == before_month.as_str() {
                            // the month the window starts in: only its earlier dates
                            let fields: Vec<String> =
                                c.hkeys(&key).await.map_err(|e| self.err("HKEYS", e))?;
                            let old: Vec<&String> = fields
                                .iter()
                                .filter(|f| {
                                    let dd = f.split('.').next().unwrap_or("");
                                    format!("{month}-{dd}") < before_day
                                })
                                .collect();
                            if !old.is_empty() {
                                let n: u64 =
                                    c.hdel(&key, old).await.map_err(|e| self.err("HDEL", e))?;
                                dropped += n;
                            }
                        }
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            Ok(dropped)
        })
    }

    fn check_retention(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for info in self.info("memory").await? {
                self.check_node(&info)?;
            }
            Ok(())
        })
    }

    fn zone<'a>(&'a self, merchant: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            c.hget(settings_key(merchant), "time_zone")
                .await
                .map_err(|e| self.err("reading a merchant's settings", e))
        })
    }

    fn set_zones<'a>(&'a self, zones: &'a [(String, String, i64)]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            for chunk in zones.chunks(1000) {
                let mut pipe = redis::pipe();
                for (m, z, at) in chunk {
                    pipe.cmd("EVAL")
                        .arg(SET_ZONE_LUA)
                        .arg(1)
                        .arg(settings_key(m))
                        .arg(z)
                        .arg(at)
                        .ignore();
                }
                let () = pipe
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.err("writing merchants' settings", e))?;
            }
            Ok(())
        })
    }

    fn memory_used(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move {
            // a cluster's memory is its primaries' together
            let mut total = None;
            for info in self.info("memory").await? {
                if let Some(used) =
                    info_field(&info, "used_memory").and_then(|v| v.parse::<u64>().ok())
                {
                    total = Some(total.unwrap_or(0) + used);
                }
            }
            Ok(total)
        })
    }

    fn describe(&self) -> String {
        format!("the serving store in Redis at {}", self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_date_lives_in_its_merchants_month_hash() {
        let day = tally_common::bucket::parse_ts("2026-11-24T00:00:00Z").unwrap();
        assert_eq!(
            day_location("m_42", day, 1),
            ("tally:sv1:{m_42}:2026-11".to_string(), "24.1".to_string())
        );
        assert_eq!(
            info_field(
                "# Memory\r\nused_memory:123\r\nmaxmemory_policy:noeviction\r\n",
                "maxmemory_policy"
            ),
            Some("noeviction")
        );
    }
}
