//! Archiving throughput on one core: ~150-byte events in batches of 10,000 (100
//! records of 100 lines), into a local lake and into the S3 emulator.
//!
//! Then concurrency (issue 17): 1, 8 and 32 archivers (one per shard, as the
//! archiver Lambda runs one invocation per shard) committing batches of 1,000
//! events at once into one `raw_events` on the S3 emulator: commits/s and
//! events/s, each commit a Delta optimistic transaction that retries on a
//! conflict. And the log at 1 M table entries: a `raw_events` whose log lists
//! 1,000,000 files (written as Delta commit files, 10,000 adds each; the data
//! files need not exist for the log's costs): time to open it without a
//! checkpoint, to write a checkpoint, to open it from the checkpoint, and one
//! archiver commit into it.
//!
//! Run: `cargo bench -p tally-batch-layer --bench archive` (BENCH_SECTIONS:
//! `single,concurrent,checkpoint`, default all).

use std::time::Instant;

use std::sync::Arc;

use tally_batch_layer::{ArchiveSink, Archiver};
use tally_common::deltalake;
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, Record, SourceId};
use tally_stream::RecordSink as _;
use tally_testkit::zipf::zipf_records;
use tally_testkit::{cpu_secs, MotoServer};

const PER_BATCH_RECORDS: usize = 100;

async fn run(lake: &Lake, records: &[Vec<u8>], now: i64) -> (f64, f64, u64) {
    let mut a = Archiver::open(lake).await.unwrap();
    let source = SourceId::kinesis("bench", "shard-0");
    let (t, c) = (Instant::now(), cpu_secs());
    let mut n = 0;
    for (b, batch) in records.chunks(PER_BATCH_RECORDS).enumerate() {
        let input: Vec<Record<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Record::new(
                    Position::from_u64((b * PER_BATCH_RECORDS + i) as u64 + 1),
                    r,
                )
            })
            .collect();
        n += a.archive(&source, &input, now).await.unwrap().accepted;
    }
    (t.elapsed().as_secs_f64(), cpu_secs() - c, n)
}

/// `writers` shards committing `records` (in batches of `per_batch` records,
/// dealt round-robin) into `lake` at once, each with its own archiver
/// (`grouped` false: every batch its own commit, as one Lambda invocation per
/// shard does) or all through one [`ArchiveSink`] (`grouped`: batches that
/// meet share a commit). Returns wall seconds, events archived, commits made
/// (`raw_events` versions added) and batches that failed (a commit that lost
/// its race more times than Delta retries; the stream would deliver them again).
async fn concurrent(
    lake: &Lake,
    records: &[Vec<u8>],
    per_batch: usize,
    writers: usize,
    grouped: bool,
    now: i64,
) -> (f64, u64, i64, u64) {
    let version =
        |t: Option<deltalake::DeltaTable>| t.and_then(|t| t.version()).map_or(-1, |v| v as i64);
    let sink = Arc::new(ArchiveSink::new(Archiver::open(lake).await.unwrap()));
    let v0 = version(lake.open(Table::RawEvents).await.unwrap());
    let batches: Vec<&[Vec<u8>]> = records.chunks(per_batch).collect();
    let t = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let lake = lake.clone();
            let sink = sink.clone();
            let mine: Vec<Vec<Vec<u8>>> = batches
                .iter()
                .skip(w)
                .step_by(writers)
                .map(|b| b.to_vec())
                .collect();
            tokio::spawn(async move {
                let mut own = if grouped {
                    None
                } else {
                    Some(Archiver::open(&lake).await.unwrap())
                };
                let source = SourceId::kinesis("bench", &format!("shard-{w}"));
                let (mut n, mut failed) = (0, 0);
                for (b, batch) in mine.iter().enumerate() {
                    let input: Vec<Record<'_>> = batch
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            Record::new(Position::from_u64((b * 1_000 + i) as u64 + 1), r)
                        })
                        .collect();
                    let accepted = match &mut own {
                        Some(a) => a.archive(&source, &input, now).await.map(|r| r.accepted),
                        None => sink.apply(&source, &input, now).await.map(|r| r.accepted),
                    };
                    match accepted {
                        Ok(a) => n += a,
                        Err(_) => failed += 1,
                    }
                }
                (n, failed)
            })
        })
        .collect();
    let (mut n, mut failed) = (0, 0);
    for task in tasks {
        let (a, f) = task.await.unwrap();
        n += a;
        failed += f;
    }
    let wall = t.elapsed().as_secs_f64();
    let v1 = version(lake.open(Table::RawEvents).await.unwrap());
    (wall, n, v1 - v0, failed)
}

