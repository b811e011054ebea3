//! Rows in raw_events that the batch layer cannot compute, written the way
//! another Delta writer would (an older archiver, a Spark job): each is moved to
//! quarantine exactly once, with its reason, and every other merchant's metrics
//! are computed as if it had never been there.

use std::sync::Arc;

use tally_batch_layer::quarantine::{self, COMPUTABLE_UNTIL};
use tally_batch_layer::BatchRun;
use tally_common::bucket::{date_string, hour_of_day, MICROS_PER_HOUR};
use tally_common::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use tally_common::deltalake::arrow::compute::cast;
use tally_common::deltalake::arrow::datatypes::DataType;
use tally_common::deltalake::protocol::SaveMode;
use tally_common::lake::{Lake, Table};
use tally_common::watermark::read_progress;
use tally_testkit::events::generate;

use crate::job::{archive, model_daily, model_hourly, read_table, DAY_MS};
use crate::{query_i64, START_MS};

/// A row of raw_events as another writer puts it.
pub struct ForeignRow {
    pub event_id: String,
    pub merchant_id: String,
    pub event_type: &'static str,
    pub event_time: i64,
    pub amount: Option<i64>,
    /// Partition values: by default those of `event_time`, as the archiver partitions.
    pub partition: Option<(String, i32)>,
}

impl ForeignRow {
    pub fn new(id: &str, merchant: &str, event_type: &'static str, event_time: i64) -> Self {
        ForeignRow {
            event_id: id.into(),
            merchant_id: merchant.into(),
            event_type,
            event_time,
            amount: (event_type != "page_view").then_some(100),
            partition: None,
        }
    }
}

