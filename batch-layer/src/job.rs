//! The batch job: `tally batch run` (the hourly run) and `tally batch reprocess`.
//!
//! A run has three steps, which run in one process ([`BatchRun::execute`]) or
//! as the states of Step Functions' batch state machine ([`BatchRun::plan`],
//! [`compute_item`], [`publish_run`], [`compact_metric_day`]):
//! - **plan** ([`crate::plan`]): the hours to compute, from the Delta log
//!   ([`crate::dirty`]), after moving any row the batch layer cannot compute to
//!   `quarantine` ([`crate::quarantine`]); the complete days whose daily rows
//!   are due ([`crate::daily`]); each split into parts ([`crate::parts`]);
//! - **items** ([`crate::items`]): each part computed with DataFusion under the
//!   memory bound ([`crate::memory`], [`crate::sql`]), its results staged
//!   ([`crate::stage`]);
//! - **publish**: one commit per table ([`crate::publish`]): `customer_hours`,
//!   then `metrics_daily` with its daily mark, then `metrics_hourly` with the
//!   watermark, the raw version processed and the logic version
//!   ([`tally_common::watermark`]). A run killed at any point leaves the tables
//!   whole, and the next run redoes what is missing; a dry run compares instead
//!   ([`crate::dry_run`]).
//!
//! Then the closed days' partitions are compacted ([`crate::compact`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use tally_common::bucket::{
    day_floor, hour_floor, now_micros, parse_ts, Granularity, MICROS_PER_DAY, MICROS_PER_HOUR,
    MICROS_PER_SECOND,
};
use tally_common::lake::{
    operation, read_commit, Commit, FileChange, Lake, Table, LOGIC_VERSION_KEY,
};
use tally_common::metric_table::MetricTable;
use tally_common::watermark::{
    read_progress, BatchProgress, DEFAULT_GRACE_MINUTES, LOGIC_VERSION_APP, RAW_VERSION_APP,
    WATERMARK_APP,
};
use tally_common::{Context as _, Error, Result};

use crate::daily;
use crate::dirty::{dirty_hours, hours_present, raw_files};
use crate::dry_run::DryRunDiff;
use crate::items::ItemContext;
use crate::lease::{Lease, DEFAULT_LEASE_EXPIRY};
use crate::memory::MemoryBound;
use crate::plan::{customer_hours_files, plan_items, Marks, Plan};
use crate::publish::{
    compact_partition, publish_customer_hours, publish_rows, record_only, stored_hours,
};
use crate::quarantine::{self, computable_hour};
use crate::stage::Staging;

