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
    let addr = format!("127.0.0.1:{}", tally_testkit::free_port());
    let secret = "a-test-secret-of-enough-length-0123456789";
    let mut server = tally(&lake)
        .args(["serve", "--addr", &addr])
        .env("TALLY_JWT_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let exp = chrono::Utc::now().timestamp() + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"merchant_id": "m_live", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
    let fmt = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let path = format!(
        "/v1/merchants/m_live/metrics?from={}&to={}&metrics=orders",
        fmt(hour),
        fmt(hour + 3600)
    );
    // wait until the server answers
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up, "tally serve did not listen");
    assert!(http_get(&addr, &path, &token).1.contains("\"orders\":0"));

    let now_ms = chrono::Utc::now().timestamp_millis();
    let file = dir.path().join("live.ndjson");
    let text: String = (0..25)
        .map(|i| format!("{{\"event_id\":\"live-{i}\",\"merchant_id\":\"m_live\",\"type\":\"order\",\"ts\":{now_ms},\"amount\":100}}\n"))
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = tally(&lake).arg("ingest").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ingested = std::time::Instant::now();
    let mut seen = None;
    // correctness is asserted; the delay (2 s log polling, promised within 5 s) is
    // printed, not asserted: timing belongs to benchmarks
    while ingested.elapsed() < Duration::from_secs(30) {
        let (status, body) = http_get(&addr, &path, &token);
        assert_eq!(status, 200, "{body}");
        if body.contains("\"orders\":25") {
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
