//! One conformance suite for both speed stores: the embedded store and Redis
//! (a real redis-server started by the test). Counters must equal a plain
//! computation over the same events, and redelivered, bisected or half-applied
//! batches must count every event exactly once.

use std::sync::Arc;

use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::bucket::{format_ts, hour_floor, now_micros};
use tally_common::lake::Lake;
use tally_common::metrics::Metric;
use tally_common::source::{Position, Record, SourceId};
use tally_common::speed_view::SpeedView;
use tally_speed_layer::redis_store::VIEW_PREFIX;
use tally_speed_layer::{
    apply_records, EmbeddedStore, Rebuild, RedisStore, SpeedBatch, SpeedStore,
};
use tally_testkit::events::{expected, generate, Expected, TestEvent};
use tally_testkit::{RedisCluster, RedisServer};

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

fn as_input(recs: &[(Position, Vec<u8>)]) -> Vec<Record<'_>> {
    recs.iter()
        .map(|(p, d)| Record::new(p.clone(), d))
        .collect()
}

async fn assert_matches(store: &impl SpeedView, want: &Expected, hll: bool) {
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

async fn conformance(store: SpeedStore, hll: bool) {
    let events = generate(7, 3_000, 12, START_MS, 6);
    let recs = records(&events, 25);
    let want = expected(&events);
    let source = SourceId::kinesis("s", "shardId-000000000000");

    // a delivery that half-applied: the first 40 records' effect landed, then a crash
    let half = SpeedBatch::build(source.clone(), as_input(&recs[..40]), NOW);
    let r = store.apply(&half).await.unwrap();
    assert!(r.applied > 0 && r.skipped == 0, "{r:?}");

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
    conformance(
        SpeedStore::Embedded(Arc::new(EmbeddedStore::new(48 * 3600))),
        false,
    )
    .await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 48 * 3600).await.unwrap();
    conformance(SpeedStore::Redis(store), true).await;
}

#[tokio::test]
async fn redis_keys_share_the_bucket_hash_tag_and_expire() {
    use tally_speed_layer::redis_store::{bucket, bucket_tag, hour_key};
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3600).await.unwrap();
    let speed = SpeedStore::Redis(store.clone());
    let events = generate(3, 200, 3, START_MS, 2);
    let recs = records(&events, 50);
    apply_records(&speed, SourceId::file("f"), as_input(&recs), NOW)
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
    let mut fields = 0;
    for k in keys.iter().filter(|k| k.as_str() != VIEW_PREFIX) {
        let ttl: i64 = redis::cmd("TTL").arg(k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0 && ttl <= 3600, "{k} has ttl {ttl}");
        // a bucket-hour's log or hash: every merchant in it has that bucket's tag
        let merchants: Vec<String> = match k.strip_suffix(":log") {
            Some(_) => {
                let log: Vec<u8> = redis::cmd("GET").arg(k).query_async(&mut c).await.unwrap();
                tally_speed_layer::speed_entry::log_entries(&log)
                    .unwrap()
                    .into_iter()
                    .map(|(_, e)| e.merchant)
                    .collect()
            }
            None => {
                let fields: Vec<String> = redis::cmd("HKEYS")
                    .arg(k)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                // merchants' merged and rebuilt fields; not the compaction count
                fields
                    .iter()
                    .filter(|f| !f.starts_with('/'))
                    .map(|f| f.strip_suffix("/r").unwrap_or(f).to_string())
                    .collect()
            }
        };
        let k = k.strip_suffix(":log").unwrap_or(k);
        for m in &merchants {
            let tag = bucket_tag(bucket(m));
            assert!(
                k.contains(&format!("{{{tag}}}")),
                "{m} is in {k}, not its bucket {tag}"
            );
            let hour: i64 = k.rsplit(':').next().unwrap().parse().unwrap();
            assert_eq!(hour_key(m, hour * MICROS_PER_HOUR), k);
        }
        fields += merchants.len();
    }
    assert!(fields >= 3, "three merchants' hours: {keys:?}");
}

