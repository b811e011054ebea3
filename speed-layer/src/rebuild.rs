//! Rebuilding a Redis speed view that lost its data, from `raw_events`.
//!
//! A Redis server can come back empty (a restart without persistence, a
//! failover to an empty replica). Its view key goes with the data, so the first
//! write afterwards makes a new view whose `covered_from` is that moment, and
//! readers treat the hours before as not whole ([`crate::redis_store`]). A
//! rebuild fills them from the master dataset:
//!
//! 1. It takes the rebuild lock (one rebuild at a time) and makes sure a view
//!    exists.
//! 2. For every source in `raw_events` newer than the batch watermark, and every
//!    source the view knows, it fixes the boundary `after:SOURCE`: the
//!    consumers' own (the position before their first write since the loss) or,
//!    for a source that has not written since, the archive's mark for it, taken
//!    no sooner than `settle` after the loss so the archiver has caught up with
//!    what that source's consumer had applied before it. The rebuild owns
//!    positions up to the boundary, the consumers those beyond.
//! 3. It sums the rows it owns per merchant-hour, with their customers'
//!    sketches, and *replaces* the hour's rebuilt sums (one frame in the
//!    merchant's field plus `/r` of its bucket-hour), so a rebuild killed and run again, or run again
//!    with more archived rows, is right.
//! 4. When `raw_events` holds every source up to its boundary, it marks the view
//!    `rebuilt`; otherwise it retries until `wait` is over and reports itself
//!    incomplete (the hours stay unknown to readers, never wrong).
//!
//! Each write checks the view's generation, so a rebuild overtaken by a second
//! loss writes nothing into the new view.
//!
//! A single server has one view; a cluster one per bucket
//! ([`crate::redis_store`]): a rebuild makes every view, and rebuilds those not
//! rebuilt (a shard's buckets after a cluster shard's loss). A boundary is per
//! view and source; a view a source has not written to since the loss takes
//! the highest boundary that source set on the same server (whose views were
//! lost together), else the archive's mark. `tally speed rebuild` runs it; `tally
//! speed consume` and `tally serve` run it by themselves when they find a view
//! that is not rebuilt.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt as _;
use redis::Value;
use tally_common::bucket::{date_string, hour_floor, now_micros};
use tally_common::config::DEFAULT_REBUILD_SETTLE_SECS;
use tally_common::deltalake;
use tally_common::lake::{register, Lake, Table};
use tally_common::marks::read_mark;
use tally_common::metrics::Counters;
use tally_common::serving_store::ServingStore as _;
use tally_common::sketch::CustomerSketch;
use tally_common::source::{Position, RowOrigin, SourceId};
use tally_common::watermark::read_progress;
use tally_common::{Context as _, Error, EventType, Result};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type, TimeUnit, TimestampMicrosecondType};
use deltalake::datafusion::prelude::{col, lit, SessionContext};

use crate::redis_store::{hour_key, rebuilt_field, RedisStore};
use crate::speed_entry::{SpeedEntry, MERGED_ID};
use crate::store::ViewState;

/// Makes a view when there is none. KEYS: view.
const ENSURE_VIEW_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'generation', now, 'covered_from', now, 'rebuilt', '0')
end
return 1
"#;

/// Sets a source's boundary unless one is set, in the view of one generation.
/// KEYS: view. ARGV: generation, source, boundary. Returns the boundary in force,
/// or -1 when the view is of another generation.
const BOUNDARY_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return -1 end
redis.call('HSETNX', KEYS[1], 'after:' .. ARGV[2], ARGV[3])
return redis.call('HGET', KEYS[1], 'after:' .. ARGV[2])
"#;

/// Replaces one merchant-hour's rebuilt sums (a frame of its own, replaced
/// whole by each pass, so passes repeated while the consumers catch up do not
/// pile up).
/// KEYS: the bucket-hour, view. ARGV: generation, ttl, frame, the merchant's
/// rebuilt field.
/// Returns 1, or -1 when the view is of another generation (nothing written).
const REPLACE_LUA: &str = r#"
if redis.call('HGET', KEYS[2], 'generation') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2], 'NX')
return 1
"#;

