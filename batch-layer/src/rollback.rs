//! `tally batch rollback`: put the metric tables back as they were before the
//! last run that changed them (an hourly run or a reprocess), with Delta's
//! RESTORE, so a reprocess with bad logic is undone in one step.
//!
//! Every commit a run makes to `metrics_hourly` or `metrics_daily` names the
//! run ([`RUN_KEY`] in its `commitInfo`). A rollback walks `metrics_hourly`'s
//! log back from its newest version to the newest run not rolled back yet,
//! restores each metric table to the version before that run's first commit
//! there, and records in the restore commit which run it undid
//! ([`ROLLED_BACK_KEY`]), so a second rollback undoes the run before. Delta's
//! RESTORE brings back the data files, not the application transactions, so
//! the restore commit also carries the batch progress (watermark, raw version,
//! logic version; the daily mark) of the version it restores. It holds the
//! batch lease while it works, like a run.

use std::collections::HashSet;
use std::time::Duration;

use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::lake::{operation, read_commit, Lake, Table};
use tally_common::watermark::{read_progress, LOGIC_VERSION_APP, RAW_VERSION_APP, WATERMARK_APP};
use tally_common::{Context as _, Error, Result};

use crate::daily;
use crate::lease::Lease;

/// The run id in a row commit's metadata (see [`tally_common::lake::RUN_KEY`]).
pub use tally_common::lake::RUN_KEY;

/// The `commitInfo` key of a rollback's restore commit naming the run it undid.
pub const ROLLED_BACK_KEY: &str = "tally.rolled_back_run";

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    /// The run undone.
    pub run: String,
    /// Its operation (`batch run` or `reprocess`).
    pub operation: String,
    /// Per metric table the run changed: (table, version before the rollback,
    /// version restored).
    pub tables: Vec<(Table, u64, u64)>,
}

impl std::fmt::Display for RollbackReport {
    /// `rolled back <operation> <run>: metrics_hourly 12 -> 7, ...`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rolled back {} {}:", self.operation, self.run)?;
        for (i, (t, from, to)) in self.tables.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{} version {from} restored to {to}", t.name())?;
        }
        Ok(())
    }
}

/// The newest run of `table`'s log not rolled back yet: its id, operation and
/// the first version it committed. None when there is none.
async fn last_live_run(table: &DeltaTable) -> Result<Option<(String, String, u64)>> {
    let Some(newest) = table.version() else {
        return Ok(None);
    };
    let mut undone: HashSet<String> = HashSet::new();
    let mut found: Option<(String, String, u64)> = None;
    for v in (0..=newest).rev() {
        let Some(commit) = read_commit(table, v).await? else {
            continue;
        };
        if let Some(run) = commit.info[ROLLED_BACK_KEY].as_str() {
            undone.insert(run.to_string());
            continue;
        }
        let run = commit.info[RUN_KEY].as_str();
        match (&mut found, run) {
            (Some((id, _, first)), Some(r)) if r == id => *first = v,
            // the commits of the run found end below its first one
            (Some(_), _) => break,
            (None, Some(r)) if !undone.contains(r) => {
                let op = commit.info[tally_common::lake::OPERATION_KEY]
                    .as_str()
                    .unwrap_or("run")
                    .to_string();
                found = Some((r.to_string(), op, v));
            }
            (None, _) => {}
        }
    }
    Ok(found)
}

/// The first version of `table` that `run` committed, if any.
async fn first_commit_of(table: &DeltaTable, run: &str) -> Result<Option<u64>> {
    let Some(newest) = table.version() else {
        return Ok(None);
    };
    let mut first = None;
    for v in (0..=newest).rev() {
        let Some(commit) = read_commit(table, v).await? else {
            continue;
        };
        match commit.info[RUN_KEY].as_str() {
            Some(r) if r == run => first = Some(v),
            _ if first.is_some() => break,
            _ => {}
        }
    }
    Ok(first)
}

/// Restore `table` to `version`, carrying `txns` and naming `run` as undone.
async fn restore(
    table: DeltaTable,
    version: u64,
    run: &str,
    txns: Vec<Transaction>,
) -> Result<DeltaTable> {
    let commit = CommitProperties::default()
        .with_metadata([
            operation("rollback"),
            (ROLLED_BACK_KEY.to_string(), serde_json::json!(run)),
        ])
        .with_application_transactions(txns);
    let (table, _) = table
        .restore()
        .with_version_to_restore(version)
        .with_commit_properties(commit)
        .await
        .context("restoring a metric table")?;
    Ok(table)
}