/// The version of the metric logic; bump it with any change of results, then
/// reprocess history.
pub const LOGIC_VERSION: i32 = 2;

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
    /// Closed days whose partitions are compacted after publishing (epoch µs).
    pub compact_days: Vec<i64>,
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
    on_progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
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
            on_progress: None,
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
    /// Called with (steps done, steps in total) after each item and each
    /// publish commit, for progress bars.
    pub fn on_progress(mut self, f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        self.on_progress = Some(Arc::new(f));
        self
    }

    /// Run it: plan, compute the items (`jobs` at a time), publish, compact.
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

    /// The run's steps, under the lease (none in a dry run): the plan (after
    /// moving rows that cannot be computed to quarantine), the items, then
    /// either the dry run's comparison or the publish, and compaction.
    async fn execute_locked(
        &self,
        hourly: &mut DeltaTable,
        lease: Option<&Lease>,
    ) -> Result<RunReport> {
        let plan = match self.plan_locked(hourly, lease).await? {
            Planned::Nothing(mut report) => {
                // nothing to compute, but days may be left uncompacted (a run
                // killed after its publish)
                if self.compact && !self.dry_run && !report.compact_days.is_empty() {
                    let t = Instant::now();
                    compact_after(
                        &self.lake,
                        &report.compact_days,
                        self.range.is_some(),
                        &self.memory,
                        hourly,
                    )
                    .await?;
                    report.compact_secs = t.elapsed().as_secs_f64();
                }
                return Ok(report);
            }
            Planned::Plan(p) => Arc::new(p),
        };
        let staging = Staging::open(&self.lake, &plan.run_id)?;
        let mut report = RunReport::planned(&plan);
        let t0 = Instant::now();
        let items =
            ItemContext::new(&self.lake, &self.memory, plan.clone(), staging.clone()).await?;
        let computed = self.compute_items(&items, &plan, lease).await;
        report.compute_secs = t0.elapsed().as_secs_f64();
        report.spilled_bytes = items.spilled_bytes();
        if let Err(e) = computed {
            discard(&self.lake, &plan, &staging).await;
            return Err(e);
        }
        if self.dry_run {
            let diff = compare(hourly, &plan, &staging, &self.memory).await;
            discard(&self.lake, &plan, &staging).await;
            report.diff = Some(diff?);
            return Ok(report);
        }
        if let Some(l) = lease {
            l.check().await?;
        }
        let t1 = Instant::now();
        let published = publish_plan(
            &self.lake,
            &plan,
            &staging,
            &self.memory,
            hourly,
            lease,
            self.on_progress.as_deref(),
        )
        .await?;
        report.hourly_rows = published.hourly_rows;
        report.daily_rows = published.daily_rows;
        report.write_secs = t1.elapsed().as_secs_f64();
        if self.compact && !plan.compact_days.is_empty() {
            let t2 = Instant::now();
            compact_after(
                &self.lake,
                &plan.compact_days,
                plan.reprocess.is_some(),
                &self.memory,
                hourly,
            )
            .await?;
            report.compact_secs = t2.elapsed().as_secs_f64();
        }
        Ok(report)
    }

    /// Plan the run and stage the plan and the items' payloads for Step
    /// Functions (`plan.json`, `hour_items.json`, `day_items.json` in the run's
    /// staging area,
    /// [`Staging`]); [`Planned::Nothing`] when there is nothing to compute (the
    /// marks that move without computing are recorded). Takes the lease while
    /// planning (the plan moves rows that cannot be computed to quarantine).
    pub async fn plan(self) -> Result<Planned> {
        let mut hourly = self.lake.open_or_create(Table::MetricsHourly).await?;
        let lease = Lease::acquire(&hourly, self.lease_expiry, self.lease_wait).await?;
        let result = async {
            hourly
                .update_state()
                .await
                .context("refreshing metrics_hourly")?;
            let planned = self.plan_locked(&mut hourly, Some(&lease)).await?;
            if let Planned::Plan(p) = &planned {
                let staging = Staging::open(&self.lake, &p.run_id)?;
                staging.put_json(PLAN_NAME, p).await?;
                // one list per wave: the day items read what the hour items wrote
                let (hours, days) = p.waves();
                for (name, wave) in [(HOUR_ITEMS_NAME, hours), (DAY_ITEMS_NAME, days)] {
                    let payloads: Vec<serde_json::Value> = wave
                        .into_iter()
                        .map(|i| serde_json::json!({"step": "part", "run_id": p.run_id, "item": i}))
                        .collect();
                    staging.put_json(name, &payloads).await?;
                }
            }
            Ok(planned)
        }
        .await;
        lease.release().await;
        result
    }

    /// The plan: its hours and days, and where the marks go. When nothing is to
    /// be computed, the marks that move anyway are recorded here.
    async fn plan_locked(&self, hourly: &mut DeltaTable, lease: Option<&Lease>) -> Result<Planned> {
        let progress = read_progress(hourly).await?;
        let closed_end = hour_floor(self.now.saturating_sub(self.grace));
        let Some(raw) = self.lake.open(Table::RawEvents).await? else {
            return Ok(Planned::Nothing(RunReport {
                watermark_before: progress.watermark,
                ..RunReport::default()
            }));
        };
        let marks = self.marks(&progress, closed_end);
        let daily = self.lake.open_or_create(Table::MetricsDaily).await?;
        let daily_mark = daily::read_mark(&daily).await?;
        let mut planner = Planner {
            job: self,
            lease,
            progress,
            marks,
            daily_mark,
            daily,
            quarantined: 0,
        };
        let work = planner.find_work(raw).await?;
        let customer_hours = self.lake.open_or_create(Table::CustomerHours).await?;
        let files = raw_files(&work.raw)?;
        let mut rows_by_hour: BTreeMap<i64, u64> = BTreeMap::new();
        for f in &files {
            if let Some(h) = f.hour() {
                *rows_by_hour.entry(h).or_default() += f.num_records.unwrap_or(0).max(0) as u64;
            }
        }
        // a due day's hours whose customer_hours rows are missing (processed
        // before the table existed) are recomputed with it
        let covered: BTreeSet<i64> = customer_hours_files(&customer_hours)?
            .into_iter()
            .filter_map(|f| f.hour)
            .collect();
        let mut hours = work.dirty.clone();
        let present: Vec<i64> = hours_present(&files)
            .into_iter()
            .filter(|&h| computable_hour(h) && h < marks.closed_end)
            .collect();
        hours.extend(
            present
                .iter()
                .copied()
                .filter(|h| work.daily_due.contains(&day_floor(*h)) && !covered.contains(h)),
        );
        // Dates whose every hour is recomputed: those of a run whose publish
        // stopped after its customer_hours commit (its metrics_hourly commit
        // never came: nothing else would recompute them), and closed dates with
        // customer_hours files of several hours (written outside tally), which
        // this run replaces whole.
        let mut rewritten: BTreeSet<i64> =
            unfinished_publish_dates(&customer_hours, hourly).await?;
        let closed_dates_with_multi_hour_files: BTreeSet<i64> =
            customer_hours_files(&customer_hours)?
                .into_iter()
                .filter(|f| f.hour.is_none())
                .filter_map(|f| parse_ts(&format!("{}T00:00:00Z", f.date)).ok())
                .filter(|&d| d + MICROS_PER_DAY <= marks.closed_end)
                .collect();
        rewritten.extend(&closed_dates_with_multi_hour_files);
        hours.extend(
            present
                .iter()
                .copied()
                .filter(|h| rewritten.contains(&day_floor(*h))),
        );
        let days: BTreeSet<i64> = work.daily_due.clone();
        let all_days: BTreeSet<i64> = hours
            .iter()
            .map(|&h| day_floor(h))
            .chain(days.iter().copied())
            .collect();
        let plan = Plan {
            run_id: self.run_id.clone(),
            reprocess: self.range,
            computed_at: now_micros(),
            raw_version: work.raw_version(),
            hourly_version: hourly.version().map(|v| v as i64),
            customer_hours_version: customer_hours.version().map(|v| v as i64),
            watermark_before: planner.progress.watermark,
            raw_version_before: planner.progress.raw_version,
            daily_mark_before: planner.daily_mark,
            marks,
            items: plan_items(&hours, &days, &rows_by_hour, self.parts),
            hours: hours.into_iter().collect(),
            days: days.into_iter().collect(),
            // the days this run touches, and any complete day left
            // uncompacted (a run killed after its publish, before compacting)
            compact_days: all_days
                .into_iter()
                .chain(uncompacted_days(&files, &hourly_files_by_date(hourly)?))
                .filter(|&d| marks.day_complete(d))
                .collect::<BTreeSet<i64>>()
                .into_iter()
                .collect(),
            quarantined: planner.quarantined,
            rewritten_dates: closed_dates_with_multi_hour_files.into_iter().collect(),
        };
        if plan.items.is_empty() && !self.dry_run {
            // nothing to compute: the marks may still move
            let mut hourly_t = hourly.clone();
            record_marks(
                &plan,
                &mut hourly_t,
                &planner.daily,
                Carried::default(),
                CommitProperties::default(),
            )
            .await?;
            *hourly = hourly_t;
            let mut report = RunReport::planned(&plan);
            report.diff = None;
            return Ok(Planned::Nothing(report));
        }
        if plan.items.is_empty() {
            let mut report = RunReport::planned(&plan);
            report.diff = Some(DryRunDiff::default());
            return Ok(Planned::Nothing(report));
        }
        Ok(Planned::Plan(plan))
    }

    /// Compute the plan's items, `jobs` at a time: the hours' parts, then the days'.
    async fn compute_items(
        &self,
        items: &ItemContext,
        plan: &Plan,
        lease: Option<&Lease>,
    ) -> Result<()> {
        let (hours, days) = plan.waves();
        let total = plan.items.len() + PUBLISH_STEPS;
        let mut done = 0;
        for wave in [hours, days] {
            for chunk in wave.chunks(self.parts.jobs.max(1)) {
                if let Some(l) = lease {
                    l.check().await?;
                }
                futures::future::try_join_all(chunk.iter().map(|&i| items.compute(i))).await?;
                done += chunk.len();
                if let Some(f) = &self.on_progress {
                    f(done, total);
                }
            }
        }
        Ok(())
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
}

