//! The batch job: `tally batch run` (the hourly run) and `tally batch reprocess`.
//!
//! A run is a sequence of named steps ([`BatchRun::execute`]): it finds its hours
//! from the Delta log ([`crate::dirty`]), first moves any row it could not compute
//! to `quarantine` ([`crate::quarantine`]), computes the hours day by day with
//! DataFusion ([`crate::sql`]), and replaces those hours' rows of
//! `metrics_hourly` (and complete days' rows of `metrics_daily`) with atomic
//! Delta commits ([`crate::publish`]); a dry run compares instead
//! ([`crate::dry_run`]). The last hourly commit records the watermark, the raw
//! version processed and the logic version ([`tally_common::watermark`]), so a
//! run killed at any point leaves the tables whole and the next run redoes what
//! is missing. A day's row is written before its hours' commit, and
//! `metrics_daily` keeps its own mark of the days before which every day with
//! data has its row ([`crate::daily`]): a complete day gets its row in the first
//! run that finds it complete, whichever runs processed its hours.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use tally_common::bucket::{
    day_floor, hour_floor, now_micros, Granularity, MICROS_PER_DAY, MICROS_PER_HOUR,
    MICROS_PER_SECOND,
};
use tally_common::lake::{operation, Lake, Table, LOGIC_VERSION_KEY};
use tally_common::metric_table::MetricTable;
use tally_common::watermark::{
    read_progress, BatchProgress, DEFAULT_GRACE_MINUTES, LOGIC_VERSION_APP, RAW_VERSION_APP,
    WATERMARK_APP,
};
use tally_common::{Context as _, Error, Result};

use crate::daily;
use crate::dirty::{dirty_hours, hours_present, raw_files};
use crate::dry_run::DryRunDiff;
use crate::lease::{Lease, DEFAULT_LEASE_EXPIRY};
use crate::memory::MemoryBound;
use crate::publish::{record_only, replace_day, replace_hours, stored_hours};
use crate::quarantine::{self, computable_hour};
use crate::sql::DayQueries;

/// The version of the metric logic; bump it with any change of results, then
/// reprocess history.
pub const LOGIC_VERSION: i32 = 1;

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
    /// Bytes the queries spilled to disk to stay within the memory bound.
    pub spilled_bytes: u64,
}

impl std::fmt::Display for RunReport {
    /// The report for people, as `tally batch run` prints it: a line of what
    /// was recomputed and the watermark's move, a line of quarantined rows if
    /// any, and for a dry run what would change, metric by metric.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = |t: Option<i64>| t.map_or("none".to_string(), tally_common::bucket::format_ts);
        write!(
            f,
            "batch: {} hours and {} days recomputed ({} hourly rows, {} daily rows) from raw_events version {}; \
             watermark {} -> {}; compute {:.1}s, write {:.1}s, compact {:.1}s",
            self.hours,
            self.days,
            self.hourly_rows,
            self.daily_rows,
            self.raw_version.map_or("none".into(), |v| v.to_string()),
            w(self.watermark_before),
            w(self.watermark_after),
            self.compute_secs,
            self.write_secs,
            self.compact_secs
        )?;
        if self.spilled_bytes > 0 {
            write!(
                f,
                "; {} spilled to disk to stay within the memory bound",
                bytesize::ByteSize(self.spilled_bytes)
            )?;
        }
        if self.quarantined > 0 {
            write!(
                f,
                "\nbatch: {} raw_events rows the batch layer cannot compute {} to quarantine (see its reason column)",
                self.quarantined,
                if self.diff.is_some() { "would be moved" } else { "moved" }
            )?;
        }
        if let Some(d) = &self.diff {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

/// The smallest memory bound accepted: the queries' operators each need a
/// batch of rows in memory to make progress (tested down to 4 MiB).
pub const MIN_MEMORY_LIMIT: u64 = 4 << 20;

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
    memory: MemoryBound,
    parts: crate::parts::Parts,
    run_id: String,
    on_day: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
}

impl BatchRun {
    /// The hourly run over `lake` as of now, with the default grace period
    /// ([`DEFAULT_GRACE_MINUTES`]) and lease expiry ([`DEFAULT_LEASE_EXPIRY`]).
    pub fn new(lake: &Lake) -> Self {
        BatchRun {
            lake: lake.clone(),
            now: now_micros(),
            grace: DEFAULT_GRACE_MINUTES * 60 * MICROS_PER_SECOND,
            range: None,
            dry_run: false,
            compact: true,
            lease_wait: Duration::ZERO,
            lease_expiry: DEFAULT_LEASE_EXPIRY,
            memory: MemoryBound::default(),
            parts: crate::parts::Parts::default(),
            run_id: uuid::Uuid::new_v4().to_string(),
            on_day: None,
        }
    }

