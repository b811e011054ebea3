//! The batch job on a local lake: generated events with duplicates and late
//! arrivals; the metric tables must equal a plain computation written here,
//! independently of the registry and the SQL.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tally_batch_layer::{Archiver, BatchRun};
use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, SourceId};
use tally_common::watermark::read_progress;
use tally_testkit::events::{expected, generate, TestEvent};

use crate::{input, query_i64, records, START_MS};

pub const DAY_MS: i64 = 86_400_000;

/// Per (merchant, hour ms): [orders, gross, refunds, refunded, page_views, unique].
pub type Table6 = BTreeMap<(String, i64), [i64; 6]>;

/// The model: dedupe by (merchant, event_id, hour), first copy wins.
pub fn model_hourly(events: &[TestEvent]) -> Table6 {
    let mut seen = HashSet::new();
    let unique: Vec<TestEvent> = events
        .iter()
        .filter(|e| {
            seen.insert((
                e.merchant_id.clone(),
                e.event_id.clone(),
                e.ts_ms.div_euclid(3_600_000),
            ))
        })
        .cloned()
        .collect();
    expected(&unique)
        .into_iter()
        .map(|(k, (c, cust))| (k, [c[0], c[1], c[2], c[3], c[4], cust.len() as i64]))
        .collect()
}

pub fn model_daily(events: &[TestEvent]) -> Table6 {
    let mut seen = HashSet::new();
    let mut out: Table6 = BTreeMap::new();
    let mut customers: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    for e in events {
        if !seen.insert((
            e.merchant_id.clone(),
            e.event_id.clone(),
            e.ts_ms.div_euclid(3_600_000),
        )) {
            continue;
        }
        let key = (e.merchant_id.clone(), e.ts_ms.div_euclid(DAY_MS) * DAY_MS);
        let v = out.entry(key.clone()).or_default();
        match e.kind {
            "order" => {
                v[0] += 1;
                v[1] += e.amount.unwrap_or(0);
            }
            "refund" => {
                v[2] += 1;
                v[3] += e.amount.unwrap_or(0);
            }
            "page_view" => v[4] += 1,
            _ => {}
        }
        if let Some(c) = &e.customer_id {
            customers.entry(key).or_default().insert(c.clone());
        }
    }
    for (k, v) in out.iter_mut() {
        v[5] = customers.get(k).map_or(0, |s| s.len() as i64);
    }
    out
}

pub async fn read_table(lake: &Lake, table: &str, time_col: &str) -> Table6 {
    // merchant ids are "m<number>": read the number back as an integer column
    let sql = format!(
        "SELECT CAST(substr(merchant_id, 2) AS BIGINT), CAST(to_unixtime({time_col}) AS BIGINT) * 1000, \
         orders, gross_sales, refunds, refunded_amount, page_views, unique_customers FROM {table} \
         ORDER BY 1, 2"
    );
    let flat = query_i64(lake, &sql).await;
    flat.chunks(8)
        .map(|r| {
            (
                (format!("m{}", r[0]), r[1]),
                [r[2], r[3], r[4], r[5], r[6], r[7]],
            )
        })
        .collect()
}

pub async fn archive(lake: &Lake, name: &str, events: &[TestEvent], now: i64) {
    let mut a = Archiver::open(lake).await.unwrap();
    let recs = records(events, 200, 1);
    a.archive(&SourceId::file(name), &input(&recs), now)
        .await
        .unwrap();
}

pub fn with_duplicates(events: &[TestEvent]) -> Vec<TestEvent> {
    let mut out = events.to_vec();
    // producers resend every 10th event (same id, same content)
    out.extend(events.iter().step_by(10).cloned());
    out
}