/// Staged name of a run's plan.
pub const PLAN_NAME: &str = "plan.json";
/// Staged name of the hour items' payloads (a JSON array, Step Functions'
/// item reader): the first wave.
pub const HOUR_ITEMS_NAME: &str = "hour_items.json";
/// Staged name of the day items' payloads: the second wave, after every hour item.
pub const DAY_ITEMS_NAME: &str = "day_items.json";
/// Commits of a publish, counted in the progress after the items.
const PUBLISH_STEPS: usize = 3;

/// What planning found.
#[derive(Debug)]
pub enum Planned {
    /// Nothing to compute: the report of the run.
    Nothing(RunReport),
    /// The plan to compute and publish.
    Plan(Plan),
}

impl RunReport {
    /// The report of `plan` before anything is computed.
    fn planned(plan: &Plan) -> Self {
        RunReport {
            hours: plan.hours.len(),
            days: plan.days.len(),
            quarantined: plan.quarantined,
            watermark_before: plan.watermark_before,
            watermark_after: plan.marks.watermark,
            raw_version: Some(plan.raw_version),
            compact_days: plan.compact_days.clone(),
            ..RunReport::default()
        }
    }
}

/// What every row commit of run `plan` says about itself in the Delta log.
fn commit_properties(plan: &Plan) -> CommitProperties {
    CommitProperties::default().with_metadata([
        operation(if plan.reprocess.is_some() {
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
            serde_json::json!(plan.run_id),
        ),
        (
            tally_common::serving_store::DAILY_DAYS_KEY.to_string(),
            serde_json::json!(plan
                .days
                .iter()
                .map(|&d| tally_common::bucket::date_string(d))
                .collect::<Vec<_>>()),
        ),
        (
            COMPACT_DAYS_KEY.to_string(),
            serde_json::json!(plan
                .compact_days
                .iter()
                .map(|&d| tally_common::bucket::date_string(d))
                .collect::<Vec<_>>()),
        ),
    ])
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

/// What a run computes, found before anything is computed.
struct Work {
    /// The `raw_events` snapshot screened, and computed from.
    raw: DeltaTable,
    /// The dirty hours.
    dirty: BTreeSet<i64>,
    /// Complete days whose daily row is computed.
    daily_due: BTreeSet<i64>,
}

impl Work {
    /// The `raw_events` version computed from (-1: an empty table).
    fn raw_version(&self) -> i64 {
        self.raw.version().map(|v| v as i64).unwrap_or(-1)
    }
}

/// Which marks the run's row commits carried.
#[derive(Default)]
struct Carried {
    /// The watermark and raw version, on the hourly commit.
    progress: bool,
    /// The daily mark, on the daily commit.
    daily_mark: bool,
}

/// Planning under way: what its steps share.
struct Planner<'a> {
    job: &'a BatchRun,
    lease: Option<&'a Lease>,
    /// The progress recorded before the run.
    progress: BatchProgress,
    marks: Marks,
    /// `metrics_daily`'s mark before the run.
    daily_mark: Option<i64>,
    daily: DeltaTable,
    /// Rows moved (or, in a dry run, to move) to quarantine.
    quarantined: u64,
}

impl Planner<'_> {
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
                return Ok(Work {
                    raw,
                    dirty,
                    daily_due,
                });
            }
            if job.dry_run {
                self.quarantined += bad.rows.len() as u64;
                return Ok(Work {
                    raw,
                    dirty,
                    daily_due,
                });
            }
            if pass > SCREEN_PASSES {
                // a writer keeps adding such rows: the queries leave them out
                // ([`computable_rows`]) and a later run moves them
                tracing::warn!(
                    rows = bad.rows.len(),
                    "rows the batch layer cannot compute keep arriving; leaving them for the next run"
                );
                return Ok(Work {
                    raw,
                    dirty,
                    daily_due,
                });
            }
            if let Some(l) = self.lease {
                l.check().await?;
            }
            self.quarantined += quarantine::write(&job.lake, &bad).await?;
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
}