    /// The run the configuration asks for: grace, lease expiry, memory bound
    /// and spill directory from `args` (flags or their environment variables,
    /// the same for the command line and the Lambda function). Errors:
    /// [`Error::Config`] for a negative grace period or a memory bound below
    /// [`MIN_MEMORY_LIMIT`].
    pub fn configured(lake: &Lake, args: &tally_common::config::BatchArgs) -> Result<Self> {
        if args.grace_minutes < 0 {
            return Err(Error::config(format!(
                "--grace-minutes (TALLY_GRACE_MINUTES) is {}: it must be 0 or more, or open hours would be taken as closed",
                args.grace_minutes
            )));
        }
        if args.memory_limit < MIN_MEMORY_LIMIT {
            return Err(Error::config(format!(
                "--memory-limit (TALLY_BATCH_MEMORY) is {}: the batch layer needs at least {}",
                bytesize::ByteSize(args.memory_limit),
                bytesize::ByteSize(MIN_MEMORY_LIMIT)
            )));
        }
        Ok(BatchRun::new(lake)
            .grace_minutes(args.grace_minutes)
            .lease_expiry(Duration::from_secs(args.lease_secs))
            .memory(MemoryBound {
                limit: args.memory_limit,
                spill_dir: args.spill_dir.clone(),
            }))
    }

    /// Split each hour's and day's computation into parts computed side by side
    /// as `parts.jobs` allows (default: parts from the Delta log's row counts,
    /// [`crate::parts::ROWS_PER_PART`] each, one at a time); the results are
    /// the same whatever the split.
    pub fn parts(mut self, parts: crate::parts::Parts) -> Self {
        self.parts = parts;
        self
    }

