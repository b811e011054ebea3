//! `tally batch run` and `tally batch reprocess`: the flags of a batch run
//! turned into a [`tally_batch_layer::BatchRun`], with a progress bar on a
//! terminal, and its report printed.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tally_batch_layer::{BatchRun, RunReport};
use tally_common::bucket::{format_ts, parse_ts, Granularity};
use tally_common::config::{BatchArgs, LakeArgs};
use tally_common::metrics::stored_metric_names;

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// The hourly job: dirty closed hours, watermark, compaction of closed raw partitions.
    Run {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Recompute a range of hours from raw facts with the current logic.
    Reprocess {
        /// First hour (RFC 3339, hour aligned), inclusive.
        #[arg(long)]
        from: String,
        /// Last hour (RFC 3339, hour aligned), exclusive.
        #[arg(long)]
        to: String,
        /// Write nothing; print what would change.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        args: RunArgs,
    },
}

/// The flags every batch run takes.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub lake: LakeArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Skip compaction of closed raw partitions.
    #[arg(long)]
    pub no_compact: bool,
    /// Seconds to wait for another run to finish before giving up.
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
}

fn configured(args: &RunArgs) -> anyhow::Result<BatchRun> {
    if args.batch.grace_minutes < 0 {
        anyhow::bail!(
            "--grace-minutes (TALLY_GRACE_MINUTES) is {}: it must be 0 or more, or open hours would be taken as closed",
            args.batch.grace_minutes
        );
    }
    let lake = args.lake.lake()?;
    let run = BatchRun::new(&lake)
        .grace_minutes(args.batch.grace_minutes)
        .compact(!args.no_compact)
        .wait_for_other_runs(Duration::from_secs(args.wait_secs))
        .lease_expiry(Duration::from_secs(args.batch.lease_secs));
    Ok(if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} days {pos}/{len} [{bar:30}] {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        run.on_day(move |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
    } else {
        run
    })
}

fn hour(s: &str, what: &str) -> anyhow::Result<i64> {
    let t = parse_ts(s)?;
    if !Granularity::Hour.is_aligned(t) {
        anyhow::bail!("--{what} {s} is not aligned to an hour");
    }
    Ok(t)
}

pub async fn run(command: BatchCommand) -> anyhow::Result<()> {
    match command {
        BatchCommand::Run { args } => {
            let report = configured(&args)?.execute().await?;
            print_report(&report);
        }
        BatchCommand::Reprocess {
            from,
            to,
            dry_run,
            args,
        } => {
            let (from, to) = (hour(&from, "from")?, hour(&to, "to")?);
            if to <= from {
                anyhow::bail!("--to must be after --from");
            }
            let report = configured(&args)?
                .reprocess(from, to)
                .dry_run(dry_run)
                .execute()
                .await?;
            print_report(&report);
        }
    }
    Ok(())
}

fn print_report(r: &RunReport) {
    let w = |t: Option<i64>| t.map_or("none".to_string(), format_ts);
    println!(
        "batch: {} hours and {} days recomputed ({} hourly rows, {} daily rows) from raw_events version {}; \
         watermark {} -> {}; compute {:.1}s, write {:.1}s, compact {:.1}s",
        r.hours,
        r.days,
        r.hourly_rows,
        r.daily_rows,
        r.raw_version.map_or("none".into(), |v| v.to_string()),
        w(r.watermark_before),
        w(r.watermark_after),
        r.compute_secs,
        r.write_secs,
        r.compact_secs
    );
    if r.quarantined > 0 {
        println!(
            "batch: {} raw_events rows the batch layer cannot compute {} to quarantine (see its reason column)",
            r.quarantined,
            if r.diff.is_some() { "would be moved" } else { "moved" }
        );
    }
    if let Some(d) = &r.diff {
        println!(
            "dry run: {} of {} merchant-hours would change; nothing was written",
            d.merchant_hours_changed, d.merchant_hours_compared
        );
        for (i, name) in stored_metric_names().enumerate() {
            println!(
                "  {name:<17} {:>16} -> {:<16}",
                d.totals_before[i], d.totals_after[i]
            );
        }
    }
}
