//! The batch view: `metrics_hourly` and `metrics_daily`, read by point lookups
//! (DataFusion for tables they cannot read).
//!
//! Opening a Delta table (listing its log, replaying actions) costs far more than
//! answering one merchant's query, so the tables, their file lists, the session
//! and the watermark are kept in a [`BatchSnapshot`] and replaced as a whole when
//! either table's version changes (checked every couple of seconds by a background
//! task). A request takes the current snapshot and reads `merchant_id = m` over a
//! range of `hour`/`day` in the matching `date`/`month` partitions.
//!
//! The read is a point lookup (the `lookup` module): the partitions' files, their
//! row groups and pages pruned by `merchant_id` statistics and the page index
//! (files are sorted by merchant), footers cached per file. Planning a DataFusion
//! query per request cost more than the read itself; DataFusion still reads any
//! table the point lookup cannot (deletion vectors, column mapping), with the same
//! pruning, its queries built with the DataFrame API so no SQL text ever holds
//! request input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use deltalake::datafusion::execution::session_state::SessionStateBuilder;
use deltalake::datafusion::prelude::{col, lit, Expr, SessionConfig, SessionContext};
use deltalake::delta_datafusion::DeltaSessionConfig;
use deltalake::kernel::Version;
use deltalake::DeltaTable;
use futures::StreamExt as _;
use tally_common::bucket::{day_floor, now_micros, MICROS_PER_DAY};
use tally_common::lake::{register, Lake, Table};
use tally_common::metric_table::{MetricRows, MetricTable, MERCHANT_COLUMN};
use tally_common::metrics::{stored_metric_names, MetricValues};
use tally_common::serving_store::{dates_between, DayRows, ServingStore, StoreState};
use tally_common::watermark::read_progress;
use tally_common::{Context as _, Error, Result};

use crate::lookup::FileIndex;

/// How long one refresh may take before it counts as a failure (a hung S3 call
/// must not leave the view looking healthy).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(15);
/// Footers of new files loaded at once after a refresh.
const WARM_CONCURRENCY: usize = 8;
/// At most this many new files (the newest partitions) are warmed after a refresh,
/// for at most [`WARM_TIMEOUT`]: warming is a courtesy to the next requests, and a
/// reprocessed month must not hold the refresh up.
const WARM_FILES: usize = 48;
const WARM_TIMEOUT: Duration = Duration::from_secs(5);

/// One consistent view of the batch tables: what a request reads from.
pub struct BatchSnapshot {
    ctx: SessionContext,
    hourly: Option<DeltaTable>,
    daily: Option<DeltaTable>,
    /// The tables' files for point lookups (None: read with DataFusion).
    hourly_files: Option<FileIndex>,
    daily_files: Option<FileIndex>,
    point_lookups: Arc<AtomicBool>,
    watermark: Option<i64>,
    /// The serving store and the state it published, when it holds the batch
    /// view of these table versions.
    served: Option<Served>,
    /// The lake's tables are not open yet (a process that just started with a
    /// serving store: it answers from the store and opens them when a request
    /// needs history outside it, or at the next refresh).
    lake_pending: bool,
}

/// A serving store's published state, as a snapshot reads it.
struct Served {
    store: Arc<dyn ServingStore>,
    state: StoreState,
    /// When the store last confirmed this state is still its newest (epoch µs).
    confirmed_at: std::sync::atomic::AtomicI64,
    /// How long after that confirmation the state may be read.
    max_age: i64,
}

impl Served {
    fn fresh(&self) -> bool {
        now_micros() - self.confirmed_at.load(Ordering::Relaxed) <= self.max_age
    }
}

/// Rows of one merchant by bucket start: (hourly, daily).
pub type MerchantRows = (HashMap<i64, MetricValues>, HashMap<i64, MetricValues>);

impl BatchSnapshot {
    /// The batch watermark W (epoch µs), None when the batch layer never ran.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Whether this snapshot has a serving store whose state has not been
    /// confirmed for too long (a Lambda container thawed after idling: its
    /// background refresher did not run while frozen).
    pub fn store_unconfirmed(&self) -> bool {
        self.served.as_ref().is_some_and(|s| !s.fresh())
    }

    /// Whether the lake's tables are still to be opened.
    pub fn lake_pending(&self) -> bool {
        self.lake_pending
    }