/// Marks the view rebuilt. KEYS: view. ARGV: generation. Returns 1, or -1 when
/// the view is of another generation.
const FINISH_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'rebuilt', '1')
return 1
"#;

/// Extends the lock when it is still ours. KEYS: lock. ARGV: token, ttl ms.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

/// Releases the lock when it is still ours. KEYS: lock. ARGV: token.
const UNLOCK_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The rebuild lock's key.
const LOCK_KEY: &str = "tally:v6:rebuild-lock";
/// How long a rebuild's lock lives unless renewed: a killed rebuild blocks the
/// next one this long at most. The holder renews it every third of this.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// The longest sleep between two looks at the view and the lake.
const STEP: Duration = Duration::from_secs(2);
/// Merchant-hours per pipelined round trip.
const WRITE_BATCH: usize = 500;
/// How long a rebuild keeps reading `raw_events` for sources it has not
/// reached yet, by default ([`Rebuild::wait`], `tally speed rebuild --wait-secs`).
pub const DEFAULT_REBUILD_WAIT: Duration = Duration::from_secs(300);

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// The newest generation among the views rebuilt.
    pub generation: String,
    /// Views rebuilt: 1 on a single server; on a cluster one per bucket
    /// (all [`crate::redis_store::BUCKETS`] after a whole cluster's loss, a
    /// shard's buckets after a shard's).
    pub views: usize,
    /// The view was already rebuilt (or another rebuild holds the lock): nothing done.
    pub nothing_to_do: bool,
    /// Events of `raw_events` summed into the view.
    pub events: u64,
    /// Merchant-hours written.
    pub merchant_hours: u64,
    /// Sources whose boundary was settled.
    pub sources: usize,
    /// Whether the view is now marked rebuilt (false: `raw_events` did not reach
    /// every source's boundary within the wait; run it again later).
    pub complete: bool,
}

impl std::fmt::Display for RebuildReport {
    /// One line for people: `generation G, N events into M merchant-hours from S sources, <state>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {} ({} views), {} events into {} merchant-hours from {} sources, {}",
            self.generation,
            self.views,
            self.events,
            self.merchant_hours,
            self.sources,
            match (self.complete, self.nothing_to_do) {
                (true, true) => "the view was whole already",
                (true, false) => "the view is whole",
                (false, true) => "another rebuild is running",
                (false, false) => "raw_events has not reached every source yet: run it again",
            }
        )
    }
}

/// A rebuild of a Redis speed view from `raw_events`, configured with builder
/// methods and started with [`Rebuild::run`].
pub struct Rebuild<'a> {
    lake: &'a Lake,
    store: &'a RedisStore,
    settle: Duration,
    wait: Duration,
    token: String,
}

impl<'a> Rebuild<'a> {
    /// A rebuild of `store` from `lake` that waits the default settle time
    /// ([`DEFAULT_REBUILD_SETTLE_SECS`]) after the loss before reading
    /// `raw_events`, and up to [`DEFAULT_REBUILD_WAIT`] for the archiver to
    /// reach the consumers' boundaries.
    pub fn new(lake: &'a Lake, store: &'a RedisStore) -> Self {
        Rebuild {
            lake,
            store,
            settle: Duration::from_secs(DEFAULT_REBUILD_SETTLE_SECS),
            wait: DEFAULT_REBUILD_WAIT,
            token: format!("{}-{}", std::process::id(), now_micros()),
        }
    }

    /// How long after the loss to wait before reading `raw_events`: longer than
    /// the archiver's lag behind the speed layer's consumers.
    pub fn settle(mut self, d: Duration) -> Self {
        self.settle = d;
        self
    }