/// What a publish wrote.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) hourly_rows: u64,
    pub(crate) daily_rows: u64,
}

/// Publish run `plan` from its staging area: one commit per table, each
/// carrying the run's id. `customer_hours` first, then `metrics_daily` (with the
/// daily mark), then `metrics_hourly` with the run's progress (watermark, raw
/// version): a publish killed part way leaves the progress unrecorded, and the
/// next run (or the publish retried) does it all again. Then the marks no row
/// commit carried, and the staging area is removed. Errors:
/// [`Error::Conflict`] when another run published since `plan` was made.
pub(crate) async fn publish_plan(
    lake: &Lake,
    plan: &Plan,
    staging: &Staging,
    memory: &MemoryBound,
    hourly: &mut DeltaTable,
    lease: Option<&Lease>,
    on_progress: Option<&(dyn Fn(usize, usize) + Send + Sync)>,
) -> Result<Published> {
    hourly
        .update_state()
        .await
        .context("refreshing metrics_hourly")?;
    if published_by(hourly, &plan.run_id).await?.is_some() {
        // a publish retried after it committed
        staging.delete_all().await?;
        return Ok(Published::default());
    }
    let ch = lake.open_or_create(Table::CustomerHours).await?;
    for (table, name, planned) in [
        (&*hourly, Table::MetricsHourly, plan.hourly_version),
        (&ch, Table::CustomerHours, plan.customer_hours_version),
    ] {
        if let Some(other) = published_since(table, planned, &plan.run_id).await? {
            return Err(Error::Conflict(format!(
                "run {} was planned at {} version {:?}, and run {other} has published since: plan it again",
                plan.run_id,
                name.name(),
                planned
            )));
        }
    }
    let total = plan.items.len() + PUBLISH_STEPS;
    let step = |k: usize| {
        if let Some(f) = on_progress {
            f(plan.items.len() + k, total);
        }
    };
    let commit = commit_properties(plan);
    let mut published = Published::default();
    check_lease(lease).await?;
    publish_customer_hours(&ch, plan, staging, commit.clone()).await?;
    step(1);

    let mut carried = Carried::default();
    let mut daily = lake.open_or_create(Table::MetricsDaily).await?;
    check_lease(lease).await?;
    if !plan.days.is_empty() {
        let mut c = commit.clone();
        if let Some(through) = plan.marks.daily_through {
            c = c.with_application_transactions(vec![daily::mark_txn(through)]);
            carried.daily_mark = true;
        }
        let (t, n) =
            publish_rows(&daily, MetricTable::Daily, staging, memory, &plan.days, c).await?;
        daily = t;
        published.daily_rows = n;
    }
    step(2);

    // the quarter hours of the run's hours, before the hourly commit that
    // moves the watermark over them
    check_lease(lease).await?;
    if !plan.hours.is_empty() {
        let quarters = lake.open_or_create(Table::MetricsQuarterHourly).await?;
        let slots: Vec<i64> = plan
            .hours
            .iter()
            .flat_map(|&h| (0..4).map(move |q| h + q * tally_common::calendar::SLOT_MICROS))
            .collect();
        let kind = MetricTable::QuarterHourly;
        publish_rows(&quarters, kind, staging, memory, &slots, commit.clone()).await?;
    }

    check_lease(lease).await?;
    if !plan.hours.is_empty() {
        let mut c = commit.clone();
        // a reprocessing run records no progress: the hours the last hourly run
        // has not seen yet stay dirty for the next one
        if plan.reprocess.is_none() {
            c = c.with_application_transactions(progress_txns(
                plan.marks.watermark,
                plan.raw_version,
            ));
            carried.progress = true;
        }
        let (t, n) =
            publish_rows(hourly, MetricTable::Hourly, staging, memory, &plan.hours, c).await?;
        *hourly = t;
        published.hourly_rows = n;
    }
    step(3);
    record_marks(plan, hourly, &daily, carried, commit).await?;
    staging.delete_all().await?;
    Ok(published)
}

