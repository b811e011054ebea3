//! The whole pipeline on real services, and under faults: `tally gen` puts events
//! (with duplicate, late and malformed lines) on a Kinesis stream in moto's
//! server; `tally speed consume` (into a real redis-server) and `tally archive
//! consume` (into a Delta lake on moto's S3) read it; `tally batch run` computes
//! the metric tables; `tally serve` answers. Every bucket of every merchant is
//! compared with a computation written here, over the same generated lines, from
//! the event contract alone.
//!
//! S3 is reached through a proxy the tests can take down; Kinesis directly
//! (`AWS_ENDPOINT_URL_KINESIS`). Redis keeps an append-only file, so a restart
//! keeps its data as a promoted replica would.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tally_stream::kinesis_event;
use tally_testkit::{free_port, http_get, kinesis, MotoServer, Proxy, RedisCluster, RedisServer};

const SECRET: &str = "pipeline-test-secret";
const STREAM: &str = "events";
const HOUR_MS: i64 = 3_600_000;

/// Per (merchant, hour start ms): orders, gross_sales, refunds, refunded_amount,
/// page_views, and the customers seen.
type Model = BTreeMap<(String, i64), ([i64; 5], BTreeSet<String>)>;

/// The batch view's truth (copies of an event counted once) and the speed view's
/// (every accepted copy counted: the contract lets the speed layer count a
/// producer's duplicate until the batch for that hour lands).
#[derive(Default)]
struct Models {
    dedup: Model,
    all: Model,
}

/// The Redis the pipeline writes to: one server, or a Redis Cluster.
enum Redis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    fn url(&self) -> String {
        match self {
            Redis::Server(s) => s.url(),
            Redis::Cluster(c) => c.url(),
        }
    }

    fn server(&mut self) -> &mut RedisServer {
        match self {
            Redis::Server(s) => s,
            Redis::Cluster(_) => panic!("this test needs a single Redis server"),
        }
    }

    fn stop(&mut self) {
        self.server().stop()
    }

    fn restart(&mut self) {
        self.server().restart()
    }

    fn restart_empty(&mut self) {
        self.server().restart_empty()
    }
}

