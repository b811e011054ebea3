//! The batch job: `tally batch run` (the hourly run) and `tally batch reprocess`.
//!
//! A run finds its hours from the Delta log ([`crate::dirty`]), computes them day
//! by day with DataFusion ([`crate::sql`]), and replaces those hours' rows of
//! `metrics_hourly` (and complete days' rows of `metrics_daily`) with atomic
//! Delta commits. The last hourly commit records the watermark, the raw version
//! processed and the logic version ([`tally_common::watermark`]), so a run killed
//! at any point leaves the tables whole and the next run redoes what is missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::compute::{
    cast, concat_batches, lexsort_to_indices, take_record_batch, SortColumn,
};
use deltalake::arrow::datatypes::{Int64Type, SchemaRef};
use deltalake::datafusion::logical_expr::{col, lit, Expr};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::scalar::ScalarValue;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::{
    date_string, day_floor, hour_floor, hours_between, month_string, now_micros, MICROS_PER_DAY,
    MICROS_PER_HOUR, MICROS_PER_SECOND,
};
use tally_common::lake::{register, Lake, Table};
use tally_common::metrics::stored_metric_names;
use tally_common::watermark::{read_progress, LOGIC_VERSION_APP, RAW_VERSION_APP, WATERMARK_APP};
use tally_common::{Context as _, Error, Result};

use crate::dirty::{hours_changed, hours_present};
use crate::layout::metric_writer_properties;
use crate::lock::Lease;
use crate::sql::{daily_sql, hourly_sql};

/// The version of the metric logic; bump it with any change of results, then
/// reprocess history.
pub const LOGIC_VERSION: i32 = 1;

/// Default expiry of the batch lease: a killed run blocks the next one at most this long.
pub const DEFAULT_LEASE_EXPIRY: Duration = Duration::from_secs(120);

/// Totals of the stored metrics over a set of rows (orders, gross_sales, refunds,
/// refunded_amount, page_views, unique_customers).
pub type Totals = [i64; 6];

/// What a `--dry-run` would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunDiff {
    /// Merchant-hours whose stored metrics would change, appear or disappear.
    pub merchant_hours_changed: u64,
    /// Merchant-hours compared.
    pub merchant_hours_compared: u64,
    /// Totals over the range now.
    pub totals_before: Totals,
    /// Totals over the range after the run.
    pub totals_after: Totals,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Hours recomputed.
    pub hours: usize,
    /// Complete days whose daily rows were recomputed.
    pub days: usize,
    /// Rows written to `metrics_hourly`.
    pub hourly_rows: u64,
    /// Rows written to `metrics_daily`.
    pub daily_rows: u64,
    /// Watermark before the run (epoch µs).
    pub watermark_before: Option<i64>,
    /// Watermark after the run.
    pub watermark_after: Option<i64>,
    /// The `raw_events` version processed.
    pub raw_version: Option<i64>,
    /// Time spent computing (the DataFusion queries), seconds.
    pub compute_secs: f64,
    /// Time spent writing metric tables, seconds.
    pub write_secs: f64,
    /// Time spent compacting raw partitions (and vacuuming once a day closes), seconds.
    pub compact_secs: f64,
    /// What a dry run would change.
    pub diff: Option<DryRunDiff>,
}

/// A batch run, configured with builder methods and started with [`BatchRun::execute`].
pub struct BatchRun {
    lake: Lake,
    now: i64,
    grace: i64,
    range: Option<(i64, i64)>,
    dry_run: bool,
    compact: bool,
    lease_wait: Duration,
    lease_expiry: Duration,
    on_day: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
}