#[tokio::test]
async fn redis_outage_fails_the_batch_and_a_redelivery_after_restart_applies_it() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3600)
        .await
        .unwrap()
        .with_max_attempts(2);
    let speed = SpeedStore::Redis(store.clone());
    let events = generate(5, 400, 4, START_MS, 3);
    let recs = records(&events, 20);
    redis.stop();
    let err = apply_records(&speed, SourceId::file("f"), as_input(&recs), NOW)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot reach Redis"), "{err}");
    redis.restart();
    // the connection manager reconnects by itself; the redelivered batch applies once
    let mut applied = None;
    for _ in 0..50 {
        match apply_records(&speed, SourceId::file("f"), as_input(&recs), NOW).await {
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

/// A line of one event at `ts` (epoch µs).
fn line(id: &str, merchant: &str, kind: &str, ts: i64, customer: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({"event_id": id, "merchant_id": merchant, "type": kind,
        "ts": format_ts(ts), "amount": 100});
    if let Some(c) = customer {
        v["customer_id"] = c.into();
    }
    (v.to_string() + "\n").into_bytes()
}

async fn all_keys(url: &str) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    (c, keys)
}

/// An empty lake: a rebuild from it has nothing to add and marks the view whole.
fn empty_lake() -> (tempfile::TempDir, Lake) {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), None, None).unwrap();
    (dir, lake)
}

/// Every key the speed layer writes has its TTL, however it came to exist: a
/// merchant-hour whose first write was an anonymous page view and whose
/// customers came in a later batch (that HyperLogLog once had no TTL), a
/// redelivery cut differently, a checkpoint, and a rebuild. The view keys
/// (one, or one per cluster slot) are the exception: a view that expired
/// would make its hours unknown until a rebuild.
#[tokio::test]
async fn redis_every_key_has_its_ttl_after_a_varied_run() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3600).await.unwrap();
    let speed = SpeedStore::Redis(store.clone());
    let now = now_micros();
    let t = hour_floor(now) + 1_000_000;
    let f = SourceId::file("f");
    let l1 = line("1", "m1", "page_view", t, None);
    let l2 = line("2", "m1", "order", t, Some("c1"));
    let l3 = line("3", "m2", "refund", t, Some("c2"));
    let l4 = line("4", "m1", "page_view", t - 3_600_000_000, Some("c3"));
    let l5 = line("5", "m1", "order", t, Some("c4"));
    let p = Position::from_u64;
    apply_records(&speed, f.clone(), [Record::new(p(1), &l1[..])], now)
        .await
        .unwrap();
    apply_records(&speed, f.clone(), [Record::new(p(2), &l2[..])], now)
        .await
        .unwrap();
    // a redelivery cut differently: m1's hour holds records 2 to 5 and its mark is 2
    let r = apply_records(
        &speed,
        f.clone(),
        [
            Record::new(p(2), &l2[..]),
            Record::new(p(3), &l3[..]),
            Record::new(p(4), &l4[..]),
            Record::new(p(5), &l5[..]),
        ],
        now,
    )
    .await
    .unwrap();
    assert_eq!(r.report.applied, 3);
    store
        .set_checkpoint("stream/shardId-000000000000", &"4".repeat(56))
        .await
        .unwrap();
    let (_dir, lake) = empty_lake();
    let rebuilt = Rebuild::new(&lake, &store)
        .settle(std::time::Duration::ZERO)
        .run()
        .await
        .unwrap();
    assert!(rebuilt.complete, "{rebuilt:?}");

    let (mut c, keys) = all_keys(&redis.url()).await;
    let log = tally_speed_layer::redis_store::log_key("m1", hour_floor(t));
    assert!(keys.contains(&log), "{keys:?}");
    let views = keys.iter().filter(|k| k.as_str() == VIEW_PREFIX).count();
    assert_eq!(views, 1, "one view on a single server");
    assert!(keys.iter().any(|k| k.contains("checkpoint")), "{keys:?}");
    assert!(keys.len() >= 4 + views, "{keys:?}");
    for k in &keys {
        let ttl: i64 = redis::cmd("TTL").arg(k).query_async(&mut c).await.unwrap();
        if k.as_str() == VIEW_PREFIX {
            assert_eq!(ttl, -1, "{k}: views do not expire");
        } else {
            assert!(ttl > 0 && ttl <= 3600, "{k} has ttl {ttl}");
        }
    }
}