#[tokio::test]
async fn batch_tables_equal_a_plain_computation_and_late_events_fix_their_hour() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = with_duplicates(&generate(21, 6_000, 15, START_MS, 48));
    let now = (START_MS + 2 * DAY_MS + 30 * 60_000) * 1000; // two closed days, 00:30 on day 3
    archive(&lake, "day1-2", &events, now).await;

    let report = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!(report.hours, 48);
    assert_eq!(report.days, 2);
    let w = read_progress(&lake.open(Table::MetricsHourly).await.unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(w.watermark, Some((START_MS + 2 * DAY_MS) * 1000));
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );

    // a late event for an old hour arrives; the next run fixes that hour (and its day)
    let late = TestEvent {
        event_id: "late-1".into(),
        merchant_id: "m3".into(),
        kind: "order",
        ts_ms: START_MS + 5 * 3_600_000 + 17,
        amount: Some(999),
        customer_id: Some("c-late".into()),
    };
    let now2 = now + MICROS_PER_HOUR;
    archive(&lake, "late", std::slice::from_ref(&late), now2).await;
    let r2 = BatchRun::new(&lake).now(now2).execute().await.unwrap();
    assert_eq!(r2.hours, 1, "only the late hour is dirty");
    let mut all = events.clone();
    all.push(late);
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&all)
    );

    // a rerun with nothing new changes nothing
    let r3 = BatchRun::new(&lake).now(now2).execute().await.unwrap();
    assert_eq!(r3.hours, 0);
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
}

#[tokio::test]
async fn reprocess_dry_run_reports_and_reprocess_fixes_exactly_the_affected_rows() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(5, 3_000, 8, START_MS, 24);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "d", &events, now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    let good = read_table(&lake, "metrics_hourly", "hour").await;

    // a "buggy logic" run wrote wrong numbers for hours 3..5: emulate it by deleting
    // one merchant's rows there
    let t = lake.open(Table::MetricsHourly).await.unwrap().unwrap();
    t.delete()
        .with_predicate("merchant_id = 'm1' AND hour >= '2025-11-24T03:00:00Z' AND hour < '2025-11-24T05:00:00Z'")
        .await
        .unwrap();
    let broken = read_table(&lake, "metrics_hourly", "hour").await;
    let affected = good.keys().filter(|k| !broken.contains_key(*k)).count() as u64;
    assert!(affected > 0);

    let from = (START_MS + 2 * 3_600_000) * 1000;
    let to = (START_MS + 6 * 3_600_000) * 1000;
    let dry = BatchRun::new(&lake)
        .now(now)
        .reprocess(from, to)
        .unwrap()
        .dry_run(true)
        .execute()
        .await
        .unwrap();
    let diff = dry.diff.unwrap();
    assert_eq!(diff.merchant_hours_changed, affected);
    assert!(diff.totals_after[0] > diff.totals_before[0]);
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        broken,
        "dry run wrote nothing"
    );

    let r = BatchRun::new(&lake)
        .now(now)
        .reprocess(from, to)
        .unwrap()
        .execute()
        .await
        .unwrap();
    assert_eq!(r.hours, 4);
    assert_eq!(read_table(&lake, "metrics_hourly", "hour").await, good);
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
}

#[tokio::test]
async fn a_killed_run_leaves_whole_tables_and_two_runs_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(9, 4_000, 10, START_MS, 48);
    let now = (START_MS + 2 * DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "d", &events, now).await;

    // a run killed after its first day's commit: day 1 written, progress not recorded
    BatchRun::new(&lake)
        .now(now)
        .reprocess(START_MS * 1000, (START_MS + DAY_MS) * 1000)
        .unwrap()
        .execute()
        .await
        .unwrap();
    let p = read_progress(&lake.open(Table::MetricsHourly).await.unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(p.watermark, None);
    // two runs at once: one works, the other stops with a clear message (or runs after)
    let (a, b) = tokio::join!(
        BatchRun::new(&lake).now(now).execute(),
        BatchRun::new(&lake).now(now).execute()
    );
    let errors: Vec<String> = [&a, &b]
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert!(errors.len() <= 1);
    for e in &errors {
        assert!(e.contains("another batch run"), "{e}");
    }
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );
    let p = read_progress(&lake.open(Table::MetricsHourly).await.unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(p.watermark, Some((START_MS + 2 * DAY_MS) * 1000));
    let _ = Position::from_u64(0);
}

