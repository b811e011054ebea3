//! The Redis speed store.
//!
//! Per merchant-hour two keys share the hash tag `{merchant_id}`, so every
//! command and script touches one cluster slot and the layout runs unchanged on
//! Redis Cluster:
//!
//! - `tally:{m}:H:c`: hash of counter sums (`orders`, `gross_sales`, ...) and
//!   of marks (`~mark:SOURCE` -> highest applied position of that source),
//! - `tally:{m}:H:u`: HyperLogLog of customer ids,
//!
//! where `H` is hours since the epoch. One Lua script per merchant-hour compares
//! the update's position with the source's mark and, only when it is beyond,
//! adds the counters, the customers and advances the mark: a redelivered or
//! half-applied batch has an exactly-once effect. A whole batch is one pipelined
//! round trip.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Pipeline, Value};
use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::metrics::{counter_defs, Counters, MetricValues, COUNTER_COUNT};
use tally_common::source::Position;
use tally_common::{Error, Result};

use crate::aggregate::{HourUpdate, SpeedBatch};
use crate::store::{ApplyReport, SpeedReading, SpeedStore};

/// Check the source's mark, apply the increments and customers, advance the mark.
/// KEYS: counters hash (which also holds the marks, as fields `~mark:SOURCE`), hll.
/// ARGV: mark field, last position, first position, ttl, n, n*(field, delta), customers...
/// Returns 1 (applied), 0 (all of it applied before) or the mark itself when the
/// mark falls inside the update's records (a redelivery cut differently after a
/// crash): the caller then re-sends only the records beyond the mark. TTLs are
/// set when a merchant-hour is first written (later updates find a mark).
const APPLY_LUA: &str = r#"
local function ge(a, b) return #a > #b or (#a == #b and a >= b) end
local mark = redis.call('HGET', KEYS[1], ARGV[1])
local p = ARGV[2]
if mark then
  if ge(mark, p) then return 0 end
  if ge(mark, ARGV[3]) then return mark end
end
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  redis.call('HINCRBY', KEYS[1], ARGV[6 + 2 * i], ARGV[7 + 2 * i])
end
local first = 6 + 2 * n
if #ARGV >= first then
  if #ARGV - first < 500 then
    redis.call('PFADD', KEYS[2], unpack(ARGV, first))
  else
    for i = first, #ARGV, 500 do
      redis.call('PFADD', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], p)
if not mark then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  if #ARGV >= first then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
end
return 1
"#;

/// The key prefix of one merchant-hour (`tally:{m}:H`).
pub fn hour_key(merchant: &str, hour: i64) -> String {
    format!("tally:{{{merchant}}}:{}", hour.div_euclid(MICROS_PER_HOUR))
}

/// The Redis speed store; cheap to clone (one multiplexed, self-reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    url_for_errors: String,
    ttl_secs: u64,
    script_sha: String,
    max_attempts: u32,
}

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
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| unreachable_error(&shown, "timed out"))?
        .map_err(|e| unreachable_error(&shown, &e.to_string()))?;
        let script_sha = redis::Script::new(APPLY_LUA).get_hash().to_string();
        let store = RedisStore {
            conn,
            url_for_errors: shown,
            ttl_secs,
            script_sha,
            max_attempts: 3,
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

    fn err(&self, e: redis::RedisError) -> Error {
        unreachable_error(&self.url_for_errors, &e.to_string())
    }

    fn pipeline(&self, batch: &SpeedBatch) -> Pipeline {
        let mut pipe = redis::pipe();
        for u in &batch.updates {
            add_update(
                &mut pipe,
                &self.script_sha,
                batch.source.as_str(),
                self.ttl_secs,
                u,
            );
        }
        pipe
    }

    async fn apply_once(&self, pipe: &Pipeline) -> redis::RedisResult<Vec<Value>> {
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await
    }
}

