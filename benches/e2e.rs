//! The whole pipeline on this machine: events/s from the Kinesis emulator into
//! both views, and freshness (an event put on the stream to visible in the API).
//!
//! Rate: `tally gen --kinesis` puts BENCH_EVENTS (default 400,000) events on a
//! 2-shard stream in moto's server first; then `tally archive consume` (into a
//! Delta lake on moto's S3) and `tally speed consume` (into a real redis-server)
//! run side by side until caught up, timed. Freshness: with both consumers and
//! `tally serve` running, BENCH_PROBES (default 100) single events of fresh
//! merchants are put one at a time, and the API polled every 10 ms until the
//! current hour shows the event. moto, Redis, the consumers and the server all
//! share the machine's 2 cores.
//!
//! Run: `cargo bench -p tally --bench e2e` (or `scripts/bench.sh e2e`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tally_testkit::{free_port, http_get, kinesis, MotoServer, RedisServer};

const STREAM: &str = "events";
const SECRET: &str = "bench-secret";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tally(moto: &MotoServer, redis: &RedisServer) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (k, v) in moto.aws_env() {
        c.env(k, v);
    }
    c.env("TALLY_LAKE", "s3://lake/tally")
        .env("TALLY_REDIS_URL", redis.url())
        .env("TALLY_KINESIS_STREAM", STREAM)
        .env("TALLY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run(mut c: Command, what: &str) -> String {
    let out = c.output().expect("running tally");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting tally")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let events: u64 = env_or("BENCH_EVENTS", 400_000);
    let probes: usize = env_or("BENCH_PROBES", 100);
    let redis = RedisServer::start();
    let moto = MotoServer::start();
    moto.create_bucket("lake");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let client = kinesis::client(&moto.endpoint());
    rt.block_on(kinesis::create_stream(&client, STREAM, 2));

    // load the stream (not timed)
    let t = Instant::now();
    let mut gen = tally(&moto, &redis);
    gen.args([
        "gen",
        "--events",
        &events.to_string(),
        "--merchants",
        "10000",
        "--days",
        "1",
        "--kinesis",
        STREAM,
    ]);
    let gen_out = run(gen, "tally gen");
    println!(
        "loaded {events} events onto the stream in {:.1}s ({})",
        t.elapsed().as_secs_f64(),
        gen_out.lines().last().unwrap_or("").trim()
    );

    // rate: both consumers until caught up
    let cpu0 = tally_testkit::cpu_secs_children();
    let t = Instant::now();
    let mut a = tally(&moto, &redis);
    a.args(["archive", "consume", "--until-caught-up"]);
    let mut s = tally(&moto, &redis);
    s.args(["speed", "consume", "--until-caught-up"]);
    let (a, s) = (
        a.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("archive consume"),
        s.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("speed consume"),
    );
    let mut ends = Vec::new();
    for (c, what) in [(a, "archive consume"), (s, "speed consume")] {
        let out = c.wait_with_output().expect(what);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ends.push((
            what,
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = tally_testkit::cpu_secs_children() - cpu0;
    println!("\n| consumer | seconds to catch up | events/s | summary |");
    println!("|---|---|---|---|");
    for (what, secs, summary) in &ends {
        println!(
            "| {what} | {secs:.1} | {:.0} | {} |",
            events as f64 / secs,
            summary.lines().last().unwrap_or("")
        );
    }
    println!(
        "both views caught up: {events} events in {wall:.1}s = {:.0} events/s end to end (consumers' CPU {cpu:.1}s)",
        events as f64 / wall
    );

    // freshness: put one event, poll the API until it shows
    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = tally(&moto, &redis);
    serve.args(["serve", "--addr", &addr]);
    let mut children = vec![spawn(serve)];
    let mut a = tally(&moto, &redis);
    a.args(["archive", "consume"]);
    let mut s = tally(&moto, &redis);
    s.args(["speed", "consume"]);
    children.push(spawn(a));
    children.push(spawn(s));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(&addr, "/ready", ""), Ok((200, _))) {
        assert!(Instant::now() < deadline, "tally serve did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = encode(
        &Header::default(),
        &json!({"role": "admin", "exp": chrono::Utc::now().timestamp() + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token");
    let mut latencies = Vec::with_capacity(probes);
    for i in 0..probes {
        let now = chrono::Utc::now();
        let hour = now.timestamp() / 3600 * 3600;
        let merchant = format!("fresh_{}_{i}", now.timestamp_millis());
        let line = json!({"event_id": format!("p{i}"), "merchant_id": merchant, "type": "order",
            "ts": now.timestamp_millis(), "amount": 100, "customer_id": "c1"})
        .to_string();
        let path = format!(
            "/v1/merchants/{merchant}/metrics?from={}&to={}&granularity=hour",
            chrono::DateTime::from_timestamp(hour, 0)
                .expect("hour")
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            chrono::DateTime::from_timestamp(hour + 3600, 0)
                .expect("hour")
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let t = Instant::now();
        rt.block_on(
            client
                .put_record()
                .stream_name(STREAM)
                .partition_key(&merchant)
                .data(Blob::new(line + "\n"))
                .send(),
        )
        .expect("PutRecord");
        loop {
            let (status, body) = http_get(&addr, &path, &token).expect("the API answers");
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            if v["buckets"][0]["orders"] == 1 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "event {i} never showed: {body}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "\nfreshness, event put to visible in the API ({probes} events, one at a time, polled every 10 ms): \
         p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
}
