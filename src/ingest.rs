//! `tally ingest [FILE|-]`: NDJSON events into the pipeline.
//!
//! Every line is a record of the source `file/NAME` whose position is its line
//! number (1-based, blank lines counted), so the position of an event does not
//! depend on how the input is cut: chunks of `--chunk-lines` lines are only the
//! unit of a commit. A rerun with any chunking (also after a kill part way) skips
//! the lines already archived and applied, since both `raw_events` and the speed
//! view keep per-source marks; a file that grew since is taken up at the line
//! where the last run stopped. A last line without its newline that is not
//! valid JSON yet (a writer still appending) is left for the next run. With
//! `--kinesis STREAM` the events go onto the stream instead (PutRecords,
//! partition key = merchant, retrying only failed entries).

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tally_common::bucket::now_micros;
use tally_common::config::{LakeArgs, SpeedArgs};
use tally_common::source::{Position, SourceId};
use tally_speed_layer::SpeedStore;

/// Arguments of `tally ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// NDJSON file to ingest, or `-` for standard input.
    #[arg(default_value = "-")]
    pub input: String,
    /// Put the events on this Kinesis stream instead of writing the lake.
    #[arg(long, value_name = "STREAM")]
    pub kinesis: Option<String>,
    /// Stable name of the source for exactly-once reruns (default: the file's absolute path;
    /// required to make standard input rerunnable).
    #[arg(long)]
    pub source_name: Option<String>,
    /// Lines per chunk (one Delta commit and one speed batch per chunk); positions are
    /// line numbers whatever the chunking.
    #[arg(long, default_value_t = 50_000)]
    pub chunk_lines: usize,
    /// Events per Kinesis record (NDJSON lines of one merchant) with --kinesis.
    #[arg(long, default_value_t = 100)]
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

fn progress(size: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match size {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A chunk of whole lines read from the input: the lines as records whose
/// positions are their line numbers.
struct Chunk {
    buf: Vec<u8>,
    /// (line number, start, end) of each line in `buf`, newline included.
    lines: Vec<(u64, usize, usize)>,
    /// A last line without its newline that is not valid JSON yet: held back.
    held_back: bool,
}

impl Chunk {
    fn records(&self) -> Vec<(Position, &[u8])> {
        self.lines
            .iter()
            .map(|&(n, a, b)| (Position::from_u64(n), &self.buf[a..b]))
            .collect()
    }
}

/// Read the lines after line `done` up to `lines` of them; empty at end of input.
fn next_chunk(
    reader: &mut dyn BufRead,
    lines: usize,
    done: &mut u64,
    chunk: &mut Chunk,
) -> anyhow::Result<()> {
    chunk.buf.clear();
    chunk.lines.clear();
    while chunk.lines.len() < lines {
        let start = chunk.buf.len();
        let read = reader
            .read_until(b'\n', &mut chunk.buf)
            .context("reading input")?;
        if read == 0 {
            break;
        }
        if !chunk.buf.ends_with(b"\n") && is_incomplete(&chunk.buf[start..]) {
            // a writer may still be appending this line: it is taken up, whole, next time
            chunk.buf.truncate(start);
            chunk.held_back = true;
            break;
        }
        *done += 1;
        chunk.lines.push((*done, start, chunk.buf.len()));
    }
    Ok(())
}

/// Whether a last line without a newline looks cut short: not blank and not a
/// JSON value (a line cut part way is never valid JSON).
fn is_incomplete(line: &[u8]) -> bool {
    let line = tally_common::decode::strip_bom(line);
    !line.iter().all(u8::is_ascii_whitespace)
        && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err()
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
    let mut chunk = Chunk {
        buf: Vec::with_capacity(args.chunk_lines.min(1 << 20) * 200),
        lines: Vec::new(),
        held_back: false,
    };
    let mut line_no = 0u64;
    loop {
        next_chunk(
            input.reader.as_mut(),
            args.chunk_lines.max(1),
            &mut line_no,
            &mut chunk,
        )?;
        if chunk.lines.is_empty() {
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
            let o = tally_speed_layer::apply_records(store, source.clone(), records, now).await?;
            if let (true, SpeedStore::Redis(redis)) = (o.report.view_created, store) {
                // the view is new: fill what it can own from raw_events now, without
                // waiting (a running `tally serve` or `tally speed consume` finishes it)
                let r = tally_speed_layer::Rebuild::new(&lake, redis)
                    .settle(args.speed.rebuild_settle())
                    .wait(Duration::ZERO)
                    .run()
                    .await?;
                tracing::info!(
                    complete = r.complete,
                    events = r.events,
                    "speed view rebuild"
                );
            }
        }
        bar.inc(chunk.buf.len() as u64);
        bar.set_message(format!("{accepted} accepted, {quarantined} quarantined"));
    }
    bar.finish_and_clear();
    println!(
        "ingest {}: {accepted} accepted, {quarantined} quarantined, {blank} blank lines skipped, {already} lines already ingested",
        input.name
    );
    if chunk.held_back {
        println!(
            "ingest {}: line {} has no newline and is not valid JSON yet; it is taken up by the next run",
            input.name,
            line_no + 1
        );
    }
    Ok(())
}

async fn put_on_kinesis(args: IngestArgs, stream: &str) -> anyhow::Result<()> {
    let mut input = open_input(&args)?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_kinesis::Client::new(&config);
    let mut producer = KinesisProducer::new(client, stream, args.events_per_record);
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
        "ingest {} -> kinesis {stream}: {} events in {} records ({} entries retried)",
        input.name, producer.events, producer.records, producer.retried
    );
    Ok(())
}

/// `tally gen --kinesis STREAM`: generated lines onto a stream, keeping to `--rate`.
pub async fn generate_to_kinesis(args: &crate::gen::GenArgs, stream: &str) -> anyhow::Result<()> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_kinesis::Client::new(&config);
    let mut producer = KinesisProducer::new(client, stream, 100);
    let mut generator = crate::gen::Generator::new(args)?;
    let mut line = String::new();
    let started = std::time::Instant::now();
    let mut since_flush = 0u32;
    while generator.next_into(&mut line) {
        producer.push_line(line.as_bytes()).await?;
        since_flush += 1;
        if let Some(due) = generator.due() {
            let ahead = due.saturating_sub(started.elapsed());
            if since_flush >= 1_000 || ahead > Duration::from_millis(200) {
                producer.flush_all().await?;
                since_flush = 0;
                tokio::time::sleep(ahead).await;
            }
        }
    }
    producer.flush_all().await?;
    println!(
        "gen -> kinesis {stream}: {} events in {} records ({} entries retried)",
        producer.events, producer.records, producer.retried
    );
    Ok(())
}