struct Pipeline {
    _dir: tempfile::TempDir,
    redis: Redis,
    moto: MotoServer,
    s3: Proxy,
    file: PathBuf,
    now_ms: i64,
    model: Models,
    /// Lines the contract accepts (duplicates included) and rejects.
    accepted: usize,
    rejected: usize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn check(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Pipeline {
    /// Services up, a 2-shard stream, and `events` generated lines over the last
    /// two days on the stream (and in a file for the model).
    fn start(seed: u64, events: u64) -> Pipeline {
        Self::start_on(Redis::Server(RedisServer::start_persistent()), seed, events)
    }

    /// [`Pipeline::start`] with the speed view and the serving store on `redis`.
    fn start_on(redis: Redis, seed: u64, events: u64) -> Pipeline {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let moto = MotoServer::start();
        moto.create_bucket("lake");
        let s3 = Proxy::start(moto.port());
        rt().block_on(kinesis::create_stream(
            &kinesis::client(&moto.endpoint()),
            STREAM,
            2,
        ));
        let now_ms = now_ms();
        // the stream ends a minute ago, so its last events are in the current
        // (or the previous, still open) hour
        let start = chrono::DateTime::from_timestamp_millis(now_ms - 2 * 86_400_000 - 60_000)
            .expect("a start time")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let file = dir.path().join("events.ndjson");
        let mut p = Pipeline {
            _dir: dir,
            redis,
            moto,
            s3,
            file,
            now_ms,
            model: Models::default(),
            accepted: 0,
            rejected: 0,
        };
        let gen = |extra: &[&str]| {
            let mut c = p.tally();
            c.args([
                "gen",
                "--seed",
                &seed.to_string(),
                "--events",
                &events.to_string(),
                "--merchants",
                "25",
                "--customers-per-merchant",
                "300",
                "--days",
                "2",
                "--start",
                &start,
                "--late-share",
                "0.03",
                "--duplicate-share",
                "0.03",
                "--malformed-share",
                "0.01",
            ])
            .args(extra);
            check(c.output().expect("running tally gen"), "tally gen");
        };
        gen(&["--output", p.file.to_str().expect("utf-8 path")]);
        gen(&["--kinesis", STREAM]);
        let (model, accepted, rejected) = model(&p.file, now_ms);
        p.model = model;
        p.accepted = accepted;
        p.rejected = rejected;
        p
    }

    /// The binary with this pipeline's configuration.
    fn tally(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
        for (k, v) in self.moto.aws_env() {
            c.env(k, v);
        }
        c.env("AWS_ENDPOINT_URL", self.s3.endpoint())
            .env("AWS_ENDPOINT_URL_KINESIS", self.moto.endpoint())
            .env("TALLY_LAKE", "s3://lake/tally")
            .env("TALLY_REDIS_URL", self.redis.url())
            .env("TALLY_KINESIS_STREAM", STREAM)
            .env("TALLY_JWT_SECRET", SECRET)
            .env("TALLY_BATCH_LEASE_SECS", "10")
            // the archiver here lags the speed consumer by well under a second
            .env("TALLY_SPEED_REBUILD_SETTLE_SECS", "2")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.tally()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tally")
    }

    fn run(&self, args: &[&str]) -> String {
        check(
            self.tally().args(args).output().expect("running tally"),
            &format!("tally {}", args.join(" ")),
        )
    }

    /// Both consumers until caught up, side by side.
    fn consume(&self, limit: &str) {
        let a = self.spawn(&["archive", "consume", "--until-caught-up", "--limit", limit]);
        let s = self.spawn(&["speed", "consume", "--until-caught-up", "--limit", limit]);
        for (c, what) in [(a, "archive consume"), (s, "speed consume")] {
            check(c.wait_with_output().expect("waiting"), what);
        }
    }

    fn count(&self, sql: &str) -> i64 {
        let out = self.run(&["sql", "--format", "csv", sql]);
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no count in {out:?}"))
    }

    /// Nothing lost, nothing doubled in the master dataset.
    fn check_master_dataset(&self) {
        assert_eq!(
            self.count("SELECT COUNT(*) FROM raw_events") as usize,
            self.accepted,
            "raw_events rows"
        );
        assert_eq!(
            self.count("SELECT COUNT(*) FROM quarantine") as usize,
            self.rejected,
            "quarantine rows"
        );
    }

    fn serve(&self) -> Server {
        let addr = format!("127.0.0.1:{}", free_port());
        // dropping the server kills and waits for the process, also on the panic below
        let server = Server {
            child: self.spawn(&["serve", "--addr", &addr]),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&server.addr, "/ready", "") {
                return server;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("tally serve did not get ready on {}", server.addr);
    }

    /// Every hourly and daily bucket of every merchant equals the model.
    fn check_api(&self, server: &Server) {
        self.wait_until_whole(server);
        let token = admin_token();
        let first_hour = (self.now_ms - 2 * 86_400_000 - 60_000).div_euclid(HOUR_MS) * HOUR_MS
            // late events reach up to 48 h further back
            - 48 * HOUR_MS;
        let end_hour = self.now_ms.div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS;
        let merchants: BTreeSet<&String> = self.model.dedup.keys().map(|(m, _)| m).collect();
        assert!(merchants.len() >= 20, "{} merchants", merchants.len());
        for m in merchants {
            let body = server.metrics(m, first_hour, end_hour, "hour", &token);
            assert_eq!(body["partial"], false, "{body}");
            let w = watermark(&body);
            let buckets = body["buckets"].as_array().expect("buckets");
            assert_eq!(buckets.len() as i64, (end_hour - first_hour) / HOUR_MS);
            for (i, b) in buckets.iter().enumerate() {
                let h = first_hour + i as i64 * HOUR_MS;
                let (c, set) = self.sum(m, h, h + HOUR_MS, w);
                check_bucket(b, c, &set);
            }
            let day = 86_400_000;
            let (d0, d1) = (
                first_hour.div_euclid(day) * day,
                end_hour.div_euclid(day) * day + day,
            );
            let body = server.metrics(m, d0, d1, "day", &token);
            let w = watermark(&body);
            for (i, b) in body["buckets"]
                .as_array()
                .expect("buckets")
                .iter()
                .enumerate()
            {
                let d = d0 + i as i64 * day;
                let (c, set) = self.sum(m, d, d + day, w);
                check_bucket(b, c, &set);
            }
        }
    }

    /// Counters and customers of `m` over the hours `[start, end)`: hours before
    /// the watermark `w` from the deduplicated model, the others from every copy.
    fn sum(&self, m: &str, start: i64, end: i64, w: i64) -> ([i64; 5], BTreeSet<String>) {
        let mut counters = [0; 5];
        let mut customers = BTreeSet::new();
        for (model, from, to) in [
            (&self.model.dedup, start, end.min(w)),
            (&self.model.all, start.max(w), end),
        ] {
            if from >= to {
                continue;
            }
            for (_, (c, set)) in model.range((m.to_string(), from)..(m.to_string(), to)) {
                for (t, v) in counters.iter_mut().zip(c) {
                    *t += v;
                }
                customers.extend(set.iter().cloned());
            }
        }
        (counters, customers)
    }
}

/// The response's batch watermark (epoch ms; the far past when there is none).
fn watermark(body: &Value) -> i64 {
    body["batch_watermark"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(i64::MIN, |t| t.timestamp_millis())
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn metrics(&self, m: &str, from: i64, to: i64, granularity: &str, token: &str) -> Value {
        let path = format!(
            "/v1/merchants/{m}/metrics?from={}&to={}&granularity={granularity}",
            rfc3339(from),
            rfc3339(to)
        );
        let (status, body) = http_get(&self.addr, &path, token).expect("the API answers");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a time")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn admin_token() -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"role": "admin", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token")
}

/// A bucket against the model: counters exact whatever the source; distinct
/// customers exact where the API says so, within its bounds where it estimates.
fn check_bucket(b: &Value, counters: [i64; 5], customers: &BTreeSet<String>) {
    assert!(
        matches!(b["source"].as_str(), Some("batch" | "speed" | "mixed")),
        "{b}"
    );
    tally_testkit::check_bucket(b, counters, customers.len());
}

/// The model, from the event contract (DESIGN.md) and nothing of tally's code:
/// a line counts when it is a JSON object with a non-empty `event_id`, a
/// `merchant_id` of `[A-Za-z0-9_.:-]`, a `type`, a `ts` (epoch ms or RFC 3339) at
/// most 5 minutes ahead, and an integer `amount` for orders and refunds. Copies
/// of an event (same merchant, id and hour) count once.
fn model(file: &Path, now_ms: i64) -> (Models, usize, usize) {
    let text = std::fs::read_to_string(file).expect("the generated file");
    let mut out = Models::default();
    let mut seen = HashSet::new();
    let (mut accepted, mut rejected) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Some((m, id, kind, ts, amount, customer)) = parse(line, now_ms) else {
            rejected += 1;
            continue;
        };
        accepted += 1;
        let hour = ts.div_euclid(HOUR_MS) * HOUR_MS;
        let first_copy = seen.insert((m.clone(), id, hour));
        for (model, counts) in [(&mut out.all, true), (&mut out.dedup, first_copy)] {
            if !counts {
                continue;
            }
            let e = model.entry((m.clone(), hour)).or_default();
            match kind.as_str() {
                "order" => {
                    e.0[0] += 1;
                    e.0[1] += amount.unwrap_or(0);
                }
                "refund" => {
                    e.0[2] += 1;
                    e.0[3] += amount.unwrap_or(0);
                }
                "page_view" => e.0[4] += 1,
                _ => {}
            }
            if let Some(c) = &customer {
                e.1.insert(c.clone());
            }
        }
    }
    (out, accepted, rejected)
}

type Parsed = (String, String, String, i64, Option<i64>, Option<String>);

fn parse(line: &str, now_ms: i64) -> Option<Parsed> {
    let v: Value = serde_json::from_str(line).ok()?;
    let id = v["event_id"].as_str().filter(|s| !s.is_empty())?;
    let m = v["merchant_id"].as_str().filter(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
    })?;
    let kind = v["type"].as_str()?;
    let ts = match &v["ts"] {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis(),
        _ => return None,
    };
    if ts > now_ms + 5 * 60_000 {
        return None;
    }
    let amount = v["amount"].as_i64();
    if matches!(kind, "order" | "refund") && amount.is_none() {
        return None;
    }
    let customer = v["customer_id"].as_str().map(str::to_string);
    Some((m.into(), id.into(), kind.into(), ts, amount, customer))
}

#[test]
fn the_pipeline_equals_an_independent_computation() {
    let p = Pipeline::start(11, 20_000);
    assert!(
        p.rejected > 0 && p.accepted > 19_000,
        "{} / {}",
        p.accepted,
        p.rejected
    );
    p.consume("500");
    p.run(&["batch", "run"]);
    p.check_master_dataset();
    let server = p.serve();
    p.check_api(&server);
    // a second pass over the stream changes nothing
    p.consume("500");
    p.run(&["batch", "run"]);
    p.check_master_dataset();
    p.check_api(&server);
}

impl Pipeline {
    /// The lake, opened in this process.
    fn lake(&self) -> tally_common::lake::Lake {
        let mut lake = tally_common::lake::Lake::new(
            "s3://lake/tally",
            Some(&self.s3.endpoint()),
            Some("us-east-1"),
        )
        .expect("the lake");
        for (k, v) in self.moto.aws_env() {
            lake = lake.with_option(k, &v);
        }
        lake
    }

    /// Batch run, then the API and the master dataset against the model.
    fn check_everything(&self) {
        self.run(&["batch", "run"]);
        self.check_master_dataset();
        let server = self.serve();
        self.check_api(&server);
    }

    /// The last 40 hours of every merchant, hour by hour, against the model:
    /// before any batch run all of them are the speed view's (older hours may
    /// have passed the speed view's 48-hour TTL and are rightly unknown).
    fn check_hours_from(&self, server: &Server) {
        let token = admin_token();
        let end_hour = self.now_ms.div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS;
        let first_hour = end_hour - 40 * HOUR_MS;
        let merchants: BTreeSet<&String> = self.model.dedup.keys().map(|(m, _)| m).collect();
        for m in merchants {
            let body = server.metrics(m, first_hour, end_hour, "hour", &token);
            assert_eq!(body["partial"], false, "{body}");
            let w = watermark(&body);
            for (i, b) in body["buckets"]
                .as_array()
                .expect("buckets")
                .iter()
                .enumerate()
            {
                let h = first_hour + i as i64 * HOUR_MS;
                let (c, set) = self.sum(m, h, h + HOUR_MS, w);
                // the speed view's sketch must equal one built from the model's
                // exact set (its own estimation error is no excuse for a lost id)
                let mut model = tally_common::sketch::CustomerUnion::new();
                for id in &set {
                    model.update(id);
                }
                tally_testkit::check_bucket(b, c, set.len());
                if !b["unique_customers_bounds"].is_null() {
                    assert_eq!(b["unique_customers"], model.estimate().estimate, "{b}");
                }
            }
        }
    }

    /// Wait until the speed view vouches for the current hour: a view new to the
    /// server (a fresh or emptied Redis) is rebuilt by `tally serve` itself.
    fn wait_until_whole(&self, server: &Server) {
        let token = admin_token();
        let merchants: BTreeSet<String> = self.model.dedup.keys().map(|(m, _)| m.clone()).collect();
        assert!(!merchants.is_empty(), "a merchant");
        let hour = self.now_ms.div_euclid(HOUR_MS) * HOUR_MS;
        // generous: the suite runs this binary's pipelines side by side on 2
        // cores, and a rebuild reads raw_events and every slot's view. Every
        // merchant: on a cluster the rebuild marks its views (one per slot)
        // rebuilt in one pipeline split by slot, so one merchant's hours can be
        // whole a moment before another's
        let deadline = Instant::now() + Duration::from_secs(180);
        for m in &merchants {
            loop {
                let body = server.metrics(m, hour - HOUR_MS, hour + HOUR_MS, "hour", &token);
                if body["partial"] == false {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the speed view was not rebuilt within 180 s (merchant {m})"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_same_batch_delivered_twice_to_both_lambda_handlers_counts_once() {
    let p = Pipeline::start(12, 8_000);
    let rt = rt();
    rt.block_on(async {
        let client = kinesis::client(&p.moto.endpoint());
        let events = kinesis::lambda_events(&client, STREAM).await;
        let speed = tally_speed_layer::SpeedSink(tally_speed_layer::SpeedStore::Redis(
            tally_speed_layer::RedisStore::connect(&p.redis.url(), 48 * 3600)
                .await
                .expect("redis"),
        ));
        let archiver = tally_batch_layer::ArchiveSink::new(
            tally_batch_layer::Archiver::open(&p.lake())
                .await
                .expect("the archiver"),
        );
        for event in events {
            // a first delivery cut short (the first half, as a bisecting retry
            // sends it), then the whole batch, then the whole batch again
            let mut half = event.clone();
            half.records.truncate(event.records.len() / 2);
            for delivery in [half, event.clone(), event] {
                let r = kinesis_event::handle(&speed, &delivery).await;
                assert!(r.batch_item_failures.is_empty(), "speed: {r:?}");
                let r = kinesis_event::handle(&archiver, &delivery).await;
                assert!(r.batch_item_failures.is_empty(), "archiver: {r:?}");
            }
        }
    });
    p.check_everything();
}

/// The same pipeline with `TALLY_REDIS_URL` naming one node of a Redis Cluster
/// (three primaries, a replica each): the speed view, its checkpoints, the
/// rebuild and the serving store spread over the cluster's slots.
#[test]
fn the_pipeline_equals_an_independent_computation_on_a_redis_cluster() {
    let p = Pipeline::start_on(Redis::Cluster(RedisCluster::start(3)), 21, 12_000);
    p.consume("500");
    // before any batch run every bucket is the speed view's
    {
        let server = p.serve();
        p.wait_until_whole(&server);
        p.check_hours_from(&server);
    }
    p.check_everything();
    // a second pass over the stream changes nothing
    p.consume("500");
    p.check_everything();
}

/// A cluster primary killed while `tally speed consume` writes: its replica is
/// promoted (the cluster's own failover), the consumer carries on through the
/// cluster's new topology, and once redeliveries are applied nothing is lost
/// and nothing counted twice. Every batch's writes reached a replica (`WAIT`)
/// before the consumer checkpointed past them, so the promoted replica has every
/// write the stream will not deliver again.
#[test]
fn a_cluster_primary_killed_mid_stream_loses_and_doubles_nothing() {
    let mut p = Pipeline::start_on(Redis::Cluster(RedisCluster::start(3)), 22, 15_000);
    let mut s = p.spawn(&["speed", "consume", "--limit", "20"]);
    let victim = {
        let Redis::Cluster(c) = &p.redis else {
            unreachable!()
        };
        let t = Instant::now();
        // wait until the consumer has applied a good part of the stream
        while c
            .cli(c.topology()[0].0, &["DBSIZE"])
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
            < 100
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the consumer applies nothing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.topology()[0].0
    };
    if let Redis::Cluster(c) = &mut p.redis {
        c.kill(victim);
        c.wait_failover(victim, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    sigkill(&mut s);
    p.consume("500");
    {
        let server = p.serve();
        p.wait_until_whole(&server);
        p.check_hours_from(&server);
    }
    p.check_everything();
}

#[test]
fn consumers_killed_mid_stream_resume_without_loss_or_double_count() {
    let p = Pipeline::start(13, 15_000);
    // small GetRecords calls so each consumer is killed with work in hand
    for round in 0..3 {
        let mut a = p.spawn(&["archive", "consume", "--limit", "20"]);
        let mut s = p.spawn(&["speed", "consume", "--limit", "20"]);
        std::thread::sleep(Duration::from_millis(700 + 400 * round));
        sigkill(&mut a);
        sigkill(&mut s);
    }
    p.consume("500");
    p.check_everything();
}

#[test]
fn redis_restarted_mid_stream_loses_and_doubles_nothing() {
    let mut p = Pipeline::start(14, 15_000);
    let mut s = p.spawn(&["speed", "consume", "--limit", "20"]);
    std::thread::sleep(Duration::from_millis(800));
    p.redis.stop();
    std::thread::sleep(Duration::from_secs(2));
    p.redis.restart();
    // the consumer retried through the outage; let it catch up, then stop it
    let caught_up = p.spawn(&["archive", "consume", "--until-caught-up"]);
    check(
        caught_up.wait_with_output().expect("archive consume"),
        "archive consume",
    );
    std::thread::sleep(Duration::from_secs(3));
    sigkill(&mut s);
    p.consume("500");
    p.check_everything();
}

/// Redis comes back empty mid-stream (a restart without its files, a failover
/// to an empty replica) and a consumer restarted after it re-reads the stream
/// from the start (its checkpoint went too). The marks written after the loss
/// must not make the older records look applied: the view is rebuilt from
/// raw_events and every bucket equals the model.
#[test]
fn redis_emptied_mid_stream_is_rebuilt_from_raw_events() {
    let mut p = Pipeline::start(15, 15_000);
    let mut a = p.spawn(&["archive", "consume", "--limit", "20"]);
    let mut s = p.spawn(&["speed", "consume", "--limit", "20"]);
    // the loss comes once the consumer has applied a good part of the stream
    let mut c = redis::Client::open(p.redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let t = Instant::now();
    while redis::cmd("DBSIZE").query::<i64>(&mut c).unwrap_or(0) < 200 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the consumer applies nothing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.redis.restart_empty();
    // the running consumer writes on into the empty server for a while
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(&mut s);
    let mut s = p.spawn(&["speed", "consume", "--limit", "20"]);
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(&mut s);
    sigkill(&mut a);
    p.consume("500");
    // before any batch run every bucket is the speed view's: the events applied
    // before the loss (which the consumers did not read again) are back only
    // through the rebuild, as rebuilt sums beside the counters
    {
        let server = p.serve();
        p.wait_until_whole(&server);
        p.check_hours_from(&server);
    }
    let mut c = redis::Client::open(p.redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    // the bucket-hours, and in them the rebuilt fields (`merchant/r`)
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tally:v6:{*}:*")
        .query(&mut c)
        .expect("KEYS");
    let mut rebuilt = 0i64;
    for k in &keys {
        let kind: String = redis::cmd("TYPE").arg(k).query(&mut c).expect("TYPE");
        if kind != "hash" {
            // a bucket-hour's log: the consumers' frames
            continue;
        }
        let fields: Vec<(String, Vec<u8>)> =
            redis::cmd("HGETALL").arg(k).query(&mut c).expect("HGETALL");
        for (field, v) in fields.iter().filter(|(f, _)| f.ends_with("/r")) {
            rebuilt += tally_speed_layer::speed_entry::value_counters(v)
                .unwrap_or_else(|e| panic!("{k} {field}: a rebuilt value decodes: {e}"))
                .get(tally_common::metrics::Metric::PageViews)
                .unwrap_or(0);
        }
    }
    assert!(rebuilt > 0, "no page view came back through the rebuild");
    p.check_everything();
}

#[test]
fn an_unreachable_s3_endpoint_delays_the_archiver_and_loses_nothing() {
    let p = Pipeline::start(15, 15_000);
    let a = p.spawn(&["archive", "consume", "--until-caught-up", "--limit", "20"]);
    std::thread::sleep(Duration::from_millis(800));
    p.s3.set_down(true);
    std::thread::sleep(Duration::from_secs(4));
    p.s3.set_down(false);
    // the object store's own retries or the consumer's (counted in its summary
    // line) carry it through; either way it must finish, and lose nothing
    check(
        a.wait_with_output().expect("archive consume"),
        "archive consume",
    );
    p.consume("500");
    p.run(&["batch", "run"]);
    p.check_master_dataset();
    let server = p.serve();
    p.check_api(&server);

    // the lake unreachable while the API serves: answers from what it has
    // loaded, or 503; never another 5xx; and whole again once S3 is back
    p.s3.set_down(true);
    let token = admin_token();
    let hour = p.now_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let path = format!(
        "/v1/merchants/m_1/metrics?from={}&to={}&granularity=hour",
        rfc3339(hour - 24 * HOUR_MS),
        rfc3339(hour + HOUR_MS)
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        let (status, body) = http_get(&server.addr, &path, &token).expect("the API answers");
        assert!(status == 200 || status == 503, "{status}: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    p.s3.set_down(false);
    p.check_api(&server);
}

#[test]
fn batch_runs_killed_or_started_twice_leave_correct_tables() {
    let p = Pipeline::start(16, 15_000);
    p.consume("500");
    // killed at several points, each rerun finds the tables whole
    for delay in [300, 900, 1_800] {
        let mut b = p.spawn(&["batch", "run", "--wait-secs", "30"]);
        std::thread::sleep(Duration::from_millis(delay));
        sigkill(&mut b);
    }
    // two at once: one works, the other waits for the lease (or finds nothing to do)
    let a = p.spawn(&["batch", "run", "--wait-secs", "60"]);
    let b = p.spawn(&["batch", "run", "--wait-secs", "60"]);
    for c in [a, b] {
        check(c.wait_with_output().expect("batch run"), "batch run");
    }
    p.check_everything();
}

#[test]
fn a_reprocess_while_the_api_serves_gives_no_error_and_no_mixed_answer() {
    let p = Pipeline::start(17, 12_000);
    p.consume("500");
    p.run(&["batch", "run"]);
    let server = p.serve();
    let from = rfc3339((p.now_ms - 4 * 86_400_000).div_euclid(HOUR_MS) * HOUR_MS);
    let to = rfc3339(p.now_ms.div_euclid(HOUR_MS) * HOUR_MS);
    let mut reprocess = p.spawn(&["batch", "reprocess", "--from", &from, "--to", &to]);
    let mut checks = 0;
    loop {
        p.check_api(&server);
        checks += 1;
        if let Some(status) = reprocess.try_wait().expect("reprocess") {
            assert!(status.success(), "reprocess failed");
            break;
        }
    }
    p.check_api(&server);
    assert!(checks >= 1);
    p.check_master_dataset();
}