    /// How long to keep reading `raw_events` for sources it has not reached yet
    /// (zero: one pass, and no waiting for `settle` either).
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = d;
        self
    }

    /// Run it. A `raw_events` row whose `source` is not a [`RowOrigin`] (another
    /// writer's) is counted by the rebuild: no consumer applied it. Errors:
    /// Redis or the lake unreachable; the view is then left as it was, unknown
    /// to readers where it is not whole.
    pub async fn run(&self) -> Result<RebuildReport> {
        let mut conn = self.store.connection();
        let token = &self.token;
        let locked: Option<String> = redis::cmd("SET")
            .arg(LOCK_KEY)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.store.command_error(e))?;
        if locked.is_none() {
            tracing::info!("another speed-view rebuild is running");
            return Ok(RebuildReport {
                nothing_to_do: true,
                ..RebuildReport::default()
            });
        }
        // the lock is renewed beside the work, however long a step takes
        let renewing = async {
            loop {
                tokio::time::sleep(LOCK_TTL / 3).await;
                if let Err(e) = self.renew().await {
                    return e;
                }
            }
        };
        let result = tokio::select! {
            r = self.run_locked() => r,
            e = renewing => Err(e),
        };
        self.release().await;
        result
    }

    /// Give up the lock if this rebuild holds it (after [`Rebuild::run`] was
    /// dropped part way, e.g. at shutdown). Best effort: it expires by itself.
    pub async fn release(&self) {
        let mut conn = self.store.connection();
        let _: redis::RedisResult<i64> = redis::Script::new(UNLOCK_LUA)
            .key(LOCK_KEY)
            .arg(&self.token)
            .invoke_async(&mut conn)
            .await;
    }

    /// Extend the lock; an error when another rebuild has it now (ours expired).
    async fn renew(&self) -> Result<()> {
        let mut conn = self.store.connection();
        let ok: i64 = redis::Script::new(RENEW_LUA)
            .key(LOCK_KEY)
            .arg(&self.token)
            .arg(LOCK_TTL.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.store.command_error(e))?;
        if ok == 1 {
            Ok(())
        } else {
            Err(Error::Busy(
                "the rebuild lock expired and another rebuild took it; this one stops".into(),
            ))
        }
    }

    async fn run_locked(&self) -> Result<RebuildReport> {
        let mut conn = self.store.connection();
        // every view is made now: a cluster bucket nobody wrote to since the loss has none yet
        let mut ensure = redis::pipe();
        for view in self.store.all_views() {
            ensure
                .cmd("EVAL")
                .arg(ENSURE_VIEW_LUA)
                .arg(1)
                .arg(view)
                .ignore();
        }
        let () = ensure
            .query_async(&mut conn)
            .await
            .map_err(|e| self.store.command_error(e))?;
        let pending = self.pending().await?;
        let mut report = RebuildReport::default();
        if pending.is_empty() {
            report.nothing_to_do = true;
            report.complete = true;
            return Ok(report);
        }
        report.generation = pending
            .values()
            .map(|v| v.generation.as_str())
            .max()
            .unwrap_or_default()
            .to_string();
        report.views = pending.len();
        let covered_from = pending.values().map(|v| v.covered_from).max().unwrap_or(0);
        let settled = covered_from.saturating_add(self.settle.as_micros() as i64);
        let early = Duration::from_micros(settled.saturating_sub(now_micros()).max(0) as u64);
        let deadline = std::time::Instant::now() + early + self.wait;
        loop {
            match self.pass(&pending, settled, &mut report).await? {
                Pass::Complete => break,
                // a zero wait asks for what can be done now (e.g. from `tally ingest`)
                Pass::Settling(_) if self.wait.is_zero() => return Ok(report),
                Pass::Settling(d) => tokio::time::sleep(d.min(STEP)).await,
                Pass::Lost => {
                    tracing::warn!("the speed view was lost again while rebuilding; the next rebuild starts over");
                    return Ok(report);
                }
                Pass::Behind(n) if std::time::Instant::now() >= deadline => {
                    tracing::warn!(
                        sources = n,
                        "raw_events has not reached every source's boundary; the view stays not rebuilt"
                    );
                    return Ok(report);
                }
                Pass::Behind(_) => tokio::time::sleep(STEP).await,
            }
        }
        let mut finish = redis::pipe();
        for (key, view) in &pending {
            finish
                .cmd("EVAL")
                .arg(FINISH_LUA)
                .arg(1)
                .arg(key)
                .arg(&view.generation);
        }
        let done: Vec<i64> = finish
            .query_async(&mut conn)
            .await
            .map_err(|e| self.store.command_error(e))?;
        report.complete = done.iter().all(|&d| d == 1);
        Ok(report)
    }

    /// The views that are not rebuilt, by view key.
    async fn pending(&self) -> Result<BTreeMap<String, ViewState>> {
        let mut pending = BTreeMap::new();
        for (key, view) in self.store.view_states().await? {
            match view {
                Some(v) if v.rebuilt => {}
                Some(v) => {
                    pending.insert(key, v);
                }
                None => {
                    return Err(Error::speed(
                        "a speed view vanished while rebuilding (Redis lost data again)",
                    ))
                }
            }
        }
        Ok(pending)
    }

    /// One read of `raw_events` and one write of the rebuilt sums, into the
    /// views of `pending` (view key -> its state when the rebuild began).
    async fn pass(
        &self,
        pending: &BTreeMap<String, ViewState>,
        settled: i64,
        report: &mut RebuildReport,
    ) -> Result<Pass> {
        // the consumers' boundaries as of now (they write theirs on their first write)
        let mut views: BTreeMap<&str, ViewState> = BTreeMap::new();
        for (key, view) in self.store.view_states().await? {
            let Some((k, was)) = pending.get_key_value(&key) else {
                continue;
            };
            match view {
                Some(v) if v.generation == was.generation => {
                    views.insert(k.as_str(), v);
                }
                _ => return Ok(Pass::Lost),
            }
        }
        let mut w = match self.lake.open(Table::MetricsHourly).await? {
            Some(t) => read_progress(&t).await?.watermark.unwrap_or(0),
            None => 0,
        };
        // readers take the watermark of the serving store on this server, which
        // may not have loaded the newest publish yet: cover the hours from there
        if let Some(served) = self.store.serving_store().state().await? {
            if let Some(sw) = served.watermark.filter(|_| served.readable()) {
                w = w.min(sw);
            }
        }
        let Some(raw) = self.lake.open(Table::RawEvents).await? else {
            return Ok(Pass::Complete);
        };
        let rows = read_rows(&raw, w).await?;
        // every source the views or the rows know
        let mut sources: BTreeMap<String, Option<Position>> = BTreeMap::new();
        for v in views.values() {
            for (s, _) in &v.after {
                sources.entry(s.clone()).or_insert(None);
            }
        }
        for r in &rows {
            sources.entry(r.source.to_string()).or_insert(None);
        }
        // per server and source, the highest boundary a bucket's view holds (the
        // position before the source's first write there since the server's
        // loss): what its consumer had applied before that loss is below it, so
        // a bucket of that server it has not written to since gets that boundary
        // too (its later batches had no record there). Per server: views lost
        // together are on one, and another server may have lost its data at
        // another time. A source that wrote nowhere on a server since gets the
        // archive's mark there; before that, the archiver is given `settle` to
        // catch up with what its consumer had applied before the loss
        let servers = self.store.view_servers().await?;
        let server = |key: &str| servers.get(key).copied().unwrap_or(usize::MAX);
        let mut known: HashMap<(usize, &str), Option<Position>> = HashMap::new();
        for (key, v) in &views {
            for (s, b) in &v.after {
                let e = known.entry((server(key), s.as_str())).or_insert(None);
                if let Some(p) = parse_boundary(b) {
                    if e.as_ref().is_none_or(|x| p > *x) {
                        *e = Some(p);
                    }
                }
            }
        }
        let idle = sources.keys().any(|s| {
            views
                .keys()
                .any(|k| !known.contains_key(&(server(k), s.as_str())))
        });
        let early = settled.saturating_sub(now_micros());
        if idle && early > 0 {
            return Ok(Pass::Settling(Duration::from_micros(early as u64)));
        }
        let mut conn = self.store.connection();
        let mut behind = 0;
        // (view key, source) -> boundary
        let mut owned: HashMap<(&str, &str), Option<Position>> = HashMap::new();
        for source in sources.keys() {
            let archived = read_mark(&raw, &SourceId::from_id(source)).await?;
            // not written since the loss on this server: the archive's mark, or
            // the rows' own highest position for a writer that keeps no marks
            let archived_or_rows = archived.clone().or_else(|| {
                rows.iter()
                    .filter(|r| r.source.as_str() == source)
                    .map(|r| r.position.clone())
                    .max()
            });
            let unset: Vec<&str> = views
                .iter()
                .filter(|(_, v)| !v.after.iter().any(|(a, _)| a == source))
                .map(|(k, _)| *k)
                .collect();
            let mut pipe = redis::pipe();
            for key in &unset {
                // written since the loss elsewhere on this server: that boundary
                let proposed = match known.get(&(server(key), source.as_str())) {
                    Some(b) => b.as_ref(),
                    None => archived_or_rows.as_ref(),
                };
                pipe.cmd("EVAL")
                    .arg(BOUNDARY_LUA)
                    .arg(1)
                    .arg(*key)
                    .arg(&views[key].generation)
                    .arg(source)
                    .arg(proposed.map_or("", |p| p.as_str()));
            }
            let set: Vec<Value> = if unset.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn)
                    .await
                    .map_err(|e| self.store.command_error(e))?
            };
            let mut reached = true;
            for (key, v) in &views {
                let boundary = match unset.iter().position(|k| k == key) {
                    Some(i) => match &set[i] {
                        Value::Int(-1) => return Ok(Pass::Lost),
                        other => {
                            let b: String =
                                redis::from_redis_value(other.clone()).unwrap_or_default();
                            parse_boundary(&b)
                        }
                    },
                    None => v
                        .after
                        .iter()
                        .find(|(a, _)| a == source)
                        .and_then(|(_, b)| parse_boundary(b)),
                };
                reached &= match (&boundary, &archived) {
                    (None, _) => true,
                    (Some(b), Some(a)) => a >= b,
                    // no marks: the rows are all the writer leaves
                    (Some(_), None) => true,
                };
                owned.insert((key, source.as_str()), boundary);
            }
            if !reached {
                behind += 1;
            }
        }
        report.sources = sources.len();

        // the rows the rebuild owns (in a view being rebuilt, up to its boundary),
        // summed per merchant-hour
        let mut hours: HashMap<(String, i64), ([Counters; 4], [CustomerSketch; 4])> =
            HashMap::new();
        let mut view_of: HashMap<String, String> = HashMap::new();
        let mut events = 0u64;
        for r in rows {
            let view = view_of
                .entry(r.merchant_id.clone())
                .or_insert_with(|| self.store.merchant_view(&r.merchant_id));
            let mine = owned
                .get(&(view.as_str(), r.source.as_str()))
                .and_then(Option::as_ref)
                .is_some_and(|b| r.position <= *b);
            if !mine {
                continue;
            }
            events += 1;
            let e = hours
                .entry((r.merchant_id, hour_floor(r.event_time)))
                .or_default();
            let q = crate::aggregate::quarter_of(r.event_time);
            e.0[q].apply_parts(&EventType::parse(&r.event_type), r.amount);
            if let Some(c) = r.customer_id {
                e.1[q].update(&c);
            }
        }
        let entries: Vec<_> = hours.into_iter().collect();
        for chunk in entries.chunks(WRITE_BATCH) {
            // EVAL, not EVALSHA: a rebuild is rare, and follows a restart that
            // emptied the script cache anyway
            let mut pipe = redis::pipe();
            for ((merchant, hour), (quarters, sketches)) in chunk {
                let k = hour_key(merchant, *hour);
                let view = &view_of[merchant];
                pipe.cmd("EVAL")
                    .arg(REPLACE_LUA)
                    .arg(2)
                    .arg(k)
                    .arg(view)
                    .arg(&views[view.as_str()].generation)
                    .arg(self.store.ttl_secs())
                    .arg(SpeedEntry::from_parts(quarters, sketches).to_frame(&MERGED_ID))
                    .arg(rebuilt_field(merchant));
            }
            let replies: Vec<i64> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.store.command_error(e))?;
            if replies.contains(&-1) {
                return Ok(Pass::Lost);
            }
        }
        report.events = events;
        report.merchant_hours = entries.len() as u64;
        Ok(if behind == 0 {
            Pass::Complete
        } else {
            Pass::Behind(behind)
        })
    }
}

