//! The `tally` binary end to end on a local lake: gen → ingest (also killed with
//! SIGKILL and rerun) → batch run → sql, checked against independent counts.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn tally(lake: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.env("TALLY_LAKE", lake)
        .env_remove("TALLY_REDIS_URL")
        .env("RUST_LOG", "warn");
    c
}

fn sql(lake: &Path, query: &str) -> String {
    let out = tally(lake)
        .args(["sql", query, "--format", "csv"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn count(lake: &Path, query: &str) -> i64 {
    sql(lake, query)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `tally ingest --chunk-lines 2000 FILE` into `lake`, which must succeed.
fn ingest(lake: &Path, file: &Path) {
    let out = tally(lake)
        .args(["ingest", "--chunk-lines", "2000"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gen(dir: &Path, events: u64, seed: u64) -> std::path::PathBuf {
    let file = dir.join(format!("events-{seed}.ndjson"));
    let status = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "gen",
            "--seed",
            &seed.to_string(),
            "--events",
            &events.to_string(),
            "--merchants",
            "50",
            "--days",
            "2",
        ])
        .arg("--output")
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    file
}

/// Lines a decoder would accept, counted independently with serde_json: valid JSON
/// objects with the required fields (the generator's malformed lines break one rule each).
fn distinct_ids(file: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut lines = 0;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
            if let Some(id) = v["event_id"].as_str() {
                ids.insert(id.to_string());
            }
        }
    }
    (lines, ids.len())
}

#[test]
fn gen_is_reproducible_and_ingest_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let a = gen(dir.path(), 60_000, 7);
    let b = dir.path().join("again.ndjson");
    std::fs::copy(gen(dir.path(), 60_000, 7), &b).unwrap();
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    let (lines, _) = distinct_ids(&a);

    // reference: one clean ingest
    let clean = dir.path().join("clean");
    ingest(&clean, &a);
    let accepted = count(&clean, "SELECT COUNT(*) FROM raw_events");
    let quarantined = count(&clean, "SELECT COUNT(*) FROM quarantine");
    assert_eq!(
        accepted + quarantined,
        lines as i64,
        "every line accepted or quarantined"
    );
    assert!(quarantined > 0);

    // killed part way with SIGKILL, then rerun: no duplicate, no gap
    let killed = dir.path().join("killed");
    let mut child = tally(&killed)
        .args(["ingest", "--chunk-lines", "2000"])
        .arg(&a)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    ingest(&killed, &a);
    assert_eq!(count(&killed, "SELECT COUNT(*) FROM raw_events"), accepted);
    assert_eq!(
        count(&killed, "SELECT COUNT(DISTINCT source) FROM raw_events"),
        accepted
    );
    assert_eq!(
        count(&killed, "SELECT COUNT(*) FROM quarantine"),
        quarantined
    );

    // the batch layer over it, and SQL that refuses writes
    let out = tally(&killed).args(["batch", "run"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hourly_orders = count(&killed, "SELECT SUM(orders) FROM metrics_hourly");
    let raw_orders = count(
        &killed,
        "SELECT COUNT(*) FROM (SELECT DISTINCT merchant_id, event_id, event_hour, event_date FROM raw_events WHERE event_type = 'order' \
         AND event_time < (SELECT MAX(hour) FROM metrics_hourly) + INTERVAL '1 hour')",
    );
    assert_eq!(hourly_orders, raw_orders);
    // quarter hours add up to the hours; a merchant's zone shows in the local view
    assert_eq!(
        count(&killed, "SELECT SUM(orders) FROM metrics_quarter_hourly"),
        hourly_orders
    );
    let m = sql(
        &killed,
        "SELECT merchant_id FROM metrics_daily ORDER BY orders DESC LIMIT 1",
    );
    let m = m.lines().nth(1).unwrap().trim().to_string();
    let out = tally(&killed)
        .args(["merchants", "set", &m, "--time-zone", "Asia/Kathmandu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tally(&killed)
        .args(["merchants", "set", &m, "--time-zone", "IST"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    // README's analyst query: local days of one merchant from the quarter hours
    let local = sql(
        &killed,
        &format!(
            "SELECT date_trunc('day', local_start) AS local_day, SUM(orders) AS orders, \
             hll_sketch_estimate(hll_union_agg(customers_sketch)) AS unique_customers, \
             MIN(time_zone) AS zone FROM metrics_local WHERE merchant_id = '{m}' GROUP BY 1 ORDER BY 1"
        ),
    );
    let rows: Vec<&str> = local.lines().skip(1).collect();
    assert!(
        rows.len() >= 2 && rows.iter().all(|r| r.ends_with(",Asia/Kathmandu")),
        "{local}"
    );
    let local_orders: i64 = rows
        .iter()
        .map(|r| r.split(',').nth(1).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(
        local_orders,
        count(
            &killed,
            &format!("SELECT SUM(orders) FROM metrics_hourly WHERE merchant_id = '{m}'")
        )
    );
    // a day's sketch estimates its exact distinct count (within 5%: three
    // standard errors of lg_k 12's 1.6%)
    let days = sql(
        &killed,
        &format!("SELECT unique_customers, hll_sketch_estimate(customers_sketch) FROM metrics_daily WHERE merchant_id = '{m}'"),
    );
    for row in days.lines().skip(1) {
        let (exact, est) = row.split_once(',').unwrap();
        let (exact, est): (f64, f64) = (exact.parse().unwrap(), est.parse().unwrap());
        assert!((est - exact).abs() <= (exact * 0.05).max(1.0), "{days}");
    }
    // another engine reads the sketches: Apache DataSketches' Python library
    // deserializes each daily sketch, and a sketch it builds itself from the
    // merchant's raw customer ids adds nothing to the union (the same hashing)
    let script = r#"
import sys, collections, datetime
from deltalake import DeltaTable
from datasketches import hll_sketch, hll_union, tgt_hll_type
lake, m = sys.argv[1], sys.argv[2]
daily = DeltaTable(lake + "/metrics_daily").to_pyarrow_table().to_pylist()
raw = DeltaTable(lake + "/raw_events").to_pyarrow_table(columns=["merchant_id", "customer_id", "event_time"]).to_pylist()
by_day = collections.defaultdict(set)
for r in raw:
    if r["merchant_id"] == m and r["customer_id"] is not None:
        by_day[r["event_time"].date()].add(r["customer_id"])
n = 0
for row in daily:
    if row["merchant_id"] != m or row["customers_sketch"] is None:
        continue
    ours = hll_sketch.deserialize(row["customers_sketch"])
    theirs = hll_sketch(12, tgt_hll_type.HLL_4)
    for c in by_day[row["day"].date()]:
        theirs.update(c)
    alone = hll_union(12)
    alone.update(ours)
    both = hll_union(12)
    both.update(ours)
    both.update(theirs)
    exact = row["unique_customers"]
    assert abs(ours.get_estimate() - exact) <= max(1, exact * 0.05), (ours.get_estimate(), exact)
    # the same registers: nothing of theirs is new to ours (a customer only
    # raw_events holds, e.g. in a quarantined row, may add one)
    assert abs(both.get_estimate() - alone.get_estimate()) <= 1.5, (both.get_estimate(), alone.get_estimate())
    n += 1
assert n >= 2, n
print(n)
"#;
    let out = Command::new(tally_testkit::venv_python())
        .args(["-c", script])
        .arg(&killed)
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python's datasketches on tally's sketches: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in [
        "DROP TABLE raw_events",
        "INSERT INTO quarantine VALUES (1)",
        "COPY raw_events TO '/tmp/x'",
    ] {
        let out = tally(&killed).args(["sql", bad]).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("read-only"),
            "{bad}"
        );
    }
    // time travel: raw_events at version 0 is the empty table
    let out = tally(&killed)
        .args([
            "sql",
            "SELECT COUNT(*) FROM raw_events",
            "--version",
            "0",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(":0}"));
}

fn http_get(addr: &str, path: &str, token: &str) -> (u16, String) {
    tally_testkit::http_get(addr, path, token).expect("the server answers")
}

fn start_demo(dir: &Path, addr: &str) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir)
        .args([
            "demo",
            "--events",
            "60000",
            "--merchants",
            "100",
            "--days",
            "2",
            "--addr",
            addr,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let reader = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let line = line.unwrap();
        let done = line.starts_with("Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    (child, lines)
}

fn sigterm(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo did not exit cleanly: {status:?}");
}

#[test]
fn demo_serves_its_printed_queries_and_the_dashboard_renders() {
    let dir = tempfile::tempdir().unwrap();
    let port = tally_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (mut child, lines) = start_demo(dir.path(), &addr);
    assert!(lines.iter().any(|l| l.contains("is ready")), "{lines:?}");
    let token = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("export TOKEN="))
        .unwrap()
        .to_string();
    let curl = lines
        .iter()
        .find(|l| l.trim_start().starts_with("curl") && l.contains("granularity=hour"))
        .unwrap();
    let url = curl.split('"').nth(3).unwrap();
    let path = &url[url.find("/v1/").unwrap()..];
    let (status, body) = http_get(&addr, path, &token);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let buckets = v["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 24);
    let orders: i64 = buckets.iter().map(|b| b["orders"].as_i64().unwrap()).sum();
    assert!(orders > 0, "the printed query answers with numbers: {body}");
    assert!(buckets.iter().any(|b| b["source"] == "batch"));

    // the dashboard in headless Chromium draws bars from the API
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium not found: run scripts/install-services.sh (apt-get install chromium)");
    let page = format!("http://{addr}/#merchant=m_1&token={token}");
    let profile = dir.path().join("chromium-profile");
    let shot = std::env::temp_dir().join("tally-dashboard.png");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        "--virtual-time-budget=8000",
    ];
    let dom = Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&page)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "dashboard did not load data"
    );
    // a card's header shows the server's total (the page never sums buckets:
    // distinct customers of the range are a union, not a sum)
    let header = |metric: &str| {
        let at = dom
            .find(&format!("data-metric=\"{metric}\""))
            .unwrap_or_else(|| panic!("no {metric} card"));
        let end = dom[at..].find("</h2>").map_or(dom.len(), |e| at + e);
        dom[at..end].to_string()
    };
    assert!(header("orders").contains("total"), "{}", header("orders"));
    assert!(
        header("unique_customers").contains("total"),
        "unique customers show the server's total: {}",
        header("unique_customers")
    );
    // the time-zone picker and the calendar granularities
    assert!(dom.contains("<select id=\"tz\">"), "no time-zone picker");
    for unit in ["week", "month"] {
        assert!(
            dom.contains(&format!("<option>{unit}</option>")),
            "no {unit} granularity"
        );
    }
    let bars = dom.matches("class=\"bar\"").count();
    assert!(
        bars >= 9 * 24,
        "expected bars for 9 metrics x 24 hours, got {bars}"
    );
    let status = Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page)
        .status()
        .unwrap();
    assert!(status.success() && std::fs::metadata(&shot).unwrap().len() > 10_000);

    sigterm(&mut child);
    // a second start reuses the lake
    let (mut child, lines) = start_demo(dir.path(), &addr);
    assert!(lines.iter().any(|l| l.contains("is ready")));
    sigterm(&mut child);
}

#[test]
fn a_running_server_shows_what_another_process_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let (mut server, addr, token) = serve_with(&lake, &[]);
    assert_eq!(
        current_hour(&addr, &token, "m_live")["buckets"][0]["orders"],
        0
    );

    let now_ms = chrono::Utc::now().timestamp_millis();
    let file = dir.path().join("live.ndjson");
    let text: String = (0..25)
        .map(|i| order_line(&format!("live-{i}"), "m_live", now_ms))
        .collect();
    std::fs::write(&file, text).unwrap();
    ingest_with(&lake, &file, &[], &[]);
    let ingested = std::time::Instant::now();
    let mut seen = None;
    // correctness is asserted; the delay (2 s log polling, promised within 5 s) is
    // printed, not asserted: timing belongs to benchmarks
    while ingested.elapsed() < Duration::from_secs(30) {
        if current_hour(&addr, &token, "m_live")["buckets"][0]["orders"] == 25 {
            seen = Some(ingested.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm(&mut server);
    let seen = seen.expect("the server never showed the other process's events");
    println!(
        "visible in the API {:.2} s after the other process's ingest returned",
        seen.as_secs_f64()
    );
}

/// One order line of `merchant` at epoch ms `ts_ms`.
fn order_line(id: &str, merchant: &str, ts_ms: i64) -> String {
    format!("{{\"event_id\":\"{id}\",\"merchant_id\":\"{merchant}\",\"type\":\"order\",\"ts\":{ts_ms},\"amount\":100}}\n")
}

/// `tally ARGS` with extra environment, which must succeed; returns stdout.
fn run_with(lake: &Path, args: &[&std::ffi::OsStr], env: &[(&str, String)]) -> String {
    let out = tally(lake)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `tally ingest` with extra arguments and environment; returns stdout.
fn ingest_with(lake: &Path, file: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let mut all: Vec<&std::ffi::OsStr> = vec!["ingest".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.push(file.as_os_str());
    run_with(lake, &all, env)
}

/// An admin token and a serve process on `lake` with `env`; returns (child, addr, token).
fn serve_with(lake: &Path, env: &[(&str, String)]) -> (std::process::Child, String, String) {
    let addr = format!("127.0.0.1:{}", tally_testkit::free_port());
    let secret = "a-test-secret-of-enough-length-0123456789";
    let mut child = tally(lake)
        .args(["serve", "--addr", &addr])
        .env("TALLY_JWT_SECRET", secret)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"role": "admin", "exp": chrono::Utc::now().timestamp() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return (child, addr, token);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("tally serve did not listen");
}

/// The current hour's bucket of `merchant` from the API.
fn current_hour(addr: &str, token: &str, merchant: &str) -> serde_json::Value {
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
    let fmt = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let path = format!(
        "/v1/merchants/{merchant}/metrics?from={}&to={}&metrics=orders",
        fmt(hour),
        fmt(hour + 3600)
    );
    let (status, body) = http_get(addr, &path, token);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A file's position is the line, not the chunk: any chunking of any earlier run
/// is idempotent in raw_events and in a Redis speed view, a file that grew is
/// taken up where it stopped, and a last line still being written waits.
#[test]
fn ingest_is_exactly_once_by_line_whatever_the_chunking() {
    let redis = tally_testkit::RedisServer::start();
    let env = [("TALLY_REDIS_URL", redis.url())];
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let file = dir.path().join("orders.ndjson");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let lines: Vec<String> = (0..16)
        .map(|i| order_line(&format!("o{i}"), "m_lines", now_ms))
        .collect();
    std::fs::write(&file, lines[..10].concat()).unwrap();
    ingest_with(&lake, &file, &["--chunk-lines", "10"], &env);
    let out = ingest_with(&lake, &file, &["--chunk-lines", "3"], &env);
    assert!(out.contains("10 lines already ingested"), "{out}");
    let rows = "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM raw_events";
    assert_eq!(sql(&lake, rows).lines().nth(1), Some("10,10"));

    // the file grows, and its last line is still being written
    let partial = &lines[13][..lines[13].len() / 2];
    std::fs::write(&file, lines[..13].concat() + partial).unwrap();
    let out = ingest_with(&lake, &file, &["--chunk-lines", "4"], &env);
    assert!(out.contains("line 14 has no newline"), "{out}");
    assert_eq!(sql(&lake, rows).lines().nth(1), Some("13,13"));
    std::fs::write(&file, lines.concat()).unwrap();
    ingest_with(&lake, &file, &["--chunk-lines", "7"], &env);
    assert_eq!(sql(&lake, rows).lines().nth(1), Some("16,16"));

    // the speed view counted each line once too
    let (mut server, addr, token) = serve_with(&lake, &env);
    let b = current_hour(&addr, &token, "m_lines");
    sigterm(&mut server);
    assert_eq!(b["buckets"][0]["orders"], 16, "{b}");
    assert_eq!(b["partial"], false, "{b}");
}

/// Lines the decoder must read right on the real path: a UTF-8 byte-order mark
/// at the start of a file and `\r\n` ends, a leap second (in the second before
/// it, so in 2016's last hour and day), and an event before 1970 (quarantined
/// as out of range, never stored where it would stop the batch layer).
#[test]
fn ingest_reads_bom_crlf_and_leap_seconds_and_refuses_events_before_1970() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let file = dir.path().join("windows.ndjson");
    let text = "\u{feff}{\"event_id\":\"b1\",\"merchant_id\":\"m_bom\",\"type\":\"page_view\",\"ts\":\"2026-11-24T10:00:00Z\"}\r\n\
        {\"event_id\":\"l1\",\"merchant_id\":\"m_leap\",\"type\":\"page_view\",\"ts\":\"2016-12-31T23:59:60Z\"}\r\n\
        {\"event_id\":\"x1\",\"merchant_id\":\"m_old\",\"type\":\"page_view\",\"ts\":\"1600-01-01T00:00:00Z\"}\r\n";
    std::fs::write(&file, text).unwrap();
    ingest_with(&lake, &file, &[], &[]);
    let got = sql(
        &lake,
        "SELECT event_id, CAST(event_time AS VARCHAR) AS t, event_date FROM raw_events ORDER BY event_id",
    );
    let rows: Vec<&str> = got.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{got}");
    assert!(rows[0].starts_with("b1,2026-11-24T10:00:00"), "{got}");
    assert!(rows[1].starts_with("l1,2016-12-31T23:59:59"), "{got}");
    assert!(rows[1].ends_with(",2016-12-31"), "{got}");
    let q = sql(&lake, "SELECT reason FROM quarantine");
    let reasons: Vec<&str> = q.lines().skip(1).collect();
    assert_eq!(reasons.len(), 1, "{q}");
    assert!(reasons[0].starts_with("out_of_range"), "{q}");
}

/// A Redis speed view that lost its data never answers zeros as if true: the
/// current hour is unknown (null, partial) until the view is rebuilt from
/// raw_events, then right again, also for lines ingested after the loss.
#[test]
fn a_speed_view_that_lost_its_data_is_never_a_silent_zero() {
    let redis = tally_testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let file = dir.path().join("orders.ndjson");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let lines: Vec<String> = (0..25)
        .map(|i| order_line(&format!("o{i}"), "m_lost", now_ms))
        .collect();
    let env = [
        ("TALLY_REDIS_URL", redis.url()),
        // the server must not rebuild by itself while the test looks at the gap
        ("TALLY_SPEED_REBUILD_SETTLE_SECS", "3600".to_string()),
    ];
    std::fs::write(&file, lines[..20].concat()).unwrap();
    ingest_with(&lake, &file, &[], &env);
    let (mut server, addr, token) = serve_with(&lake, &env);
    let b = current_hour(&addr, &token, "m_lost");
    assert_eq!(b["buckets"][0]["orders"], 20, "{b}");

    // Redis loses everything (a restart without persistence, an empty replica)
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    let b = current_hour(&addr, &token, "m_lost");
    assert_eq!(b["partial"], true, "{b}");
    assert!(b["buckets"][0]["orders"].is_null(), "{b}");

    // an idle source's boundary waits for the settle time: the gap stays unknown
    let rebuild = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        run_with(&lake, &args, &env)
    };
    rebuild(&["speed", "rebuild", "--wait-secs", "0"]);
    assert!(current_hour(&addr, &token, "m_lost")["buckets"][0]["orders"].is_null());

    // another file's lines arrive (the first file is not read again: only the
    // rebuild can bring its orders back), then the rebuild fills them from raw_events
    let later = dir.path().join("later.ndjson");
    std::fs::write(&later, lines[20..].concat()).unwrap();
    ingest_with(&lake, &later, &[], &env);
    let stdout = rebuild(&["speed", "rebuild", "--rebuild-settle-secs", "0"]);
    assert!(stdout.contains("20 events"), "{stdout}");
    assert!(stdout.contains("the view is whole"), "{stdout}");
    let b = current_hour(&addr, &token, "m_lost");
    assert_eq!(b["buckets"][0]["orders"], 25, "{b}");
    assert_eq!(b["partial"], false, "{b}");
    // a second rebuild changes nothing
    assert!(rebuild(&["speed", "rebuild", "--rebuild-settle-secs", "0"]).contains("whole already"));
    let b = current_hour(&addr, &token, "m_lost");
    sigterm(&mut server);
    assert_eq!(b["buckets"][0]["orders"], 25, "{b}");
}

/// ElastiCache with an AUTH token: the token comes from Secrets Manager (here
/// moto's, the secret made by boto3, an independent client), never from the code
/// or a plain variable, and works for ingest and serve alike.
#[test]
fn the_redis_auth_token_comes_from_secrets_manager() {
    let password = "tok:en/with@odd chars";
    let redis = tally_testkit::RedisServer::start_with_password(password);
    let moto = tally_testkit::MotoServer::start();
    let made = Command::new(tally_testkit::venv_python())
        .args([
            "-c",
            "import sys, boto3; print(boto3.client('secretsmanager', endpoint_url=sys.argv[1], \
             region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\
             .create_secret(Name='redis-auth', SecretString=sys.argv[2])['ARN'])",
            &moto.endpoint(),
            password,
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let arn = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let mut env = moto.aws_env();
    env.push(("TALLY_REDIS_URL", redis.url()));
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let file = dir.path().join("orders.ndjson");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let text: String = (0..7)
        .map(|i| order_line(&format!("a{i}"), "m_auth", now_ms))
        .collect();
    std::fs::write(&file, text).unwrap();

    // without the token Redis refuses, and the error says so
    let out = tally(&lake)
        .arg("ingest")
        .arg(&file)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused tally's credentials") && err.contains("NOAUTH"),
        "{err}"
    );

    // a secret that cannot be read is an AWS failure, with the service's answer
    let out = tally(&lake)
        .arg("ingest")
        .arg(&file)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TALLY_REDIS_AUTH_SECRET_ARN", "no-such-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("aws: cannot read the Redis AUTH token from secret no-such-secret")
            && err.contains("ResourceNotFound"),
        "{err}"
    );

    env.push(("TALLY_REDIS_AUTH_SECRET_ARN", arn));
    ingest_with(&lake, &file, &[], &env);
    let (mut server, addr, token) = serve_with(&lake, &env);
    let b = current_hour(&addr, &token, "m_auth");
    sigterm(&mut server);
    assert_eq!(b["buckets"][0]["orders"], 7, "{b}");
    assert_eq!(b["partial"], false, "{b}");
}

/// Midnight UTC `days_ago` days before today, as epoch seconds.
fn midnight_days_ago(days_ago: i64) -> i64 {
    chrono::Utc::now().timestamp() / 86_400 * 86_400 - days_ago * 86_400
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn order_at(id: &str, merchant: &str, ts_secs: i64, amount: i64) -> String {
    format!(
        "{{\"event_id\":\"{id}\",\"merchant_id\":\"{merchant}\",\"type\":\"order\",\"ts\":\"{}\",\"amount\":{amount}}}\n",
        rfc3339(ts_secs)
    )
}

/// `tally batch run ARGS` on `lake`, which must exit 0; its stdout.
fn batch_run(lake: &Path, args: &[&str]) -> String {
    let out = tally(lake)
        .args(["batch", "run"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tally batch run {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Rows of `SELECT a, b ...` as (text, integer) pairs.
fn pairs(lake: &Path, query: &str) -> Vec<(String, i64)> {
    sql(lake, query)
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.rsplit_once(',').unwrap();
            (a.to_string(), b.trim().parse().unwrap())
        })
        .collect()
}

#[test]
fn a_row_the_batch_layer_cannot_compute_is_quarantined_once_and_every_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let day = midnight_days_ago(3);
    // the report's line beside normal events of two merchants
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&order_at(&format!("a{i}"), "m_a", day + 2 * 3600 + i, 100));
        text.push_str(&order_at(&format!("b{i}"), "m_b", day + 30 * 3600 + i, 10));
    }
    text.push_str(
        "{\"event_id\":\"x1\",\"merchant_id\":\"m_old\",\"type\":\"page_view\",\"ts\":\"1600-01-01T00:00:00Z\"}\n",
    );
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, text).unwrap();
    ingest(&lake, &file);

    // another Delta writer (Python's deltalake, as a Spark job or an older archiver
    // would) appends a row dated 1700 to raw_events, partitioned by its own time
    let script = r#"
import sys, datetime, deltalake, pyarrow as pa
uri = sys.argv[1]
utc = datetime.timezone.utc
t = datetime.datetime(1700, 6, 1, 10, 0, tzinfo=utc)
ts = pa.timestamp("us", tz="UTC")
schema = pa.schema([
    pa.field("event_id", pa.string(), False), pa.field("merchant_id", pa.string(), False),
    pa.field("event_type", pa.string(), False), pa.field("event_time", ts, False),
    pa.field("amount", pa.int64(), True), pa.field("customer_id", pa.string(), True),
    pa.field("ingest_time", ts, False), pa.field("source", pa.string(), False),
    pa.field("payload", pa.string(), False), pa.field("event_date", pa.string(), False),
    pa.field("event_hour", pa.int32(), False),
])
row = {"event_id": ["x2"], "merchant_id": ["m_spark"], "event_type": ["order"], "event_time": [t],
       "amount": [5], "customer_id": [None], "ingest_time": [datetime.datetime.now(utc)],
       "source": ["spark:backfill-7/part-0:1"], "payload": ['{"event_id":"x2","ts":"1700-06-01T10:00:00Z"}'],
       "event_date": ["1700-06-01"], "event_hour": [10]}
deltalake.write_deltalake(uri, pa.Table.from_pydict(row, schema=schema), mode="append",
                          partition_by=["event_date", "event_hour"])
"#;
    let out = Command::new(tally_testkit::venv_python())
        .arg("-c")
        .arg(script)
        .arg(lake.join("raw_events"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = batch_run(&lake, &[]);
    assert!(first.contains("watermark none -> 20"), "{first}");
    let orders = "SELECT merchant_id, CAST(SUM(orders) AS BIGINT) FROM {t} GROUP BY merchant_id ORDER BY merchant_id";
    let expect = vec![("m_a".to_string(), 5), ("m_b".to_string(), 5)];
    for t in ["metrics_hourly", "metrics_daily"] {
        assert_eq!(pairs(&lake, &orders.replace("{t}", t)), expect, "{t}");
    }
    let quarantined = |lake: &Path| {
        pairs(
            lake,
            "SELECT CASE WHEN CAST(payload AS VARCHAR) LIKE '%\"x1\"%' THEN 'x1' \
             WHEN CAST(payload AS VARCHAR) LIKE '%\"x2\"%' THEN 'x2' ELSE 'other' END AS id, \
             COUNT(*) FROM quarantine GROUP BY 1 ORDER BY 1",
        )
    };
    let once = vec![("x1".to_string(), 1), ("x2".to_string(), 1)];
    assert_eq!(quarantined(&lake), once);
    assert_eq!(
        count(
            &lake,
            "SELECT COUNT(*) FROM quarantine WHERE source = 'spark:backfill-7/part-0:1' \
             AND reason LIKE 'out_of_range: event_time 1700-06-01T10:00:00Z cannot be computed%'"
        ),
        1
    );
    assert_eq!(
        count(
            &lake,
            "SELECT COUNT(*) FROM raw_events WHERE event_id IN ('x1', 'x2')"
        ),
        0
    );

    // every later run exits 0 and moves nothing twice
    for _ in 0..2 {
        let again = batch_run(&lake, &[]);
        assert!(!again.contains("quarantine"), "{again}");
        assert_eq!(quarantined(&lake), once);
    }
}

#[test]
fn a_day_processed_by_an_early_run_gets_its_daily_row_in_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let day = midnight_days_ago(3);
    let text: String = (1..=3)
        .map(|i| order_at(&format!("o{i}"), "m_d", day + 3600 + 60 * i, 1000))
        .collect();
    let file = dir.path().join("orders.ndjson");
    std::fs::write(&file, text).unwrap();
    ingest(&lake, &file);

    // the 05:35 run of that day: a grace period that puts its closed hours' end at 05:00
    let grace = (chrono::Utc::now().timestamp() - (day + 5 * 3600 + 35 * 60)) / 60;
    let early = batch_run(&lake, &["--grace-minutes", &grace.to_string()]);
    assert!(
        early.contains(&format!("watermark none -> {}", rfc3339(day + 5 * 3600))),
        "{early}"
    );
    assert_eq!(count(&lake, "SELECT COUNT(*) FROM metrics_daily"), 0);
    let normal = batch_run(&lake, &[]);
    assert!(normal.contains("and 1 days recomputed"), "{normal}");
    assert_eq!(
        count(
            &lake,
            "SELECT CAST(SUM(orders) AS BIGINT) FROM metrics_daily"
        ),
        3
    );

    // the API: the day bucket and its 01:00 hour agree
    let (mut server, addr, token) = serve_with(&lake, &[]);
    let get = |granularity: &str, from: i64, to: i64| -> serde_json::Value {
        let path = format!(
            "/v1/merchants/m_d/metrics?from={}&to={}&granularity={granularity}&metrics=orders",
            rfc3339(from),
            rfc3339(to)
        );
        let (status, body) = http_get(&addr, &path, &token);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let days = get("day", day, day + 86_400);
    let hours = get("hour", day, day + 86_400);
    sigterm(&mut server);
    let d = &days["buckets"][0];
    assert_eq!(
        (d["source"].as_str(), d["orders"].as_i64()),
        (Some("batch"), Some(3)),
        "{days}"
    );
    let h = &hours["buckets"][1];
    assert_eq!(
        (h["source"].as_str(), h["orders"].as_i64()),
        (Some("batch"), Some(3)),
        "{hours}"
    );
}

#[test]
fn hourly_runs_racing_late_events_of_a_closed_day_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let day = midnight_days_ago(2);
    let orders = |prefix: &str, n: i64| -> String {
        (0..n)
            .map(|i| {
                order_at(
                    &format!("{prefix}{i}"),
                    &format!("m{}", i % 25),
                    day + (i % 24) * 3600 + i % 3600,
                    100 + i,
                )
            })
            .collect()
    };
    let first = dir.path().join("day.ndjson");
    std::fs::write(&first, orders("o", 2_000)).unwrap();
    let out = tally(&lake)
        .args(["ingest", "--chunk-lines", "100"])
        .arg(&first)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    batch_run(&lake, &[]);

    // 600 late orders of that day, one per commit, while the hourly run loops
    let late = dir.path().join("late.ndjson");
    std::fs::write(&late, orders("late", 600)).unwrap();
    let log = dir.path().join("ingest-late.log");
    let mut ingest_late = tally(&lake)
        .args(["ingest", "--chunk-lines", "1"])
        .arg(&late)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut runs = 0;
    while ingest_late.try_wait().unwrap().is_none() {
        batch_run(&lake, &[]);
        runs += 1;
    }
    let status = ingest_late.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(runs >= 2, "the runs raced the appends ({runs} runs)");
    batch_run(&lake, &[]);

    assert_eq!(
        count(&lake, "SELECT COUNT(*) FROM raw_events"),
        2_600,
        "no row lost or doubled"
    );
    assert_eq!(
        count(&lake, "SELECT COUNT(DISTINCT event_id) FROM raw_events"),
        2_600
    );
    for t in ["metrics_hourly", "metrics_daily"] {
        assert_eq!(
            count(
                &lake,
                &format!("SELECT CAST(SUM(orders) AS BIGINT) FROM {t}")
            ),
            2_600,
            "{t}"
        );
    }
}

/// Logs written to a file or a pipe (systemd, CloudWatch, `2> log`) carry no ANSI
/// colour codes: colour is for a terminal only. Both log formats: the compact one
/// of the commands and the JSON one of the Lambda entry point.
#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let addr = format!("127.0.0.1:{}", tally_testkit::free_port());
    let log = dir.path().join("serve.log");
    let mut server = tally(&lake)
        .args(["serve", "--addr", &addr])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("TALLY_JWT_SECRET")
        .env_remove("TALLY_JWKS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut answered = false;
    for _ in 0..100 {
        // an access-log line at info, and a refused request
        if let Ok((status, _)) = tally_testkit::http_get(&addr, "/v1/merchants/m/metrics", "x") {
            assert_eq!(status, 401);
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sigterm(&mut server);
    assert!(answered, "tally serve did not answer");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving the API"), "{text}");
    assert!(text.contains("status=401"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file: {text:?}"
    );

    // the Lambda entry point's JSON lines, through a pipe
    let out = tally(&lake)
        .args(["lambda", "--handler", "api"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env_remove("TALLY_JWT_SECRET")
        .env_remove("TALLY_JWKS")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("\"level\":\"WARN\""), "{text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in Lambda logs: {text:?}"
    );
}

/// `--memory-limit` / `TALLY_BATCH_MEMORY` take sizes with units; a bound too
/// small to work or a malformed one is refused with what to give instead.
#[test]
fn the_batch_memory_bound_is_read_from_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        tally(&lake)
            .args(["batch", "run"])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = run(&["--memory-limit", "64MiB"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[], &[("TALLY_BATCH_MEMORY", "1MiB")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs at least 4.0 MiB"),
        "{err}"
    );
    let out = run(&["--memory-limit", "lots"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not a size"),
        "{err}"
    );
}

/// Through the binary: a reprocess takes in late events, `tally batch rollback`
/// gives back the tables from before it (an independent reader, `tally sql`,
/// sees the rows), and a second rollback says why it cannot undo the first run.
#[test]
fn batch_rollback_undoes_a_reprocess() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let day = midnight_days_ago(3);
    let orders = |prefix: &str, n: i64, amount: i64| -> String {
        (0..n)
            .map(|i| order_at(&format!("{prefix}{i}"), "m_r", day + 3 * 3600 + i, amount))
            .collect()
    };
    let first = dir.path().join("first.ndjson");
    std::fs::write(&first, orders("a", 4, 100)).unwrap();
    ingest(&lake, &first);
    // in parts, side by side: the same rows as one part
    batch_run(&lake, &["--parts", "3", "--jobs", "2"]);
    let query = "SELECT merchant_id, CAST(SUM(orders) AS BIGINT) FROM metrics_hourly GROUP BY 1";
    assert_eq!(pairs(&lake, query), [("m_r".to_string(), 4)]);

    let late = dir.path().join("late.ndjson");
    std::fs::write(&late, orders("late", 3, 50)).unwrap();
    ingest(&lake, &late);
    let from = rfc3339(day);
    let to = rfc3339(day + 86_400);
    let out = tally(&lake)
        .args(["batch", "reprocess", "--from", &from, "--to", &to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pairs(&lake, query), [("m_r".to_string(), 7)]);

    let out = tally(&lake).args(["batch", "rollback"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("rolled back reprocess"), "{said}");
    assert_eq!(pairs(&lake, query), [("m_r".to_string(), 4)]);

    let out = tally(&lake).args(["batch", "rollback"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("first that set the watermark"),
        "{err}"
    );
    assert_eq!(pairs(&lake, query), [("m_r".to_string(), 4)]);
}
