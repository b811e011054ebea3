//! Loading the serving store from the Delta tables: what runs after each
//! publish (`tally batch run`, `tally batch load`, the batch state machine's Load
//! step), and what `tally serve` runs itself for its embedded store.
//!
//! A load brings the store from the table versions it reflects to the newest
//! ones. The dates it rewrites are those whose rows changed in between, read
//! from the Delta log: the `date` partitions of `metrics_hourly`'s data changes,
//! and the days a batch run records it rewrote in `metrics_daily` (every date of
//! a changed `month` partition when a commit does not say, as a restore's does
//! not). Compactions change no rows and are skipped. Dates of the window the
//! store does not hold yet (a new day, a store that lost its data) are loaded
//! too, newest first. A log too old to replay (its commits cleaned up) makes the
//! load rewrite the whole window.
//!
//! Each date is read whole from the tables (its `metrics_hourly` partition, and
//! its `metrics_daily` rows), sorted by merchant under a memory limit that
//! spills, and written into the slots readers do not use; then one publish of
//! the new state switches readers to all of them at once (see
//! [`tally_common::serving_store`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::AsArray as _;
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int32Type};
use deltalake::datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use deltalake::datafusion::execution::memory_pool::FairSpillPool;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::execution::session_state::SessionStateBuilder;
use deltalake::datafusion::prelude::{col, lit, Expr, SessionConfig, SessionContext};
use deltalake::delta_datafusion::DeltaSessionConfig;
use deltalake::DeltaTable;
use futures::StreamExt as _;
use tally_common::bucket::{
    date_string, day_floor, format_ts, hour_of_day, month_string, now_micros, parse_ts,
    MICROS_PER_DAY,
};
use tally_common::calendar::SLOT_MICROS;
use tally_common::lake::{read_commit, register, utc_micros, Lake, Table, RUN_KEY};
use tally_common::metric_table::{MetricRows, MetricTable, MERCHANT_COLUMN, SKETCH_COLUMN};
use tally_common::metrics::stored_metric_names;
use tally_common::serving_store::{
    dates_between, DateEntry, DayRows, DayWrite, HourRow, ServingStore, StoreState, StoredRow,
    DAILY_DAYS_KEY, FORMAT,
};
use tally_common::watermark::read_progress;
use tally_common::{Context as _, Error, Result};

/// Values written per round trip.
const WRITE_BATCH: usize = 2_000;