/// Append `rows` to raw_events in one commit, bypassing the archiver and its decoder.
pub async fn write_foreign(lake: &Lake, rows: &[ForeignRow], ingest_time: i64) {
    let table = lake.open_or_create(Table::RawEvents).await.unwrap();
    let part = |r: &ForeignRow| {
        r.partition.clone().unwrap_or_else(|| {
            let h = r.event_time.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR;
            (date_string(h), hour_of_day(h))
        })
    };
    let strings = |f: &dyn Fn(&ForeignRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| r.event_id.clone()),
        strings(&|r| r.merchant_id.clone()),
        strings(&|r| r.event_type.to_string()),
        ts(rows.iter().map(|r| r.event_time).collect()),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.amount).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
        ts(vec![ingest_time; rows.len()]),
        strings(&|r| format!("spark:backfill/{}", r.event_id)),
        strings(&|r| {
            format!(
                "{{\"event_id\":\"{}\",\"merchant_id\":\"{}\",\"type\":\"{}\",\"ts\":{}}}",
                r.event_id,
                r.merchant_id,
                r.event_type,
                r.event_time.div_euclid(1000)
            )
        }),
        strings(&|r| part(r).0),
        Arc::new(Int32Array::from(
            rows.iter().map(|r| part(r).1).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(Table::RawEvents.schema(), columns).unwrap();
    table
        .write(vec![batch])
        .with_save_mode(SaveMode::Append)
        .with_partition_columns(Table::RawEvents.partition_columns().iter().copied())
        .await
        .unwrap();
}

const MOVED: &str = "%moved from raw_events by the batch layer";

/// (reason, source) of the rows the batch layer moved, sorted by source.
async fn moved(lake: &Lake) -> Vec<(String, String)> {
    let ctx = lake.session(&[Table::Quarantine]).await.unwrap();
    let batches = ctx
        .sql(&format!(
            "SELECT reason, source FROM quarantine WHERE reason LIKE '{MOVED}' ORDER BY source"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in batches {
        let text = |i: usize| cast(b.column(i), &DataType::Utf8).unwrap();
        let (r, s) = (text(0), text(1));
        let (r, s) = (r.as_string::<i32>(), s.as_string::<i32>());
        for i in 0..r.len() {
            out.push((r.value(i).to_string(), s.value(i).to_string()));
        }
    }
    out
}

fn parse(s: &str) -> i64 {
    tally_common::bucket::parse_ts(s).unwrap()
}

#[tokio::test]
async fn rows_the_batch_layer_cannot_compute_are_moved_once_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    moved_once_and_the_run_goes_on(lake).await;
}

#[tokio::test]
async fn rows_the_batch_layer_cannot_compute_are_moved_once_on_s3_too() {
    let moto = tally_testkit::MotoServer::start();
    moto.create_bucket("lake");
    let mut lake = Lake::new("s3://lake/tally", Some(&moto.endpoint()), Some("us-east-1")).unwrap();
    for (k, v) in moto.aws_env() {
        lake = lake.with_option(k, &v);
    }
    moved_once_and_the_run_goes_on(lake).await;
}

async fn moved_once_and_the_run_goes_on(lake: Lake) {
    let events = generate(31, 3_000, 12, START_MS, 24);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "good", &events, now).await;

    let day = START_MS * 1000;
    let h = |x: i64| day + x * MICROS_PER_HOUR;
    let mut misplaced = ForeignRow::new("bad-misplaced", "m900", "order", h(5) + 1);
    misplaced.partition = Some((date_string(day), 3));
    let mut min_time = ForeignRow::new("bad-min", "m901", "order", i64::MIN);
    min_time.partition = Some((date_string(day), 2));
    let mut huge = ForeignRow::new("bad-amount", "m902", "order", h(4) + 7);
    huge.amount = Some(i64::MAX);
    let mut garbage = ForeignRow::new("bad-partition", "m903", "order", h(7));
    garbage.partition = Some(("not-a-date".into(), 7));
    let mut hour_24 = ForeignRow::new("bad-hour", "m904", "page_view", h(7));
    hour_24.partition = Some((date_string(day), 24));
    let foreign = vec![
        // the report's row, partitioned as the archiver partitions it
        ForeignRow::new("x1", "m905", "page_view", parse("1600-01-01T00:00:00Z")),
        misplaced,
        min_time,
        huge,
        garbage,
        hour_24,
        // past what nanosecond timestamps hold (and never closing)
        ForeignRow::new("bad-future", "m906", "order", COMPUTABLE_UNTIL + 5),
    ];
    write_foreign(&lake, &foreign, now).await;

    let report = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!(report.quarantined, 7);
    assert_eq!(report.hours, 24);
    assert_eq!(report.days, 1);
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
    assert_eq!(p.watermark, Some((START_MS + DAY_MS) * 1000));

    let expect = [
        ("spark:backfill/bad-amount", "out_of_range: amount 9223372036854775807"),
        ("spark:backfill/bad-future", "out_of_range: event_time 2262-04-11T00:00:00.000005Z cannot be computed"),
        ("spark:backfill/bad-hour", "invalid_partition: event_date=2025-11-24/event_hour=24 names no hour"),
        ("spark:backfill/bad-min", "out_of_range: event_time @-9223372036854775808µs cannot be computed"),
        ("spark:backfill/bad-misplaced", "misplaced: event_time 2025-11-24T05:00:00.000001Z is not in its partition event_date=2025-11-24/event_hour=3"),
        ("spark:backfill/bad-partition", "invalid_partition: event_date=not-a-date/event_hour=7"),
        ("spark:backfill/x1", "out_of_range: event_time 1600-01-01T00:00:00Z cannot be computed"),
    ];
    let check = |got: Vec<(String, String)>| {
        assert_eq!(got.len(), expect.len(), "{got:#?}");
        for ((reason, source), (s, r)) in got.iter().zip(expect) {
            assert_eq!(source, s);
            assert!(reason.starts_with(r), "{reason} does not start with {r}");
        }
    };
    check(moved(&lake).await);
    let left = query_i64(
        &lake,
        "SELECT COUNT(*) FROM raw_events WHERE source LIKE 'spark:%'",
    )
    .await;
    assert_eq!(left, [0], "moved rows are gone from raw_events");
    assert_eq!(
        query_i64(&lake, "SELECT COUNT(*) FROM raw_events").await,
        [events.len() as i64]
    );

    // a rerun (and a later one) finds nothing more and moves nothing twice
    for later in [now, now + DAY_MS * 1000] {
        let r = BatchRun::new(&lake).now(later).execute().await.unwrap();
        assert_eq!(r.quarantined, 0);
        check(moved(&lake).await);
    }
}

#[tokio::test]
async fn a_run_stopped_between_the_quarantine_write_and_the_raw_delete_writes_no_row_twice() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(32, 1_000, 5, START_MS, 24);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "good", &events, now).await;
    let bad = [
        ForeignRow::new("x1", "m900", "page_view", parse("1600-01-01T00:00:00Z")),
        ForeignRow::new("x2", "m901", "order", parse("1601-06-01T10:00:00Z")),
    ];
    write_foreign(&lake, &bad, now).await;

    // what a run killed right after its quarantine commit leaves behind
    let raw = lake.open(Table::RawEvents).await.unwrap().unwrap();
    let files = tally_batch_layer::dirty::raw_files(&raw).unwrap();
    let found = quarantine::screen(&raw, &files, &Default::default(), now, &Default::default())
        .await
        .unwrap();
    assert_eq!(found.rows.len(), 2);
    assert_eq!(quarantine::write(&lake, &found).await.unwrap(), 2);
    assert_eq!(moved(&lake).await.len(), 2);
    // the rerun of that write (same snapshot) finds the marks
    assert_eq!(quarantine::write(&lake, &found).await.unwrap(), 0);

    let r = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!(r.quarantined, 0, "the rows were in quarantine already");
    assert_eq!(moved(&lake).await.len(), 2);
    assert_eq!(
        query_i64(
            &lake,
            "SELECT COUNT(*) FROM raw_events WHERE source LIKE 'spark:%'"
        )
        .await,
        [0]
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
}

