//! The batch job: `tally batch run` (the hourly run) and `tally batch reprocess`.
//!
//! A run finds its hours from the Delta log ([`crate::dirty`]), first moves any
//! row it could not compute to `quarantine` ([`crate::quarantine`]), computes the
//! hours day by day with DataFusion ([`crate::sql`]), and replaces those hours'
//! rows of `metrics_hourly` (and complete days' rows of `metrics_daily`) with
//! atomic Delta commits. The last hourly commit records the watermark, the raw
//! version processed and the logic version ([`tally_common::watermark`]), so a
//! run killed at any point leaves the tables whole and the next run redoes what
//! is missing. A day's row is written before its hours' commit, and
//! `metrics_daily` keeps its own mark of the days before which every day with
//! data has its row ([`crate::daily`]): a complete day gets its row in the first
//! run that finds it complete, whichever runs processed its hours.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::Int64Type;
use deltalake::datafusion::logical_expr::{col, lit};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use tally_common::bucket::{
    date_string, day_floor, hour_floor, hours_between, month_string, now_micros, MICROS_PER_DAY,
    MICROS_PER_HOUR, MICROS_PER_SECOND,
};
use tally_common::lake::{register, Lake, Table};
use tally_common::metrics::stored_metric_names;
use tally_common::watermark::{
    read_progress, BatchProgress, LOGIC_VERSION_APP, RAW_VERSION_APP, WATERMARK_APP,
};
use tally_common::{Context as _, Error, Result};