/// Fail when another run has taken `lease` over (no lease: a dry run).
async fn check_lease(lease: Option<&Lease>) -> Result<()> {
    match lease {
        Some(l) => l.check().await,
        None => Ok(()),
    }
}

/// Commit the marks that no row commit carried: the daily mark moves on alone
/// when no day was missing its row, and the watermark or the processed
/// version when there was nothing to recompute; each commit carries `commit`'s
/// metadata (a publish's: its run id).
async fn record_marks(
    plan: &Plan,
    hourly: &mut DeltaTable,
    daily: &DeltaTable,
    carried: Carried,
    commit: CommitProperties,
) -> Result<()> {
    if let Some(through) = plan.marks.daily_through {
        if !carried.daily_mark && plan.daily_mark_before.is_none_or(|m| m < through) {
            let c = commit
                .clone()
                .with_application_transactions(vec![daily::mark_txn(through)]);
            record_only(daily, MetricTable::Daily, c).await?;
        }
    }
    let watermark = plan.marks.watermark;
    if !carried.progress
        && plan.reprocess.is_none()
        && (watermark != plan.watermark_before || plan.raw_version_before != Some(plan.raw_version))
    {
        let c = commit.with_application_transactions(progress_txns(watermark, plan.raw_version));
        *hourly = record_only(hourly, MetricTable::Hourly, c).await?;
    }
    Ok(())
}