/// A `raw_events` log listing `entries` files in commits of 10,000 adds (Delta
/// commit files, after the table's own first commit), then the times to open
/// it, to checkpoint it, to open it again, and to commit one archiver batch.
async fn log_at(entries: usize, records: &[Vec<u8>], now: i64) {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    drop(Archiver::open(&lake).await.unwrap());
    let log = lake
        .table_url(Table::RawEvents)
        .to_file_path()
        .unwrap()
        .join("_delta_log");
    let first = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count() as u64;
    let per_commit = 10_000;
    let t = Instant::now();
    for c in 0..entries.div_ceil(per_commit) {
        let version = first + c as u64;
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(log.join(format!("{version:020}.json"))).unwrap(),
        );
        writeln!(
            f,
            r#"{{"commitInfo":{{"timestamp":1795600800000,"operation":"WRITE"}}}}"#
        )
        .unwrap();
        for i in 0..per_commit {
            let day = 1 + (c * per_commit + i) % 28;
            let hour = i % 24;
            writeln!(
                f,
                r#"{{"add":{{"path":"event_date=2026-11-{day:02}/event_hour={hour}/part-{c}-{i}.parquet","partitionValues":{{"event_date":"2026-11-{day:02}","event_hour":"{hour}"}},"size":400000,"modificationTime":1795600800000,"dataChange":true,"stats":"{{\"numRecords\":1000}}"}}}}"#
            )
            .unwrap();
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let t = Instant::now();
    let table = lake.open(Table::RawEvents).await.unwrap().unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let files = table.snapshot().unwrap().log_data().num_files();
    let t = Instant::now();
    deltalake::checkpoints::create_checkpoint(&table, None)
        .await
        .unwrap();
    let ckpt_s = t.elapsed().as_secs_f64();
    let ckpt_bytes: u64 = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("checkpoint.parquet")
        })
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let t = Instant::now();
    let table = lake.open(Table::RawEvents).await.unwrap().unwrap();
    let reopen_s = t.elapsed().as_secs_f64();
    drop(table);
    let t = Instant::now();
    let mut a = Archiver::open(&lake).await.unwrap();
    let archiver_open_s = t.elapsed().as_secs_f64();
    let input: Vec<Record<'_>> = records[..10]
        .iter()
        .enumerate()
        .map(|(i, r)| Record::new(Position::from_u64(i as u64 + 1), r))
        .collect();
    let t = Instant::now();
    a.archive(&SourceId::kinesis("bench", "shard-x"), &input, now)
        .await
        .unwrap();
    let commit_s = t.elapsed().as_secs_f64();
    println!(
        "\n`raw_events` log at {files} table entries ({} MB of commit files, written in {write_s:.1}s; local disk):",
        bytes / 1_000_000
    );
    println!("| step | seconds |");
    println!("|---|---|");
    println!("| open the table from its commit files (no checkpoint) | {open_s:.2} |");
    println!(
        "| write a checkpoint ({} MB) | {ckpt_s:.2} |",
        ckpt_bytes / 1_000_000
    );
    println!("| open the table from the checkpoint | {reopen_s:.2} |");
    println!("| open an archiver (both tables) | {archiver_open_s:.2} |");
    println!("| one archiver commit (1,000 events) into it | {commit_s:.2} |");
}