use crate::daily;
use crate::dirty::{hours_changed, hours_present, raw_files};
use crate::lock::Lease;
use crate::publish::{
    daily_rows, hours_predicate, read_rows, record_only, rewrite_partition, to_table_rows, ts_lit,
};
use crate::quarantine::{self, computable_hour, COMPUTABLE_FROM, COMPUTABLE_UNTIL};
use crate::sql::{computable_rows, daily_sql, hourly_sql};

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
    /// Rows of `raw_events` the batch layer cannot compute, moved to `quarantine`
    /// (a dry run: rows it would move).
    pub quarantined: u64,
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
        self.grace = m.max(0).saturating_mul(60 * MICROS_PER_SECOND);
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
        let closed_end = hour_floor(self.now.saturating_sub(self.grace));
        let Some(mut raw) = self.lake.open(Table::RawEvents).await? else {
            return Ok(report);
        };

        let new_watermark = match self.range {
            Some(_) => progress.watermark,
            None => Some(progress.watermark.map_or(closed_end, |w| w.max(closed_end))),
        };
        report.watermark_after = new_watermark;
        // the day a daily row is due before: hourly runs keep metrics_daily's mark
        let daily_through = match (self.range, new_watermark) {
            (None, Some(w)) => Some(day_floor(w)),
            _ => None,
        };
        let mut daily = self.lake.open_or_create(Table::MetricsDaily).await?;
        let daily_mark = daily::read_mark(&daily).await?;

        // Rows the batch layer cannot compute leave raw_events before anything is
        // computed, so that one row never stops the run for everyone: in every hour
        // this run reads (the dirty hours and the whole of each day whose row it
        // writes). Each pass screens the very snapshot then computed from.
        let mut pass = 0;
        let (dirty, daily_due) = loop {
            pass += 1;
            let files = raw_files(&raw)?;
            let present: BTreeSet<i64> = hours_present(&files)
                .into_iter()
                .filter(|&h| computable_hour(h))
                .collect();
            let dirty = self
                .dirty_hours(&raw, &present, &progress, closed_end)
                .await?;
            // Days whose daily row is computed: complete days with a dirty hour and,
            // in an hourly run, every complete day with data that may not have its
            // row yet (the watermark passed it in this run or in one that stopped
            // early, or its hours were processed before the day was complete).
            let dirty_days: BTreeSet<i64> = dirty.iter().map(|&h| day_floor(h)).collect();
            let daily_due: BTreeSet<i64> = match daily_through {
                Some(through) => {
                    let mut due: BTreeSet<i64> =
                        dirty_days.into_iter().filter(|&d| d < through).collect();
                    due.extend(
                        daily::unfinished_days(&daily, daily_mark, &present, through).await?,
                    );
                    due
                }
                None => dirty_days
                    .into_iter()
                    .filter(|&d| d + MICROS_PER_DAY <= closed_end)
                    .collect(),
            };
            let read: BTreeSet<i64> = present
                .iter()
                .copied()
                .filter(|h| daily_due.contains(&day_floor(*h)))
                .chain(dirty.iter().copied())
                .collect();
            let bad = quarantine::screen(&raw, &files, &read, self.now).await?;
            if bad.is_empty() {
                break (dirty, daily_due);
            }
            if self.dry_run {
                report.quarantined += bad.rows.len() as u64;
                break (dirty, daily_due);
            }
            if pass > SCREEN_PASSES {
                // a writer keeps adding such rows: the queries leave them out
                // ([`computable_rows`]) and a later run moves them
                tracing::warn!(
                    rows = bad.rows.len(),
                    "rows the batch layer cannot compute keep arriving; leaving them for the next run"
                );
                break (dirty, daily_due);
            }
            if let Some(l) = lease {
                l.check().await?;
            }
            report.quarantined += quarantine::write(&self.lake, &bad).await?;
            raw = match quarantine::delete(&raw, &bad).await? {
                Some(t) => t,
                None => self
                    .lake
                    .open(Table::RawEvents)
                    .await?
                    .ok_or_else(|| Error::invalid("raw_events disappeared during the run"))?,
            };
        };
        let raw_version = raw.version().map(|v| v as i64).unwrap_or(-1);
        report.raw_version = Some(raw_version);
        report.hours = dirty.len();

        let mut by_day: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for &h in &dirty {
            by_day.entry(day_floor(h)).or_default().push(h);
        }
        let days: BTreeSet<i64> = by_day.keys().chain(&daily_due).copied().collect();
        let last_day = days.last().copied();
        let last_daily = daily_due.last().copied();

        let ctx = SessionContext::new();
        register(&ctx, Table::RawEvents.name(), &raw).await?;
        let computed_at = now_micros();
        let mut diff = DryRunDiff::default();
        let n_days = days.len();
        let mut progress_recorded = false;
        let mut mark_recorded = false;

        for (i, &day) in days.iter().enumerate() {
            let t0 = std::time::Instant::now();
            let rows = computable_rows(Table::RawEvents.name(), day);
            let hours = by_day.get(&day);
            let hourly_rows = match hours {
                Some(hours) => Some(to_table_rows(
                    Table::MetricsHourly,
                    &run_query(&ctx, &hourly_sql(&rows, day, hours)).await?,
                    computed_at,
                    &date_string(day),
                )?),
                None => None,
            };
            let daily_rows = if daily_due.contains(&day) && !self.dry_run {
                let b = run_query(&ctx, &daily_sql(&rows, day)).await?;
                Some(daily_rows(&b, day, computed_at)?)
            } else {
                None
            };
            report.compute_secs += t0.elapsed().as_secs_f64();

            if self.dry_run {
                if let (Some(hours), Some(after)) = (hours, &hourly_rows) {
                    let before = existing_hourly(hourly, day, hours).await?;
                    compare(&before, after, &mut diff)?;
                }
            } else {
                if let Some(l) = lease {
                    l.check().await?;
                }
                let t1 = std::time::Instant::now();
                // The day's row before its hours: the last hourly commit records the
                // raw version processed, after which nothing would recompute a day
                // whose daily commit a killed run never made.
                if let Some(rows) = daily_rows {
                    let n: u64 = rows.iter().map(|b| b.num_rows() as u64).sum();
                    let mut commit = self.commit_properties();
                    if let (Some(through), true) = (daily_through, Some(day) == last_daily) {
                        commit =
                            commit.with_application_transactions(vec![daily::mark_txn(through)]);
                        mark_recorded = true;
                    }
                    let month = col("month").eq(lit(month_string(day)));
                    daily = rewrite_partition(
                        &daily,
                        Table::MetricsDaily,
                        month.clone(),
                        month.and(col("day").eq(ts_lit(day))),
                        rows,
                        commit,
                    )
                    .await?;
                    report.daily_rows += n;
                    report.days += 1;
                }
                if let (Some(hours), Some(rows)) = (hours, hourly_rows) {
                    let n: u64 = rows.iter().map(|b| b.num_rows() as u64).sum();
                    let mut commit = self.commit_properties();
                    // a reprocessing run records no progress: the hours the last
                    // hourly run has not seen yet stay dirty for the next one
                    if Some(day) == last_day && self.range.is_none() {
                        commit = commit.with_application_transactions(progress_txns(
                            new_watermark,
                            raw_version,
                        ));
                        progress_recorded = true;
                    }
                    *hourly = rewrite_partition(
                        hourly,
                        Table::MetricsHourly,
                        col("date").eq(lit(date_string(day))),
                        hours_predicate(day, hours),
                        rows,
                        commit,
                    )
                    .await?;
                    report.hourly_rows += n;
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
        if let Some(through) = daily_through {
            if !mark_recorded && daily_mark.is_none_or(|m| m < through) {
                // no day was missing its row: the mark moves on alone
                let commit = CommitProperties::default()
                    .with_application_transactions(vec![daily::mark_txn(through)]);
                record_only(&daily, Table::MetricsDaily, through, commit).await?;
            }
        }
        if !progress_recorded
            && self.range.is_none()
            && (new_watermark != progress.watermark || progress.raw_version != Some(raw_version))
        {
            // nothing to recompute, but the watermark or the processed version moves on
            let commit = CommitProperties::default()
                .with_application_transactions(progress_txns(new_watermark, raw_version));
            let w = new_watermark.unwrap_or(closed_end);
            *hourly = record_only(hourly, Table::MetricsHourly, w, commit).await?;
        }
        // closed days whose raw data changed, and days that closed in this run
        // (the watermark may pass a day in a run where none of its hours is dirty)
        let closed_days: BTreeSet<i64> = days
            .iter()
            .copied()
            .filter(|&d| match daily_through {
                Some(through) => d < through,
                None => d + MICROS_PER_DAY <= closed_end,
            })
            .collect();
        if self.compact && !closed_days.is_empty() {
            let t2 = std::time::Instant::now();
            crate::compact::compact_days(&self.lake, &closed_days).await?;
            if self.range.is_none() {
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

    /// The hours to compute: a reprocessing range's closed hours, or the closed
    /// hours from the watermark on plus those whose raw data changed since the
    /// version the last run processed. Only hours the batch layer computes.
    async fn dirty_hours(
        &self,
        raw: &DeltaTable,
        present: &BTreeSet<i64>,
        progress: &BatchProgress,
        closed_end: i64,
    ) -> Result<BTreeSet<i64>> {
        if let Some((from, to)) = self.range {
            let to = to.min(closed_end).min(COMPUTABLE_UNTIL);
            return Ok(hours_between(from.max(COMPUTABLE_FROM), to).collect());
        }
        let w = progress.watermark;
        // every hour before the new watermark is processed once this run is done:
        // also one that a run with a later clock took and that changed since
        let end = w.map_or(closed_end, |w| w.max(closed_end));
        let closed = |h: &i64| *h < end && computable_hour(*h);
        let mut d: BTreeSet<i64> = present
            .iter()
            .copied()
            .filter(|h| closed(h) && w.is_none_or(|w| *h >= w))
            .collect();
        if let Some(v) = progress.raw_version {
            let raw_version = raw.version().map(|v| v as i64).unwrap_or(-1);
            match hours_changed(raw, v, raw_version).await? {
                Some(changed) => d.extend(changed.into_iter().filter(closed)),
                None => {
                    tracing::warn!("raw_events log entries since version {v} are gone; recomputing every closed hour");
                    d.extend(present.iter().copied().filter(closed));
                }
            }
        }
        Ok(d)
    }

    fn commit_properties(&self) -> CommitProperties {
        CommitProperties::default().with_metadata([
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
        ])
    }
}

/// How many times a run screens raw_events again after moving rows to quarantine
/// (each pass only finds rows committed during the one before).
const SCREEN_PASSES: u32 = 4;

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

pub(crate) async fn run_query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    ctx.sql(sql)
        .await
        .context("planning the metrics query")?
        .collect()
        .await
        .context("running the metrics query")
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
