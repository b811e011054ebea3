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
use tally_common::metric_table::{MetricRows, MetricTable, MERCHANT_COLUMN, SKETCH_COLUMN};
use tally_common::metrics::{stored_metric_names, BucketRow};
use tally_common::serving_store::{dates_between, DayRowsView, ServingStore, StoreState};
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
    /// The metric tables, in [`MetricTable::ALL`] order.
    tables: [Option<DeltaTable>; 3],
    /// The tables' files for point lookups (None: read with DataFusion).
    files: [Option<FileIndex>; 3],
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

/// The position of `kind` in [`MetricTable::ALL`].
const fn slot(kind: MetricTable) -> usize {
    match kind {
        MetricTable::Hourly => 0,
        MetricTable::Daily => 1,
        MetricTable::QuarterHourly => 2,
    }
}

/// The rows to read per metric table: sorted, disjoint spans of bucket
/// starts, `[start, end)` (epoch µs). Lists, so that a range of local months
/// reads hourly rows only on the days its boundaries fall on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    /// `metrics_hourly` hours.
    pub hourly: Vec<(i64, i64)>,
    /// `metrics_daily` days.
    pub daily: Vec<(i64, i64)>,
    /// `metrics_quarter_hourly` quarter hours.
    pub quarters: Vec<(i64, i64)>,
}

impl Ranges {
    fn of(&self, kind: MetricTable) -> &[(i64, i64)] {
        match kind {
            MetricTable::Hourly => &self.hourly,
            MetricTable::Daily => &self.daily,
            MetricTable::QuarterHourly => &self.quarters,
        }
    }

    fn all(&self) -> impl Iterator<Item = (MetricTable, (i64, i64))> + '_ {
        MetricTable::ALL.into_iter().flat_map(move |k| {
            self.of(k)
                .iter()
                .filter(|(a, b)| a < b)
                .map(move |&r| (k, r))
        })
    }

    /// Add `[start, end)` to `spans` (kept sorted when added in time order),
    /// joining it to the last span it meets.
    pub fn add(spans: &mut Vec<(i64, i64)>, start: i64, end: i64) {
        match spans.last_mut() {
            Some(last) if start <= last.1 && start >= last.0 => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
}

/// Rows of one merchant by bucket start, per metric table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MerchantRows {
    /// `metrics_hourly` rows by hour.
    pub hourly: HashMap<i64, BucketRow>,
    /// `metrics_daily` rows by day.
    pub daily: HashMap<i64, BucketRow>,
    /// `metrics_quarter_hourly` rows by quarter hour.
    pub quarters: HashMap<i64, BucketRow>,
}

