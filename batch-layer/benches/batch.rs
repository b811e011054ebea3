//! The batch job over 10 million raw events (one day, 100,000 Zipf-skewed
//! merchants) on a local lake: the whole run, and the aggregation alone, with
//! DuckDB running the same SQL over the same Parquet files in the same run as
//! the reference (scripts/bench_duckdb.py in the test venv).
//!
//! Run: `cargo bench -p tally-batch-layer --bench batch` (BENCH_EVENTS to change the size)

use std::process::Command;
use std::time::Instant;

use tally_batch_layer::{Archiver, BatchRun};
use tally_common::bucket::{MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, Record, SourceId};
use tally_testkit::zipf::zipf_records;
use tally_testkit::{venv_python, workspace_root};

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let day_ms: i64 = 1_795_564_800_000 / 86_400_000 * 86_400_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // BENCH_LAKE_DIR keeps the lake for a look afterwards (`tally sql`); default a temporary directory
    let dir = tempfile::tempdir().unwrap();
    let path = match std::env::var("BENCH_LAKE_DIR") {
        Ok(d) => {
            let _ = std::fs::remove_dir_all(&d);
            std::path::PathBuf::from(d)
        }
        Err(_) => dir.path().join("lake"),
    };
    let lake = Lake::new(path.to_str().unwrap(), None, None).unwrap();
    let now = (day_ms * 1000) + MICROS_PER_DAY + MICROS_PER_HOUR;

    // load: each hour's events as 2 batches of 1,000-event records
    let t = Instant::now();
    rt.block_on(async {
        let mut a = Archiver::open(&lake).await.unwrap();
        let per_hour = events / 24;
        let mut pos = 0u64;
        for h in 0..24 {
            let recs = zipf_records(
                per_hour,
                1000,
                100_000,
                day_ms + h * 3_600_000,
                100 + h as u64,
            );
            for half in recs.chunks(recs.len().div_ceil(2)) {
                let input: Vec<Record<'_>> = half
                    .iter()
                    .map(|r| {
                        pos += 1;
                        Record::new(Position::from_u64(pos), r)
                    })
                    .collect();
                a.archive(&SourceId::file("bench"), &input, now)
                    .await
                    .unwrap();
            }
        }
    });
    let load = t.elapsed().as_secs_f64();

    // DuckDB first, over the uncompacted files the run will read
    let sql = tally_batch_layer::sql::hourly_sql(
        "raw_events",
        day_ms * 1000,
        &(0..24)
            .map(|h| day_ms * 1000 + h * MICROS_PER_HOUR)
            .collect::<Vec<_>>(),
    );
    let duck = Command::new(venv_python())
        .arg(workspace_root().join("scripts/bench_duckdb.py"))
        .arg(path.join(Table::RawEvents.name()))
        .arg(&sql)
        .output()
        .expect("running DuckDB");
    assert!(
        duck.status.success(),
        "{}",
        String::from_utf8_lossy(&duck.stderr)
    );
    let duck_out = String::from_utf8_lossy(&duck.stdout).to_string();

    // DataFusion: the aggregation alone (same SQL, collected)
    let (df_secs, df_rows) = rt.block_on(async {
        let ctx = lake.session(&[Table::RawEvents]).await.unwrap();
        let t = Instant::now();
        let b = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        (
            t.elapsed().as_secs_f64(),
            b.iter().map(|b| b.num_rows()).sum::<usize>(),
        )
    });

    // the whole run
    let t = Instant::now();
    let report = rt
        .block_on(BatchRun::new(&lake).now(now).execute())
        .unwrap();
    let run = t.elapsed().as_secs_f64();

    println!("batch layer, {events} raw events, one day, 100,000 Zipf(1.1) merchants, 2 cores");
    println!("load (archiver, 48 commits): {load:.1}s");
    println!("| step | seconds | rows |");
    println!("|---|---|---|");
    println!("| aggregation alone, DataFusion (hourly SQL, 24 hours) | {df_secs:.2} | {df_rows} |");
    for line in duck_out.lines() {
        println!("{line}");
    }
    println!("| whole `batch run` (hourly + daily + writes + compaction) | {run:.2} | {} hourly, {} daily |", report.hourly_rows, report.daily_rows);
    println!("|  of which compute | {:.2} | |", report.compute_secs);
    println!("|  of which writes | {:.2} | |", report.write_secs);
    println!("|  of which compaction | {:.2} | |", report.compact_secs);
}