    /// Whether [`BatchSnapshot::read`] of these ranges needs the lake: dates
    /// the serving store does not hold, or no store (whether the store's state
    /// is fresh is [`BatchSnapshot::store_unconfirmed`]'s question).
    pub fn needs_lake(&self, hourly: Option<(i64, i64)>, daily: Option<(i64, i64)>) -> bool {
        let Some(served) = self.served.as_ref() else {
            return true;
        };
        [hourly, daily].into_iter().flatten().any(|(a, b)| {
            a < b
                && dates_between(day_floor(a), day_floor(b - 1))
                    .any(|d| served.state.date(d).is_none())
        })
    }

    /// [`BatchSnapshot::read`] from the lake alone.
    async fn read_lake(
        &self,
        merchant: &str,
        hourly: Option<(i64, i64)>,
        daily: Option<(i64, i64)>,
    ) -> Result<MerchantRows> {
        if self.lake_pending {
            return Err(Error::Timeout(
                "the lake's tables are still being opened; retry shortly".into(),
            ));
        }
        let h = match hourly {
            Some((a, b)) => self.hourly(merchant, a, b).await?,
            None => HashMap::new(),
        };
        let d = match daily {
            Some((a, b)) => self.daily(merchant, a, b).await?,
            None => HashMap::new(),
        };
        Ok((h, d))
    }

    /// Whether requests read the serving store (it holds these versions and
    /// confirmed its state recently), rather than the lake alone.
    pub fn serves_from_store(&self) -> bool {
        self.served.as_ref().is_some_and(Served::fresh)
    }