impl MerchantRows {
    fn of(&mut self, kind: MetricTable) -> &mut HashMap<i64, BucketRow> {
        match kind {
            MetricTable::Hourly => &mut self.hourly,
            MetricTable::Daily => &mut self.daily,
            MetricTable::QuarterHourly => &mut self.quarters,
        }
    }
}

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
    pub fn needs_lake(&self, ranges: &Ranges) -> bool {
        let Some(served) = self.served.as_ref() else {
            return true;
        };
        ranges.all().any(|(_, (a, b))| {
            dates_between(day_floor(a), day_floor(b - 1)).any(|d| served.state.date(d).is_none())
        })
    }

    /// [`BatchSnapshot::read`] from the lake alone.
    async fn read_lake(&self, merchant: &str, ranges: &Ranges) -> Result<MerchantRows> {
        if self.lake_pending {
            return Err(Error::Timeout(
                "the lake's tables are still being opened; retry shortly".into(),
            ));
        }
        let mut out = MerchantRows::default();
        for (kind, (a, b)) in ranges.all() {
            let rows = self.rows(kind, merchant, a, b).await?;
            out.of(kind).extend(rows);
        }
        Ok(out)
    }

    /// Whether the serving store's state says a load copied merchants'
    /// settings in (read fresh).
    pub fn store_holds_settings(&self) -> bool {
        self.served
            .as_ref()
            .is_some_and(|s| s.fresh() && s.state.merchants_version.is_some())
    }

    /// Whether requests read the serving store (it holds these versions and
    /// confirmed its state recently), rather than the lake alone.
    pub fn serves_from_store(&self) -> bool {
        self.served.as_ref().is_some_and(Served::fresh)
    }

    /// `merchant`'s rows of each metric table in `ranges`: the dates the
    /// serving store holds from it (one round trip), the others from the lake at
    /// the same table versions.
    pub async fn read(&self, merchant: &str, ranges: &Ranges) -> Result<MerchantRows> {
        let Some(served) = self.served.as_ref().filter(|s| s.fresh()) else {
            return self.read_lake(merchant, ranges).await;
        };
        let state = &served.state;
        let mut in_store: std::collections::BTreeSet<i64> = Default::default();
        let mut from_lake: Vec<(MetricTable, i64, i64)> = Vec::new();
        for (kind, (a, b)) in ranges.all() {
            for d in dates_between(day_floor(a), day_floor(b - 1)) {
                let (s, e) = (a.max(d), b.min(d + MICROS_PER_DAY));
                if state.date(d).is_some() {
                    in_store.insert(d);
                } else {
                    match from_lake.last_mut() {
                        Some(last) if last.0 == kind && last.2 == s => last.2 = e,
                        _ => from_lake.push((kind, s, e)),
                    }
                }
            }
        }
        let keys: Vec<(i64, u8)> = in_store
            .iter()
            .filter_map(|&d| state.date(d).map(|e| (d, e.slot)))
            .collect();
        let lake_rows = async {
            let mut out = MerchantRows::default();
            for &(kind, a, b) in &from_lake {
                let rows = self.rows(kind, merchant, a, b).await?;
                out.of(kind).extend(rows);
            }
            Result::Ok(out)
        };
        let (values, lake) = tokio::join!(served.store.read(merchant, &keys), lake_rows);
        let mut out = lake?;
        let read = values.and_then(|values| {
            let mut rows = MerchantRows::default();
            for (&(day, _), value) in keys.iter().zip(values) {
                let Some(value) = value else { continue };
                let view = DayRowsView::parse(value)?;
                // left in this slot by an older load: the merchant had no rows since
                if state.date(day).map(|e| e.generation) != Some(view.generation) {
                    continue;
                }
                for &(a, b) in &ranges.hourly {
                    view.hours_into(day, a, b, &mut rows.hourly)?;
                }
                for &(a, b) in &ranges.quarters {
                    view.quarters_into(day, a, b, &mut rows.quarters)?;
                }
                if ranges.daily.iter().any(|&(a, b)| day >= a && day < b) {
                    if let Some(v) = view.daily_row()? {
                        rows.daily.insert(day, v);
                    }
                }
            }
            Ok(rows)
        });
        match read {
            Ok(rows) => {
                out.hourly.extend(rows.hourly);
                out.daily.extend(rows.daily);
                out.quarters.extend(rows.quarters);
            }
            Err(e) => {
                // the lake at the same versions holds the same rows
                tracing::warn!(merchant, error = %e, "reading the serving store failed; reading the lake");
                return self.read_lake(merchant, ranges).await;
            }
        }
        Ok(out)
    }

    /// The loaded versions of the metric tables, in [`MetricTable::ALL`] order.
    pub fn versions(&self) -> [Option<Version>; 3] {
        self.tables
            .each_ref()
            .map(|t| t.as_ref().and_then(|t| t.version()))
    }

    /// `merchant`'s rows of `metrics_hourly` with `start <= hour < end`, by hour.
    pub async fn hourly(
        &self,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, BucketRow>> {
        self.rows(MetricTable::Hourly, merchant, start, end).await
    }

    /// `merchant`'s rows of `metrics_daily` with `start <= day < end`, by day.
    pub async fn daily(
        &self,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, BucketRow>> {
        self.rows(MetricTable::Daily, merchant, start, end).await
    }

    /// `merchant`'s rows of `kind` with `start <= time < end` from the lake.
    pub async fn rows(
        &self,
        kind: MetricTable,
        merchant: &str,
        start: i64,
        end: i64,
    ) -> Result<HashMap<i64, BucketRow>> {
        if self.tables[slot(kind)].is_none() || start >= end {
            return Ok(HashMap::new());
        }
        self.read_table(kind, merchant, start, end).await
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
    ) -> Result<HashMap<i64, BucketRow>> {
        let files = &self.files[slot(table)];
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
    ) -> Result<HashMap<i64, BucketRow>> {
        let ts = tally_common::lake::utc_micros;
        let time_col = table.time_column();
        let filter = col(MERCHANT_COLUMN)
            .eq(lit(merchant))
            .and(partitions)
            .and(col(time_col).gt_eq(ts(start)))
            .and(col(time_col).lt(ts(end)));
        let mut columns = vec![time_col];
        columns.extend(stored_metric_names());
        columns.push(SKETCH_COLUMN);
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
    out: &mut HashMap<i64, BucketRow>,
) -> std::result::Result<(), ArrowError> {
    let rows = MetricRows::new(batch, time_col)?;
    for r in 0..rows.len() {
        if let Some(t) = rows.time(r) {
            out.insert(t, rows.row(r));
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
        let Some(h) = &s.tables[0] else {
            return Ok(None);
        };
        let hv = h
            .get_latest_version()
            .await
            .context("checking the version of metrics_hourly")?;
        let dv = match &s.tables[1] {
            Some(d) => Some(
                d.get_latest_version()
                    .await
                    .context("checking the version of metrics_daily")?,
            ),
            None => None,
        };
        Ok(Some((hv as i64, dv.map(|v| v as i64))))
    }

    /// The lake this view reads.
    pub fn lake(&self) -> &Lake {
        &self.lake
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
                    tables: [None, None, None],
                    files: [None, None, None],
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
        let mut tables: [Option<DeltaTable>; 3] = [None, None, None];
        let mut changed = false;
        for kind in MetricTable::ALL {
            let i = slot(kind);
            let previous = current.as_ref().and_then(|s| s.tables[i].as_ref());
            let (t, c) = match &state {
                Some(state) => {
                    let version = match kind {
                        MetricTable::Hourly => state.hourly_version,
                        MetricTable::Daily => state.daily_version,
                        MetricTable::QuarterHourly => state.quarter_version,
                    };
                    self.at_version(kind.table(), previous, version).await?
                }
                None => self.newest(kind.table(), previous).await?,
            };
            tables[i] = t;
            changed |= c;
        }
        let was_served = current.as_ref().is_some_and(|c| c.served.is_some());
        if current.is_some() && !changed && state.is_none() && !was_served {
            return Ok(false);
        }
        let ctx = self.session();
        let mut watermark = None;
        for kind in MetricTable::ALL {
            if let Some(t) = &tables[slot(kind)] {
                register(&ctx, kind.name(), t).await?;
                if kind == MetricTable::Hourly {
                    watermark = read_progress(t).await?.watermark;
                }
            }
        }
        let mut files: [Option<FileIndex>; 3] = [None, None, None];
        for kind in MetricTable::ALL {
            let i = slot(kind);
            files[i] = self.file_index(
                kind,
                tables[i].as_ref(),
                current.as_ref().and_then(|s| s.files[i].as_ref()),
            )?;
        }
        // the files a batch run just added, warmed before requests see them
        if let Some(current) = &current {
            let mut new = Vec::new();
            for kind in MetricTable::ALL {
                let i = slot(kind);
                if let (Some(index), Some(previous)) = (&files[i], &current.files[i]) {
                    new.extend(
                        index
                            .new_files(previous)
                            .into_iter()
                            .map(|f| (f, kind.time_column())),
                    );
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
            tables,
            files,
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