#[tokio::test]
async fn a_dry_run_reports_the_rows_it_would_move_and_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(33, 1_000, 5, START_MS, 24);
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    archive(&lake, "good", &events, now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    let good = read_table(&lake, "metrics_hourly", "hour").await;

    // a late misplaced row inside an hour already computed
    let mut late = ForeignRow::new("late-bad", "m1", "order", (START_MS + 9 * 3_600_000) * 1000);
    late.partition = Some((date_string(START_MS * 1000), 2));
    write_foreign(&lake, &[late], now).await;
    let from = START_MS * 1000;
    let dry = BatchRun::new(&lake)
        .now(now)
        .reprocess(from, from + DAY_MS * 1000)
        .unwrap()
        .dry_run(true)
        .execute()
        .await
        .unwrap();
    assert_eq!(dry.quarantined, 1);
    assert_eq!(
        dry.diff.unwrap().merchant_hours_changed,
        0,
        "the row is left out"
    );
    assert!(moved(&lake).await.is_empty());

    let r = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!((r.quarantined, r.hours), (1, 1));
    assert_eq!(read_table(&lake, "metrics_hourly", "hour").await, good);
    assert_eq!(moved(&lake).await.len(), 1);
}

#[tokio::test]
async fn a_day_closing_screens_its_hours_that_no_run_screened() {
    // an hour an earlier version processed, with another writer's misplaced row in
    // it: the watermark is past it, so it is not dirty, but its day's row reads it
    use tally_common::deltalake::kernel::transaction::CommitProperties;
    use tally_common::deltalake::kernel::Transaction;
    use tally_common::watermark::{RAW_VERSION_APP, WATERMARK_APP};

    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let day = START_MS * 1000;
    let now = (START_MS + DAY_MS + 10 * 60_000) * 1000;
    let events = generate(34, 500, 5, START_MS, 5);
    archive(&lake, "good", &events, now).await;
    let mut misplaced = ForeignRow::new("old-bad", "m1", "order", day + 6 * MICROS_PER_HOUR);
    misplaced.partition = Some((date_string(day), 3));
    write_foreign(&lake, &[misplaced], now).await;
    let raw_version = lake
        .open(Table::RawEvents)
        .await
        .unwrap()
        .unwrap()
        .version()
        .unwrap();
    lake.open_or_create(Table::MetricsHourly)
        .await
        .unwrap()
        .write(vec![RecordBatch::new_empty(Table::MetricsHourly.schema())])
        .with_save_mode(SaveMode::Append)
        .with_commit_properties(
            CommitProperties::default().with_application_transactions(vec![
                Transaction::new_with_last_update(WATERMARK_APP, START_MS / 3_600_000 + 5, None),
                Transaction::new_with_last_update(RAW_VERSION_APP, raw_version as i64, None),
            ]),
        )
        .await
        .unwrap();

    let r = BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!((r.quarantined, r.days), (1, 1));
    assert_eq!(
        r.hours, 5,
        "the hour the row left is recomputed, with the day's other hours: no run wrote \
         their customer_hours rows (the watermark above was set by hand)"
    );
    let got = moved(&lake).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].0.starts_with("misplaced: "), "{got:?}");
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );
    let hour_3 = |t: &crate::job::Table6| -> crate::job::Table6 {
        t.iter()
            .filter(|((_, h), _)| *h == START_MS + 3 * 3_600_000)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(
        hour_3(&read_table(&lake, "metrics_hourly", "hour").await),
        hour_3(&model_hourly(&events))
    );
}