/// The most a PutRecords request may carry (Kinesis: 5 MiB including partition keys).
const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;

/// Groups NDJSON lines by merchant into records and puts them with PutRecords.
pub struct KinesisProducer {
    client: aws_sdk_kinesis::Client,
    stream: String,
    per_record: usize,
    open: std::collections::HashMap<String, (Vec<u8>, usize)>,
    ready: Vec<(String, Vec<u8>)>,
    pub events: u64,
    pub records: u64,
    pub retried: u64,
}

/// The partition key of a line: its merchant id, or a fixed key for unparsable lines
/// (they go to quarantine from any shard).
fn partition_key(line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Key<'a> {
        #[serde(borrow)]
        merchant_id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Key<'_>>(tally_common::decode::strip_bom(line))
        .ok()
        .and_then(|k| k.merchant_id)
        .filter(|m| !m.is_empty() && m.len() <= 256)
        .map_or_else(|| "_unkeyed".to_string(), |m| m.into_owned())
}

impl KinesisProducer {
    pub fn new(client: aws_sdk_kinesis::Client, stream: &str, per_record: usize) -> Self {
        KinesisProducer {
            client,
            stream: stream.to_string(),
            per_record: per_record.max(1),
            open: Default::default(),
            ready: Vec::new(),
            events: 0,
            records: 0,
            retried: 0,
        }
    }

    pub async fn push_line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let key = partition_key(line);
        let entry = self.open.entry(key.clone()).or_default();
        entry.0.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            entry.0.push(b'\n');
        }
        entry.1 += 1;
        self.events += 1;
        if entry.1 >= self.per_record || entry.0.len() > 512 * 1024 {
            if let Some((data, _)) = self.open.remove(&key) {
                self.ready.push((key, data));
            }
        }
        if self.ready.len() >= 500 {
            self.flush_ready().await?;
        }
        Ok(())
    }

    pub async fn flush_all(&mut self) -> anyhow::Result<()> {
        let open: Vec<_> = self.open.drain().map(|(k, (d, _))| (k, d)).collect();
        self.ready.extend(open);
        while !self.ready.is_empty() {
            self.flush_ready().await?;
        }
        Ok(())
    }

    async fn flush_ready(&mut self) -> anyhow::Result<()> {
        use aws_sdk_kinesis::primitives::Blob;
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;
        // a PutRecords request carries at most 500 records and 5 MiB (data and
        // partition keys together)
        let mut take = 0;
        let mut bytes = 0;
        for (k, d) in self.ready.iter().take(500) {
            let size = k.len() + d.len();
            if take > 0 && bytes + size > MAX_PUT_RECORDS_BYTES {
                break;
            }
            bytes += size;
            take += 1;
        }
        let mut pending: Vec<(String, Vec<u8>)> = self.ready.drain(..take).collect();
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            let sent = pending.len();
            let entries = pending
                .iter()
                .map(|(k, d)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(k)
                        .data(Blob::new(d.clone()))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await;
            let out = match out {
                Ok(o) => o,
                Err(e)
                    if attempt < 10
                        && !e.as_service_error().is_some_and(|s| {
                            s.is_invalid_argument_exception()
                                || s.is_resource_not_found_exception()
                                || s.is_access_denied_exception()
                        }) =>
                {
                    tracing::warn!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "PutRecords failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => anyhow::bail!(
                    "PutRecords to {}: {}",
                    self.stream,
                    aws_sdk_kinesis::error::DisplayErrorContext(e)
                ),
            };
            let failed: Vec<(String, Vec<u8>)> = out
                .records
                .iter()
                .zip(pending.drain(..))
                .filter(|(r, _)| r.error_code.is_some())
                .map(|(_, p)| p)
                .collect();
            self.records += (sent - failed.len()) as u64;
            if failed.is_empty() {
                return Ok(());
            }
            self.retried += failed.len() as u64;
            pending = failed;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        anyhow::bail!(
            "PutRecords to {}: {} entries still failing after retries",
            self.stream,
            pending.len()
        )
    }
}