impl BatchRun {
    /// The hourly run over `lake` as of now, with a 5 minute grace period.
    pub fn new(lake: &Lake) -> Self {
        BatchRun {
            lake: lake.clone(),
            now: now_micros(),
            grace: 5 * 60 * MICROS_PER_SECOND,
            range: None,
            dry_run: false,
            compact: true,
            lease_wait: Duration::ZERO,
            lease_expiry: DEFAULT_LEASE_EXPIRY,
            on_day: None,
        }
    }
    /// Pretend the run happens at `t` (epoch µs).
    pub fn now(mut self, t: i64) -> Self {
        self.now = t;
        self
    }
    /// Minutes after an hour's end before it is closed.
    pub fn grace_minutes(mut self, m: i64) -> Self {
        self.grace = m * 60 * MICROS_PER_SECOND;
        self
    }
    /// Reprocess the closed hours of `[from, to)` (epoch µs, hour aligned) instead of the dirty ones.
    pub fn reprocess(mut self, from: i64, to: i64) -> Self {
        self.range = Some((from, to));
        self
    }
    /// Compute and compare, write nothing.
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }
    /// Compact the raw partitions of closed hours after writing (default on).
    pub fn compact(mut self, yes: bool) -> Self {
        self.compact = yes;
        self
    }
    /// How long to wait for another run's lease before giving up (default: not at all).
    pub fn wait_for_other_runs(mut self, d: Duration) -> Self {
        self.lease_wait = d;
        self
    }

    /// How long a lease not renewed stays a live run's (default 2 minutes; the
    /// holder renews it every quarter of this).
    pub fn lease_expiry(mut self, d: Duration) -> Self {
        self.lease_expiry = d.max(Duration::from_secs(1));
        self
    }
    /// Called after each day with (days done, days in total), for progress bars.
    pub fn on_day(mut self, f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        self.on_day = Some(Arc::new(f));
        self
    }

    /// Run it.
    pub async fn execute(self) -> Result<RunReport> {
        let mut hourly = self.lake.open_or_create(Table::MetricsHourly).await?;
        let lease = if self.dry_run {
            None
        } else {
            Some(Lease::acquire(&hourly, self.lease_expiry, self.lease_wait).await?)
        };
        // the table as of now: another run may have committed while this one waited
        let result = match hourly.update_state().await {
            Ok(()) => self.execute_locked(&mut hourly, lease.as_ref()).await,
            Err(e) => Err(e).context("refreshing metrics_hourly"),
        };
        if let Some(l) = lease {
            l.release().await;
        }
        result
    }

    async fn execute_locked(
        &self,
        hourly: &mut DeltaTable,
        lease: Option<&Lease>,
    ) -> Result<RunReport> {
        let mut report = RunReport::default();
        let progress = read_progress(hourly).await?;
        report.watermark_before = progress.watermark;
        let closed_end = hour_floor(self.now - self.grace);
        let Some(raw) = self.lake.open(Table::RawEvents).await? else {
            return Ok(report);
        };
        let raw_version = raw.version().map(|v| v as i64).unwrap_or(-1);
        report.raw_version = Some(raw_version);

        let present = hours_present(&raw)?;
        let dirty: BTreeSet<i64> = match self.range {
            Some((from, to)) => hours_between(from, to.min(closed_end)).collect(),
            None => {
                let w = progress.watermark;
                let mut d: BTreeSet<i64> = present
                    .iter()
                    .copied()
                    .filter(|&h| h < closed_end && w.is_none_or(|w| h >= w))
                    .collect();
                if let Some(v) = progress.raw_version {
                    match hours_changed(&raw, v, raw_version).await? {
                        Some(changed) => d.extend(changed.into_iter().filter(|&h| h < closed_end)),
                        None => {
                            tracing::warn!("raw_events log entries since version {v} are gone; recomputing every closed hour");
                            d.extend(present.iter().copied().filter(|&h| h < closed_end));
                        }
                    }
                }
                d
            }
        };
        let new_watermark = match self.range {
            Some(_) => progress.watermark,
            None => Some(progress.watermark.map_or(closed_end, |w| w.max(closed_end))),
        };
        report.watermark_after = new_watermark;
        report.hours = dirty.len();

        let mut by_day: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for &h in &dirty {
            by_day.entry(day_floor(h)).or_default().push(h);
        }
        let ctx = SessionContext::new();
        register(&ctx, Table::RawEvents.name(), &raw).await?;
        let mut daily = self.lake.open_or_create(Table::MetricsDaily).await?;
        let computed_at = now_micros();
        let mut diff = DryRunDiff::default();
        let n_days = by_day.len();
        let last_day = by_day.keys().next_back().copied();

        for (i, (&day, hours)) in by_day.iter().enumerate() {
            let t0 = std::time::Instant::now();
            let hourly_batches = run_query(&ctx, &hourly_sql("raw_events", day, hours)).await?;
            let hourly_rows = to_table_rows(
                Table::MetricsHourly,
                &hourly_batches,
                computed_at,
                &date_string(day),
            )?;
            let complete = day + MICROS_PER_DAY <= closed_end;
            let daily_rows = if complete {
                let b = run_query(&ctx, &daily_sql("raw_events", day)).await?;
                Some(daily_rows(&b, day, computed_at)?)
            } else {
                None
            };
            report.compute_secs += t0.elapsed().as_secs_f64();

            if self.dry_run {
                let before = existing_hourly(hourly, day, hours).await?;
                compare(&before, &hourly_rows, &mut diff)?;
            } else {
                if let Some(l) = lease {
                    l.check().await?;
                }
                let t1 = std::time::Instant::now();
                let n: u64 = hourly_rows.iter().map(|b| b.num_rows() as u64).sum();
                let mut commit = CommitProperties::default().with_metadata([
                    (
                        "tally.operation".to_string(),
                        serde_json::json!(if self.range.is_some() {
                            "reprocess"
                        } else {
                            "batch run"
                        }),
                    ),
                    (
                        "tally.logic_version".to_string(),
                        serde_json::json!(LOGIC_VERSION),
                    ),
                ]);
                if Some(day) == last_day {
                    commit = commit
                        .with_application_transactions(progress_txns(new_watermark, raw_version));
                }
                *hourly = rewrite_partition(
                    hourly,
                    Table::MetricsHourly,
                    col("date").eq(lit(date_string(day))),
                    hours_predicate(day, hours),
                    hourly_rows,
                    commit,
                )
                .await?;
                report.hourly_rows += n;
                if let Some(rows) = daily_rows {
                    let n: u64 = rows.iter().map(|b| b.num_rows() as u64).sum();
                    let month = col("month").eq(lit(month_string(day)));
                    daily = rewrite_partition(
                        &daily,
                        Table::MetricsDaily,
                        month.clone(),
                        month.and(col("day").eq(ts_lit(day))),
                        rows,
                        CommitProperties::default(),
                    )
                    .await?;
                    report.daily_rows += n;
                    report.days += 1;
                }
                report.write_secs += t1.elapsed().as_secs_f64();
            }
            if let Some(f) = &self.on_day {
                f(i + 1, n_days);
            }
        }

        if self.dry_run {
            report.diff = Some(diff);
            return Ok(report);
        }
        if by_day.is_empty()
            && (new_watermark != progress.watermark || progress.raw_version != Some(raw_version))
        {
            // nothing to recompute, but the watermark or the processed version moves on
            let commit = CommitProperties::default()
                .with_application_transactions(progress_txns(new_watermark, raw_version));
            let w = new_watermark.unwrap_or(closed_end);
            let pred = col("hour").gt_eq(ts_lit(w)).and(col("hour").lt(ts_lit(w)));
            *hourly = replace_rows(hourly, Table::MetricsHourly, Vec::new(), pred, commit).await?;
        }
        if self.compact && !dirty.is_empty() {
            let t2 = std::time::Instant::now();
            let days: BTreeSet<i64> = by_day
                .keys()
                .copied()
                .filter(|&d| d + MICROS_PER_DAY <= closed_end)
                .collect();
            crate::compact::compact_days(&self.lake, &days).await?;
            if !days.is_empty() && self.range.is_none() {
                // once a day closes: files replaced more than the retention ago go, and
                // readers and time travel inside the window keep theirs
                for t in [Table::RawEvents, Table::MetricsHourly, Table::MetricsDaily] {
                    let n = crate::compact::vacuum(&self.lake, t, crate::compact::VACUUM_RETENTION)
                        .await?;
                    tracing::info!(table = t.name(), files = n, "vacuumed");
                }
            }
            report.compact_secs = t2.elapsed().as_secs_f64();
        }
        Ok(report)
    }
}