/// The metric files of `table`'s current version: (path, rows as (merchant, time)),
/// checking on the way the layout the serving layer's lookups rely on.
fn metric_files(
    table: &tally_common::deltalake::DeltaTable,
    time_col: &str,
) -> Vec<(String, Vec<(String, i64)>)> {
    use tally_common::deltalake::arrow::array::AsArray;
    use tally_common::deltalake::arrow::datatypes::TimestampMicrosecondType;
    use tally_common::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use tally_common::deltalake::parquet::basic::{Compression, Encoding};
    use tally_common::deltalake::parquet::file::reader::{FileReader, SerializedFileReader};

    let mut out = Vec::new();
    for uri in table.get_file_uris().unwrap() {
        let path = uri.strip_prefix("file://").unwrap_or(&uri).to_string();
        let meta = SerializedFileReader::new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .metadata()
            .clone();
        for rg in meta.row_groups() {
            for c in rg.columns() {
                assert_eq!(
                    c.compression(),
                    Compression::LZ4_RAW,
                    "{path}: {}",
                    c.column_path()
                );
                assert!(
                    c.dictionary_page_offset().is_none(),
                    "{path}: a dictionary page in {}",
                    c.column_path()
                );
                assert!(
                    c.offset_index_offset().is_some(),
                    "{path}: no page index for {}",
                    c.column_path()
                );
            }
            let m = rg.column(0);
            assert_eq!(m.column_path().string(), "merchant_id");
            assert!(
                m.encodings().any(|e| e == Encoding::DELTA_BYTE_ARRAY),
                "{path}: merchant_id not delta-encoded"
            );
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let mut rows = Vec::new();
        for b in reader {
            let b = b.unwrap();
            let m = b
                .column_by_name("merchant_id")
                .unwrap()
                .as_string::<i32>()
                .clone();
            let t = b
                .column_by_name(time_col)
                .unwrap()
                .as_primitive::<TimestampMicrosecondType>()
                .clone();
            rows.extend((0..b.num_rows()).map(|i| (m.value(i).to_string(), t.value(i))));
        }
        out.push((path, rows));
    }
    out
}

#[tokio::test]
async fn hourly_runs_leave_a_closed_date_one_file_sorted_by_merchant() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    // a day and a half of events arriving as they happen; an hourly run after each hour
    let events = generate(5, 4_000, 40, START_MS, 36);
    let mut all = Vec::new();
    for h in 0..36i64 {
        let (start, end) = (START_MS + h * 3_600_000, START_MS + (h + 1) * 3_600_000);
        let hour: Vec<TestEvent> = events
            .iter()
            .filter(|e| e.ts_ms >= start && e.ts_ms < end)
            .cloned()
            .collect();
        let now = (end + 10 * 60_000) * 1000;
        if !hour.is_empty() {
            archive(&lake, &format!("hour-{h}"), &hour, now).await;
        }
        all.extend(hour);
        if h % 5 == 4 || h == 35 {
            // runs are not always hourly: some cover several hours at once
            BatchRun::new(&lake).now(now).execute().await.unwrap();
        }
    }
    // a late event for the first day makes one of its hours dirty again
    let late = TestEvent {
        event_id: "late-2".into(),
        merchant_id: "m1".into(),
        kind: "page_view",
        ts_ms: START_MS + 7 * 3_600_000 + 1,
        amount: None,
        customer_id: Some("c-late".into()),
    };
    let now = (START_MS + 36 * 3_600_000 + 20 * 60_000) * 1000;
    archive(&lake, "late", std::slice::from_ref(&late), now).await;
    all.push(late);
    assert_eq!(
        BatchRun::new(&lake).now(now).execute().await.unwrap().hours,
        1
    );

    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
    // only the first day is complete
    let day1: Vec<TestEvent> = all
        .iter()
        .filter(|e| e.ts_ms < START_MS + DAY_MS)
        .cloned()
        .collect();
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&day1)
    );

    // a closed day's partition is compacted into one file; an open day's has
    // one file per run that published some of its hours
    let closed_date = format!(
        "date={}",
        tally_common::bucket::date_string(START_MS * 1000)
    );
    for (table, time_col, closed_partition, files_there) in [
        (Table::MetricsHourly, "hour", closed_date.as_str(), 1),
        (Table::MetricsDaily, "day", "month=", 1),
    ] {
        let t = lake.open(table).await.unwrap().unwrap();
        let files = metric_files(&t, time_col);
        assert_eq!(
            files
                .iter()
                .filter(|f| f.0.contains(closed_partition))
                .count(),
            files_there,
            "{}: one file in the closed partition {closed_partition}: {:?}",
            table.name(),
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        // every file is sorted: a publish's as much as a compaction's
        for (path, rows) in files {
            assert!(!rows.is_empty());
            let bad = rows.windows(2).find(|w| w[0] >= w[1]);
            assert!(
                bad.is_none(),
                "{path}: not sorted by merchant and time: {bad:?}"
            );
        }
    }
}