    /// Bound the memory of the run's queries (default
    /// [`tally_common::config::DEFAULT_BATCH_MEMORY`]); they spill beyond it.
    pub fn memory(mut self, bound: MemoryBound) -> Self {
        self.memory = bound;
        self
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
    /// Reprocess the closed hours of `[from, to)` (epoch µs) instead of the
    /// dirty ones. Errors: [`Error::Invalid`] when the range is not whole hours
    /// ([`BatchRun::check_range`]).
    pub fn reprocess(mut self, from: i64, to: i64) -> Result<Self> {
        Self::check_range(from, to)?;
        self.range = Some((from, to));
        Ok(self)
    }
    /// Check a range to reprocess, `[from, to)` (epoch µs): both ends aligned
    /// to an hour and `to` after `from`. Errors: [`Error::Invalid`] naming the
    /// end at fault.
    pub fn check_range(from: i64, to: i64) -> Result<()> {
        Granularity::Hour.check_range(from, to)
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

    /// The run's steps, under the lease (none in a dry run): where the marks go,
    /// which hours and days to compute (after moving rows that cannot be
    /// computed to quarantine), then either the dry run's comparison or the
    /// writes, the marks no write carried, and compaction.
    async fn execute_locked(
        &self,
        hourly: &mut DeltaTable,
        lease: Option<&Lease>,
    ) -> Result<RunReport> {
        let progress = read_progress(hourly).await?;
        let mut report = RunReport {
            watermark_before: progress.watermark,
            ..RunReport::default()
        };
        let closed_end = hour_floor(self.now.saturating_sub(self.grace));
        let Some(raw) = self.lake.open(Table::RawEvents).await? else {
            return Ok(report);
        };
        let marks = self.marks(&progress, closed_end);
        report.watermark_after = marks.watermark;
        let daily = self.lake.open_or_create(Table::MetricsDaily).await?;
        let daily_mark = daily::read_mark(&daily).await?;
        let mut run = Run {
            job: self,
            lease,
            progress,
            marks,
            daily_mark,
            hourly,
            daily,
            report,
        };

        let work = run.find_work(raw).await?;
        run.report.raw_version = Some(work.raw_version());
        run.report.hours = work.hour_count();
        let queries = DayQueries::new(&work.raw, &self.memory, self.parts).await?;
        if self.dry_run {
            run.report.diff = Some(run.compare(&work, &queries).await?);
            run.report.spilled_bytes = queries.spilled_bytes();
            return Ok(run.report);
        }
        let carried = run.recompute(&work, &queries).await;
        run.report.spilled_bytes = queries.spilled_bytes();
        run.record_marks(work.raw_version(), carried?).await?;
        run.compact(&work).await?;
        Ok(run.report)
    }

    /// Where this run moves the watermark and the daily mark.
    fn marks(&self, progress: &BatchProgress, closed_end: i64) -> Marks {
        let watermark = match self.range {
            Some(_) => progress.watermark,
            None => Some(progress.watermark.map_or(closed_end, |w| w.max(closed_end))),
        };
        // the day a daily row is due before: hourly runs keep metrics_daily's mark
        let daily_through = match (self.range, watermark) {
            (None, Some(w)) => Some(day_floor(w)),
            _ => None,
        };
        Marks {
            closed_end,
            watermark,
            daily_through,
        }
    }

    /// Report a day done to the progress callback.
    fn day_done(&self, done: usize, total: usize) {
        if let Some(f) = &self.on_day {
            f(done, total);
        }
    }

    /// What every row commit of this run says about itself in the Delta log.
    fn commit_properties(&self) -> CommitProperties {
        CommitProperties::default().with_metadata([
            operation(if self.range.is_some() {
                "reprocess"
            } else {
                "batch run"
            }),
            (
                LOGIC_VERSION_KEY.to_string(),
                serde_json::json!(LOGIC_VERSION),
            ),
            // what `tally batch rollback` undoes as one
            (
                crate::rollback::RUN_KEY.to_string(),
                serde_json::json!(self.run_id),
            ),
        ])
    }
}

/// How many times a run screens raw_events again after moving rows to quarantine
/// (each pass only finds rows committed during the one before).
const SCREEN_PASSES: u32 = 4;

/// The `txn` actions recording a run's progress ([`tally_common::watermark`]).
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

/// Where a run moves the batch layer's marks.
struct Marks {
    /// Hours starting before this are closed (epoch µs).
    closed_end: i64,
    /// The watermark after the run (a reprocessing run leaves it as it is).
    watermark: Option<i64>,
    /// In an hourly run, the day before which every day with data has its daily
    /// row after the run (`metrics_daily`'s mark); None when reprocessing.
    daily_through: Option<i64>,
}

impl Marks {
    /// Whether the day starting at `day` is complete as far as this run goes:
    /// before the daily mark in an hourly run, wholly closed when reprocessing.
    fn day_complete(&self, day: i64) -> bool {
        match self.daily_through {
            Some(through) => day < through,
            None => day + MICROS_PER_DAY <= self.closed_end,
        }
    }
}

/// What a run computes, found before anything is computed.
struct Work {
    /// The `raw_events` snapshot screened, and computed from.
    raw: DeltaTable,
    /// The hours to recompute, by day.
    hours: BTreeMap<i64, Vec<i64>>,
    /// Complete days whose daily row is computed.
    daily_due: BTreeSet<i64>,
}

impl Work {
    fn new(raw: DeltaTable, dirty: BTreeSet<i64>, daily_due: BTreeSet<i64>) -> Self {
        let mut hours: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for h in dirty {
            hours.entry(day_floor(h)).or_default().push(h);
        }
        Work {
            raw,
            hours,
            daily_due,
        }
    }

    /// The `raw_events` version computed from (-1: an empty table).
    fn raw_version(&self) -> i64 {
        self.raw.version().map(|v| v as i64).unwrap_or(-1)
    }

    /// Hours to recompute, on every day.
    fn hour_count(&self) -> usize {
        self.hours.values().map(Vec::len).sum()
    }

    /// Every day the run computes: days with hours to recompute, and days whose
    /// daily row is due.
    fn days(&self) -> BTreeSet<i64> {
        self.hours.keys().chain(&self.daily_due).copied().collect()
    }
}

/// Which marks the run's row commits carried.
#[derive(Default)]
struct Carried {
    /// The watermark and raw version, on the last hourly commit.
    progress: bool,
    /// The daily mark, on the last daily commit.
    daily_mark: bool,
}

/// One run under way: what its steps share.
struct Run<'a> {
    job: &'a BatchRun,
    lease: Option<&'a Lease>,
    /// The progress recorded before the run.
    progress: BatchProgress,
    marks: Marks,
    /// `metrics_daily`'s mark before the run.
    daily_mark: Option<i64>,
    hourly: &'a mut DeltaTable,
    daily: DeltaTable,
    report: RunReport,
}

impl Run<'_> {
    /// The hours and days to compute. Rows the batch layer cannot compute leave
    /// raw_events before anything is computed, so that one row never stops the
    /// run for everyone: in every hour this run reads (the dirty hours and the
    /// whole of each day whose row it writes). Each pass screens the very
    /// snapshot then computed from.
    async fn find_work(&mut self, mut raw: DeltaTable) -> Result<Work> {
        let job = self.job;
        let mut pass = 0;
        loop {
            pass += 1;
            let files = raw_files(&raw)?;
            let present: BTreeSet<i64> = hours_present(&files)
                .into_iter()
                .filter(|&h| computable_hour(h))
                .collect();
            let dirty = dirty_hours(
                &raw,
                &present,
                &self.progress,
                self.marks.closed_end,
                job.range,
            )
            .await?;
            let daily_due = self.daily_due(&dirty, &present).await?;
            let read: BTreeSet<i64> = present
                .iter()
                .copied()
                .filter(|h| daily_due.contains(&day_floor(*h)))
                .chain(dirty.iter().copied())
                .collect();
            let bad = quarantine::screen(&raw, &files, &read, job.now, &job.memory).await?;
            if bad.is_empty() {
                return Ok(Work::new(raw, dirty, daily_due));
            }
            if job.dry_run {
                self.report.quarantined += bad.rows.len() as u64;
                return Ok(Work::new(raw, dirty, daily_due));
            }
            if pass > SCREEN_PASSES {
                // a writer keeps adding such rows: the queries leave them out
                // ([`computable_rows`]) and a later run moves them
                tracing::warn!(
                    rows = bad.rows.len(),
                    "rows the batch layer cannot compute keep arriving; leaving them for the next run"
                );
                return Ok(Work::new(raw, dirty, daily_due));
            }
            self.check_lease().await?;
            self.report.quarantined += quarantine::write(&job.lake, &bad).await?;
            raw = match quarantine::delete(&raw, &bad).await? {
                Some(t) => t,
                None => job
                    .lake
                    .open(Table::RawEvents)
                    .await?
                    .ok_or_else(|| Error::internal("raw_events disappeared during the run"))?,
            };
        }
    }

