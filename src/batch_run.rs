//! `tally batch run` and `tally batch reprocess`: the flags of a batch run
//! turned into a [`tally_batch_layer::BatchRun`], with a progress bar on a
//! terminal, and its report printed.

use std::time::Duration;

use clap::{Args, Subcommand};
use tally_batch_layer::BatchRun;
use tally_common::bucket::{format_ts, hour_floor, now_micros, parse_ts, MICROS_PER_SECOND};
use tally_common::config::{BatchArgs, LakeArgs, SpeedArgs};

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
    /// Load the serving store (Redis) from the metric tables: the dates changed
    /// since it was last loaded, and any of its window it lacks (after a flush
    /// or a restart). `batch run`, `reprocess` and `rollback` do it themselves
    /// when Redis is configured.
    Load {
        #[command(flatten)]
        lake: LakeArgs,
        #[command(flatten)]
        speed: SpeedArgs,
        #[command(flatten)]
        serving: ServingArgs,
    },
}

/// The flags of loading the serving store.
#[derive(Debug, Args, Clone)]
pub struct ServingArgs {
    /// UTC dates the serving store keeps, ending with the watermark's.
    #[arg(long, env = "TALLY_SERVING_WINDOW_DAYS", default_value_t = 35,
          value_parser = clap::value_parser!(u32).range(1..=400))]
    pub serving_window_days: u32,
}

impl ServingArgs {
    /// The load options these flags make.
    pub fn options(&self) -> tally_serving_layer::LoadOptions {
        tally_serving_layer::LoadOptions {
            window_days: self.serving_window_days,
            ..Default::default()
        }
    }
}

/// Load the serving store in Redis when `speed` names one (with the embedded
/// store, `tally serve` loads its own); prints what it did.
pub async fn load_serving_store(
    lake: &tally_common::lake::Lake,
    speed: &SpeedArgs,
    serving: &ServingArgs,
    after_publish: bool,
) -> anyhow::Result<()> {
    if speed.redis_url.is_none() {
        return Ok(());
    }
    let tally_speed_layer::SpeedStore::Redis(redis) =
        tally_speed_layer::SpeedStore::connect(speed).await?
    else {
        return Ok(());
    };
    let report =
        match tally_serving_layer::load(lake, &redis.serving_store(), &serving.options()).await {
            Ok(r) => r,
            Err(e) if !after_publish => return Err(e.into()),
            Err(e) => {
                // the publish stands; the API answers from the previous load and the speed view
                eprintln!(
                    "warning: loading the serving store failed ({e}); the API serves the state \
                     before until `tally batch load` (or the next run) loads it"
                );
                return Ok(());
            }
        };
    println!(
        "serving store: {} date(s) loaded ({} merchant-dates, {} bytes) in {:.1} s; watermark {}{}",
        report.dates.len(),
        report.values,
        report.bytes,
        report.seconds,
        report.watermark.as_deref().unwrap_or("none"),
        if report.complete {
            ""
        } else {
            "; not complete yet: run `tally batch load` again"
        }
    );
    Ok(())
}

/// The flags of `tally batch rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub lake: LakeArgs,
    #[command(flatten)]
    pub speed: SpeedArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
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
    pub speed: SpeedArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
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
            load_serving_store(&args.lake.lake()?, &args.speed, &args.serving, true).await?;
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
            if !dry_run {
                load_serving_store(&args.lake.lake()?, &args.speed, &args.serving, true).await?;
            }
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
            load_serving_store(&lake, &args.speed, &args.serving, true).await?;
        }
        BatchCommand::Load {
            lake,
            speed,
            serving,
        } => {
            if speed.redis_url.is_none() {
                anyhow::bail!(
                    "no serving store to load: set TALLY_REDIS_URL (--redis-url); without Redis \
                     `tally serve` loads its own embedded store"
                );
            }
            load_serving_store(&lake.lake()?, &speed, &serving, false).await?;
        }
    }
    Ok(())
}