/// A dry run's comparison: the hours' parts added up against what
/// `metrics_hourly` holds (daily rows are not compared).
async fn compare(
    hourly: &DeltaTable,
    plan: &Plan,
    staging: &Staging,
    memory: &MemoryBound,
) -> Result<DryRunDiff> {
    let mut diff = DryRunDiff::default();
    let ctx = memory.session()?;
    let after = if staging
        .register_dir(
            &ctx,
            "hourly/",
            "staged",
            MetricTable::Hourly.table().schema(),
        )
        .await?
    {
        crate::sql::run_query(
            &ctx,
            &crate::publish::combine_staged_sql(MetricTable::Hourly, "staged"),
        )
        .await?
    } else {
        Vec::new()
    };
    let mut before = Vec::new();
    for (day, hours) in plan.hours_by_day() {
        before.extend(stored_hours(hourly, day, &hours).await?);
    }
    diff.add(&before, &after)?;
    Ok(diff)
}

/// Remove what an unpublished run left: the `customer_hours` files its hour
/// items wrote (never committed) and its staging area. Best effort: vacuum
/// removes whatever this misses.
async fn discard(lake: &Lake, plan: &Plan, staging: &Staging) {
    let result = async {
        let ch = lake.open_or_create(Table::CustomerHours).await?;
        let store = ch.object_store();
        for (i, item) in plan.items.iter().enumerate() {
            if matches!(item, crate::plan::Item::Hour { .. }) {
                let adds: Vec<deltalake::kernel::Add> = staging
                    .get_json(&crate::items::adds_name(i))
                    .await?
                    .unwrap_or_default();
                for a in adds {
                    let _ = object_store::ObjectStoreExt::delete(
                        store.as_ref(),
                        &deltalake::Path::from(a.path.as_str()),
                    )
                    .await;
                }
            }
        }
        staging.delete_all().await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(run = %plan.run_id, error = %e, "leaving an unpublished run's files to vacuum");
    }
}

/// Compact the raw partitions of the plan's closed days whose raw data changed
/// or that closed in this run, and each such day's `metrics_hourly` partition
/// (one file sorted by merchant); an hourly run then vacuums.
async fn compact_after(
    lake: &Lake,
    compact_days: &[i64],
    reprocess: bool,
    memory: &MemoryBound,
    hourly: &mut DeltaTable,
) -> Result<()> {
    let days: BTreeSet<i64> = compact_days.iter().copied().collect();
    crate::compact::compact_days(lake, &days).await?;
    for &day in &days {
        compact_metric_day(lake, day, memory).await?;
    }
    if !reprocess {
        // once a day closes: files replaced more than the retention ago go, and
        // readers and time travel inside the window keep theirs
        crate::stage::expire_local(lake, crate::compact::VACUUM_RETENTION);
        for t in [
            Table::RawEvents,
            Table::MetricsHourly,
            Table::MetricsDaily,
            Table::MetricsQuarterHourly,
            Table::CustomerHours,
        ] {
            let n = crate::compact::vacuum(lake, t, crate::compact::VACUUM_RETENTION).await?;
            tracing::info!(table = t.name(), files = n, "vacuumed");
        }
    }
    hourly
        .update_state()
        .await
        .context("refreshing metrics_hourly")?;
    Ok(())
}

/// Rewrite the `metrics_hourly` and `metrics_quarter_hourly` partitions of
/// `day` as one file each, sorted by merchant and time, when runs left several
/// (a compaction commit, no run id); whether the hourly one was rewritten.
pub async fn compact_metric_day(lake: &Lake, day: i64, memory: &MemoryBound) -> Result<bool> {
    let mut compacted = None;
    for kind in [MetricTable::QuarterHourly, MetricTable::Hourly] {
        let Some(table) = lake.open(kind.table()).await? else {
            continue;
        };
        let commit = CommitProperties::default().with_metadata([operation("compact")]);
        let done = match compact_partition(&table, kind, day, memory, commit).await {
            Err(Error::Conflict(m)) => {
                // a run published meanwhile: the next compaction of the day does it
                tracing::warn!(reason = %m, "compaction lost to a commit; leaving it to the next run");
                false
            }
            other => other?,
        };
        compacted = Some(done);
    }
    Ok(compacted.unwrap_or(false))
}

