//! `tally ingest [FILE|-]`: NDJSON events into the pipeline.
//!
//! Every line is a record of the source `file/NAME` whose position is its line
//! number (1-based, blank lines counted; [`LineBatch`]), so the position of an event does not
//! depend on how the input is cut: chunks of `--chunk-lines` lines are only the
//! unit of a commit. A rerun with any chunking (also after a kill part way) skips
//! the lines already archived and applied, since both `raw_events` and the speed
//! view keep per-source marks; a file that grew since is taken up at the line
//! where the last run stopped. A last line without its newline that is not
//! valid JSON yet (a writer still appending) is left for the next run. With
//! `--kinesis STREAM` the events go onto the stream instead
//! ([`KinesisProducer`]: PutRecords, partition key = merchant, retrying only
//! failed entries).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tally_common::bucket::now_micros;
use tally_common::config::{LakeArgs, SpeedArgs};
use tally_common::source::SourceId;
use tally_speed_layer::SpeedStore;
use tally_stream::{kinesis_client, KinesisProducer, LineBatch, Salting};

/// Events per Kinesis record (NDJSON lines of one merchant) that `tally ingest
/// --kinesis` puts by default and `tally gen --kinesis` always puts.
const EVENTS_PER_RECORD: usize = 100;

/// Arguments of `tally ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// NDJSON file to ingest, or `-` for standard input.
    #[arg(default_value = "-")]
    pub input: String,
    /// Put the events on this Kinesis stream instead of writing the lake.
    #[arg(long, value_name = "STREAM")]
    pub kinesis: Option<String>,
    /// With --kinesis: salt the partition key of a merchant sending more than
    /// this many events a second (`merchant_id#n`), so it spans shards; 0: never.
    #[arg(long, default_value_t = 0)]
    pub salt_above: u64,
    /// With --salt-above: salts per hot merchant (at most this many shards each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub salt_ways: u32,
    /// Stable name of the source for exactly-once reruns (default: the file's absolute path;
    /// required to make standard input rerunnable).
    #[arg(long)]
    pub source_name: Option<String>,
    /// Lines per chunk (one Delta commit and one speed batch per chunk); positions are
    /// line numbers whatever the chunking.
    #[arg(long, default_value_t = 50_000)]
    pub chunk_lines: usize,
    /// Events per Kinesis record (NDJSON lines of one merchant) with --kinesis.
    #[arg(long, default_value_t = EVENTS_PER_RECORD)]
    pub events_per_record: usize,
    #[command(flatten)]
    pub lake: LakeArgs,
    #[command(flatten)]
    pub speed: SpeedArgs,
}

struct Input {
    reader: Box<dyn BufRead + Send>,
    size: Option<u64>,
    name: String,
}

fn open_input(args: &IngestArgs) -> anyhow::Result<Input> {
    if args.input == "-" {
        let name = args
            .source_name
            .clone()
            .unwrap_or_else(|| format!("stdin-{}", uuid::Uuid::new_v4()));
        return Ok(Input {
            reader: Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())),
            size: None,
            name,
        });
    }
    let path = PathBuf::from(&args.input);
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().ok().map(|m| m.len());
    let name = match &args.source_name {
        Some(n) => n.clone(),
        None => std::fs::canonicalize(&path)?.display().to_string(),
    };
    Ok(Input {
        reader: Box::new(BufReader::with_capacity(1 << 20, file)),
        size,
        name,
    })
}

fn progress(size: Option<u64>) -> indicatif::ProgressBar {
    crate::progress_bar(
        size,
        "{spinner} {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}",
    )
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    if let Some(stream) = args.kinesis.clone() {
        return put_on_kinesis(args, &stream).await;
    }
    let mut input = open_input(&args)?;
    let lake = args.lake.lake()?;
    let mut archiver = tally_batch_layer::Archiver::open(&lake).await?;
    let speed = match &args.speed.redis_url {
        Some(_) => Some(SpeedStore::connect(&args.speed).await?),
        // the embedded store lives in the serving process, which rebuilds it from raw_events
        None => None,
    };
    let source = SourceId::file(&input.name);
    let bar = progress(input.size);
    let (mut accepted, mut quarantined, mut blank, mut already) = (0u64, 0u64, 0u64, 0u64);
    let mut chunk = LineBatch::with_capacity(args.chunk_lines.min(1 << 20) * 200);
    loop {
        chunk.read_from(input.reader.as_mut(), args.chunk_lines)?;
        if chunk.is_empty() {
            break;
        }
        let records = chunk.records();
        let now = now_micros();
        let report = archiver.archive(&source, &records, now).await?;
        already += report.already_archived;
        accepted += report.accepted;
        quarantined += report.quarantined;
        blank += report.blank;
        if let Some(store) = &speed {
            let settle = args.speed.rebuild_settle();
            tally_speed_layer::apply_records_and_fill(
                store,
                &lake,
                settle,
                source.clone(),
                records,
                now,
            )
            .await?;
        }
        bar.inc(chunk.bytes() as u64);
        bar.set_message(format!("{accepted} accepted, {quarantined} quarantined"));
    }
    bar.finish_and_clear();
    println!(
        "ingest {}: {accepted} accepted, {quarantined} quarantined, {blank} blank lines skipped, {already} lines already ingested",
        input.name
    );
    if chunk.held_back() {
        println!(
            "ingest {}: line {} has no newline and is not valid JSON yet; it is taken up by the next run",
            input.name,
            chunk.last_line() + 1
        );
    }
    Ok(())
}

async fn put_on_kinesis(args: IngestArgs, stream: &str) -> anyhow::Result<()> {
    let mut input = open_input(&args)?;
    let mut producer = KinesisProducer::new(kinesis_client().await, stream, args.events_per_record)
        .with_salting(Salting {
            above_per_sec: args.salt_above,
            ways: args.salt_ways,
        });
    let bar = progress(input.size);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input.reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        bar.inc(n as u64);
        producer.push_line(&line).await?;
    }
    producer.flush_all().await?;
    bar.finish_and_clear();
    println!(
        "ingest {} -> kinesis {stream}: {} events in {} records ({} with a salted key; {} entries retried)",
        input.name, producer.events, producer.records, producer.salted_records, producer.retried
    );
    Ok(())
}

/// `tally gen --kinesis STREAM`: generated lines onto a stream, keeping to `--rate`.
pub async fn generate_to_kinesis(args: &crate::gen::GenArgs, stream: &str) -> anyhow::Result<()> {
    let mut producer = KinesisProducer::new(kinesis_client().await, stream, EVENTS_PER_RECORD)
        .with_salting(Salting {
            above_per_sec: args.salt_above,
            ways: args.salt_ways,
        });
    let mut generator = crate::gen::Generator::new(args)?;
    producer
        .put_paced(|line| generator.next_into(line).then(|| generator.due()))
        .await?;
    println!(
        "gen -> kinesis {stream}: {} events in {} records ({} with a salted key; {} entries retried)",
        producer.events, producer.records, producer.salted_records, producer.retried
    );
    Ok(())
}