enum Pass {
    Complete,
    Settling(Duration),
    Behind(usize),
    Lost,
}

fn parse_boundary(b: &str) -> Option<Position> {
    if b.is_empty() {
        None
    } else {
        Position::parse(b).ok()
    }
}

/// The columns of a `raw_events` row the rebuild sums.
struct Row {
    merchant_id: String,
    event_time: i64,
    event_type: String,
    amount: Option<i64>,
    customer_id: Option<String>,
    source: SourceId,
    position: Position,
}

/// `raw_events` rows with `event_time` at or after `since`, read as a stream.
async fn read_rows(raw: &deltalake::DeltaTable, since: i64) -> Result<Vec<Row>> {
    let ctx = SessionContext::new();
    register(&ctx, "raw_events", raw).await?;
    let df = ctx
        .table("raw_events")
        .await
        .context("reading raw_events")?
        .filter(
            col("event_date")
                .gt_eq(lit(date_string(since)))
                .and(col("event_time").gt_eq(tally_common::lake::utc_micros(since))),
        )
        .context("filtering raw_events")?
        .select_columns(&[
            "merchant_id",
            "event_time",
            "event_type",
            "amount",
            "customer_id",
            "source",
        ])
        .context("projecting raw_events")?;
    let mut stream = df.execute_stream().await.context("reading raw_events")?;
    let mut rows = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.context("reading raw_events")?;
        rows_of(&batch, &mut rows)?;
    }
    Ok(rows)
}

