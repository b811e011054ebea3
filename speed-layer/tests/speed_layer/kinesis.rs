//! The speed layer against moto's Kinesis and a real redis-server: records put
//! with aws-sdk-kinesis are consumed by the consumer and, separately, by the
//! Lambda handler fed the same records; both views equal a plain computation,
//! redeliveries count nothing twice, and a restarted consumer resumes from its
//! checkpoint.

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use tally_common::metrics::Metric;
use tally_common::shutdown::Shutdown;
use tally_common::source::{Record, SourceId};
use tally_common::speed_view::SpeedView;
use tally_speed_layer::{RedisStore, SpeedSink, SpeedStore};
use tally_stream::{kinesis_event, ConsumeOptions, Consumer, RecordSink, SinkOutcome};
use tally_testkit::events::{expected, generate, Expected, TestEvent};
use tally_testkit::{MotoServer, RedisServer};

const START_MS: i64 = 1_764_000_000_000 / 3_600_000 * 3_600_000;
const STREAM: &str = "events";

fn client(moto: &MotoServer) -> Client {
    tally_testkit::kinesis::client(&moto.endpoint())
}

async fn put(client: &Client, events: &[TestEvent]) {
    // one record per merchant and 20 events, partition key = merchant
    let mut by_merchant: std::collections::BTreeMap<&str, Vec<&TestEvent>> = Default::default();
    for e in events {
        by_merchant.entry(&e.merchant_id).or_default().push(e);
    }
    let mut entries = Vec::new();
    for (m, evs) in by_merchant {
        for chunk in evs.chunks(20) {
            let data: String = chunk.iter().map(|e| e.to_line(true) + "\n").collect();
            entries.push(
                PutRecordsRequestEntry::builder()
                    .partition_key(m)
                    .data(Blob::new(data.into_bytes()))
                    .build()
                    .unwrap(),
            );
        }
    }
    for chunk in entries.chunks(100) {
        let out = client
            .put_records()
            .stream_name(STREAM)
            .set_records(Some(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_record_count.unwrap_or(0), 0);
    }
}

async fn assert_view(store: &impl SpeedView, want: &Expected) {
    for ((m, hour_ms), (counts, customers)) in want {
        let r = store.read(m, &[hour_ms * 1000], &[]).await.unwrap();
        let c = &r.hours[0].counters;
        assert_eq!(
            [
                c.get(Metric::Orders).unwrap(),
                c.get(Metric::GrossSales).unwrap(),
                c.get(Metric::Refunds).unwrap(),
                c.get(Metric::RefundedAmount).unwrap(),
                c.get(Metric::PageViews).unwrap()
            ],
            *counts,
            "{m} {hour_ms}"
        );
        let u = r.hours[0].unique_customers.unwrap();
        assert!(
            (u - customers.len() as i64).abs() <= 1,
            "{m}: {u} vs {}",
            customers.len()
        );
    }
}

async fn lambda_events(client: &Client) -> Vec<KinesisEvent> {
    tally_testkit::kinesis::lambda_events(client, STREAM).await
}

#[tokio::test]
async fn consumer_and_lambda_agree_with_a_plain_computation_exactly_once() {
    let moto = MotoServer::start();
    let redis_a = RedisServer::start();
    let redis_b = RedisServer::start();
    let client = client(&moto);
    client
        .create_stream()
        .stream_name(STREAM)
        .shard_count(2)
        .send()
        .await
        .unwrap();

    let first = generate(31, 2_000, 25, START_MS, 3);
    put(&client, &first).await;

    let options = ConsumeOptions {
        until_caught_up: true,
        ..Default::default()
    };
    let store_a = SpeedStore::Redis(RedisStore::connect(&redis_a.url(), 3600).await.unwrap());
    // each run a new consumer, as after a restart
    let consume = || async {
        Consumer::new(
            client.clone(),
            STREAM,
            SpeedSink(store_a.clone()),
            options.clone(),
        )
        .run(Shutdown::never())
        .await
        .unwrap()
    };
    let stats = consume().await;
    assert_eq!(stats.accepted, 2_000);
    assert_view(&store_a, &expected(&first)).await;

    // a restart resumes from the checkpoints: nothing is read again
    let again = consume().await;
    assert_eq!(again.records, 0);

    // new events after the restart are applied once
    let second = generate(32, 1_000, 25, START_MS, 3);
    put(&client, &second).await;
    let third = consume().await;
    assert_eq!(third.accepted, 1_000);
    let all: Vec<TestEvent> = first.iter().chain(second.iter()).cloned().collect();
    assert_view(&store_a, &expected(&all)).await;

    // the Lambda handler fed the same records, each event delivered twice (a retry)
    let store_b = SpeedStore::Redis(RedisStore::connect(&redis_b.url(), 3600).await.unwrap());
    let sink_b = SpeedSink(store_b.clone());
    for event in lambda_events(&client).await {
        for _ in 0..2 {
            let resp = kinesis_event::handle(&sink_b, &event).await;
            assert!(resp.batch_item_failures.is_empty());
        }
    }
    assert_view(&store_b, &expected(&all)).await;
}

#[tokio::test]
async fn lambda_reports_the_first_record_when_redis_is_down() {
    let moto = MotoServer::start();
    let mut redis = RedisServer::start();
    let client = client(&moto);
    client
        .create_stream()
        .stream_name(STREAM)
        .shard_count(1)
        .send()
        .await
        .unwrap();
    let events = generate(41, 300, 5, START_MS, 2);
    put(&client, &events).await;
    let store = SpeedStore::Redis(
        RedisStore::connect(&redis.url(), 3600)
            .await
            .unwrap()
            .with_max_attempts(1),
    );
    let sink = SpeedSink(store.clone());
    let event = lambda_events(&client).await.remove(0);
    let first_seq = event.records[0].kinesis.sequence_number.clone();
    redis.stop();
    let resp = kinesis_event::handle(&sink, &event).await;
    assert_eq!(resp.batch_item_failures.len(), 1);
    assert_eq!(
        resp.batch_item_failures[0].item_identifier.as_deref(),
        Some(first_seq.as_str())
    );
    redis.restart();
    let mut ok = false;
    for _ in 0..50 {
        if kinesis_event::handle(&sink, &event)
            .await
            .batch_item_failures
            .is_empty()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "redelivery did not apply after Redis came back");
    assert_view(&store, &expected(&events)).await;
}

/// A sink that holds its first few batches for longer than the emulator's
/// iterator lifetime, so the consumer's next iterator has expired (AWS: 300 s).
struct SlowSink {
    inner: SpeedSink,
    slow_batches: std::sync::atomic::AtomicU32,
}

impl RecordSink for SlowSink {
    async fn apply<'a>(
        &'a self,
        source: &'a SourceId,
        records: &'a [Record<'a>],
        ingest_time: i64,
    ) -> tally_common::Result<SinkOutcome> {
        use std::sync::atomic::Ordering;
        if self
            .slow_batches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        }
        self.inner.apply(source, records, ingest_time).await
    }
    async fn checkpoint(&self, stream: &str, shard: &str) -> tally_common::Result<Option<String>> {
        self.inner.checkpoint(stream, shard).await
    }
    async fn set_checkpoint(
        &self,
        stream: &str,
        shard: &str,
        value: &str,
    ) -> tally_common::Result<()> {
        self.inner.set_checkpoint(stream, shard, value).await
    }
}