/// Orders per day in `metrics_daily` (day start ms -> orders).
async fn daily_orders(lake: &Lake) -> BTreeMap<i64, i64> {
    let mut out = BTreeMap::new();
    for ((_, day), v) in read_table(lake, "metrics_daily", "day").await {
        *out.entry(day).or_default() += v[0];
    }
    out
}

/// Three orders at 01:0x UTC on `day_ms`.
fn three_orders(day_ms: i64) -> Vec<TestEvent> {
    (0..3)
        .map(|i| TestEvent {
            event_id: format!("o-{day_ms}-{i}"),
            merchant_id: "m1".into(),
            kind: "order",
            ts_ms: day_ms + 3_600_000 + i * 60_000,
            amount: Some(1_000),
            customer_id: Some(format!("c{i}")),
        })
        .collect()
}

fn at(ms: i64) -> i64 {
    ms * 1000
}

async fn run_at(lake: &Lake, now_ms: i64) -> tally_batch_layer::RunReport {
    BatchRun::new(lake).now(at(now_ms)).execute().await.unwrap()
}

#[tokio::test]
async fn a_day_gets_its_daily_row_when_the_watermark_passes_it_without_a_dirty_hour() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let d = START_MS;
    archive(&lake, "d", &three_orders(d), at(d + 3_600_000 * 2)).await;
    let m = |h: i64, min: i64| d + h * 3_600_000 + min * 60_000;

    // the 05:35 run of that day computes 01:00; the day is not complete
    let r = run_at(&lake, m(5, 35)).await;
    assert_eq!((r.hours, r.days), (1, 0));
    assert!(daily_orders(&lake).await.is_empty());
    // later runs of the same day and one inside the grace period after midnight
    for now in [m(12, 35), m(24, 3)] {
        let r = run_at(&lake, now).await;
        assert_eq!((r.hours, r.days), (0, 0));
        assert!(daily_orders(&lake).await.is_empty());
    }
    // 00:10: the watermark passes midnight with no dirty hour, and the day's row is written
    let r = run_at(&lake, m(24, 10)).await;
    assert_eq!((r.hours, r.days, r.daily_rows), (0, 1, 1));
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(d, 3)]));
    // and is not written again
    let r = run_at(&lake, m(25, 10)).await;
    assert_eq!(r.days, 0);
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&three_orders(d))
    );
}

#[tokio::test]
async fn the_reported_order_of_runs_gives_the_day_its_row() {
    // three orders at 01:0x on a day three days ago: its 05:35 run, then a normal run
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let d = START_MS;
    archive(&lake, "d", &three_orders(d), at(d + 3_600_000 * 2)).await;
    run_at(&lake, d + 5 * 3_600_000 + 35 * 60_000).await;
    let r = run_at(&lake, d + 3 * DAY_MS + 10 * 3_600_000).await;
    assert_eq!(r.days, 1);
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(d, 3)]));
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&three_orders(d))
    );
}

#[tokio::test]
async fn reprocessing_writes_complete_days_and_leaves_other_dirty_hours_to_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let (d, d2) = (START_MS, START_MS + DAY_MS);
    let now = d + 3 * DAY_MS;
    let mut all = three_orders(d);
    all.extend(three_orders(d2));
    archive(&lake, "d", &all, at(now)).await;
    // the 05:35 run of day 2: day 1 complete, day 2 not
    run_at(&lake, d2 + 5 * 3_600_000 + 35 * 60_000).await;
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(d, 3)]));

    // a late order for day 1 (before the watermark) arrives, and a reprocessing run
    // of day 2's early hours runs before the next hourly run: day 2 gets its row,
    // and the late hour stays dirty for the hourly run
    let late = TestEvent {
        event_id: "late".into(),
        merchant_id: "m2".into(),
        kind: "order",
        ts_ms: d + 7 * 3_600_000,
        amount: Some(5),
        customer_id: None,
    };
    archive(&lake, "late", std::slice::from_ref(&late), at(now)).await;
    let r = BatchRun::new(&lake)
        .now(at(now))
        .reprocess(at(d2), at(d2 + 3 * 3_600_000))
        .unwrap()
        .execute()
        .await
        .unwrap();
    assert_eq!((r.hours, r.days), (3, 1));
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(d, 3), (d2, 3)]));
    all.push(late);
    let r = run_at(&lake, now).await;
    assert_eq!(r.hours, 1, "the late hour is dirty");
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&all)
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
}