fn rows_of(b: &RecordBatch, out: &mut Vec<Row>) -> Result<()> {
    let text =
        |i: usize| cast(b.column(i), &DataType::Utf8).context("reading a raw_events string column");
    let (merchant, kind, customer, source) = (text(0)?, text(2)?, text(4)?, text(5)?);
    let (merchant, kind, customer, source) = (
        merchant.as_string::<i32>(),
        kind.as_string::<i32>(),
        customer.as_string::<i32>(),
        source.as_string::<i32>(),
    );
    let t = cast(
        b.column(1),
        &DataType::Timestamp(TimeUnit::Microsecond, None),
    )
    .context("reading raw_events.event_time")?;
    let t = t.as_primitive::<TimestampMicrosecondType>();
    let amount = cast(b.column(3), &DataType::Int64).context("reading raw_events.amount")?;
    let amount = amount.as_primitive::<Int64Type>();
    for i in 0..b.num_rows() {
        // rows the batch layer moves to quarantine (missing_field): counted by neither
        if t.is_null(i) || merchant.is_null(i) {
            continue;
        }
        let text = (!source.is_null(i)).then(|| source.value(i));
        // a row another writer put in raw_events (a backfill) has no tally origin:
        // no consumer applied it, so the rebuild owns it (position 0 of a source
        // named by its text, which every boundary covers)
        let origin = text
            .and_then(RowOrigin::parse)
            .unwrap_or_else(|| RowOrigin {
                source: SourceId::from_id(&format!("foreign/{}", text.unwrap_or("unnamed"))),
                position: Position::from_u64(0),
                line: 0,
            });
        out.push(Row {
            merchant_id: merchant.value(i).to_string(),
            event_time: t.value(i),
            event_type: if kind.is_null(i) {
                String::new()
            } else {
                kind.value(i).to_string()
            },
            amount: (!amount.is_null(i)).then(|| amount.value(i)),
            customer_id: (!customer.is_null(i)).then(|| customer.value(i).to_string()),
            source: origin.source,
            position: origin.position,
        });
    }
    Ok(())
}

