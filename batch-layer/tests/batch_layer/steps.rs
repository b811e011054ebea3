//! The batch layer as Step Functions runs it on AWS: the batch Lambda's steps
//! (plan, parts, publish, compact) on an S3 lake, with parts computed by two
//! processes at once and retried, a publish retried after it landed, and a
//! publish that lost to another run's.

use serde_json::{json, Value};
use tally_batch_layer::job::PLAN_NAME;
use tally_batch_layer::plan::Plan;
use tally_batch_layer::run_request::handle;
use tally_batch_layer::stage::Staging;
use tally_common::config::BatchArgs;
use tally_common::lake::{Lake, Table};
use tally_testkit::events::generate;

use crate::job::{archive, model_daily, model_hourly, read_table, with_duplicates};
use crate::START_MS;

const DAY_MS: i64 = 86_400_000;

fn args() -> BatchArgs {
    BatchArgs {
        grace_minutes: 5,
        lease_secs: 120,
        memory_limit: 256 << 20,
        spill_dir: None,
    }
}

/// Compute `items` of run `run_id` in a process of its own (a thread with its
/// own runtime, as a Lambda invocation is), each with the part step's payload.
fn compute_in_another_process(
    lake: &Lake,
    run_id: &str,
    items: Vec<usize>,
) -> std::thread::JoinHandle<()> {
    let (lake, run_id) = (lake.clone(), run_id.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for i in items {
            let out = rt
                .block_on(handle(
                    &lake,
                    &args(),
                    &json!({"step": "part", "run_id": run_id, "item": i}),
                ))
                .unwrap();
            assert_eq!(out["item"], i);
        }
    })
}

#[tokio::test]
async fn the_state_machines_steps_on_s3_give_the_tables_of_one_run() {
    let moto = tally_testkit::MotoServer::start();
    moto.create_bucket("lake");
    let mut lake = Lake::new("s3://lake/tally", Some(&moto.endpoint()), Some("us-east-1")).unwrap();
    for (k, v) in moto.aws_env() {
        lake = lake.with_option(k, &v);
    }
    let events = with_duplicates(&generate(41, 4_000, 12, START_MS, 48));
    archive(&lake, "two-days", &events, (START_MS + 2 * DAY_MS) * 1000).await;

    // plan: 3 parts per hour and day; the two waves' payloads where the Maps read them
    let planned = handle(&lake, &args(), &json!({"step": "plan", "parts": 3}))
        .await
        .unwrap();
    let run_id = planned["run_id"].as_str().unwrap().to_string();
    let staging = Staging::open(&lake, &run_id).unwrap();
    let plan: Plan = staging.get_json(PLAN_NAME).await.unwrap().unwrap();
    assert_eq!(plan.hours.len(), 48);
    assert_eq!(plan.days.len(), 2);
    assert_eq!(plan.items.len(), (48 + 2) * 3);
    assert_eq!(planned["item_count"], plan.items.len());
    let (hours, days) = plan.waves();
    for (wave, name, count, items) in [
        ("hour_items", "hour_items.json", "hour_item_count", &hours),
        ("day_items", "day_items.json", "day_item_count", &days),
    ] {
        assert_eq!(planned[wave]["bucket"], "lake");
        assert_eq!(
            planned[wave]["key"],
            format!("tally/_staging/{run_id}/{name}")
        );
        assert_eq!(planned[count], items.len());
        let payloads: Vec<Value> = staging.get_json(name).await.unwrap().unwrap();
        let expected: Vec<Value> = items
            .iter()
            .map(|i| json!({"step": "part", "run_id": run_id, "item": i}))
            .collect();
        assert_eq!(payloads, expected, "{wave}");
    }

    // the hours' parts, then the days', each wave shared by two processes at
    // once; the first item of each wave computed by both (a retried invocation)
    for wave in [hours, days] {
        let (mut a, mut b): (Vec<usize>, Vec<usize>) = wave.iter().partition(|&&i| i % 2 == 0);
        b.push(a[0]);
        a.push(b[0]);
        let (ta, tb) = (
            compute_in_another_process(&lake, &run_id, a),
            compute_in_another_process(&lake, &run_id, b),
        );
        ta.join().unwrap();
        tb.join().unwrap();
    }
    // nothing is visible before the publish
    assert!(read_table(&lake, "metrics_hourly", "hour").await.is_empty());

    let published = handle(
        &lake,
        &args(),
        &json!({"step": "publish", "run_id": run_id}),
    )
    .await
    .unwrap();
    assert_eq!(published["hours"], 48);
    assert_eq!(
        published["compact_days"],
        json!(["2025-11-24", "2025-11-25"])
    );
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&events)
    );

    // a publish retried after it landed answers and commits nothing
    let version = lake
        .open(Table::MetricsHourly)
        .await
        .unwrap()
        .unwrap()
        .version();
    handle(
        &lake,
        &args(),
        &json!({"step": "publish", "run_id": run_id}),
    )
    .await
    .unwrap();
    assert_eq!(
        lake.open(Table::MetricsHourly)
            .await
            .unwrap()
            .unwrap()
            .version(),
        version
    );

    for day in ["2025-11-24", "2025-11-25"] {
        let out = handle(&lake, &args(), &json!({"step": "compact", "day": day}))
            .await
            .unwrap();
        // one publish leaves each date one sorted file: nothing to rewrite
        assert_eq!(out["metrics_hourly_rewritten"], false, "{out}");
        assert_eq!(out["day"], day);
    }
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&events)
    );

    // a run planned, then another run published (a late event), then the
    // first one's publish: a conflict, and the tables stay the other run's
    let late = generate(42, 10, 3, START_MS + 3_600_000, 1);
    archive(&lake, "late", &late, (START_MS + 2 * DAY_MS) * 1000).await;
    let first = handle(&lake, &args(), &json!({"step": "plan"}))
        .await
        .unwrap();
    let first_id = first["run_id"].as_str().unwrap().to_string();
    for i in 0..first["item_count"].as_u64().unwrap() as usize {
        handle(
            &lake,
            &args(),
            &json!({"step": "part", "run_id": first_id, "item": i}),
        )
        .await
        .unwrap();
    }
    handle(&lake, &args(), &json!({})).await.unwrap();
    let lost = handle(
        &lake,
        &args(),
        &json!({"step": "publish", "run_id": first_id}),
    )
    .await;
    assert!(
        matches!(lost, Err(tally_common::Error::Conflict(_))),
        "{lost:?}"
    );
    let all: Vec<_> = events.iter().chain(&late).cloned().collect();
    assert_eq!(
        read_table(&lake, "metrics_hourly", "hour").await,
        model_hourly(&all)
    );
    assert_eq!(
        read_table(&lake, "metrics_daily", "day").await,
        model_daily(&all)
    );
}