/// On AWS-shaped Kinesis (56-digit sequence numbers, a split that closes its
/// parent, iterators that expire), the consumer reads the parent to its end and
/// then both children, takes up again after its iterators expired, and counts
/// every event once.
#[tokio::test]
async fn a_split_shard_and_expired_iterators_count_every_event_once() {
    let moto = MotoServer::start_with(&[("EMU_ITER_TTL", "1")]);
    let redis = RedisServer::start();
    let client = client(&moto);
    client
        .create_stream()
        .stream_name(STREAM)
        .shard_count(1)
        .send()
        .await
        .unwrap();
    let before = generate(51, 600, 10, START_MS, 2);
    put(&client, &before).await;
    let shards = client
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await
        .unwrap()
        .shards
        .unwrap();
    let parent = &shards[0];
    // real sequence numbers are longer than any machine integer
    let seq = parent
        .sequence_number_range
        .as_ref()
        .unwrap()
        .starting_sequence_number
        .clone();
    assert!(seq.len() >= 56, "{seq}");
    client
        .split_shard()
        .stream_name(STREAM)
        .shard_to_split(&parent.shard_id)
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    let after = generate(52, 600, 10, START_MS, 2);
    put(&client, &after).await;

    let store = SpeedStore::Redis(RedisStore::connect(&redis.url(), 3600).await.unwrap());
    let sink = SlowSink {
        inner: SpeedSink(store.clone()),
        slow_batches: std::sync::atomic::AtomicU32::new(2),
    };
    let options = ConsumeOptions {
        until_caught_up: true,
        limit: 100,
        ..Default::default()
    };
    let stats = Consumer::new(client.clone(), STREAM, sink, options)
        .run(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(stats.accepted, 1_200, "{stats:?}");
    let all: Vec<TestEvent> = before.iter().chain(after.iter()).cloned().collect();
    assert_view(&store, &expected(&all)).await;
}

/// A hot merchant's partition key salted by the producer (`m#n`) spreads its
/// records over all four shards; each shard's records delivered twice (a
/// Lambda retry on every shard) still count every event once.
#[tokio::test]
async fn a_salted_hot_merchant_spans_four_shards_and_counts_once() {
    let moto = MotoServer::start();
    let redis = RedisServer::start();
    let client = client(&moto);
    tally_testkit::kinesis::create_stream(&client, STREAM, 4).await;
    // 2,000 events of one merchant among 1,000 of 20 others
    let mut events = generate(51, 1_000, 20, START_MS, 2);
    events.extend(
        generate(52, 2_000, 1, START_MS, 2)
            .into_iter()
            .map(|mut e| {
                e.merchant_id = "mhot".into();
                e
            }),
    );
    let mut producer = tally_stream::KinesisProducer::new(client.clone(), STREAM, 25).with_salting(
        tally_stream::Salting {
            above_per_sec: 100,
            ways: 4,
        },
    );
    for e in &events {
        producer
            .push_line(e.to_line(true).as_bytes())
            .await
            .unwrap();
    }
    producer.flush_all().await.unwrap();
    assert!(producer.salted_records > 0);

    let shard_events = lambda_events(&client).await;
    let hot_shards = shard_events
        .iter()
        .filter(|ev| {
            ev.records
                .iter()
                .any(|r| r.kinesis.partition_key.starts_with("mhot#"))
        })
        .count();
    assert_eq!(
        hot_shards, 4,
        "the hot merchant's salted records are on every shard"
    );
    let store = SpeedStore::Redis(RedisStore::connect(&redis.url(), 3600).await.unwrap());
    let sink = SpeedSink(store.clone());
    for event in &shard_events {
        for _ in 0..2 {
            let resp = kinesis_event::handle(&sink, event).await;
            assert!(resp.batch_item_failures.is_empty());
        }
    }
    assert_view(&store, &expected(&events)).await;
}

/// KPL aggregated records, made by an independent implementation (PyPI's
/// `aws-kinesis-agg`) and put on the emulator's stream with boto3, plus one
/// whose MD5 digest is broken: the consumer and the Lambda handler (every
/// event delivered twice) count each user record's events once, and the
/// broken record is rejected (for quarantine), not dropped silently.
#[tokio::test]
async fn kpl_aggregated_records_from_an_independent_producer_count_once() {
    let moto = MotoServer::start();
    let redis_a = RedisServer::start();
    let redis_b = RedisServer::start();
    let client = client(&moto);
    tally_testkit::kinesis::create_stream(&client, STREAM, 2).await;
    let events = generate(61, 1_500, 12, START_MS, 2);
    let lines: String = events.iter().map(|e| e.to_line(true) + "\n").collect();
    let script = r#"
import sys, boto3
from aws_kinesis_agg.aggregator import RecordAggregator
kinesis = boto3.client("kinesis", endpoint_url=sys.argv[1], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
def put(rec, corrupt=False):
    pk, ehk, data = rec.get_contents()
    if corrupt:
        data = data[:-1] + bytes([data[-1] ^ 1])
    kinesis.put_record(StreamName=sys.argv[2], Data=data, PartitionKey=pk)
agg = RecordAggregator()
n = 0
for line in sys.stdin:
    merchant = line.split('"merchant_id":"', 1)[1].split('"', 1)[0]
    # one user record per line, flushed every 40 (or when the aggregator is full)
    full = agg.add_user_record(merchant, line.encode())
    if full:
        put(full); n += 1
    if agg.get_num_user_records() >= 40:
        put(agg.clear_and_get()); n += 1
if agg.get_num_user_records():
    put(agg.clear_and_get()); n += 1
bad = RecordAggregator()
bad.add_user_record("m_bad", b'{"event_id":"x"}\n')
put(bad.clear_and_get(), corrupt=True)
print(n)
"#;
    let mut child = std::process::Command::new(tally_testkit::venv_python())
        .arg("-c")
        .arg(script)
        .arg(moto.endpoint())
        .arg(STREAM)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python from the test venv (scripts/install-services.sh)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "aggregating with aws-kinesis-agg (scripts/install-services.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let aggregated: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        aggregated > 10 && aggregated < 1_500,
        "{aggregated} aggregated records"
    );

    // the consumer
    let store_a = SpeedStore::Redis(RedisStore::connect(&redis_a.url(), 3600).await.unwrap());
    let stats = Consumer::new(
        client.clone(),
        STREAM,
        SpeedSink(store_a.clone()),
        ConsumeOptions {
            until_caught_up: true,
            ..Default::default()
        },
    )
    .run(Shutdown::never())
    .await
    .unwrap();
    assert_eq!(stats.records as usize, aggregated + 1);
    assert_eq!(stats.accepted, 1_500);
    assert_eq!(stats.rejected, 1, "the broken record, for quarantine");
    assert_view(&store_a, &expected(&events)).await;

    // the Lambda handler, every event twice
    let store_b = SpeedStore::Redis(RedisStore::connect(&redis_b.url(), 3600).await.unwrap());
    let sink_b = SpeedSink(store_b.clone());
    for event in lambda_events(&client).await {
        for _ in 0..2 {
            let resp = kinesis_event::handle(&sink_b, &event).await;
            assert!(resp.batch_item_failures.is_empty());
        }
    }
    assert_view(&store_b, &expected(&events)).await;
}