/// Every how many checks [`keep_rebuilt`] reads every bucket's view rather than
/// one per server.
const FULL_CHECK_EVERY: u64 = 30;

/// Keeps a view rebuilt: every `every`, when the view is missing or not rebuilt,
/// runs a [`Rebuild`] with `settle`, until shutdown. Errors are logged and the
/// next tick retries; readers meanwhile treat the hours concerned as unknown.
pub async fn keep_rebuilt(
    lake: Lake,
    store: RedisStore,
    every: Duration,
    settle: Duration,
    mut shutdown: tally_common::shutdown::Shutdown,
) {
    let mut tick: u64 = 0;
    loop {
        // a look at one view per server every tick; every bucket's view now and
        // then, for a rebuild cut off part way through marking the views
        // rebuilt (the probed view whole, another not)
        let full = tick.is_multiple_of(FULL_CHECK_EVERY);
        tick += 1;
        let whole = if full {
            store
                .view_state()
                .await
                .map(|v| v.is_some_and(|v| v.rebuilt))
        } else {
            store.views_whole().await
        };
        let needed = match whole {
            Ok(whole) => !whole,
            Err(e) => {
                tracing::debug!(error = %e, "speed view unreadable; rebuild check retries");
                false
            }
        };
        if needed {
            let rebuild = Rebuild::new(&lake, &store).settle(settle);
            tokio::select! {
                r = rebuild.run() => match r {
                    Ok(r) if r.complete && !r.nothing_to_do => tracing::info!(
                        events = r.events, merchant_hours = r.merchant_hours, sources = r.sources,
                        "speed view rebuilt from raw_events"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "speed view rebuild failed; retrying"),
                },
                _ = shutdown.wait() => {
                    // the next process need not wait for the lock to expire
                    rebuild.release().await;
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// How long the scheduled check ([`scheduled_check`]) waits for `raw_events`
/// to reach every source's boundary: within the batch function's timeout, whose
/// minimum the infrastructure derives from it (`speed_rebuild_max_seconds` in
/// `infra/terraform/lambda.tf`).
pub const SCHEDULED_CHECK_WAIT: Duration = Duration::from_secs(45);

/// The every-minute check on AWS (the batch function's `{"speed_rebuild": true}`
/// event): rebuild `store` if it lost its data (usually one look at the view
/// key that says it is whole), answering `{"speed_rebuild": "whole" | "not yet
/// whole", "events", "merchant_hours"}`.
pub async fn scheduled_check(
    lake: &Lake,
    store: &RedisStore,
    settle: Duration,
) -> Result<serde_json::Value> {
    let r = Rebuild::new(lake, store)
        .settle(settle)
        .wait(SCHEDULED_CHECK_WAIT)
        .run()
        .await?;
    Ok(serde_json::json!({
        "speed_rebuild": if r.complete { "whole" } else { "not yet whole" },
        "events": r.events, "merchant_hours": r.merchant_hours,
    }))
}

/// Whether a batch-function event is the scheduled speed-view check.
pub fn is_scheduled_check(payload: &serde_json::Value) -> bool {
    payload["speed_rebuild"].as_bool() == Some(true)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deltalake::arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};

    use super::*;

    /// A batch of the columns [`read_rows`] selects, one row per source.
    fn batch(sources: &[Option<&str>]) -> RecordBatch {
        let n = sources.len();
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("merchant_id", Arc::new(StringArray::from(vec!["m"; n]))),
            (
                "event_time",
                Arc::new(TimestampMicrosecondArray::from(vec![7; n])),
            ),
            ("event_type", Arc::new(StringArray::from(vec!["order"; n]))),
            ("amount", Arc::new(Int64Array::from(vec![5; n]))),
            (
                "customer_id",
                Arc::new(StringArray::from(vec![None::<&str>; n])),
            ),
            ("source", Arc::new(StringArray::from(sources.to_vec()))),
        ];
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn rows_are_read_with_their_origin_and_another_writers_rows_are_the_rebuilds() {
        let mut rows = Vec::new();
        rows_of(&batch(&[Some("kinesis/s/shard-1@42:3")]), &mut rows).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].source.as_str(), "kinesis/s/shard-1");
        assert_eq!(rows[0].position, Position::parse("42").unwrap());

        for (foreign, named) in [
            (
                Some("spark:backfill/part-3"),
                "foreign/spark:backfill/part-3",
            ),
            (Some("x@y:1"), "foreign/x@y:1"),
            (None, "foreign/unnamed"),
        ] {
            let mut rows = Vec::new();
            rows_of(
                &batch(&[Some("kinesis/s/shard-1@43:1"), foreign]),
                &mut rows,
            )
            .unwrap();
            assert_eq!(rows.len(), 2, "{foreign:?}");
            assert_eq!(rows[1].source.as_str(), named);
            assert_eq!(rows[1].position, Position::from_u64(0));
        }
    }
}
