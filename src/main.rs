//! `tally`: one binary for every part of the pipeline. Argument parsing and
//! wiring only; the work is done by the layer crates.

mod batch_run;
mod demo;
mod ingest;
mod lambda;
mod serve;
mod sql;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally_common::config::{KinesisArgs, LakeArgs, SpeedArgs};
use tally_common::shutdown;
use tally_gen as gen;

/// Merchant analytics as a Lambda architecture on object storage.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job on embedded defaults: lake, history, batch, live speed view, API, dashboard.
    Demo(demo::DemoArgs),
    /// The HTTP API (and the dashboard at /).
    Serve(serve::ServeArgs),
    /// Realistic synthetic events to stdout, a file or a Kinesis stream.
    Gen(gen::GenArgs),
    /// NDJSON events into raw_events and the speed view (or onto Kinesis with --kinesis).
    Ingest(ingest::IngestArgs),
    /// The batch layer: the hourly run and reprocessing of history.
    Batch {
        #[command(subcommand)]
        command: batch_run::BatchCommand,
    },
    /// Read-only SQL over the lake's tables, for analysts.
    Sql(sql::SqlArgs),
    /// Merchants' settings.
    Merchants {
        #[command(subcommand)]
        command: MerchantsCommand,
    },
    /// The archiver: the Kinesis stream into the master dataset.
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// The speed layer.
    Speed {
        #[command(subcommand)]
        command: SpeedCommand,
    },
    /// Run as an AWS Lambda function (the `bootstrap` of every function; picks the
    /// handler from `_HANDLER`: speed, archiver, batch or api).
    #[command(hide = true)]
    Lambda {
        /// Handler name; defaults to the `_HANDLER` variable Lambda sets.
        #[arg(long, env = "_HANDLER")]
        handler: String,
        #[command(flatten)]
        lake: LakeArgs,
        #[command(flatten)]
        speed: SpeedArgs,
        #[command(flatten)]
        auth: tally_common::config::AuthArgs,
        #[command(flatten)]
        batch: tally_common::config::BatchArgs,
    },
}

#[derive(Debug, Subcommand)]
enum SpeedCommand {
    /// Consume the Kinesis stream into the speed view until SIGTERM; a Redis view
    /// that lost its data is rebuilt from the lake's raw_events meanwhile.
    Consume {
        #[command(flatten)]
        consume: ConsumeArgs,
        #[command(flatten)]
        speed: SpeedArgs,
        #[command(flatten)]
        lake: LakeArgs,
    },
    /// Rebuild a Redis speed view that lost its data (restart, failover) from
    /// raw_events newer than the watermark; nothing to do when it is whole.
    Rebuild {
        #[command(flatten)]
        speed: SpeedArgs,
        #[command(flatten)]
        lake: LakeArgs,
        /// Seconds to keep waiting for the archiver to reach every source.
        #[arg(long, default_value_t = tally_speed_layer::rebuild::DEFAULT_REBUILD_WAIT.as_secs())]
        wait_secs: u64,
    },
}

/// A Kinesis consumer's flags (`speed consume`, `archive consume`).
#[derive(Debug, clap::Args)]
struct ConsumeArgs {
    #[command(flatten)]
    kinesis: KinesisArgs,
    /// Exit once every shard is caught up instead of waiting for new records.
    #[arg(long)]
    until_caught_up: bool,
    /// Records per GetRecords call.
    #[arg(long, default_value_t = tally_stream::consumer::MAX_GET_RECORDS)]
    limit: i32,
}

