//! Compaction while late events of the same closed day keep arriving, one per
//! commit, through the archiver: every batch run and every compaction succeeds,
//! and no row is lost or doubled.

use std::collections::BTreeSet;

use tally_batch_layer::compact::compact_days;
use tally_batch_layer::{Archiver, BatchRun};
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, Record, SourceId};
use tally_testkit::events::TestEvent;

use tally_common::bucket::date_string;

use crate::job::DAY_MS;
use crate::quarantine::{write_foreign, ForeignRow};
use crate::{query_i64, START_MS};

fn order(prefix: &str, i: i64) -> TestEvent {
    TestEvent {
        event_id: format!("{prefix}-{i}"),
        merchant_id: format!("m{}", i % 20),
        kind: "order",
        ts_ms: START_MS + (i % 24) * 3_600_000 + i,
        amount: Some(100 + i),
        customer_id: Some(format!("c{}", i % 50)),
    }
}

/// Archive `events` one per commit (one record, one source position each).
async fn append_one_by_one(lake: Lake, source: &'static str, events: Vec<TestEvent>, now: i64) {
    let mut a = Archiver::open(&lake).await.unwrap();
    let src = SourceId::file(source);
    for (i, e) in events.iter().enumerate() {
        let line = e.to_line(true) + "\n";
        let r = a
            .archive(
                &src,
                &[Record::new(
                    Position::from_u64(i as u64 + 1),
                    line.as_bytes(),
                )],
                now,
            )
            .await
            .unwrap();
        assert_eq!(r.accepted, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_late_events_never_fails_nor_loses_or_doubles_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let now = (START_MS + DAY_MS + 30 * 60_000) * 1000;
    let day: BTreeSet<i64> = [START_MS * 1000].into();

    // 2,000 orders of a closed day in 40 commits, then the hourly run (which compacts it)
    let mut a = Archiver::open(&lake).await.unwrap();
    for chunk in 0..40 {
        let text: String = (chunk * 50..(chunk + 1) * 50)
            .map(|i| order("o", i).to_line(true) + "\n")
            .collect();
        a.archive(
            &SourceId::file(&format!("day-{chunk}")),
            &[Record::new(Position::from_u64(1), text.as_bytes())],
            now,
        )
        .await
        .unwrap();
    }
    BatchRun::new(&lake).now(now).execute().await.unwrap();

    // another writer's misplaced row in that day (moved to quarantine by the first
    // looping run, while the appends go on), then 600 late orders of that day, one
    // per commit, while the hourly run loops
    let mut misplaced = ForeignRow::new(
        "misplaced",
        "m1",
        "order",
        (START_MS + 5 * 3_600_000) * 1000,
    );
    misplaced.partition = Some((date_string(START_MS * 1000), 2));
    write_foreign(&lake, &[misplaced], now).await;
    let late: Vec<TestEvent> = (0..600).map(|i| order("late", i)).collect();
    let appender = tokio::spawn(append_one_by_one(lake.clone(), "late", late, now));
    let mut runs = 0;
    while !appender.is_finished() {
        let r = BatchRun::new(&lake).now(now).execute().await;
        assert!(r.is_ok(), "run {runs} failed: {}", r.unwrap_err());
        runs += 1;
    }
    appender.await.unwrap();
    assert!(runs >= 2, "the runs raced the appends ({runs} runs)");

    // compaction alone in a tight loop against 300 more
    let later: Vec<TestEvent> = (0..300).map(|i| order("later", i)).collect();
    let appender = tokio::spawn(append_one_by_one(lake.clone(), "later", later, now));
    let mut compactions = 0;
    let mut rewritten = 0;
    while !appender.is_finished() {
        let r = compact_days(&lake, &day).await;
        let r = r.unwrap_or_else(|e| panic!("compaction {compactions} failed: {e}"));
        rewritten += r.rows_rewritten;
        compactions += 1;
    }
    appender.await.unwrap();
    assert!(
        compactions >= 2 && rewritten > 0,
        "{compactions} compactions"
    );

    BatchRun::new(&lake).now(now).execute().await.unwrap();
    assert_eq!(
        query_i64(
            &lake,
            "SELECT COUNT(*) FROM quarantine WHERE reason LIKE 'misplaced:%'"
        )
        .await,
        [1]
    );
    assert_eq!(
        query_i64(
            &lake,
            "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM raw_events"
        )
        .await,
        [2_900, 2_900]
    );
    assert_eq!(
        query_i64(
            &lake,
            "SELECT CAST(SUM(orders) AS BIGINT) FROM metrics_hourly"
        )
        .await,
        [2_900]
    );
    assert_eq!(
        query_i64(
            &lake,
            "SELECT CAST(SUM(orders) AS BIGINT) FROM metrics_daily"
        )
        .await,
        [2_900]
    );
    // the day ends up compacted: few files for its 24 hours
    let raw = lake.open(Table::RawEvents).await.unwrap().unwrap();
    let files = tally_batch_layer::dirty::raw_files(&raw).unwrap();
    assert!(files.len() <= 48, "{} files", files.len());
}
