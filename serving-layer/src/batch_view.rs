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
use tally_common::lake::{register, Lake, Table};
use tally_common::metric_table::{MetricRows, MetricTable, MERCHANT_COLUMN};
use tally_common::metrics::{stored_metric_names, MetricValues};
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
}

impl BatchSnapshot {
    /// The batch watermark W (epoch µs), None when the batch layer never ran.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
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
        self.read(MetricTable::Hourly, merchant, start, end).await
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
        self.read(MetricTable::Daily, merchant, start, end).await
    }

    /// `merchant`'s rows of `table` with `start <= time < end`, from the
    /// partitions holding that range: a point lookup when the table allows it,
    /// else a DataFusion query.
    async fn read(
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
        let runtime = RuntimeEnvBuilder::new()
            .build_arc()
            .context("building the DataFusion runtime")?;
        let view = Arc::new(BatchView {
            lake,
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
        let _one_at_a_time = self.refreshing.lock().await;
        let result = match tokio::time::timeout(REFRESH_TIMEOUT, self.refresh_inner()).await {
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

    async fn refresh_inner(&self) -> Result<bool> {
        let current = self.snapshot();
        let (hourly, hourly_changed) = self
            .newest(
                Table::MetricsHourly,
                current.as_ref().and_then(|s| s.hourly.as_ref()),
            )
            .await?;
        let (daily, daily_changed) = self
            .newest(
                Table::MetricsDaily,
                current.as_ref().and_then(|s| s.daily.as_ref()),
            )
            .await?;
        if current.is_some() && !hourly_changed && !daily_changed {
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
        let snapshot = BatchSnapshot {
            ctx,
            hourly,
            daily,
            hourly_files,
            daily_files,
            point_lookups: self.point_lookups.clone(),
            watermark,
        };
        tracing::info!(versions = ?snapshot.versions(), watermark = ?watermark.map(tally_common::bucket::format_ts),
            "batch view refreshed");
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