    /// Days whose daily row is computed: complete days with a dirty hour and, in
    /// an hourly run, every complete day with data that may not have its row yet
    /// (the watermark passed it in this run or in one that stopped early, or its
    /// hours were processed before the day was complete).
    async fn daily_due(
        &self,
        dirty: &BTreeSet<i64>,
        present: &BTreeSet<i64>,
    ) -> Result<BTreeSet<i64>> {
        let mut due: BTreeSet<i64> = dirty
            .iter()
            .map(|&h| day_floor(h))
            .filter(|&d| self.marks.day_complete(d))
            .collect();
        if let Some(through) = self.marks.daily_through {
            due.extend(
                daily::unfinished_days(&self.daily, self.daily_mark, present, through).await?,
            );
        }
        Ok(due)
    }

    /// A dry run: compute the hours and compare them with what `metrics_hourly`
    /// holds; nothing is written (daily rows are not computed).
    async fn compare(&mut self, work: &Work, queries: &DayQueries) -> Result<DryRunDiff> {
        let days = work.days();
        let mut diff = DryRunDiff::default();
        for (i, &day) in days.iter().enumerate() {
            if let Some(hours) = work.hours.get(&day) {
                let t0 = Instant::now();
                let after = queries.hourly(day, hours).await?;
                self.report.compute_secs += t0.elapsed().as_secs_f64();
                let before = stored_hours(self.hourly, day, hours).await?;
                diff.add(&before, &after)?;
            }
            self.job.day_done(i + 1, days.len());
        }
        Ok(diff)
    }