fn progress_txns(watermark: Option<i64>, raw_version: i64) -> Vec<Transaction> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut t = vec![
        Transaction::new_with_last_update(RAW_VERSION_APP, raw_version, Some(now)),
        Transaction::new_with_last_update(LOGIC_VERSION_APP, i64::from(LOGIC_VERSION), Some(now)),
    ];
    if let Some(w) = watermark {
        t.push(Transaction::new_with_last_update(
            WATERMARK_APP,
            w.div_euclid(MICROS_PER_HOUR),
            Some(now),
        ));
    }
    t
}

fn ts_lit(t: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t),
        Some("UTC".into()),
    ))
}

/// `date = D AND (hour in contiguous runs of the given hours)`.
fn hours_predicate(day: i64, hours: &[i64]) -> Expr {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &h in hours {
        match runs.last_mut() {
            Some((_, end)) if *end == h => *end = h + MICROS_PER_HOUR,
            _ => runs.push((h, h + MICROS_PER_HOUR)),
        }
    }
    let any = runs
        .into_iter()
        .map(|(a, b)| col("hour").gt_eq(ts_lit(a)).and(col("hour").lt(ts_lit(b))))
        .reduce(Expr::or)
        .unwrap_or(lit(false));
    col("date").eq(lit(date_string(day))).and(any)
}