#[tokio::test]
async fn a_lake_whose_watermark_passed_a_day_without_its_row_gets_it() {
    // the state an earlier version left: the watermark past a day (its run stopped
    // between the hourly and the daily commit, or the watermark passed it in a run
    // without dirty hours), no daily mark, and another day's row already there
    use tally_common::deltalake::arrow::array::RecordBatch;
    use tally_common::deltalake::kernel::transaction::CommitProperties;
    use tally_common::deltalake::kernel::Transaction;
    use tally_common::deltalake::protocol::SaveMode;
    use tally_common::watermark::{RAW_VERSION_APP, WATERMARK_APP};

    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let (e, d) = (START_MS, START_MS + DAY_MS);
    let mut all = three_orders(e);
    all.extend(three_orders(d));
    let now = d + 2 * DAY_MS;
    archive(&lake, "d", &all, at(now)).await;
    BatchRun::new(&lake)
        .now(at(now))
        .reprocess(at(e), at(e + DAY_MS))
        .unwrap()
        .execute()
        .await
        .unwrap();
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(e, 3)]));
    let raw_version = lake
        .open(Table::RawEvents)
        .await
        .unwrap()
        .unwrap()
        .version()
        .unwrap();
    let hourly = lake.open(Table::MetricsHourly).await.unwrap().unwrap();
    hourly
        .write(vec![RecordBatch::new_empty(Table::MetricsHourly.schema())])
        .with_save_mode(SaveMode::Append)
        .with_commit_properties(
            CommitProperties::default().with_application_transactions(vec![
                Transaction::new_with_last_update(WATERMARK_APP, (d + DAY_MS) / 3_600_000, None),
                Transaction::new_with_last_update(RAW_VERSION_APP, raw_version as i64, None),
            ]),
        )
        .await
        .unwrap();

    let r = run_at(&lake, now).await;
    assert_eq!(
        (r.hours, r.days),
        (1, 1),
        "only the missing day is computed (its hour too: a lake whose runs \
         never wrote their customer_hours rows recomputes them once)"
    );
    assert_eq!(daily_orders(&lake).await, BTreeMap::from([(e, 3), (d, 3)]));
    assert_eq!(run_at(&lake, now).await.days, 0);
}

/// Where a run is killed: after its first item, or after the `k`-th commit of
/// its publish (1: customer_hours, 2: metrics_daily).
#[derive(Debug, Clone, Copy)]
enum KillAt {
    FirstItem,
    PublishCommit(usize),
}

/// A `tally batch run` killed (its runtime dropped, as a killed process) at `at`.
fn run_killed(lake: &Lake, now: i64, at: KillAt) {
    run_killed_reprocessing(lake, now, at, None)
}

/// [`run_killed`], for a reprocessing of `range` (epoch µs) when given.
fn run_killed_reprocessing(lake: &Lake, now: i64, at: KillAt, range: Option<(i64, i64)>) {
    let lake = lake.clone();
    let killed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // a short lease: the next run takes a killed run's over after 1 s
        let run = BatchRun::new(&lake)
            .now(now)
            .lease_expiry(std::time::Duration::from_secs(1));
        let run = match range {
            Some((from, to)) => run.reprocess(from, to).unwrap(),
            None => run,
        };
        rt.block_on(
            run.on_progress(move |done, total| {
                let kill = match at {
                    KillAt::FirstItem => done == 1,
                    // the publish's three commits are the last three steps
                    KillAt::PublishCommit(k) => done == total - 3 + k,
                };
                if kill {
                    panic!("killed at {at:?} (expected by the test)");
                }
            })
            .execute(),
        )
    })
    .join();
    assert!(killed.is_err(), "the run was not killed");
}

