//! Archiving throughput on one core: ~150-byte events in batches of 10,000 (100
//! records of 100 lines), into a local lake and into the S3 emulator.
//!
//! Run: `cargo bench -p tally-batch-layer --bench archive`

use std::time::Instant;

use tally_batch_layer::Archiver;
use tally_common::lake::Lake;
use tally_common::source::{Position, Record, SourceId};
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

fn main() {
    let hour_ms = 1_795_600_800_000 / 3_600_000 * 3_600_000;
    let now = (hour_ms + 3_700_000) * 1000;
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