#[derive(Debug, Subcommand)]
enum MerchantsCommand {
    /// Set a merchant's time zone (an IANA name): the calendar of its buckets,
    /// over all of its history at once.
    Set {
        /// The merchant.
        merchant_id: String,
        /// The IANA time zone, e.g. Asia/Kolkata, America/New_York or UTC.
        #[arg(long)]
        time_zone: String,
        #[command(flatten)]
        lake: LakeArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ArchiveCommand {
    /// Consume the Kinesis stream into raw_events and quarantine until SIGTERM
    /// (the archiver Lambda's work as a long-running process).
    Consume {
        #[command(flatten)]
        consume: ConsumeArgs,
        #[command(flatten)]
        lake: LakeArgs,
    },
}

impl ConsumeArgs {
    /// Consume the configured stream into `sink` until SIGTERM (or caught up).
    async fn run<K: tally_stream::RecordSink>(
        self,
        sink: K,
    ) -> anyhow::Result<tally_stream::ConsumeStats> {
        let stream = self.kinesis.stream.ok_or_else(|| {
            anyhow::anyhow!("no stream: pass --stream or set TALLY_KINESIS_STREAM")
        })?;
        let options = tally_stream::ConsumeOptions {
            limit: self.limit,
            until_caught_up: self.until_caught_up,
            ..Default::default()
        };
        Ok(tally_stream::consume(&stream, sink, options).await?)
    }
}

fn main() -> ExitCode {
    // Lambda runs the binary as `bootstrap` with no arguments
    let argv0 = std::env::args().next().unwrap_or_default();
    let cli = if argv0.ends_with("bootstrap") && std::env::args().len() == 1 {
        Cli::parse_from(["tally", "lambda"])
    } else {
        Cli::parse()
    };
    let lambda = matches!(cli.command, Command::Lambda { .. });
    init_tracing(lambda);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text its
/// error already says (tally's errors name their cause in their own message).
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// A progress bar on standard error with `template` (indicatif's syntax) and
/// `len` steps (None: unknown), drawn only for a person at a terminal.
pub(crate) fn progress_bar(len: Option<u64>, template: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = len.map_or_else(ProgressBar::no_length, ProgressBar::new);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn init_tracing(lambda: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // delta kernel logs an ERROR when it opens a table that does not exist
        // yet (which tally then creates); its real failures come back as errors
        // with context, so its own log stays off by default
        tracing_subscriber::EnvFilter::new(
            "info,deltalake=warn,deltalake_core=warn,datafusion=warn,buoyant_kernel=off",
        )
    });
    // colour only for a person at a terminal: a file, a pipe or CloudWatch gets
    // plain text (escape codes there are noise, and break log queries)
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if lambda {
        // CloudWatch adds timestamps
        builder.json().without_time().init();
    } else {
        builder.compact().init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Gen(args) => match args.kinesis.clone() {
            Some(stream) => ingest::generate_to_kinesis(&args, &stream).await,
            None => {
                let n = tokio::task::spawn_blocking(move || gen::run(&args)).await??;
                eprintln!("gen: {n} lines");
                Ok(())
            }
        },
        Command::Ingest(args) => ingest::run(args).await,
        Command::Batch { command } => batch_run::run(command).await,
        Command::Sql(args) => sql::run(args).await,
        Command::Merchants {
            command:
                MerchantsCommand::Set {
                    merchant_id,
                    time_zone,
                    lake,
                },
        } => {
            let lake = lake.lake()?;
            let now = tally_common::bucket::now_micros();
            let cal = tally_common::merchants::set_time_zone(&lake, &merchant_id, &time_zone, now)
                .await?;
            // the serving store too, so the API uses it now, not after the next load
            if let Ok(url) = std::env::var("TALLY_REDIS_URL") {
                use tally_common::serving_store::ServingStore as _;
                let store = tally_speed_layer::RedisStore::connect(&url, 3600).await?;
                store
                    .serving_store()
                    .set_zones(&[(merchant_id.clone(), cal.name().to_string(), now)])
                    .await?;
            }
            eprintln!("merchants: {merchant_id} is now in {}", cal.name());
            Ok(())
        }
        Command::Speed {
            command:
                SpeedCommand::Consume {
                    consume: args,
                    speed,
                    lake,
                },
        } => {
            let store = tally_speed_layer::SpeedStore::connect(&speed).await?;
            // a Redis view that lost its data is rebuilt meanwhile
            let (stop_keeper, keeper_signal) = shutdown::channel();
            let keeper = store
                .keep_whole(&lake.lake()?, speed.rebuild_settle(), keeper_signal)
                .await?;
            let stats = args.run(tally_speed_layer::SpeedSink(store)).await;
            stop_keeper.fire();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), keeper).await;
            let stats = stats?;
            eprintln!(
                "speed consume: {} records, {} events accepted, {} lines rejected, {} merchant-hours already applied, {} retries",
                stats.records, stats.accepted, stats.rejected, stats.skipped, stats.retries
            );
            Ok(())
        }
        Command::Speed {
            command:
                SpeedCommand::Rebuild {
                    speed,
                    lake,
                    wait_secs,
                },
        } => {
            let tally_speed_layer::SpeedStore::Redis(store) =
                tally_speed_layer::SpeedStore::connect(&speed).await?
            else {
                anyhow::bail!(
                    "no Redis speed view configured (TALLY_REDIS_URL): the embedded view is rebuilt by the process that holds it"
                );
            };
            let lake = lake.lake()?;
            let r = tally_speed_layer::Rebuild::new(&lake, &store)
                .settle(speed.rebuild_settle())
                .wait(std::time::Duration::from_secs(wait_secs))
                .run()
                .await?;
            println!("speed rebuild: {r}");
            Ok(())
        }
        Command::Archive {
            command:
                ArchiveCommand::Consume {
                    consume: args,
                    lake,
                },
        } => {
            let archiver = tally_batch_layer::Archiver::open(&lake.lake()?).await?;
            let stats = args
                .run(tally_batch_layer::ArchiveSink::new(archiver))
                .await?;
            eprintln!(
                "archive consume: {} records, {} events archived, {} lines quarantined, {} records already archived, {} retries",
                stats.records, stats.accepted, stats.rejected, stats.skipped, stats.retries
            );
            Ok(())
        }
        Command::Lambda {
            handler,
            lake,
            speed,
            auth,
            batch,
        } => lambda::run(&handler, lake, speed, auth, batch).await,
    }
}