    /// Compute and write day by day. The last daily commit carries the daily
    /// mark and, in an hourly run, the last hourly commit the progress.
    async fn recompute(&mut self, work: &Work, queries: &DayQueries) -> Result<Carried> {
        let days = work.days();
        let last_day = days.last().copied();
        let last_daily = work.daily_due.last().copied();
        let mut carried = Carried::default();
        for (i, &day) in days.iter().enumerate() {
            let t0 = Instant::now();
            let hours = work.hours.get(&day);
            let hourly_rows = match hours {
                Some(hours) => Some(queries.hourly(day, hours).await?),
                None => None,
            };
            let daily_rows = match work.daily_due.contains(&day) {
                true => Some(queries.daily(day).await?),
                false => None,
            };
            self.report.compute_secs += t0.elapsed().as_secs_f64();

            self.check_lease().await?;
            let t1 = Instant::now();
            // The day's row before its hours: the last hourly commit records the
            // raw version processed, after which nothing would recompute a day
            // whose daily commit a killed run never made.
            if let Some(rows) = daily_rows {
                let mut commit = self.job.commit_properties();
                if let (Some(through), true) = (self.marks.daily_through, Some(day) == last_daily) {
                    commit = commit.with_application_transactions(vec![daily::mark_txn(through)]);
                    carried.daily_mark = true;
                }
                let n = row_count(&rows);
                self.daily = replace_day(&self.daily, day, rows, commit).await?;
                self.report.daily_rows += n;
                self.report.days += 1;
            }
            if let (Some(hours), Some(rows)) = (hours, hourly_rows) {
                let mut commit = self.job.commit_properties();
                // a reprocessing run records no progress: the hours the last
                // hourly run has not seen yet stay dirty for the next one
                if Some(day) == last_day && self.job.range.is_none() {
                    commit = commit.with_application_transactions(progress_txns(
                        self.marks.watermark,
                        work.raw_version(),
                    ));
                    carried.progress = true;
                }
                let n = row_count(&rows);
                *self.hourly = replace_hours(self.hourly, day, hours, rows, commit).await?;
                self.report.hourly_rows += n;
            }
            self.report.write_secs += t1.elapsed().as_secs_f64();
            self.job.day_done(i + 1, days.len());
        }
        Ok(carried)
    }

    /// Commit the marks that no row commit carried: the daily mark moves on alone
    /// when no day was missing its row, and the watermark or the processed
    /// version when there was nothing to recompute.
    async fn record_marks(&mut self, raw_version: i64, carried: Carried) -> Result<()> {
        if let Some(through) = self.marks.daily_through {
            if !carried.daily_mark && self.daily_mark.is_none_or(|m| m < through) {
                let commit = CommitProperties::default()
                    .with_application_transactions(vec![daily::mark_txn(through)]);
                record_only(&self.daily, MetricTable::Daily, through, commit).await?;
            }
        }
        let watermark = self.marks.watermark;
        if !carried.progress
            && self.job.range.is_none()
            && (watermark != self.progress.watermark
                || self.progress.raw_version != Some(raw_version))
        {
            let commit = CommitProperties::default()
                .with_application_transactions(progress_txns(watermark, raw_version));
            let w = watermark.unwrap_or(self.marks.closed_end);
            *self.hourly = record_only(self.hourly, MetricTable::Hourly, w, commit).await?;
        }
        Ok(())
    }

    /// Compact the raw partitions of closed days whose raw data changed and of
    /// days that closed in this run (the watermark may pass a day in a run where
    /// none of its hours is dirty); an hourly run then vacuums.
    async fn compact(&mut self, work: &Work) -> Result<()> {
        let closed_days: BTreeSet<i64> = work
            .days()
            .into_iter()
            .filter(|&d| self.marks.day_complete(d))
            .collect();
        if !self.job.compact || closed_days.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let lake = &self.job.lake;
        crate::compact::compact_days(lake, &closed_days).await?;
        if self.job.range.is_none() {
            // once a day closes: files replaced more than the retention ago go, and
            // readers and time travel inside the window keep theirs
            for t in [Table::RawEvents, Table::MetricsHourly, Table::MetricsDaily] {
                let n = crate::compact::vacuum(lake, t, crate::compact::VACUUM_RETENTION).await?;
                tracing::info!(table = t.name(), files = n, "vacuumed");
            }
        }
        self.report.compact_secs = t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Fail when another run has taken the lease over.
    async fn check_lease(&self) -> Result<()> {
        match self.lease {
            Some(l) => l.check().await,
            None => Ok(()),
        }
    }
}

fn row_count(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// Run the batch layer every `every` until `shutdown` (for a process that keeps
/// its own schedule, as `tally demo` does; on AWS EventBridge is the schedule).
/// A failed run is logged and the next one retries.
pub async fn run_every(
    lake: Lake,
    every: Duration,
    mut shutdown: tally_common::shutdown::Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        match BatchRun::new(&lake).execute().await {
            Ok(r) => tracing::info!(
                hours = r.hours,
                watermark = ?r.watermark_after.map(tally_common::bucket::format_ts),
                "batch run"
            ),
            Err(e) => tracing::warn!(error = %e, "batch run failed; the next one retries"),
        }
    }
}
