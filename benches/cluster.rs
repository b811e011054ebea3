//! The stream side on a Redis Cluster against one Redis server, same run:
//! events/s of `tally speed consume` and the API's latency while it runs.
//!
//! For each Redis (a single `redis-server`; a 3-primary cluster with a replica
//! each, `redis-cli --cluster create`, every node on this machine), BENCH_EVENTS
//! (default 300,000) events of 100,000 merchants are put on a 4-shard stream in
//! moto's server (not timed); then `tally speed consume --until-caught-up` runs,
//! timed, while BENCH_CLIENTS (default 8) threads ask `tally serve` (on the same
//! Redis) for the current hour of random merchants, one request after another.
//! moto, every Redis node, the consumer, the server and the clients share the
//! machine's 2 cores (the cluster's six `redis-server`s among them), so the
//! figures compare the two setups, not capacity. No node keeps an append-only
//! file (ElastiCache's default).
//!
//! Run: `cargo bench -p tally --bench cluster`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tally_testkit::{free_port, http_get, kinesis, MotoServer, RedisCluster, RedisServer};

const STREAM: &str = "events";
const SECRET: &str = "bench-secret";
const MERCHANTS: u32 = 100_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tally(moto: &MotoServer, redis_url: &str, lake: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (k, v) in moto.aws_env() {
        c.env(k, v);
    }
    c.env("TALLY_LAKE", lake)
        .env("TALLY_REDIS_URL", redis_url)
        .env("TALLY_KINESIS_STREAM", STREAM)
        .env("TALLY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One setup's figures: consume seconds, events/s, API requests, p50, p99 (ms).
fn measure(name: &str, redis_url: &str, events: u64, clients: usize) -> String {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().expect("a directory for the lake");
    let lake = dir.path().join("lake");
    let lake = lake.to_str().expect("utf-8 path");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(kinesis::create_stream(
        &kinesis::client(&moto.endpoint()),
        STREAM,
        4,
    ));
    let mut gen = tally(&moto, redis_url, lake);
    gen.args([
        "gen",
        "--events",
        &events.to_string(),
        "--merchants",
        &MERCHANTS.to_string(),
        "--days",
        "1",
        "--kinesis",
        STREAM,
    ]);
    let out = gen.output().expect("tally gen");
    assert!(
        out.status.success(),
        "tally gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = tally(&moto, redis_url, lake);
    serve
        .args(["serve", "--addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = serve.spawn().expect("tally serve");
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
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
    let ts = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .expect("a time")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let query = format!(
        "/metrics?from={}&to={}&granularity=hour",
        ts(hour - 3600),
        ts(hour + 3600)
    );

    let running = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..clients)
        .map(|i| {
            let (running, addr, token, query) =
                (running.clone(), addr.clone(), token.clone(), query.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let mut errors = 0u64;
                while running.load(Ordering::Relaxed) {
                    // xorshift: a random merchant per request
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let m = x % u64::from(MERCHANTS);
                    let t = Instant::now();
                    match http_get(&addr, &format!("/v1/merchants/m_{m}{query}"), &token) {
                        Ok((200, _)) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let t = Instant::now();
    let mut consume = tally(&moto, redis_url, lake);
    consume.args(["speed", "consume", "--until-caught-up"]);
    let out = consume.output().expect("tally speed consume");
    let secs = t.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    assert!(
        out.status.success(),
        "speed consume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // what the consumer warned of (retries, replicas), for the write-up
    let warnings = String::from_utf8_lossy(&out.stderr);
    let warned: Vec<&str> = warnings.lines().filter(|l| l.contains("WARN")).collect();
    if !warned.is_empty() {
        eprintln!(
            "speed consume warned {} times; first: {}",
            warned.len(),
            warned[0]
        );
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for r in readers {
        let (l, e) = r.join().expect("a reader");
        lat.extend(l);
        errors += e;
    }
    let _ = server.kill();
    let _ = server.wait();
    lat.sort_by(f64::total_cmp);
    format!(
        "| {name} | {secs:.1} | {:.0} | {} ({:.0}/s) | {errors} | {:.2} ms | {:.2} ms |",
        events as f64 / secs,
        lat.len(),
        lat.len() as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    )
}

fn main() {
    let events: u64 = env_or("BENCH_EVENTS", 300_000);
    let clients: usize = env_or("BENCH_CLIENTS", 8);
    println!(
        "{events} events of {MERCHANTS} merchants on a 4-shard stream; `tally speed consume --until-caught-up` \
         timed while {clients} clients read random merchants' current hour from `tally serve`"
    );
    let mut rows = Vec::new();
    {
        let redis = RedisServer::start();
        rows.push(measure("one redis-server", &redis.url(), events, clients));
    }
    {
        // no append-only files, as the single server and ElastiCache's defaults
        let cluster = RedisCluster::start_with(3, Duration::from_secs(2), false);
        rows.push(measure(
            "Redis Cluster, 3 primaries + 3 replicas (WAIT 1 per batch)",
            &cluster.url(),
            events,
            clients,
        ));
        // what kept a primary busy longest (SLOWLOG: commands over 10 ms), for the write-up
        for (port, _) in cluster.topology() {
            let slow = cluster.cli(port, &["SLOWLOG", "GET", "3"]);
            let lines: Vec<&str> = slow
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(24)
                .collect();
            eprintln!("slowlog of the primary on {port}: {}", lines.join(" | "));
        }
    }
    println!("\n| Redis | consume seconds | events/s | API requests during it | API errors | API p50 | API p99 |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