    /// `merchant`'s `metrics_hourly` rows with `start <= hour < end` and
    /// `metrics_daily` rows with `start <= day < end` for the given ranges: the
    /// dates the serving store holds from it (one round trip), the others from
    /// the lake at the same table versions.
    pub async fn read(
        &self,
        merchant: &str,
        hourly: Option<(i64, i64)>,
        daily: Option<(i64, i64)>,
    ) -> Result<MerchantRows> {
        let Some(served) = self.served.as_ref().filter(|s| s.fresh()) else {
            return self.read_lake(merchant, hourly, daily).await;
        };
        let state = &served.state;
        let mut in_store: std::collections::BTreeSet<i64> = Default::default();
        let mut lake_hourly: Vec<(i64, i64)> = Vec::new();
        let mut lake_daily: Vec<(i64, i64)> = Vec::new();
        let mut split = |(a, b): (i64, i64), lake: &mut Vec<(i64, i64)>| {
            if a >= b {
                return;
            }
            for d in dates_between(day_floor(a), day_floor(b - 1)) {
                let (s, e) = (a.max(d), b.min(d + MICROS_PER_DAY));
                if state.date(d).is_some() {
                    in_store.insert(d);
                } else {
                    match lake.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => lake.push((s, e)),
                    }
                }
            }
        };
        if let Some(r) = hourly {
            split(r, &mut lake_hourly);
        }
        if let Some(r) = daily {
            split(r, &mut lake_daily);
        }
        let keys: Vec<(i64, u8)> = in_store
            .iter()
            .filter_map(|&d| state.date(d).map(|e| (d, e.slot)))
            .collect();
        let from_lake = async {
            let mut h = HashMap::new();
            for &(a, b) in &lake_hourly {
                h.extend(self.hourly(merchant, a, b).await?);
            }
            let mut d = HashMap::new();
            for &(a, b) in &lake_daily {
                d.extend(self.daily(merchant, a, b).await?);
            }
            Result::Ok((h, d))
        };
        let (values, lake) = tokio::join!(served.store.read(merchant, &keys), from_lake);
        let (mut h, mut d) = lake?;
        let decoded = values.and_then(|values| {
            values
                .into_iter()
                .map(|v| v.map(|v| DayRows::decode(&v)).transpose())
                .collect::<Result<Vec<Option<DayRows>>>>()
        });
        let values = match decoded {
            Ok(v) => v,
            Err(e) => {
                // the lake at the same versions holds the same rows
                tracing::warn!(merchant, error = %e, "reading the serving store failed; reading the lake");
                return self.read_lake(merchant, hourly, daily).await;
            }
        };
        for (&(day, _), rows) in keys.iter().zip(values) {
            let Some(rows) = rows else { continue };
            // left in this slot by an older load: the merchant had no rows since
            if state.date(day).map(|e| e.generation) != Some(rows.generation) {
                continue;
            }
            if let Some((a, b)) = hourly {
                rows.hours_into(day, a, b, &mut h);
            }
            if let Some((a, b)) = daily {
                if day >= a && day < b {
                    if let Some(v) = rows.daily_values() {
                        d.insert(day, v);
                    }
                }
            }
        }
        Ok((h, d))
    }

    /// The loaded versions of `metrics_hourly` and `metrics_daily`.
    pub fn versions(&self) -> (Option<Version>, Option<Version>) {
        (
            self.hourly.as_ref().and_then(|t| t.version()),
            self.daily.as_ref().and_then(|t| t.version()),
        )
    }

    /// `merchant`'s rows of `metrics_hourly` with `start <= hour < end`, by hour.
    pub async fn hourly(
        &self,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, MetricValues>> {
        if self.hourly.is_none() || start >= end {
            return Ok(HashMap::new());
        }
        self.read_table(MetricTable::Hourly, merchant, start, end)
            .await
    }

    /// `merchant`'s rows of `metrics_daily` with `start <= day < end`, by day.
    pub async fn daily(
        &self,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, MetricValues>> {
        if self.daily.is_none() || start >= end {
            return Ok(HashMap::new());
        }
        self.read_table(MetricTable::Daily, merchant, start, end)
            .await
    }

    /// `merchant`'s rows of `table` with `start <= time < end`, from the
    /// partitions holding that range: a point lookup when the table allows it,
    /// else a DataFusion query.
    async fn read_table(
        &self,
        table: MetricTable,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, MetricValues>> {
        let files = match table {
            MetricTable::Hourly => &self.hourly_files,
            MetricTable::Daily => &self.daily_files,
        };
        let (first, last) = (table.partition_of(start), table.partition_of(end - 1));
        if self.point_lookups.load(Ordering::Relaxed) {
            if let Some(files) = files {
                let found = files.lookup(merchant, start, end, &first, &last).await?;
                if let Some(rows) = found {
                    return Ok(rows);
                }
            }
        }
        let partition_col = table.partition_column();
        let partitions = col(partition_col)
            .gt_eq(lit(first))
            .and(col(partition_col).lt_eq(lit(last)));
        self.query(table, merchant, start, end, partitions).await
    }

    /// The same read as a DataFusion query.
    async fn query(
        &self,
        table: MetricTable,
        merchant: &str,
        start: i64,
        end: i64,
        partitions: Expr,
    ) -> Result<HashMap<i64, MetricValues>> {
        let ts = tally_common::lake::utc_micros;
        let time_col = table.time_column();
        let filter = col(MERCHANT_COLUMN)
            .eq(lit(merchant))
            .and(partitions)
            .and(col(time_col).gt_eq(ts(start)))
            .and(col(time_col).lt(ts(end)));
        let mut columns = vec![time_col];
        columns.extend(stored_metric_names());
        let what = format!("reading {} for a merchant", table.name());
        let batches = self
            .ctx
            .table(table.name())
            .await
            .context(what.clone())?
            .filter(filter)
            .context(what.clone())?
            .select_columns(&columns)
            .context(what.clone())?
            .collect()
            .await
            .context(what)?;
        let mut out = HashMap::new();
        for batch in &batches {
            rows_into(batch, time_col, &mut out)
                .context(format!("decoding {} rows", table.name()))?;
        }
        Ok(out)
    }
}

/// Decode the rows of `batch` (a projection of a metric table whose time column
/// is `time_col`) into `out`, by time.
fn rows_into(
    batch: &RecordBatch,
    time_col: &str,
    out: &mut HashMap<i64, MetricValues>,
) -> std::result::Result<(), ArrowError> {
    let rows = MetricRows::new(batch, time_col)?;
    for r in 0..rows.len() {
        if let Some(t) = rows.time(r) {
            out.insert(t, rows.values(r));
        }
    }
    Ok(())
}

/// The cached batch view and its refresher.
pub struct BatchView {
    lake: Lake,
    /// Whether the first refresh may answer from the serving store alone.
    lake_deferred: AtomicBool,
    /// The serving store requests read, when there is one.
    store: Option<Arc<dyn ServingStore>>,
    /// How long a store's state may be read after the store last confirmed it.
    state_max_age: Duration,
    runtime: Arc<RuntimeEnv>,
    point_lookups: Arc<AtomicBool>,
    current: RwLock<Option<Arc<BatchSnapshot>>>,
    last_error: RwLock<Option<String>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl BatchView {
    /// A view of `lake`'s metric tables, loaded once now. A lake that cannot be
    /// read yet is not an error here: the view reports itself unhealthy and the
    /// refresher keeps trying.
    pub async fn open(lake: Lake) -> Result<Arc<Self>> {
        Self::open_with_store(lake, None, Duration::from_secs(5)).await
    }

    /// A view reading `store` for the dates it holds, and the lake at the table
    /// versions the store reflects for the rest (the lake alone, at its newest
    /// versions, while the store has no state). A state the store has not
    /// confirmed for `state_max_age` is not read (the lake answers alone).
    pub async fn open_with_store(
        lake: Lake,
        store: Option<Arc<dyn ServingStore>>,
        state_max_age: Duration,
    ) -> Result<Arc<Self>> {
        let runtime = RuntimeEnvBuilder::new()
            .build_arc()
            .context("building the DataFusion runtime")?;
        let view = Arc::new(BatchView {
            lake,
            lake_deferred: AtomicBool::new(true),
            store,
            state_max_age,
            runtime,
            point_lookups: Arc::new(AtomicBool::new(true)),
            current: RwLock::new(None),
            last_error: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        });
        if let Err(e) = view.refresh().await {
            tracing::warn!(error = %e, "the batch view could not be loaded yet; retrying in the background");
        }
        Ok(view)
    }

    /// Check for new table versions every `every`, for as long as the view is alive.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) {
        let weak: Weak<BatchView> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(view) = weak.upgrade() else { return };
                if let Err(e) = view.refresh().await {
                    tracing::warn!(error = %e, "refreshing the batch view failed");
                }
            }
        });
    }

    /// Stop reading the serving store's state of the current snapshot (until the
    /// next refresh confirms one): requests read the lake at its versions.
    pub(crate) fn expire_served(&self) {
        if let Some(s) = self.snapshot() {
            if let Some(served) = &s.served {
                served.confirmed_at.store(i64::MIN / 2, Ordering::Relaxed);
            }
        }
    }

    /// The newest versions of the metric tables in the lake (a listing of their
    /// logs), when the view has both tables open; None otherwise.
    pub(crate) async fn latest_versions(&self) -> Result<Option<(i64, Option<i64>)>> {
        let Some(s) = self.snapshot() else {
            return Ok(None);
        };
        let Some(h) = &s.hourly else { return Ok(None) };
        let hv = h
            .get_latest_version()
            .await
            .context("checking the version of metrics_hourly")?;
        let dv = match &s.daily {
            Some(d) => Some(
                d.get_latest_version()
                    .await
                    .context("checking the version of metrics_daily")?,
            ),
            None => None,
        };
        Ok(Some((hv as i64, dv.map(|v| v as i64))))
    }

    /// Read with point lookups where the tables allow (the default), or always with
    /// DataFusion queries (to compare the two).
    pub fn set_point_lookups(&self, on: bool) {
        self.point_lookups.store(on, Ordering::Relaxed);
    }

    /// The current snapshot; None until the lake was read once.
    pub fn snapshot(&self) -> Option<Arc<BatchSnapshot>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// Whether the lake was readable at the last check.
    pub fn is_healthy(&self) -> bool {
        self.snapshot().is_some() && self.last_error.read().is_ok_and(|e| e.is_none())
    }

    /// The last refresh's error, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.read().ok().and_then(|e| e.clone())
    }

    /// Look for new versions of the tables now; returns whether the snapshot changed.
    pub async fn refresh(&self) -> Result<bool> {
        self.refresh_opening(true).await
    }

    /// [`BatchView::refresh`]; with `open_lake` false, a snapshot whose lake
    /// tables are not open yet only has its store's state confirmed (a
    /// request that needs no history outside the store).
    pub(crate) async fn refresh_opening(&self, open_lake: bool) -> Result<bool> {
        let _one_at_a_time = self.refreshing.lock().await;
        let result =
            match tokio::time::timeout(REFRESH_TIMEOUT, self.refresh_inner(open_lake)).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(format!(
                    "the lake did not answer within {REFRESH_TIMEOUT:?}"
                ))),
            };
        if let Ok(mut last) = self.last_error.write() {
            *last = result.as_ref().err().map(ToString::to_string);
        }
        result
    }

    async fn refresh_inner(&self, open_lake: bool) -> Result<bool> {
        let current = self.snapshot();
        // the state is known current as of when it was asked for, not answered
        let asked_at = now_micros();
        let state = match &self.store {
            Some(store) => store.state().await?.filter(StoreState::readable),
            None => None,
        };
        if let (Some(state), Some(cur)) = (&state, &current) {
            if let Some(served) = cur.served.as_ref().filter(|s| s.state.load == state.load) {
                served.confirmed_at.store(asked_at, Ordering::Relaxed);
                if !cur.lake_pending || !open_lake {
                    return Ok(false);
                }
            }
        }
        // a process starting with a serving store answers from it at once: the
        // lake's tables (only for history outside the store) open later
        if let (None, Some(store), Some(state)) = (&current, &self.store, &state) {
            if self.lake_deferred.swap(false, Ordering::SeqCst) {
                let snapshot = BatchSnapshot {
                    ctx: self.session(),
                    hourly: None,
                    daily: None,
                    hourly_files: None,
                    daily_files: None,
                    point_lookups: self.point_lookups.clone(),
                    watermark: state.watermark,
                    served: Some(self.served(store, state.clone(), asked_at)),
                    lake_pending: true,
                };
                if let Ok(mut c) = self.current.write() {
                    *c = Some(Arc::new(snapshot));
                }
                return Ok(true);
            }
        }
        let (hourly, hourly_changed, daily, daily_changed) = match &state {
            Some(state) => {
                let (h, hc) = self
                    .at_version(
                        Table::MetricsHourly,
                        current.as_ref().and_then(|s| s.hourly.as_ref()),
                        state.hourly_version,
                    )
                    .await?;
                let (d, dc) = self
                    .at_version(
                        Table::MetricsDaily,
                        current.as_ref().and_then(|s| s.daily.as_ref()),
                        state.daily_version,
                    )
                    .await?;
                (h, hc, d, dc)
            }
            None => {
                let (h, hc) = self
                    .newest(
                        Table::MetricsHourly,
                        current.as_ref().and_then(|s| s.hourly.as_ref()),
                    )
                    .await?;
                let (d, dc) = self
                    .newest(
                        Table::MetricsDaily,
                        current.as_ref().and_then(|s| s.daily.as_ref()),
                    )
                    .await?;
                (h, hc, d, dc)
            }
        };
        let was_served = current.as_ref().is_some_and(|c| c.served.is_some());
        if current.is_some() && !hourly_changed && !daily_changed && state.is_none() && !was_served
        {
            return Ok(false);
        }
        let ctx = self.session();
        let mut watermark = None;
        if let Some(t) = &hourly {
            register(&ctx, Table::MetricsHourly.name(), t).await?;
            watermark = read_progress(t).await?.watermark;
        }
        if let Some(t) = &daily {
            register(&ctx, Table::MetricsDaily.name(), t).await?;
        }
        let hourly_files = self.file_index(
            MetricTable::Hourly,
            hourly.as_ref(),
            current.as_ref().and_then(|s| s.hourly_files.as_ref()),
        )?;
        let daily_files = self.file_index(
            MetricTable::Daily,
            daily.as_ref(),
            current.as_ref().and_then(|s| s.daily_files.as_ref()),
        )?;
        // the files a batch run just added, warmed before requests see them
        if let Some(current) = &current {
            let mut new = Vec::new();
            for (index, previous, time_col) in [
                (
                    &hourly_files,
                    &current.hourly_files,
                    MetricTable::Hourly.time_column(),
                ),
                (
                    &daily_files,
                    &current.daily_files,
                    MetricTable::Daily.time_column(),
                ),
            ] {
                if let (Some(index), Some(previous)) = (index, previous) {
                    new.extend(index.new_files(previous).into_iter().map(|f| (f, time_col)));
                }
            }
            // each table's new files come in partition order, so the cap drops the oldest
            let skip = new.len().saturating_sub(WARM_FILES);
            let warm = futures::stream::iter(new.into_iter().skip(skip)).for_each_concurrent(
                WARM_CONCURRENCY,
                |(file, time_col)| async move {
                    if let Err(e) = file.warm(time_col).await {
                        tracing::warn!(error = %e, "loading a new file's footer failed");
                    }
                },
            );
            if tokio::time::timeout(WARM_TIMEOUT, warm).await.is_err() {
                tracing::warn!("warming new files' footers took over {WARM_TIMEOUT:?}; the rest load on first use");
            }
        }
        let served = match (state, &self.store) {
            (Some(state), Some(store)) => {
                // the state's watermark is that of the version read above
                watermark = state.watermark;
                Some(self.served(store, state, asked_at))
            }
            _ => None,
        };
        let snapshot = BatchSnapshot {
            ctx,
            hourly,
            daily,
            hourly_files,
            daily_files,
            point_lookups: self.point_lookups.clone(),
            watermark,
            served,
            lake_pending: false,
        };
        tracing::info!(versions = ?snapshot.versions(), watermark = ?watermark.map(tally_common::bucket::format_ts),
            serving_store = snapshot.served.is_some(), "batch view refreshed");
        if let Ok(mut c) = self.current.write() {
            *c = Some(Arc::new(snapshot));
        }
        Ok(true)
    }

    /// The point-lookup index of `table`, reusing `previous`'s entries (and so
    /// their cached footers) for files still present.
    fn file_index(
        &self,
        table: MetricTable,
        loaded: Option<&DeltaTable>,
        previous: Option<&FileIndex>,
    ) -> Result<Option<FileIndex>> {
        let Some(loaded) = loaded else {
            return Ok(None);
        };
        let local_root = if self.lake.is_local() {
            self.lake.table_url(table.table()).to_file_path().ok()
        } else {
            None
        };
        FileIndex::build(loaded, table, local_root, previous)
    }

    /// `table` at its newest version, and whether that differs from `current`.
    async fn newest(
        &self,
        table: Table,
        current: Option<&DeltaTable>,
    ) -> Result<(Option<DeltaTable>, bool)> {
        let Some(current) = current else {
            let opened = self.lake.open(table).await?;
            let changed = opened.is_some();
            return Ok((opened, changed));
        };
        let latest = current
            .get_latest_version()
            .await
            .context(format!("checking the version of {}", table.name()))?;
        let mut table_state = current.clone();
        if current.version() == Some(latest) {
            return Ok((Some(table_state), false));
        }
        table_state
            .update_state()
            .await
            .context(format!("loading the new version of {}", table.name()))?;
        Ok((Some(table_state), true))
    }

    /// `store`'s `state`, confirmed current as of `asked_at` (epoch µs).
    fn served(&self, store: &Arc<dyn ServingStore>, state: StoreState, asked_at: i64) -> Served {
        Served {
            store: Arc::clone(store),
            state,
            confirmed_at: std::sync::atomic::AtomicI64::new(asked_at),
            max_age: i64::try_from(self.state_max_age.as_micros()).unwrap_or(i64::MAX),
        }
    }

    /// `table` at `version` (None: the table did not exist then), and whether
    /// that differs from `current`.
    async fn at_version(
        &self,
        table: Table,
        current: Option<&DeltaTable>,
        version: Option<i64>,
    ) -> Result<(Option<DeltaTable>, bool)> {
        let Some(v) = version.and_then(|v| u64::try_from(v).ok()) else {
            return Ok((None, current.is_some()));
        };
        match current {
            Some(c) if c.version() == Some(v) => Ok((Some(c.clone()), false)),
            Some(c) => {
                let mut t = c.clone();
                t.load_version(v)
                    .await
                    .context(format!("loading version {v} of {}", table.name()))?;
                Ok((Some(t), true))
            }
            None => Ok((Some(self.lake.open_at_version(table, v).await?), true)),
        }
    }

    /// A session for one snapshot, on the shared runtime (and so the shared Parquet
    /// metadata cache). One partition per query: requests are small and many, so
    /// they parallelize across requests, not within one.
    fn session(&self) -> SessionContext {
        let config: SessionConfig = DeltaSessionConfig::default().into();
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config.with_target_partitions(1))
            .with_runtime_env(self.runtime.clone())
            .build();
        SessionContext::new_with_state(state)
    }
}