fn main() {
    let hour_ms = 1_795_600_800_000 / 3_600_000 * 3_600_000;
    let now = (hour_ms + 3_700_000) * 1000;
    let sections = std::env::var("BENCH_SECTIONS")
        .unwrap_or_else(|_| "single,concurrent,checkpoint".to_string());
    if sections.contains("concurrent") || sections.contains("checkpoint") {
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let records = zipf_records(400_000, 100, 100_000, hour_ms, 5);
        if sections.contains("concurrent") {
            let moto = MotoServer::start();
            for (k, v) in moto.aws_env() {
                // SAFETY: set before any other thread of the benchmark reads the environment
                unsafe { std::env::set_var(k, v) };
            }
            println!("archivers committing at once into one raw_events on the S3 emulator (moto), batches of 1,000 events, 400,000 events in all; 2 cores shared with moto");
            println!("| writers (shards) | commit | wall s | commits | commits/s | events/s | batches failed |");
            println!("|---|---|---|---|---|---|---|");
            for writers in [1usize, 8, 32] {
                for grouped in [false, true] {
                    if writers == 1 && grouped {
                        continue;
                    }
                    let bucket = format!("conc{writers}{}", if grouped { "g" } else { "" });
                    moto.create_bucket(&bucket);
                    let lake = Lake::new(
                        &format!("s3://{bucket}/lake"),
                        Some(&moto.endpoint()),
                        Some("us-east-1"),
                    )
                    .unwrap();
                    let (wall, n, commits, failed) =
                        multi.block_on(concurrent(&lake, &records, 10, writers, grouped, now));
                    println!(
                        "| {writers} | {} | {wall:.1} | {commits} | {:.1} | {:.0} | {failed} |",
                        if grouped {
                            "grouped (one committer)"
                        } else {
                            "one per batch"
                        },
                        commits as f64 / wall,
                        n as f64 / wall
                    );
                }
            }
        }
        if sections.contains("checkpoint") {
            multi.block_on(log_at(1_000_000, &records, now));
        }
    }
    if !sections.contains("single") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local_records = zipf_records(1_000_000, 100, 100_000, hour_ms, 3);
    let s3_records = zipf_records(300_000, 100, 100_000, hour_ms, 4);
    let avg = local_records.iter().map(Vec::len).sum::<usize>() / 1_000_000;

    // the local figure is the median of three runs, each into a fresh lake: the
    // disk's writeback makes single runs vary by +-15% on this machine
    let mut runs: Vec<(f64, f64, u64)> = (0..3)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let local = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
            rt.block_on(run(&local, &local_records, now))
        })
        .collect();
    let spread: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.0}", r.2 as f64 / r.0))
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (lt, lc, ln) = runs[1];

    let moto = MotoServer::start();
    moto.create_bucket("bench");
    for (k, v) in moto.aws_env() {
        // SAFETY: set before any other thread of the benchmark reads the environment
        unsafe { std::env::set_var(k, v) };
    }
    let s3 = Lake::new("s3://bench/lake", Some(&moto.endpoint()), Some("us-east-1")).unwrap();
    let (st, sc, sn) = rt.block_on(run(&s3, &s3_records, now));

    println!(
        "archiver, {avg}-byte events, batches of {} events, one commit per batch per table",
        PER_BATCH_RECORDS * 100
    );
    println!("| lake | events | wall s | events/s | CPU s |");
    println!("|---|---|---|---|---|");
    println!(
        "| local (median of 3) | {ln} | {lt:.2} | {:.0} | {lc:.2} |",
        ln as f64 / lt
    );
    println!("local runs, events/s: {}", spread.join(", "));
    println!(
        "| S3 emulator (moto) | {sn} | {st:.2} | {:.0} | {sc:.2} |",
        sn as f64 / st
    );
}