async fn run_query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    ctx.sql(sql)
        .await
        .context("planning the metrics query")?
        .collect()
        .await
        .context("running the metrics query")
}

/// Query output plus `computed_at`, `logic_version` and the partition column, cast to the table's schema.
fn to_table_rows(
    table: Table,
    batches: &[RecordBatch],
    computed_at: i64,
    partition: &str,
) -> Result<Vec<RecordBatch>> {
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            finish_rows(
                table,
                b.columns().to_vec(),
                b.num_rows(),
                computed_at,
                partition,
            )
        })
        .collect()
}

fn finish_rows(
    table: Table,
    mut cols: Vec<ArrayRef>,
    n: usize,
    computed_at: i64,
    partition: &str,
) -> Result<RecordBatch> {
    cols.push(Arc::new(
        deltalake::arrow::array::TimestampMicrosecondArray::from(vec![computed_at; n])
            .with_timezone("UTC"),
    ));
    cols.push(Arc::new(deltalake::arrow::array::Int32Array::from(
        vec![LOGIC_VERSION; n],
    )));
    cols.push(Arc::new(deltalake::arrow::array::StringArray::from(
        vec![partition; n],
    )));
    conform(&table.schema(), cols)
}

/// Daily query output (merchant, metrics...) with the `day` column put in second place.
fn daily_rows(batches: &[RecordBatch], day: i64, computed_at: i64) -> Result<Vec<RecordBatch>> {
    let month = month_string(day);
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let n = b.num_rows();
            let mut cols: Vec<ArrayRef> = vec![b.column(0).clone()];
            cols.push(Arc::new(
                deltalake::arrow::array::TimestampMicrosecondArray::from(vec![day; n])
                    .with_timezone("UTC"),
            ));
            cols.extend(b.columns()[1..].iter().cloned());
            finish_rows(Table::MetricsDaily, cols, n, computed_at, &month)
        })
        .collect()
}

fn conform(schema: &SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    if cols.len() != schema.fields().len() {
        return Err(Error::invalid(format!(
            "metrics query returned {} columns, table has {}",
            cols.len(),
            schema.fields().len()
        )));
    }
    let cols = cols
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                cast(&c, f.data_type()).context(format!("casting {}", f.name()))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), cols).context("shaping metric rows")
}

async fn replace_rows(
    table: &DeltaTable,
    kind: Table,
    rows: Vec<RecordBatch>,
    predicate: Expr,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    // an empty replacement still commits: it removes the hours' old rows (or only
    // records progress)
    let rows = if rows.is_empty() {
        vec![RecordBatch::new_empty(kind.schema())]
    } else {
        rows
    };
    table
        .clone()
        .write(rows)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_partition_columns(kind.partition_columns().iter().copied())
        .with_writer_properties(metric_writer_properties())
        .with_commit_properties(commit)
        .await
        .context(format!("replacing rows of {}", kind.name()))
}