/// How a load runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// UTC dates kept, ending with the watermark's (default 35: every hourly
    /// range the API allows, 31 days, plus the days around it).
    pub window_days: u32,
    /// At most this many dates loaded by one call (None: all); the rest are
    /// loaded by the next calls while readers read them from the lake. Dates
    /// whose rows changed are never left stale: beyond the budget they are
    /// dropped from the store until loaded.
    pub max_dates: Option<usize>,
    /// Stop starting new dates after this long (None: no limit) and publish
    /// what is loaded, like `max_dates`: a Lambda invocation ends well inside
    /// its timeout, and the state machine loads again while not complete.
    pub time_budget: Option<Duration>,
    /// How long after the last publish a load may overwrite slots or drop
    /// dates: longer than readers keep a state the store has not confirmed
    /// (`ServeOptions::state_max_age`, 5 s by default) plus a request's time.
    pub flip_guard: Duration,
    /// Memory for sorting one date's rows before spilling to disk, bytes.
    pub memory_limit: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            window_days: 35,
            max_dates: None,
            time_budget: None,
            flip_guard: Duration::from_secs(10),
            memory_limit: 512 * 1024 * 1024,
        }
    }
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LoadReport {
    /// Whether it published a new state.
    pub published: bool,
    /// Dates written (`YYYY-MM-DD`), newest first.
    pub dates: Vec<String>,
    /// Merchant-dates written.
    pub values: u64,
    /// Bytes written (encoded values).
    pub bytes: u64,
    /// Whether every date of the window is in the store now.
    pub complete: bool,
    /// The versions and watermark the store reflects now.
    pub hourly_version: Option<i64>,
    /// See `hourly_version`.
    pub daily_version: Option<i64>,
    /// The batch watermark (RFC 3339) the store serves now.
    pub watermark: Option<String>,
    /// Values removed as their dates left the window.
    pub dropped: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Bring `store` up to the newest versions of `lake`'s metric tables.
/// Errors: the lake or the store cannot be read or written, the store may evict
/// (see [`ServingStore::check_retention`]), or another loader published meanwhile
/// ([`Error::Conflict`]: run it again).
pub async fn load(
    lake: &Lake,
    store: &dyn ServingStore,
    options: &LoadOptions,
) -> Result<LoadReport> {
    store.check_retention().await?;
    // one load at a time: a second one would write into the slots the first
    // makes live
    let holder = format!("{}-{}", std::process::id(), now_micros());
    if !store.lease(&holder, LEASE_TTL).await? {
        return Err(Error::Busy(format!(
            "another load of {} is running (it loads the same changes); try again when it is done",
            store.describe()
        )));
    }
    let result = load_leased(lake, store, options, &holder).await;
    if let Err(e) = store.release(&holder).await {
        tracing::warn!(error = %e, "giving the serving store's lease back failed; it expires on its own");
    }
    result
}

/// How long a loader's lease lasts without renewal (renewed before each date,
/// which takes about a minute at 1 M merchants): a killed load blocks the next
/// one at most this long.
const LEASE_TTL: Duration = Duration::from_secs(5 * 60);

async fn load_leased(
    lake: &Lake,
    store: &dyn ServingStore,
    options: &LoadOptions,
    holder: &str,
) -> Result<LoadReport> {
    let started = Instant::now();
    let previous = store.state().await?;
    let expected = previous.as_ref().map(|s| s.load);
    // a state this process cannot read (another format) is replaced whole
    let previous = previous.filter(StoreState::readable);
    let mut report = LoadReport::default();
    let Some(hourly) = lake.open(Table::MetricsHourly).await? else {
        report.complete = true;
        return Ok(report);
    };
    let previous_hourly = previous.as_ref().and_then(|p| p.hourly_version);
    let daily = match lake.open(Table::MetricsDaily).await? {
        Some(d) => {
            let before = previous.as_ref().and_then(|p| p.daily_version);
            Some(
                paired(
                    lake,
                    &hourly,
                    Table::MetricsDaily,
                    d,
                    previous_hourly,
                    before,
                )
                .await?,
            )
        }
        None => None,
    };
    let quarters = match lake.open(Table::MetricsQuarterHourly).await? {
        Some(q) => {
            let before = previous.as_ref().and_then(|p| p.quarter_version);
            let kind = Table::MetricsQuarterHourly;
            Some(paired(lake, &hourly, kind, q, previous_hourly, before).await?)
        }
        None => None,
    };
    let hourly_version = hourly.version().map(|v| v as i64);
    let daily_version = daily.as_ref().and_then(|t| t.version()).map(|v| v as i64);
    let quarter_version = quarters
        .as_ref()
        .and_then(|t| t.version())
        .map(|v| v as i64);
    let Some(watermark) = read_progress(&hourly).await?.watermark else {
        report.complete = true;
        return Ok(report);
    };
    report.hourly_version = hourly_version;
    report.daily_version = daily_version;
    report.watermark = Some(format_ts(watermark));

    let last = day_floor(watermark - 1);
    let window_start = last - i64::from(options.window_days.max(1) - 1) * MICROS_PER_DAY;
    let window: BTreeSet<i64> = dates_between(window_start, last).collect();

    let held: BTreeMap<i64, DateEntry> = previous
        .as_ref()
        .map(|s| {
            s.dates
                .iter()
                .filter(|(d, _)| window.contains(d))
                .map(|(d, e)| (*d, *e))
                .collect()
        })
        .unwrap_or_default();
    let changed: BTreeSet<i64> = match &previous {
        Some(p) => {
            let h =
                changed_dates(&hourly, p.hourly_version, hourly_version, Changes::Hourly).await?;
            let d = match (&daily, p.daily_version) {
                (Some(t), _) => {
                    changed_dates(t, p.daily_version, daily_version, Changes::Daily).await?
                }
                (None, None) => Some(BTreeSet::new()),
                // the table is gone: everything may have changed
                (None, Some(_)) => None,
            };
            let q = match (&quarters, p.quarter_version) {
                (Some(t), _) => {
                    changed_dates(t, p.quarter_version, quarter_version, Changes::Hourly).await?
                }
                (None, None) => Some(BTreeSet::new()),
                (None, Some(_)) => None,
            };
            match (h, d, q) {
                (Some(h), Some(d), Some(q)) => h.union(&d).chain(&q).copied().collect(),
                _ => window.clone(),
            }
        }
        None => window.clone(),
    };
    let mut to_load: Vec<i64> = window
        .iter()
        .copied()
        .filter(|d| changed.contains(d) || !held.contains_key(d))
        .collect();
    to_load.reverse(); // newest first
    let mut dates = held;
    if let Some(max) = options.max_dates {
        for d in to_load.iter().skip(max) {
            // changed and not loaded now: readers go to the lake for it meanwhile
            dates.remove(d);
        }
        to_load.truncate(max);
    }
    // merchants' settings: copied whole when the table changed
    let merchants_version = tally_common::merchants::load_settings(
        lake,
        store,
        previous.as_ref().and_then(|p| p.merchants_version),
    )
    .await?;
    let unchanged = previous.as_ref().is_some_and(|p| {
        p.hourly_version == hourly_version
            && p.daily_version == daily_version
            && p.quarter_version == quarter_version
            && p.merchants_version == merchants_version
            && p.watermark == Some(watermark)
            && p.window_start == window_start
    });
    if unchanged && to_load.is_empty() {
        report.complete = dates.len() == window.len();
        return Ok(report);
    }

    if let Some(p) = &previous {
        // readers of the state before the last publish may still read the slots
        // this load overwrites and the dates it drops: give them the guard's
        // time to move on
        let since =
            Duration::from_micros(u64::try_from(now_micros() - p.published_at).unwrap_or(0));
        if since < options.flip_guard {
            tokio::time::sleep(options.flip_guard - since).await;
        }
    }
    // never a generation an earlier attempt wrote (one that failed half way
    // leaves values behind in the slots this one writes)
    let generation = store.next_generation().await?;
    // the slots the last load switched away from: no reader uses them after
    // the guard, so each merchant's write deletes those of its month (the
    // dates loaded now are written over instead)
    let stale: Vec<(i64, u8)> = previous
        .as_ref()
        .map(|p| {
            p.dates
                .iter()
                .filter(|(d, e)| e.generation == p.load && !to_load.contains(d))
                .map(|(d, e)| (*d, 1 - e.slot.min(1)))
                .collect()
        })
        .unwrap_or_default();
    let ctx = session(options.memory_limit)?;
    register(&ctx, Table::MetricsHourly.name(), &hourly).await?;
    if let Some(t) = &daily {
        register(&ctx, Table::MetricsDaily.name(), t).await?;
    }
    if let Some(t) = &quarters {
        register(&ctx, Table::MetricsQuarterHourly.name(), t).await?;
    }
    let tables = Loaded {
        daily: daily.is_some(),
        quarters: quarters.is_some(),
    };
    for (i, &day) in to_load.iter().enumerate() {
        if options.time_budget.is_some_and(|b| started.elapsed() > b) && i > 0 {
            // out of time: the rest go to the lake until a next load
            for d in &to_load[i..] {
                dates.remove(d);
            }
            break;
        }
        if !store.lease(holder, LEASE_TTL).await? {
            return Err(Error::Conflict(format!(
                "this load's lease of {} ran out and another load took it; load again",
                store.describe()
            )));
        }
        let slot = dates.get(&day).map_or(0, |e| 1 - e.slot.min(1));
        let (values, bytes) = load_date(&ctx, store, day, slot, generation, tables, &stale).await?;
        report.values += values;
        report.bytes += bytes;
        report.dates.push(date_string(day));
        dates.insert(day, DateEntry { generation, slot });
    }
    report.complete = dates.len() == window.len();
    // dates that left the window by the last publish (readers of its state
    // may still read those that leave it now: the next load drops them)
    let mut dropped_before = previous.as_ref().map_or(0, |p| p.dropped_before);
    if let Some(p) = &previous {
        let bound = p.window_start.min(window_start);
        if bound > dropped_before {
            report.dropped = store.drop_before(bound).await?;
            dropped_before = bound;
        }
    }
    let state = StoreState {
        format: FORMAT,
        metrics: stored_metric_names().map(str::to_string).collect(),
        hourly_version,
        daily_version,
        quarter_version,
        merchants_version,
        watermark: Some(watermark),
        load: generation,
        published_at: now_micros(),
        window_start,
        dropped_before,
        dates,
    };
    if !store.lease(holder, LEASE_TTL).await? || !store.publish(expected, &state).await? {
        return Err(Error::Conflict(format!(
            "{} changed while this load ran (another load published, or it lost its data); \
             load again",
            store.describe()
        )));
    }
    report.published = true;

    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(dates = report.dates.len(), values = report.values, bytes = report.bytes,
        watermark = ?report.watermark, seconds = report.seconds, complete = report.complete,
        "loaded the serving store");
    Ok(report)
}

/// `other` (`metrics_daily` or `metrics_quarter_hourly`) at its newest
/// version whose rows the hourly table's newest version goes with. A publish
/// commits both before `metrics_hourly`: while a run's commit of `other` has
/// no hourly commit yet (a publish in progress, or one that died between the
/// two, which the next run redoes), the store takes `other` as it was before,
/// so no state pairs a run's rows of one table with the hourly rows of the run
/// before.
///
/// Only commits since the previous load are read (`previous_hourly`,
/// `previous_other`: the versions it loaded): a commit of `other` newer than
/// the version it loaded belongs to a run whose hourly commit, if made, is
/// newer than the hourly version it loaded. Without a usable previous state
/// the last [`PAIRING_LOOKBACK`] commits of each table are read.
/// Errors: reading the logs; [`Error::Conflict`] when no version within reach
/// is paired (load again shortly).
async fn paired(
    lake: &Lake,
    hourly: &DeltaTable,
    kind: Table,
    other: DeltaTable,
    previous_hourly: Option<i64>,
    previous_other: Option<i64>,
) -> Result<DeltaTable> {
    let (Some(h), Some(newest)) = (hourly.version(), other.version()) else {
        return Ok(other);
    };
    let known = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    // the previous state's version was paired when it was loaded
    let paired_before = known(previous_other).filter(|&d| d <= newest);
    if paired_before == Some(newest) {
        return Ok(other);
    }
    let hourly_from = known(previous_hourly)
        .filter(|&v| v <= h)
        .map_or(h.saturating_sub(PAIRING_LOOKBACK), |v| v + 1);
    let mut runs = BTreeSet::new();
    for v in hourly_from..=h {
        if let Some(r) = read_commit(hourly, v).await?.and_then(|c| run_of(&c)) {
            runs.insert(r);
        }
    }
    let oldest = paired_before.map_or(newest.saturating_sub(PAIRING_LOOKBACK), |d| d + 1);
    for v in (oldest..=newest).rev() {
        match read_commit(&other, v).await?.and_then(|c| run_of(&c)) {
            // not a batch run's commit (a restore, a compaction): nothing to pair
            None => return open_at(lake, kind, other, v).await,
            Some(run) if runs.contains(&run) => return open_at(lake, kind, other, v).await,
            Some(_) => {}
        }
    }
    match paired_before {
        Some(d) => open_at(lake, kind, other, d).await,
        None => Err(Error::Conflict(
            "the metric tables' last commits are of runs whose metrics_hourly commit is not \
             there yet (a publish in progress); load again shortly"
                .into(),
        )),
    }
}

/// Commits of each table read back when pairing without a previous state.
const PAIRING_LOOKBACK: u64 = 24;

/// The batch run that made a commit, when a batch run did.
fn run_of(commit: &tally_common::lake::Commit) -> Option<String> {
    commit.info[RUN_KEY].as_str().map(str::to_string)
}

/// `table` (the lake's `kind`) at version `v` (itself when it is there already).
async fn open_at(lake: &Lake, kind: Table, table: DeltaTable, v: u64) -> Result<DeltaTable> {
    if table.version() == Some(v) {
        Ok(table)
    } else {
        lake.open_at_version(kind, v).await
    }
}

/// Which table's changes to read.
#[derive(Clone, Copy)]
enum Changes {
    Hourly,
    Daily,
}

/// The dates whose rows changed in `table` after version `from` up to `to`;
/// None when a commit in between cannot be read (its log file was cleaned up).
async fn changed_dates(
    table: &DeltaTable,
    from: Option<i64>,
    to: Option<i64>,
    kind: Changes,
) -> Result<Option<BTreeSet<i64>>> {
    let Some(to) = to else {
        return Ok(Some(BTreeSet::new()));
    };
    // a table made anew (its versions start again): nothing can be assumed
    if from.is_some_and(|f| f > to) {
        return Ok(None);
    }
    let first = from.map_or(0, |v| v + 1);
    let mut out = BTreeSet::new();
    for v in first..=to {
        let Some(commit) = read_commit(table, u64::try_from(v).unwrap_or(0)).await? else {
            return Ok(None);
        };
        let data: Vec<_> = commit.files.iter().filter(|f| f.data_change).collect();
        if data.is_empty() {
            continue;
        }
        match kind {
            Changes::Hourly => {
                for f in data {
                    let Some(date) = f.partition_values.get("date") else {
                        return Ok(None);
                    };
                    out.insert(parse_date(date)?);
                }
            }
            Changes::Daily => {
                if let Some(days) = commit.info[DAILY_DAYS_KEY].as_array() {
                    for d in days.iter().filter_map(|d| d.as_str()) {
                        out.insert(parse_date(d)?);
                    }
                    continue;
                }
                for f in data {
                    let Some(month) = f.partition_values.get("month") else {
                        return Ok(None);
                    };
                    let first = parse_date(&format!("{month}-01"))?;
                    out.extend(
                        dates_between(first, first + 31 * MICROS_PER_DAY)
                            .filter(|&d| month_string(d) == *month),
                    );
                }
            }
        }
    }
    Ok(Some(out))
}

fn parse_date(d: &str) -> Result<i64> {
    parse_ts(&format!("{d}T00:00:00Z"))
}

/// A session that sorts under `limit` bytes and spills beyond it.
fn session(limit: usize) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(limit)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::OsTmpDirectory),
        )
        .build_arc()
        .map_err(|e| Error::config(format!("the loader's query runtime: {e}")))?;
    let config: SessionConfig = DeltaSessionConfig::default().into();
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config.with_target_partitions(2))
        .with_runtime_env(runtime)
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// Which of the optional metric tables a load reads.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    daily: bool,
    quarters: bool,
}