/// Undo the last run that changed the metric tables (see the module doc);
/// None when no run is left to undo. Waits up to `wait` for a running batch
/// run's lease. Errors: [`Error::Busy`] when another run holds the lease;
/// [`Error::Invalid`] when the run is the first that ever set the watermark
/// (a Delta log cannot forget an application transaction: start over by
/// removing the metric tables instead).
pub async fn rollback(lake: &Lake, wait: Duration) -> Result<Option<RollbackReport>> {
    let Some(hourly) = lake.open(Table::MetricsHourly).await? else {
        return Ok(None);
    };
    let lease = Lease::acquire(&hourly, crate::lease::DEFAULT_LEASE_EXPIRY, wait).await?;
    let result = rollback_locked(lake, hourly).await;
    lease.release().await;
    result
}

async fn rollback_locked(lake: &Lake, mut hourly: DeltaTable) -> Result<Option<RollbackReport>> {
    // as of now: a run may have committed while the lease was awaited
    hourly
        .update_state()
        .await
        .context("refreshing metrics_hourly")?;
    let Some((run, op, first)) = last_live_run(&hourly).await? else {
        return Ok(None);
    };
    let target = first
        .checked_sub(1)
        .ok_or_else(|| Error::internal(format!("run {run} made metrics_hourly's first commit")))?;
    let before = lake.open_at_version(Table::MetricsHourly, target).await?;
    let (now_p, then_p) = (read_progress(&hourly).await?, read_progress(&before).await?);
    if now_p.watermark.is_some() && then_p.watermark.is_none() {
        return Err(Error::invalid(format!(
            "the last run ({run}) is the first that set the watermark; there is nothing \
             before it to restore (remove metrics_hourly, metrics_daily, metrics_quarter_hourly and customer_hours to start over)"
        )));
    }
    let stamp = Some(chrono::Utc::now().timestamp_millis());
    let mut txns = Vec::new();
    for (app, value) in [
        (
            WATERMARK_APP,
            then_p.watermark.map(|w| w.div_euclid(MICROS_PER_HOUR)),
        ),
        (RAW_VERSION_APP, then_p.raw_version),
        (LOGIC_VERSION_APP, then_p.logic_version),
    ] {
        if let Some(v) = value {
            txns.push(Transaction::new_with_last_update(app, v, stamp));
        }
    }
    let mut report = RollbackReport {
        run: run.clone(),
        operation: op,
        tables: Vec::new(),
    };
    // metrics_daily first: a rollback killed between the two leaves the hourly
    // table (and the watermark) at the run, and the next rollback finishes it
    if let Some(mut daily_t) = lake.open(Table::MetricsDaily).await? {
        daily_t
            .update_state()
            .await
            .context("refreshing metrics_daily")?;
        if let Some(first_d) = first_commit_of(&daily_t, &run).await? {
            let target_d = first_d.saturating_sub(1);
            let then_d = lake.open_at_version(Table::MetricsDaily, target_d).await?;
            let mark: Vec<Transaction> = daily::read_mark(&then_d)
                .await?
                .map(daily::mark_txn)
                .into_iter()
                .collect();
            let from = daily_t.version().unwrap_or(0);
            restore(daily_t, target_d, &run, mark).await?;
            report.tables.push((Table::MetricsDaily, from, target_d));
        }
    }
    // metrics_quarter_hourly, and customer_hours, whose rows the run's other
    // rows were computed from
    for t in [Table::MetricsQuarterHourly, Table::CustomerHours] {
        if let Some(mut other) = lake.open(t).await? {
            other
                .update_state()
                .await
                .context(format!("refreshing {}", t.name()))?;
            if let Some(first_c) = first_commit_of(&other, &run).await? {
                let target_c = first_c.saturating_sub(1);
                let from = other.version().unwrap_or(0);
                restore(other, target_c, &run, Vec::new()).await?;
                report.tables.push((t, from, target_c));
            }
        }
    }
    let from = hourly.version().unwrap_or(0);
    restore(hourly, target, &run, txns).await?;
    report
        .tables
        .insert(0, (Table::MetricsHourly, from, target));
    Ok(Some(report))
}