/// Compute item `item` of run `run_id` (staged by [`BatchRun::plan`]) within
/// `memory`: the Step Functions Map's item. Returns the metric rows staged.
/// Errors: [`Error::Invalid`] when the run has no staged plan (published
/// already, or never planned) or no such item.
pub async fn compute_item(
    lake: &Lake,
    memory: &MemoryBound,
    run_id: &str,
    item: usize,
) -> Result<u64> {
    let staging = Staging::open(lake, run_id)?;
    let plan: Plan = staging.get_json(PLAN_NAME).await?.ok_or_else(|| {
        Error::invalid(format!(
            "run {run_id} has no staged plan (published, or never planned)"
        ))
    })?;
    let items = ItemContext::new(lake, memory, Arc::new(plan), staging).await?;
    items.compute(item).await
}

/// How far back in `metrics_hourly`'s log a retried publish looks for its own
/// commit, in versions.
const PUBLISHED_WITHIN: u64 = 100;

/// The commit of run `run_id` among the newest [`PUBLISHED_WITHIN`] of `table`.
async fn published_by(table: &DeltaTable, run_id: &str) -> Result<Option<Commit>> {
    let Some(newest) = table.version() else {
        return Ok(None);
    };
    for v in (newest.saturating_sub(PUBLISHED_WITHIN)..=newest).rev() {
        if let Some(c) = read_commit(table, v).await? {
            if c.info[crate::rollback::RUN_KEY].as_str() == Some(run_id) {
                return Ok(Some(c));
            }
        }
    }
    Ok(None)
}

/// The run, other than `run_id`, that committed to `table` after version
/// `planned` (compactions, which change no row, do not count; a commit of
/// marks only does: its watermark is newer than the plan's).
async fn published_since(
    table: &DeltaTable,
    planned: Option<i64>,
    run_id: &str,
) -> Result<Option<String>> {
    let Some(newest) = table.version() else {
        return Ok(None);
    };
    let first = planned.map_or(0, |v| v + 1).max(0) as u64;
    for v in first..=newest {
        let Some(c) = read_commit(table, v).await? else {
            continue;
        };
        let run = c.info[crate::rollback::RUN_KEY].as_str().unwrap_or("");
        // a compaction rewrites rows without changing them
        let compaction = !c.files.is_empty() && c.files.iter().all(|f| !f.data_change);
        if run == run_id || compaction {
            continue;
        }
        return Ok(Some(if run.is_empty() {
            format!("(version {v})")
        } else {
            run.to_string()
        }));
    }
    Ok(None)
}

/// The dates (epoch µs) of the `customer_hours` files that the newest run
/// committing to `customer_hours` added, when that run has no commit in
/// `metrics_hourly` (its publish stopped half way).
async fn unfinished_publish_dates(
    customer_hours: &DeltaTable,
    hourly: &DeltaTable,
) -> Result<BTreeSet<i64>> {
    let Some(newest) = customer_hours.version() else {
        return Ok(BTreeSet::new());
    };
    for v in (newest.saturating_sub(PUBLISHED_WITHIN)..=newest).rev() {
        let Some(c) = read_commit(customer_hours, v).await? else {
            continue;
        };
        let Some(run) = c.info[crate::rollback::RUN_KEY].as_str() else {
            continue;
        };
        if published_by(hourly, run).await?.is_some() {
            return Ok(BTreeSet::new());
        }
        return Ok(c
            .files
            .iter()
            .filter(|f| f.change == FileChange::Added)
            .filter_map(|f| f.partition_values.get("date"))
            .filter_map(|d| parse_ts(&format!("{d}T00:00:00Z")).ok())
            .collect());
    }
    Ok(BTreeSet::new())
}

/// Raw rows below which a file is small: compaction makes files of
/// [`crate::compact::TARGET_FILE_SIZE`] (about 2 M rows), so two small files
/// in one hour partition mean the partition was never compacted.
const SMALL_FILE_ROWS: i64 = 1_000_000;