fn add_update(pipe: &mut Pipeline, sha: &str, source: &str, ttl: u64, u: &HourUpdate) {
    let k = hour_key(&u.merchant_id, u.hour);
    let fields: Vec<(&str, i64)> = counter_defs()
        .map(|(d, _, _, slot)| (d.name, u.counters.values[slot]))
        .filter(|(_, v)| *v != 0)
        .collect();
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(sha)
        .arg(2)
        .arg(format!("{k}:c"))
        .arg(format!("{k}:u"))
        .arg(format!("~mark:{source}"))
        .arg(u.position.as_str())
        .arg(u.first_position.as_str())
        .arg(ttl)
        .arg(fields.len());
    for (name, v) in fields {
        cmd.arg(name).arg(v);
    }
    for c in &u.customers {
        cmd.arg(c.as_str());
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

fn unreachable_error(url: &str, why: &str) -> Error {
    Error::Speed(format!(
        "cannot reach Redis at {url} ({why}): is redis-server running? \
         set TALLY_REDIS_URL, or unset it for the embedded store"
    ))
}

impl SpeedStore for RedisStore {
    async fn apply(&self, batch: &SpeedBatch) -> Result<ApplyReport> {
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
                    for (i, r) in results.into_iter().enumerate() {
                        match r {
                            Value::Int(1) => report.applied += 1,
                            Value::Int(_) => report.skipped += 1,
                            other => {
                                let mark: String = redis::from_redis_value(other).map_err(|e| {
                                    Error::Speed(format!("unexpected script reply: {e}"))
                                })?;
                                report.overlaps.push((i, Position::parse(&mark)?));
                            }
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

    async fn read(
        &self,
        merchant: &str,
        hours: &[i64],
        unions: &[Vec<usize>],
    ) -> Result<SpeedReading> {
        let mut pipe = redis::pipe();
        let keys: Vec<String> = hours.iter().map(|&h| hour_key(merchant, h)).collect();
        for k in &keys {
            pipe.cmd("HGETALL").arg(format!("{k}:c"));
            pipe.cmd("PFCOUNT").arg(format!("{k}:u"));
        }
        for group in unions {
            let cmd = pipe.cmd("PFCOUNT");
            for &i in group {
                if let Some(k) = keys.get(i) {
                    cmd.arg(format!("{k}:u"));
                }
            }
        }
        let mut c = self.conn.clone();
        let values: Vec<Value> = pipe.query_async(&mut c).await.map_err(|e| self.err(e))?;
        let mut reading = SpeedReading::default();
        let mut it = values.into_iter();
        for _ in hours {
            let fields: Vec<(String, i64)> =
                redis::from_redis_value(it.next().unwrap_or(Value::Nil))
                    .map_err(|e| Error::Speed(format!("unexpected counters reply: {e}")))?;
            let unique: i64 = redis::from_redis_value(it.next().unwrap_or(Value::Int(0)))
                .map_err(|e| Error::Speed(format!("unexpected PFCOUNT reply: {e}")))?;
            let mut counters = Counters::default();
            for (name, v) in fields {
                if let Some((_, _, _, slot)) = counter_defs().find(|(d, ..)| d.name == name) {
                    if slot < COUNTER_COUNT {
                        counters.values[slot] = v;
                    }
                }
            }
            reading.hours.push(MetricValues {
                counters,
                unique_customers: Some(unique),
            });
        }
        for _ in unions {
            let n: i64 = redis::from_redis_value(it.next().unwrap_or(Value::Int(0)))
                .map_err(|e| Error::Speed(format!("unexpected PFCOUNT reply: {e}")))?;
            reading.unions.push(n);
        }
        Ok(reading)
    }

    async fn checkpoint(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        c.get(format!("tally:checkpoint:{key}"))
            .await
            .map_err(|e| self.err(e))
    }

    async fn set_checkpoint(&self, key: &str, value: &str) -> Result<()> {
        let mut c = self.conn.clone();
        c.set(format!("tally:checkpoint:{key}"), value)
            .await
            .map_err(|e| self.err(e))
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