/// Kinesis sequence numbers have 56 digits on AWS (up to 129 allowed): marks of
/// that length sit beside the counters, and reads must not take them for
/// counters (every current-hour bucket once came back partial in production).
#[tokio::test]
async fn redis_reads_with_real_length_sequence_numbers() {
    // a TTL of hours: with one hour the current hour is vouched for only until
    // :55 (its keys may expire an hour after a write five minutes early)
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 6 * 3600).await.unwrap();
    let speed = SpeedStore::Redis(store.clone());
    let now = now_micros();
    let hour = hour_floor(now);
    let seq = |i: u32| {
        Position::parse(&format!(
            "4959033827149025660855969253836157109592157598913658{i:04}"
        ))
        .unwrap()
    };
    let shard = SourceId::kinesis("events", "shardId-000000000000");
    let a = line("a", "m", "order", hour + 1_000_000, Some("c1"));
    let b = [
        line("b", "m", "order", hour + 2_000_000, Some("c2")),
        line("c", "m", "page_view", hour + 3_000_000, None),
    ]
    .concat();
    apply_records(
        &speed,
        shard.clone(),
        [Record::new(seq(1), &a[..]), Record::new(seq(2), &b[..])],
        now,
    )
    .await
    .unwrap();
    // a redelivery of both adds nothing
    let again = apply_records(
        &speed,
        shard.clone(),
        [Record::new(seq(1), &a[..]), Record::new(seq(2), &b[..])],
        now,
    )
    .await
    .unwrap();
    assert_eq!((again.report.applied, again.report.skipped), (0, 1));
    let (_dir, lake) = empty_lake();
    Rebuild::new(&lake, &store)
        .settle(std::time::Duration::ZERO)
        .run()
        .await
        .unwrap();
    let r = store.read("m", &[hour], &[]).await.unwrap();
    assert_eq!(r.not_covered, Vec::<usize>::new());
    assert_eq!(r.hours[0].counters.get(Metric::Orders), Some(2));
    assert_eq!(r.hours[0].counters.get(Metric::GrossSales), Some(200));
    assert_eq!(r.hours[0].counters.get(Metric::PageViews), Some(1));
    assert_eq!(r.hours[0].unique_customers, Some(2));
}

/// A server that lost its data is told from one that had no events: the view
/// key goes with the data, the hours before the next write are not vouched
/// for until a rebuild, and hours past the TTL never are.
#[tokio::test]
async fn redis_view_that_lost_its_data_covers_nothing_until_rebuilt() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 3 * 3600).await.unwrap();
    let speed = SpeedStore::Redis(store.clone());
    let now = now_micros();
    let hour = hour_floor(now);
    let hours = [
        hour - 4 * 3_600_000_000,
        hour - 3_600_000_000,
        hour,
        hour + 3_600_000_000,
    ];
    let f = SourceId::file("f");
    let a = line("a", "m", "order", hour + 1_000_000, None);
    let first = apply_records(
        &speed,
        f.clone(),
        [Record::new(Position::from_u64(1), &a[..])],
        now,
    )
    .await
    .unwrap();
    assert!(first.report.view_created);
    // a new view vouches for no hour that began before it (nor for one past the TTL)
    let r = store.read("m", &hours, &[]).await.unwrap();
    // (the next hour too when it starts within five minutes: an event may be that early)
    assert!(r.not_covered.starts_with(&[0, 1, 2]), "{:?}", r.not_covered);
    let (_dir, lake) = empty_lake();
    let rebuilt = Rebuild::new(&lake, &store)
        .settle(std::time::Duration::ZERO)
        .run()
        .await
        .unwrap();
    assert!(rebuilt.complete && !rebuilt.nothing_to_do, "{rebuilt:?}");
    let r = store.read("m", &hours, &[]).await.unwrap();
    assert_eq!(r.not_covered, [0], "only the hour past the TTL");
    assert_eq!(r.hours[2].counters.get(Metric::Orders), Some(1));
    // the server loses everything: zeros are no longer an answer
    let (mut c, _) = all_keys(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let r = store.read("m", &hours, &[]).await.unwrap();
    assert_eq!(r.not_covered, [0, 1, 2, 3]);
    let b = line("b", "m", "order", hour + 2_000_000, None);
    let next = apply_records(
        &speed,
        f.clone(),
        [Record::new(Position::from_u64(2), &b[..])],
        now,
    )
    .await
    .unwrap();
    assert!(next.report.view_created);
    let r = store.read("m", &hours, &[]).await.unwrap();
    assert!(r.not_covered.starts_with(&[0, 1, 2]), "{:?}", r.not_covered);
    assert_eq!(r.hours[2].counters.get(Metric::Orders), Some(1));
}

