//! `tally batch run` and `tally batch reprocess`: the flags of a batch run
//! turned into a [`tally_batch_layer::BatchRun`], with a progress bar on a
//! terminal, and its report printed.

use std::time::Duration;

use clap::{Args, Subcommand};
use tally_batch_layer::BatchRun;
use tally_common::bucket::{format_ts, hour_floor, now_micros, parse_ts, MICROS_PER_SECOND};
use tally_common::config::{BatchArgs, LakeArgs};

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
        /// Last hour (RFC 3339, hour aligned), exclusive. Hours not closed yet
        /// (ending less than the grace period ago) are left out, and said so.
        #[arg(long)]
        to: String,
        /// Write nothing; print what would change.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Restore the metric tables to before the last run that changed them
    /// (Delta restore, recorded in their logs); again for the run before.
    Rollback {
        #[command(flatten)]
        args: RollbackArgs,
    },
}

/// The flags of `tally batch rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub lake: LakeArgs,
    /// Seconds to wait for a running batch run to finish before giving up.
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
}

/// The flags every batch run takes.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub lake: LakeArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Parts each hour's (and day's) computation is split into, computed
    /// independently and added up [default: from the Delta log's row counts,
    /// 20 M raw rows a part].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parts: Option<u32>,
    /// Parts computed side by side (they share the memory bound).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Skip compaction of closed raw partitions.
    #[arg(long)]
    pub no_compact: bool,
    /// Seconds to wait for another run to finish before giving up.
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
}

fn configured(args: &RunArgs) -> anyhow::Result<BatchRun> {
    let run = BatchRun::configured(&args.lake.lake()?, &args.batch)?
        .compact(!args.no_compact)
        .parts(tally_batch_layer::parts::Parts {
            count: args.parts,
            jobs: usize::from(args.jobs),
        })
        .wait_for_other_runs(Duration::from_secs(args.wait_secs));
    let bar = crate::progress_bar(Some(0), "{spinner} steps {pos}/{len} [{bar:30}] {elapsed}");
    Ok(if bar.is_hidden() {
        run
    } else {
        run.on_progress(move |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
    })
}

pub async fn run(command: BatchCommand) -> anyhow::Result<()> {
    match command {
        BatchCommand::Run { args } => {
            let report = configured(&args)?.execute().await?;
            println!("{report}");
        }
        BatchCommand::Reprocess {
            from,
            to,
            dry_run,
            args,
        } => {
            let (from, to) = (parse_ts(&from)?, parse_ts(&to)?);
            let closed_end = hour_floor(
                now_micros().saturating_sub(
                    args.batch
                        .grace_minutes
                        .saturating_mul(60 * MICROS_PER_SECOND),
                ),
            );
            let report = configured(&args)?
                .reprocess(from, to)?
                .dry_run(dry_run)
                .execute()
                .await?;
            println!("{report}");
            if to > closed_end {
                eprintln!(
                    "note: the hours from {} on are not closed yet (grace {} min) and were left out",
                    format_ts(closed_end.max(from)),
                    args.batch.grace_minutes
                );
            }
        }
        BatchCommand::Rollback { args } => {
            let lake = args.lake.lake()?;
            let wait = Duration::from_secs(args.wait_secs);
            match tally_batch_layer::rollback::rollback(&lake, wait).await? {
                Some(report) => println!("batch: {report}"),
                None => println!("batch: no run to roll back"),
            }
        }
    }
    Ok(())
}
