//! One conformance suite for both speed stores: the embedded store and Redis
//! (a real redis-server started by the test). Counters must equal a plain
//! computation over the same events, and redelivered, bisected or half-applied
//! batches must count every event exactly once.

use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::metrics::Metric;
use tally_common::source::{Position, SourceId};
use tally_speed_layer::{apply_records, EmbeddedStore, RedisStore, SpeedBatch, SpeedStore};
use tally_testkit::events::{expected, generate, Expected, TestEvent};
use tally_testkit::RedisServer;

const START_MS: i64 = 1_764_000_000_000 / 3_600_000 * 3_600_000; // an hour of Nov 2025
const NOW: i64 = (START_MS + 10 * 3_600_000) * 1000;

fn records(events: &[TestEvent], per_record: usize) -> Vec<(Position, Vec<u8>)> {
    events
        .chunks(per_record)
        .enumerate()
        .map(|(i, chunk)| {
            let text: String = chunk
                .iter()
                .enumerate()
                .map(|(j, e)| e.to_line((i + j) % 2 == 0) + "\n")
                .collect();
            (Position::from_u64(1000 + i as u64), text.into_bytes())
        })
        .collect()
}

fn as_input(recs: &[(Position, Vec<u8>)]) -> Vec<(Position, &[u8])> {
    recs.iter()
        .map(|(p, d)| (p.clone(), d.as_slice()))
        .collect()
}

async fn assert_matches<S: SpeedStore>(store: &S, want: &Expected, hll: bool) {
    let mut merchants: Vec<&String> = want.keys().map(|(m, _)| m).collect();
    merchants.dedup();
    for m in merchants {
        let hours: Vec<i64> = (0..6).map(|h| (START_MS + h * 3_600_000) * 1000).collect();
        let got = store.read(m, &hours, &[(0..6).collect()]).await.unwrap();
        let mut all = std::collections::BTreeSet::new();
        for (i, &h) in hours.iter().enumerate() {
            let key = (m.clone(), h / 1000);
            let (counts, customers) = want.get(&key).cloned().unwrap_or_default();
            all.extend(customers.iter().cloned());
            let v = &got.hours[i];
            let c = |x: Metric| v.counters.get(x).unwrap();
            assert_eq!(
                [
                    c(Metric::Orders),
                    c(Metric::GrossSales),
                    c(Metric::Refunds),
                    c(Metric::RefundedAmount),
                    c(Metric::PageViews)
                ],
                counts,
                "{m} hour {i}"
            );
            let u = v.unique_customers.unwrap();
            if hll {
                // HyperLogLog is exact for small sets in practice; allow its ~1% error anyway
                assert!(
                    (u - customers.len() as i64).abs() <= 1 + customers.len() as i64 / 50,
                    "{m} hour {i}: {u} vs {}",
                    customers.len()
                );
            } else {
                assert_eq!(u, customers.len() as i64, "{m} hour {i}");
            }
        }
        let union = got.unions[0];
        assert!(
            (union - all.len() as i64).abs() <= i64::from(hll) * (1 + all.len() as i64 / 50),
            "{m}: union {union} vs {}",
            all.len()
        );
    }
}

async fn conformance<S: SpeedStore>(store: S, hll: bool) {
    let events = generate(7, 3_000, 12, START_MS, 6);
    let recs = records(&events, 25);
    let want = expected(&events);
    let source = SourceId::kinesis("s", "shardId-000000000000");

    // a delivery that half-applied: the first 40 records' effect landed, then a crash
    let half = SpeedBatch::build(source.clone(), as_input(&recs[..40]), NOW);
    let r = store.apply(&half).await.unwrap();
    assert!(r.applied > 0 && r.skipped == 0);

    // the whole batch is redelivered: what landed is skipped, the rest applies
    let out = apply_records(&store, source.clone(), as_input(&recs[..]), NOW)
        .await
        .unwrap();
    assert_eq!(out.accepted, 3_000);
    assert_matches(&store, &want, hll).await;

    // the same batch again, and bisected halves of it (Lambda's bisect-on-error): no change
    let again = apply_records(&store, source.clone(), as_input(&recs[..]), NOW)
        .await
        .unwrap();
    assert_eq!(again.report.applied, 0);
    assert!(again.report.skipped > 0);
    for part in [&recs[..60], &recs[60..]] {
        let r = apply_records(&store, source.clone(), as_input(part), NOW)
            .await
            .unwrap();
        assert_eq!(r.report.applied, 0);
    }
    assert_matches(&store, &want, hll).await;

    // another source's records are not hidden by this source's marks
    let more = generate(8, 500, 12, START_MS, 6);
    let other = SourceId::kinesis("s", "shardId-000000000001");
    apply_records(&store, other, as_input(&records(&more, 25)), NOW)
        .await
        .unwrap();
    let both: Vec<TestEvent> = events.iter().chain(more.iter()).cloned().collect();
    assert_matches(&store, &expected(&both), hll).await;

    // checkpoints
    assert_eq!(store.checkpoint("s/shard-9").await.unwrap(), None);
    store.set_checkpoint("s/shard-9", "12345").await.unwrap();
    assert_eq!(
        store.checkpoint("s/shard-9").await.unwrap().as_deref(),
        Some("12345")
    );
    store.ping().await.unwrap();

    // unknown merchants read as zeros
    let none = store
        .read(
            "nobody",
            &[START_MS * 1000, START_MS * 1000 + MICROS_PER_HOUR],
            &[],
        )
        .await
        .unwrap();
    assert!(none
        .hours
        .iter()
        .all(|h| h.counters.is_zero() && h.unique_customers == Some(0)));
}

#[tokio::test]
async fn embedded_store_conforms() {
    conformance(EmbeddedStore::new(48 * 3600), false).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 48 * 3600).await.unwrap();
    conformance(store, true).await;
}

#[tokio::test]
async fn redis_keys_share_the_merchant_hash_tag_and_expire() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3600).await.unwrap();
    let events = generate(3, 200, 3, START_MS, 2);
    let recs = records(&events, 50);
    apply_records(&store, SourceId::file("f"), as_input(&recs), NOW)
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tally:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        let tag = k
            .split('{')
            .nth(1)
            .and_then(|s| s.split('}').next())
            .unwrap();
        assert!(tag.starts_with('m'), "{k} lacks the merchant hash tag");
        let ttl: i64 = redis::cmd("TTL").arg(k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0 && ttl <= 3600, "{k} has ttl {ttl}");
    }
}

#[tokio::test]
async fn redis_outage_fails_the_batch_and_a_redelivery_after_restart_applies_it() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3600)
        .await
        .unwrap()
        .with_max_attempts(2);
    let events = generate(5, 400, 4, START_MS, 3);
    let recs = records(&events, 20);
    redis.stop();
    let err = apply_records(&store, SourceId::file("f"), as_input(&recs), NOW)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot reach Redis"), "{err}");
    redis.restart();
    // the connection manager reconnects by itself; the redelivered batch applies once
    let mut applied = None;
    for _ in 0..50 {
        match apply_records(&store, SourceId::file("f"), as_input(&recs), NOW).await {
            Ok(o) => {
                applied = Some(o);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert!(applied.is_some(), "store did not reconnect after restart");
    assert_matches(&store, &expected(&events), true).await;
}