/// The same suite with `TALLY_REDIS_URL` naming one node of a real Redis
/// Cluster (three primaries, a replica each): merchants' keys spread over the
/// slots, a batch's pipeline is split by slot, and a rebuild covers every
/// slot's view.
#[tokio::test]
async fn redis_cluster_store_conforms() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&cluster.url(), 48 * 3600)
        .await
        .unwrap();
    conformance(SpeedStore::Redis(store.clone()), true).await;
    // the merchants' keys are on every primary
    for (port, _) in cluster.topology() {
        let n: i64 = cluster.cli(port, &["DBSIZE"]).trim().parse().unwrap();
        assert!(n > 0, "the primary on {port} holds no key");
    }
    let (_dir, lake) = empty_lake();
    assert!(!store.views_whole().await.unwrap());
    let rebuilt = Rebuild::new(&lake, &store)
        .settle(std::time::Duration::ZERO)
        .run()
        .await
        .unwrap();
    assert!(
        rebuilt.complete && rebuilt.views == usize::from(tally_speed_layer::redis_store::BUCKETS),
        "{rebuilt:?}"
    );
    assert!(store.views_whole().await.unwrap());
}

/// A write that reached a cluster primary but not its replica, then the
/// primary's loss: the batch is not reported applied until a replica has it
/// (`WAIT`), so the consumer does not checkpoint past it; the promoted replica
/// lacks it, and the redelivery applies it once. Nothing lost, nothing doubled.
#[tokio::test]
async fn redis_cluster_write_that_missed_the_replica_is_applied_once_after_failover() {
    // nodes are suspected only after 20 s: the frozen replica still counts as one
    let mut cluster = RedisCluster::start_with_node_timeout(3, std::time::Duration::from_secs(20));
    let (store, speed) = one_attempt(&cluster.url(), 48 * 3600).await;
    let now = now_micros();
    let hour = hour_floor(now);
    let f = SourceId::file("f");
    let a = line("a", "m", "order", hour + 1_000_000, Some("c1"));
    let b = line("b", "m", "order", hour + 2_000_000, Some("c2"));
    apply_records(
        &speed,
        f.clone(),
        [Record::new(Position::from_u64(1), &a[..])],
        now,
    )
    .await
    .unwrap();
    let key = tally_speed_layer::redis_store::hour_key("m", hour);
    let primary = cluster.primary_of(&key);
    let replica = cluster
        .topology()
        .into_iter()
        .find(|(p, _)| *p == primary)
        .and_then(|(_, r)| r.first().copied())
        .expect("the primary has a replica");
    // the replica goes down (shut down, so its append-only file holds all it
    // had): the write lands on the primary only, and the batch is not
    // reported applied
    cluster.shutdown(replica);
    let err = apply_records(
        &speed,
        f.clone(),
        [Record::new(Position::from_u64(2), &b[..])],
        now,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("replica"), "{err}");
    let view = store.merchant_view("m");
    let mark = cluster.cli(primary, &["HGET", &view, "mark:file/f"]);
    assert_eq!(mark.trim(), "2", "the write reached the primary");
    // the primary is lost; the replica comes back without the write and takes over
    cluster.kill(primary);
    cluster.restart(replica);
    cluster.takeover(replica);
    cluster.wait_ok(std::time::Duration::from_secs(30));
    let mark = cluster.cli(replica, &["HGET", &view, "mark:file/f"]);
    assert_eq!(mark.trim(), "1", "the promoted replica lacks the write");
    // the stream delivers the unacknowledged record again
    let mut again = None;
    for _ in 0..100 {
        match apply_records(
            &speed,
            f.clone(),
            [Record::new(Position::from_u64(2), &b[..])],
            now,
        )
        .await
        {
            Ok(o) => {
                again = Some(o);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    let again = again.expect("the cluster took writes again after the failover");
    assert_eq!(again.report.applied, 1, "{:?}", again.report);
    let r = store.read("m", &[hour], &[]).await.unwrap();
    assert_eq!(r.hours[0].counters.get(Metric::Orders), Some(2));
    assert_eq!(r.hours[0].unique_customers, Some(2));
    // and once more: nothing doubles
    let third = apply_records(&speed, f, [Record::new(Position::from_u64(2), &b[..])], now)
        .await
        .unwrap();
    assert_eq!(third.report.applied, 0);
}

/// A Redis store that tries each batch once (a failure is returned, not
/// retried), keys living `ttl_secs`, and the same as a [`SpeedStore`].
async fn one_attempt(url: &str, ttl_secs: u64) -> (RedisStore, SpeedStore) {
    let store = RedisStore::connect(url, ttl_secs)
        .await
        .unwrap()
        .with_max_attempts(1);
    (store.clone(), SpeedStore::Redis(store))
}

/// Orders of `merchant` in `hour`, as the store reads them.
async fn orders(store: &RedisStore, merchant: &str, hour: i64) -> i64 {
    let r = store.read(merchant, &[hour], &[]).await.unwrap();
    r.hours[0].counters.get(Metric::Orders).unwrap_or(0)
}

/// Makes `key` a list, so a script's `APPEND` to it fails: the batch is cut
/// off there (the parts before it applied, and the logs before it in its
/// part).
async fn block(c: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: () = redis::cmd("RPUSH")
        .arg(key)
        .arg("x")
        .query_async(c)
        .await
        .unwrap();
}

async fn unblock(c: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: () = redis::cmd("DEL").arg(key).query_async(c).await.unwrap();
}

/// A batch of more merchant-hours than one script call takes is applied in
/// parts; one cut off after its first part (a crash, a failed call), then
/// delivered again cut the same way, shorter or longer, counts every event
/// once: the same delivery resumes at the part it stopped at, another first
/// takes the cut-off part's frames out.
#[tokio::test]
async fn redis_batch_cut_off_between_parts_counts_once_in_any_redelivery() {
    use tally_speed_layer::redis_store::{log_key, PART_SIZE};
    let now = now_micros();
    let hour = hour_floor(now);
    let n = PART_SIZE + 100;
    let ms = in_part_order("m", hour, PART_SIZE, 100);
    let r1: Vec<u8> = ms
        .iter()
        .enumerate()
        .flat_map(|(i, m)| line(&format!("a{i}"), m, "order", hour + 1_000_000, Some("c1")))
        .collect();
    let r2 = line("b", &ms[0], "order", hour + 2_000_000, Some("c2"));
    let r3 = line("c", &ms[1], "order", hour + 3_000_000, Some("c3"));
    let p = Position::from_u64;
    let all = [
        Record::new(p(1), &r1[..]),
        Record::new(p(2), &r2[..]),
        Record::new(p(3), &r3[..]),
    ];
    // the first merchant of the first part's third bucket-hour: the two
    // bucket-hours before it are written
    let keys: Vec<String> = ms.iter().map(|m| log_key(m, hour)).collect();
    let inside = (1..PART_SIZE)
        .filter(|&i| keys[i] != keys[i - 1])
        .nth(1)
        .unwrap();
    assert!(inside > 1 && inside < PART_SIZE);
    // cut off between parts (the second not begun: the same delivery
    // resumes it), at the second part's first log (begun, nothing written),
    // or inside the first part; redelivered as records 1-2 (the same cut), 1
    // (shorter), 1-3 (longer)
    let between = n; // no log blocked: out of memory between the parts
    for (blocked, redelivered) in [
        (between, 2usize),
        (between, 1),
        (between, 3),
        (PART_SIZE, 2),
        (PART_SIZE, 1),
        (PART_SIZE, 3),
        (inside, 2),
        (inside, 3),
    ] {
        let f = SourceId::file("f");
        let (redis, store, speed) = if blocked == between {
            cut_between_parts(&all[..2], now).await
        } else {
            let redis = RedisServer::start();
            let (store, speed) = one_attempt(&redis.url(), 6 * 3600).await;
            let (mut c, _) = all_keys(&redis.url()).await;
            let blocker = log_key(&ms[blocked], hour);
            block(&mut c, &blocker).await;
            let e = apply_records(&speed, f.clone(), all[..2].to_vec(), now)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("Redis"), "{e}");
            unblock(&mut c, &blocker).await;
            (redis, store, speed)
        };
        let (mut c, _) = all_keys(&redis.url()).await;
        let cut_at = ms.get(blocked).map_or("between the parts", String::as_str);
        assert_eq!(
            orders(&store, &ms[1], hour).await,
            1,
            "written before the cut"
        );
        assert_eq!(orders(&store, &ms[blocked.min(PART_SIZE)], hour).await, 0);
        let again = apply_records(&speed, f.clone(), all[..redelivered].to_vec(), now)
            .await
            .unwrap();
        // the rest of the stream, then everything once more: nothing doubles
        apply_records(&speed, f.clone(), all[redelivered..].to_vec(), now)
            .await
            .unwrap();
        let last = apply_records(&speed, f.clone(), all.to_vec(), now)
            .await
            .unwrap();
        assert_eq!(last.report.applied, 0, "{redelivered}: {:?}", last.report);
        for (i, m) in ms.iter().enumerate().take(n) {
            let want = if i < 2 { 2 } else { 1 };
            assert_eq!(
                orders(&store, m, hour).await,
                want,
                "merchant {m}, cut at {cut_at}, redelivered as records 1-{redelivered} ({:?})",
                again.report
            );
        }
        let open: i64 = redis::cmd("HLEN")
            .arg(format!("{VIEW_PREFIX}:open"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(open, 0, "no batch is left part way");
    }
}

/// An undo (taking a cut-off batch's frames out of its logs, a chunk of
/// logs per call) cut off between its calls leaves the batch marked as cut
/// off inside: its next delivery, even cut as it was, undoes it again and
/// applies it whole rather than resume after the part whose frames the first
/// undo call already took out.
#[tokio::test]
async fn redis_undo_cut_off_between_its_calls_counts_once() {
    use tally_speed_layer::redis_store::{log_key, PART_SIZE, UNDO_CHUNK};
    let now = now_micros();
    let hour = hour_floor(now);
    let ms = in_part_order("u", hour, PART_SIZE, 100);
    let r1: Vec<u8> = ms
        .iter()
        .enumerate()
        .flat_map(|(i, m)| line(&format!("a{i}"), m, "order", hour + 1_000_000, None))
        .collect();
    let r2 = line("b", &ms[0], "order", hour + 2_000_000, None);
    let r3 = line("c", &ms[1], "order", hour + 3_000_000, None);
    let p = Position::from_u64;
    let all = [
        Record::new(p(1), &r1[..]),
        Record::new(p(2), &r2[..]),
        Record::new(p(3), &r3[..]),
    ];
    // the first part's logs, in the order the undo takes them
    let mut logs: Vec<String> = ms[..PART_SIZE].iter().map(|m| log_key(m, hour)).collect();
    logs.sort();
    logs.dedup();
    assert!(logs.len() > UNDO_CHUNK, "{} logs", logs.len());
    let (redis, store, speed) = cut_between_parts(&all[..2], now).await;
    let f = SourceId::file("f");
    let (mut c, _) = all_keys(&redis.url()).await;
    // record 1 alone: the undo takes its first chunk of logs, then fails
    let stop = &logs[UNDO_CHUNK];
    unblock(&mut c, stop).await;
    block(&mut c, stop).await;
    let e = apply_records(&speed, f.clone(), all[..1].to_vec(), now)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Redis"), "{e}");
    unblock(&mut c, stop).await;
    // records 1-2 again, cut as the first time; then the rest, then all again
    apply_records(&speed, f.clone(), all[..2].to_vec(), now)
        .await
        .unwrap();
    apply_records(&speed, f.clone(), all[2..].to_vec(), now)
        .await
        .unwrap();
    apply_records(&speed, f.clone(), all.to_vec(), now)
        .await
        .unwrap();
    for (i, m) in ms.iter().enumerate() {
        let want = if i < 2 { 2 } else { 1 };
        assert_eq!(orders(&store, m, hour).await, want, "merchant {m}");
    }
}

/// A server on which `batch` (of source `file/f`, two parts in one view) was
/// cut off cleanly between its parts: the first applied, the second not
/// begun (its open entry reads `ID 1`, not dirty). Made as in production:
/// the server reaches `maxmemory` with the first part's writes, and refuses
/// the second part's first write (`OOM`; a script is refused only before it
/// writes). The memory margin that does so depends on buffers, so margins
/// are tried in turn on fresh servers.
async fn cut_between_parts(
    batch: &[Record<'_>],
    now: i64,
) -> (RedisServer, RedisStore, SpeedStore) {
    for margin_kb in [8u64, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512] {
        let redis = RedisServer::start();
        let (store, speed) = one_attempt(&redis.url(), 6 * 3600).await;
        let (mut c, _) = all_keys(&redis.url()).await;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut c)
            .await
            .unwrap();
        let used: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(used + margin_kb * 1024)
            .query_async(&mut c)
            .await
            .unwrap();
        let out = apply_records(&speed, SourceId::file("f"), batch.to_vec(), now).await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(0)
            .query_async(&mut c)
            .await
            .unwrap();
        let open: Option<String> = redis::cmd("HGET")
            .arg(format!("{VIEW_PREFIX}:open"))
            .arg("file/f")
            .query_async(&mut c)
            .await
            .unwrap();
        if out.is_err() && open.as_deref().is_some_and(|o| o.ends_with(" 1")) {
            return (redis, store, speed);
        }
    }
    panic!("no memory margin cut the batch off between its parts");
}

/// `first + second` merchant ids named `PREFIX<i>`, in the order the Redis
/// store sends a batch's merchant-hours at `hour` (bucket-hour log, then id):
/// the first `first` fill a batch's first part of that size exactly, and the
/// bucket-hours of the other `second` all come after theirs (so a part
/// boundary falls between two bucket-hours, and one can be cut off at).
fn in_part_order(prefix: &str, hour: i64, first: usize, second: usize) -> Vec<String> {
    use tally_speed_layer::redis_store::log_key;
    let mut by_key: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for i in 0..(first + second) * 2 {
        let m = format!("{prefix}{i}");
        by_key.entry(log_key(&m, hour)).or_default().push(m);
    }
    let mut out = Vec::new();
    let mut keys = by_key.into_values();
    for mut ms in keys.by_ref() {
        ms.sort();
        let take = (first - out.len()).min(ms.len());
        out.extend(ms.into_iter().take(take));
        if out.len() == first {
            break;
        }
    }
    for mut ms in keys {
        ms.sort();
        out.extend(ms.into_iter().take(first + second - out.len()));
    }
    assert_eq!(out.len(), first + second);
    out
}

/// A merchant-hour written by many batches is compacted, but the frame of
/// another source's batch cut off part way is never merged: it must stay
/// findable, to be taken out when the batch is delivered again (were it
/// merged, g's event below would count twice).
#[tokio::test]
async fn redis_compaction_keeps_the_frames_of_a_batch_cut_off_part_way() {
    use tally_speed_layer::redis_store::{hour_key, log_key, PART_SIZE};
    use tally_speed_layer::speed_entry::{frames, log_entries};
    let redis = RedisServer::start();
    let (store, speed) = one_attempt(&redis.url(), 6 * 3600).await;
    let now = now_micros();
    let hour = hour_floor(now);
    let (f, g) = (SourceId::file("f"), SourceId::file("g"));
    let (mut c, _) = all_keys(&redis.url()).await;
    // g's merchants; the first, "hot", f writes too
    let ms = in_part_order("g", hour, PART_SIZE, 10);
    let hot_m = ms[0].as_str();
    let hot = hour_key(hot_m, hour);
    // hot's frames: its merged field's, and those of its bucket-hour's log
    let hot_frames = async |c: &mut redis::aio::MultiplexedConnection| -> usize {
        let (field, log): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
            .hget(&hot, hot_m)
            .get(log_key(hot_m, hour))
            .query_async(c)
            .await
            .unwrap();
        let merged = field.map_or(0, |v| frames(&v).unwrap().len());
        let logged = log_entries(&log.unwrap_or_default())
            .unwrap()
            .iter()
            .filter(|(_, e)| e.merchant == hot_m)
            .count();
        merged + logged
    };
    // f's batches: PER orders of "hot" each, from customers of their own (a
    // sketch of kilobytes per frame: the log passes 32 KiB and is compacted)
    const PER: i64 = 300;
    let mut next = 0u64;
    let mut apply_f = async || {
        next += 1;
        let l: Vec<u8> = (0..PER)
            .flat_map(|j| {
                line(
                    &format!("f{next}-{j}"),
                    hot_m,
                    "order",
                    hour + 1_000_000,
                    Some(&format!("c{next}-{j}")),
                )
            })
            .collect();
        apply_records(
            &speed,
            f.clone(),
            [Record::new(Position::from_u64(next), &l[..])],
            now,
        )
        .await
        .unwrap();
    };
    for _ in 0..5 {
        apply_f().await;
    }
    // g's batch: "hot" in its first part, cut off before its second
    let mut g_lines = Vec::new();
    for (i, m) in ms.iter().enumerate() {
        let customer = (i == 0).then_some("g");
        g_lines.extend(line(
            &format!("g{i}"),
            m,
            "order",
            hour + 1_000_000,
            customer,
        ));
    }
    let g_tail = line("g-tail", &ms[1], "order", hour + 1_000_000, None);
    let blocker = log_key(&ms[PART_SIZE], hour);
    block(&mut c, &blocker).await;
    let g1 = [Record::new(Position::from_u64(1), &g_lines[..])];
    apply_records(&speed, g.clone(), g1.to_vec(), now)
        .await
        .unwrap_err();
    unblock(&mut c, &blocker).await;
    for _ in 0..60 {
        apply_f().await;
    }
    let held = hot_frames(&mut c).await;
    assert!(
        held < 40,
        "f's frames were merged around g's cut-off frame, which stays as it is: {held} frames"
    );
    assert_eq!(orders(&store, hot_m, hour).await, 65 * PER + 1);
    // g delivered again, cut differently: its cut-off frame is taken out, then all applied
    let g2 = [
        Record::new(Position::from_u64(1), &g_lines[..]),
        Record::new(Position::from_u64(2), &g_tail[..]),
    ];
    apply_records(&speed, g.clone(), g2.to_vec(), now)
        .await
        .unwrap();
    assert_eq!(orders(&store, hot_m, hour).await, 65 * PER + 1);
    assert_eq!(orders(&store, &ms[1], hour).await, 2);
    assert_eq!(orders(&store, ms.last().unwrap(), hour).await, 1);
    // g's share is done: the value stays short as f goes on
    apply_f().await;
    assert!(hot_frames(&mut c).await < 40);
    assert_eq!(orders(&store, hot_m, hour).await, 66 * PER + 1);
    let r = store.read(hot_m, &[hour], &[]).await.unwrap();
    let distinct = r.hours[0].unique_customers.unwrap() as f64;
    let want = (66 * PER + 1) as f64;
    assert!(
        (distinct - want).abs() < 0.05 * want,
        "{want} customers (f's, and g's): {distinct}"
    );
}