/// Write every merchant's rows of date `day` into `slot`; returns the values and
/// bytes written.
///
/// The date's rows of the three tables are read as one stream sorted by
/// merchant (spilling under the session's memory limit), so a merchant's value
/// is complete when the next merchant's rows start.
async fn load_date(
    ctx: &SessionContext,
    store: &dyn ServingStore,
    day: i64,
    slot: u8,
    generation: u64,
    tables: Loaded,
    stale: &[(i64, u8)],
) -> Result<(u64, u64)> {
    let what = format!("loading {} into the serving store", date_string(day));
    // one relation: merchant, kind (0 hour, 1 quarter hour, 2 day), time,
    // metrics, sketch
    let part = |kind: MetricTable, filter: Expr| {
        let what = what.clone();
        async move {
            let code = match kind {
                MetricTable::Hourly => 0,
                MetricTable::QuarterHourly => 1,
                MetricTable::Daily => 2,
            };
            let mut columns = vec![
                col(MERCHANT_COLUMN),
                lit(code).alias(KIND),
                col(kind.time_column()).alias(TIME),
            ];
            columns.extend(stored_metric_names().map(col));
            columns.push(col(SKETCH_COLUMN));
            ctx.table(kind.name())
                .await
                .context(what.clone())?
                .filter(filter)
                .context(what.clone())?
                .select(columns)
                .context(what)
        }
    };
    let mut df = part(MetricTable::Hourly, col("date").eq(lit(date_string(day)))).await?;
    if tables.quarters {
        let q = part(
            MetricTable::QuarterHourly,
            col("date").eq(lit(date_string(day))),
        )
        .await?;
        df = df.union(q).context(what.clone())?;
    }
    if tables.daily {
        let t = MetricTable::Daily;
        let d = part(
            t,
            col(t.partition_column())
                .eq(lit(month_string(day)))
                .and(col(t.time_column()).eq(utc_micros(day))),
        )
        .await?;
        df = df.union(d).context(what.clone())?;
    }
    let mut stream = df
        .sort(vec![col(MERCHANT_COLUMN).sort(true, false)])
        .context(what.clone())?
        .execute_stream()
        .await
        .context(what.clone())?;
    let month = month_string(day);
    let mut writer = Writer {
        store,
        // the same month's only: one hash per merchant and month
        stale: stale
            .iter()
            .copied()
            .filter(|&(d, _)| month_string(d) == month)
            .collect(),
        day,
        slot,
        pending: Vec::with_capacity(WRITE_BATCH),
        values: 0,
        bytes: 0,
    };
    let mut current: Option<(String, DayRows)> = None;
    while let Some(batch) = stream.next().await {
        let batch = batch.context(what.clone())?;
        let rows = MetricRows::new(&batch, TIME).context(what.clone())?;
        let kinds = batch
            .column_by_name(KIND)
            .map(|c| cast(c, &DataType::Int32))
            .transpose()
            .context(what.clone())?
            .ok_or_else(|| Error::internal("the load's rows have no kind"))?;
        let kinds = kinds.as_primitive::<Int32Type>();
        for r in 0..rows.len() {
            let (Some(m), Some(t)) = (rows.merchant(r), rows.time(r)) else {
                continue;
            };
            if current.as_ref().is_none_or(|(cm, _)| cm != m) {
                if let Some((cm, value)) = current.take() {
                    writer.add(cm, value).await?;
                }
                current = Some((
                    m.to_string(),
                    DayRows {
                        generation,
                        ..Default::default()
                    },
                ));
            }
            let Some((_, value)) = current.as_mut() else {
                continue;
            };
            let values = rows.stored(r).to_vec();
            let sketch = rows.sketch(r).map(<[u8]>::to_vec);
            match kinds.value(r) {
                0 => value.hours.push(HourRow {
                    hour: u32::try_from(hour_of_day(t)).unwrap_or(0),
                    values,
                    sketch,
                }),
                1 => value.quarters.push(HourRow {
                    hour: u32::try_from((t - day) / SLOT_MICROS).unwrap_or(0),
                    values,
                    sketch,
                }),
                _ => value.daily = Some(StoredRow { values, sketch }),
            }
        }
    }
    if let Some((cm, value)) = current.take() {
        writer.add(cm, value).await?;
    }
    writer.flush().await?;
    Ok((writer.values, writer.bytes))
}

/// The load relation's columns besides the tables' own.
const KIND: &str = "tally_kind";
const TIME: &str = "tally_time";

/// Encodes merchants' dates and writes them in batches.
struct Writer<'a> {
    store: &'a dyn ServingStore,
    /// Slots of other dates of this date's month that no state reads any more,
    /// deleted with each write.
    stale: Vec<(i64, u8)>,
    day: i64,
    slot: u8,
    pending: Vec<DayWrite>,
    values: u64,
    bytes: u64,
}

impl Writer<'_> {
    async fn add(&mut self, merchant: String, rows: DayRows) -> Result<()> {
        let value = rows.encode_to_vec();
        self.bytes += value.len() as u64;
        self.values += 1;
        self.pending.push(DayWrite {
            merchant,
            day: self.day,
            slot: self.slot,
            value,
            clear: self.stale.clone(),
        });
        if self.pending.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.store.write(&self.pending).await?;
        self.pending.clear();
        Ok(())
    }
}