/// A run killed after its publish, before compacting: the next run, with
/// nothing to recompute, still compacts the closed days left as they were
/// (found from the tables, not from what the killed run meant to do).
#[tokio::test]
async fn compaction_a_killed_run_never_did_is_done_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(15, 2_000, 6, START_MS, 24);
    let now = at(START_MS + DAY_MS + 30 * 60_000);
    // two commits: every hour partition holds two small files
    let (a, b) = events.split_at(events.len() / 2);
    archive(&lake, "a", a, now).await;
    archive(&lake, "b", b, now).await;
    let raw_files = |lake: Lake| async move {
        lake.open(Table::RawEvents)
            .await
            .unwrap()
            .unwrap()
            .get_file_uris()
            .unwrap()
            .count()
    };
    let before = raw_files(lake.clone()).await;
    assert!(before >= 2 * 20, "{before} raw files");
    run_killed(&lake, now, KillAt::PublishCommit(3));
    assert_eq!(
        raw_files(lake.clone()).await,
        before,
        "killed before compacting"
    );
    let r = BatchRun::new(&lake)
        .now(now)
        .lease_expiry(std::time::Duration::from_secs(1))
        .wait_for_other_runs(std::time::Duration::from_secs(30))
        .execute()
        .await
        .unwrap();
    assert_eq!(r.hours, 0, "{r}");
    let after = raw_files(lake.clone()).await;
    assert!(
        after <= 24,
        "one file per hour partition after compaction: {after}"
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
}

/// A reprocess killed after its customer_hours commit leaves metrics_hourly as
/// it was and records no progress, so nothing marks its hours dirty: the next
/// run finds the unfinished publish in customer_hours' log and recomputes
/// every hour of its dates.
#[tokio::test]
async fn a_reprocess_killed_after_its_first_commit_is_redone_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(14, 2_000, 6, START_MS, 48);
    let now = at(START_MS + 2 * DAY_MS + 30 * 60_000);
    archive(&lake, "d", &events, now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    let day2 = (START_MS + DAY_MS) * 1000;
    run_killed_reprocessing(
        &lake,
        now,
        KillAt::PublishCommit(1),
        Some((day2, day2 + DAY_MS * 1000)),
    );
    // the killed run's lease is taken over once it expires
    let r = BatchRun::new(&lake)
        .now(now)
        .lease_expiry(std::time::Duration::from_secs(1))
        .wait_for_other_runs(std::time::Duration::from_secs(30))
        .execute()
        .await
        .unwrap();
    assert_eq!(
        r.hours, 24,
        "the reprocessed date's hours are recomputed: {r}"
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );
    let r = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!(r.hours, 0, "and only once: {r}");
}

/// A run killed while computing, or half way through its publish (after the
/// customer_hours commit, after the metrics_daily commit), then run again:
/// every table whole and right, no hour or day missing or doubled.
#[tokio::test]
async fn runs_killed_part_way_leave_the_tables_whole_and_right() {
    let events = generate(12, 2_000, 6, START_MS, 72);
    let now = at(START_MS + 3 * DAY_MS + 30 * 60_000);
    for at in [
        KillAt::FirstItem,
        KillAt::PublishCommit(1),
        KillAt::PublishCommit(2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
        archive(&lake, "d", &events, now).await;
        run_killed(&lake, now, at);
        // the API's tables: nothing of the killed run's hours is visible yet
        assert!(
            read_table(&lake, "metrics_hourly", "hour").await.is_empty(),
            "killed at {at:?}: metrics_hourly is published last, in one commit"
        );
        BatchRun::new(&lake)
            .now(now)
            .lease_expiry(std::time::Duration::from_secs(1))
            .wait_for_other_runs(std::time::Duration::from_secs(30))
            .execute()
            .await
            .unwrap();
        assert_eq!(
            read_table(&lake, "metrics_daily", "day").await,
            model_daily(&events),
            "killed at {at:?}, then rerun"
        );
        assert_eq!(
            read_table(&lake, "metrics_hourly", "hour").await,
            model_hourly(&events),
            "killed at {at:?}, then rerun"
        );
    }
}

/// A memory bound far below what the queries hold makes them spill to disk and
/// still give exactly the tables of a plain computation.
#[tokio::test]
async fn a_run_under_a_tiny_memory_bound_spills_and_gives_the_same_tables() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = with_duplicates(&generate(33, 60_000, 4_000, START_MS, 24));
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "day1", &events, now).await;

    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let report = BatchRun::new(&lake)
        .now(now)
        .memory(tally_batch_layer::memory::MemoryBound {
            limit: 16 << 20,
            spill_dir: Some(spill.clone()),
        })
        .execute()
        .await
        .unwrap();
    assert_eq!(report.hours, 24);
    assert!(report.spilled_bytes > 0, "nothing spilled: {report}");
    assert!(report.to_string().contains("spilled to disk"), "{report}");
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );
    // spill files are removed once the queries are done
    assert_eq!(std::fs::read_dir(&spill).unwrap().flatten().count(), 0);
}