/// Days (epoch µs) whose raw partitions or `metrics_hourly` date are not
/// compacted: an hour partition with two small files, or a date of several
/// files (`hourly_files`: files per date).
fn uncompacted_days(
    raw: &[crate::dirty::RawFile],
    hourly_files: &BTreeMap<String, usize>,
) -> BTreeSet<i64> {
    let mut small: BTreeMap<i64, usize> = BTreeMap::new();
    for f in raw {
        if let (Some(h), Some(n)) = (f.hour(), f.num_records) {
            if n < SMALL_FILE_ROWS {
                *small.entry(h).or_default() += 1;
            }
        }
    }
    small
        .into_iter()
        .filter(|&(_, n)| n >= 2)
        .map(|(h, _)| day_floor(h))
        .chain(
            hourly_files
                .iter()
                .filter(|&(_, &n)| n >= 2)
                .filter_map(|(d, _)| parse_ts(&format!("{d}T00:00:00Z")).ok()),
        )
        .collect()
}

/// The number of `metrics_hourly` files per date.
fn hourly_files_by_date(hourly: &DeltaTable) -> Result<BTreeMap<String, usize>> {
    let mut by_date = BTreeMap::new();
    for f in crate::publish::partition_files(hourly, MetricTable::Hourly)? {
        *by_date.entry(f.partition).or_default() += 1;
    }
    Ok(by_date)
}

/// Closed days (epoch µs) a run's commit says it leaves to compaction.
fn compact_days_of(commit: &Commit) -> Vec<i64> {
    commit.info[COMPACT_DAYS_KEY]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str())
        .filter_map(|d| parse_ts(&format!("{d}T00:00:00Z")).ok())
        .collect()
}

/// Commit metadata key: the closed days (`YYYY-MM-DD`) a run leaves to
/// compaction, so that a publish retried after it landed still answers them.
const COMPACT_DAYS_KEY: &str = "tally.compact_days";

/// Publish run `run_id` from its staging area (the Step Functions' publish
/// step), under the lease (waiting up to `wait` for it), then report. Errors:
/// [`Error::Conflict`] when another run published since it was planned;
/// [`Error::Invalid`] when it has no staged plan.
pub async fn publish_run(
    lake: &Lake,
    memory: &MemoryBound,
    run_id: &str,
    lease_expiry: Duration,
    wait: Duration,
) -> Result<RunReport> {
    let staging = Staging::open(lake, run_id)?;
    let mut hourly = lake.open_or_create(Table::MetricsHourly).await?;
    let Some(plan) = staging.get_json::<Plan>(PLAN_NAME).await? else {
        // a publish retried after it landed (its answer was lost) succeeds
        for t in [
            Table::MetricsHourly,
            Table::MetricsDaily,
            Table::CustomerHours,
        ] {
            let Some(table) = lake.open(t).await? else {
                continue;
            };
            if let Some(c) = published_by(&table, run_id).await? {
                let progress = read_progress(&hourly).await?;
                return Ok(RunReport {
                    watermark_before: progress.watermark,
                    watermark_after: progress.watermark,
                    raw_version: progress.raw_version,
                    compact_days: compact_days_of(&c),
                    ..RunReport::default()
                });
            }
        }
        return Err(Error::invalid(format!(
            "run {run_id} has no staged plan (never planned, or published more than {PUBLISHED_WITHIN} commits ago)"
        )));
    };
    let lease = Lease::acquire(&hourly, lease_expiry, wait).await?;
    let result = async {
        hourly
            .update_state()
            .await
            .context("refreshing metrics_hourly")?;
        let t = Instant::now();
        let p = match publish_plan(
            lake,
            &plan,
            &staging,
            memory,
            &mut hourly,
            Some(&lease),
            None,
        )
        .await
        {
            Err(Error::Conflict(m)) => {
                // the run is planned again: what it wrote is nobody's
                discard(lake, &plan, &staging).await;
                return Err(Error::Conflict(m));
            }
            other => other?,
        };
        let mut report = RunReport::planned(&plan);
        report.hourly_rows = p.hourly_rows;
        report.daily_rows = p.daily_rows;
        report.write_secs = t.elapsed().as_secs_f64();
        Ok(report)
    }
    .await;
    lease.release().await;
    result
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
