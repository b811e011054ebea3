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
    let out = tally(&clean)
        .args(["ingest", "--chunk-lines", "2000"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = tally(&killed)
        .args(["ingest", "--chunk-lines", "2000"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