/// `rollback` after a reprocess gives back exactly the rows (and watermark)
/// from before it; a second rollback would have to forget the first run's
/// watermark, which a Delta log cannot, and says so.
#[tokio::test]
async fn rollback_after_a_reprocess_gives_back_exactly_the_previous_rows() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(41, 4_000, 12, START_MS, 24);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "day1", &events, now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    let hourly_before = read_table(&lake, "metrics_hourly", "hour").await;
    let daily_before = read_table(&lake, "metrics_daily", "day").await;
    let progress_before = read_progress(&lake.open(Table::MetricsHourly).await.unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(hourly_before, model_hourly(&events));

    // late orders land in three hours; a reprocess of the day takes them in
    let late: Vec<TestEvent> = (0..3)
        .map(|i| TestEvent {
            event_id: format!("late-{i}"),
            merchant_id: "m1".into(),
            kind: "order",
            ts_ms: START_MS + (2 + 5 * i) * 3_600_000 + 7,
            amount: Some(1_000 + i),
            customer_id: Some(format!("c-late-{i}")),
        })
        .collect();
    archive(&lake, "late", &late, now).await;
    let r = BatchRun::new(&lake)
        .now(now)
        .reprocess(START_MS * 1000, (START_MS + DAY_MS) * 1000)
        .unwrap()
        .execute()
        .await
        .unwrap();
    assert_eq!(r.hours, 24);
    let mut all = events.clone();
    all.extend(late);
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
    assert_ne!(
        read_table(&lake, "metrics_hourly", "hour").await,
        hourly_before
    );

    let rolled = tally_batch_layer::rollback::rollback(&lake, std::time::Duration::ZERO)
        .await
        .unwrap()
        .expect("a run to roll back");
    assert_eq!(rolled.operation, "reprocess", "{rolled}");
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        hourly_before
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        daily_before
    );
    let hourly = lake.open(Table::MetricsHourly).await.unwrap().unwrap();
    assert_eq!(read_progress(&hourly).await.unwrap(), progress_before);

    // the run before is the one that set the first watermark
    let err = tally_batch_layer::rollback::rollback(&lake, std::time::Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("first that set the watermark"),
        "{err}"
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        hourly_before
    );
}

/// The same events computed in 1 part and in 7 (two side by side) give the
/// same tables, equal to a plain computation, with one merchant holding a
/// tenth of the events and of the customers (split across the parts too).
#[tokio::test]
async fn parts_add_up_to_the_same_tables_with_a_hot_merchant() {
    let mut events = with_duplicates(&generate(51, 9_000, 40, START_MS, 24));
    let hot = events.len() / 9;
    events.extend((0..hot).map(|i| TestEvent {
        event_id: format!("hot-{i}"),
        merchant_id: "m999".into(),
        kind: ["order", "refund", "page_view"][i % 3],
        ts_ms: START_MS + (i as i64 * 7_919) % DAY_MS,
        amount: (i % 3 != 2).then_some(100 + (i as i64 % 50)),
        customer_id: (i % 5 != 0).then(|| format!("hc-{}", i % 700)),
    }));
    // a producer's copies of some hot events (identical, as the contract says)
    let copies: Vec<TestEvent> = events.iter().rev().step_by(13).take(200).cloned().collect();
    events.extend(copies);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    let mut tables = Vec::new();
    for parts in [
        tally_batch_layer::parts::Parts {
            count: Some(1),
            jobs: 1,
        },
        tally_batch_layer::parts::Parts {
            count: Some(7),
            jobs: 2,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
        archive(&lake, "day1", &events, now).await;
        let r = BatchRun::new(&lake)
            .now(now)
            .parts(parts)
            .execute()
            .await
            .unwrap();
        assert_eq!(r.hours, 24);
        tables.push((
            read_table(&lake, "metrics_hourly", "hour").await,
            read_table(&lake, "metrics_daily", "day").await,
        ));
    }
    assert_eq!(tables[0], tables[1]);
    assert_eq!(tables[1].0, model_hourly(&events));
    assert_eq!(tables[1].1, model_daily(&events));
}