/// Replace the rows matching `replaced` (within the partition `partition`) with
/// `rows` by rewriting the whole partition in one commit: its other rows are read
/// back and everything is written sorted by merchant and time, so a partition
/// stays one file a lookup of one merchant reads a page or two of
/// ([`crate::layout`]).
async fn rewrite_partition(
    table: &DeltaTable,
    kind: Table,
    partition: Expr,
    replaced: Expr,
    rows: Vec<RecordBatch>,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let kept = read_rows(table, kind, partition.clone().and(!replaced)).await?;
    let rows = sorted_by_merchant(kind, kept.into_iter().chain(rows).collect())?;
    replace_rows(table, kind, rows, partition, commit).await
}

/// The rows of `table` matching `filter`, in the table's column order and types.
async fn read_rows(table: &DeltaTable, kind: Table, filter: Expr) -> Result<Vec<RecordBatch>> {
    if table.snapshot().is_err() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    register(&ctx, kind.name(), table).await?;
    let schema = kind.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let batches = ctx
        .table(kind.name())
        .await
        .context(format!("reading {}", kind.name()))?
        .filter(filter)
        .context(format!("filtering {}", kind.name()))?
        .select_columns(&names)
        .context(format!("projecting {}", kind.name()))?
        .collect()
        .await
        .context(format!("reading {}", kind.name()))?;
    batches
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| conform(&schema, b.columns().to_vec()))
        .collect()
}

/// One batch sorted by `merchant_id`, then the table's time column.
fn sorted_by_merchant(kind: Table, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    let schema = kind.schema();
    let all = concat_batches(&schema, &batches).context("gathering metric rows")?;
    let time = match kind {
        Table::MetricsDaily => "day",
        _ => "hour",
    };
    let key = |name: &str| -> Result<SortColumn> {
        Ok(SortColumn {
            values: all
                .column_by_name(name)
                .ok_or_else(|| Error::invalid(format!("no {name} column")))?
                .clone(),
            options: None,
        })
    };
    let order = lexsort_to_indices(&[key("merchant_id")?, key(time)?], None)
        .context("sorting metric rows")?;
    Ok(vec![
        take_record_batch(&all, &order).context("sorting metric rows")?
    ])
}

type RowKey = (String, i64);

fn metric_rows(batches: &[RecordBatch], time_col: &str) -> Result<HashMap<RowKey, Totals>> {
    let mut out = HashMap::new();
    for b in batches {
        let m = b
            .column_by_name("merchant_id")
            .ok_or_else(|| Error::invalid("no merchant_id"))?;
        let m = cast(m, &deltalake::arrow::datatypes::DataType::Utf8).context("merchant_id")?;
        let m = m.as_string::<i32>();
        let t = b
            .column_by_name(time_col)
            .ok_or_else(|| Error::invalid("no time column"))?;
        let t = cast(t, &deltalake::arrow::datatypes::DataType::Int64).context("time column")?;
        let t = t.as_primitive::<Int64Type>();
        let cols: Vec<_> = stored_metric_names()
            .map(|n| {
                b.column_by_name(n)
                    .map(|c| c.as_primitive::<Int64Type>().clone())
            })
            .collect();
        for i in 0..b.num_rows() {
            let mut v = [0i64; 6];
            for (j, c) in cols.iter().enumerate() {
                if let Some(c) = c {
                    v[j] = if c.is_null(i) { 0 } else { c.value(i) };
                }
            }
            out.insert((m.value(i).to_string(), t.value(i)), v);
        }
    }
    Ok(out)
}

async fn existing_hourly(hourly: &DeltaTable, day: i64, hours: &[i64]) -> Result<Vec<RecordBatch>> {
    read_rows(hourly, Table::MetricsHourly, hours_predicate(day, hours)).await
}

fn compare(before: &[RecordBatch], after: &[RecordBatch], diff: &mut DryRunDiff) -> Result<()> {
    let b = metric_rows(before, "hour")?;
    let a = metric_rows(after, "hour")?;
    let keys: BTreeSet<&RowKey> = b.keys().chain(a.keys()).collect();
    for k in keys {
        diff.merchant_hours_compared += 1;
        let (x, y) = (b.get(k), a.get(k));
        if x != y {
            diff.merchant_hours_changed += 1;
        }
        for j in 0..6 {
            diff.totals_before[j] += x.map_or(0, |v| v[j]);
            diff.totals_after[j] += y.map_or(0, |v| v[j]);
        }
    }
    Ok(())
}
