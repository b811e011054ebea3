//! Merchants' calendars against an independent computation: Python's own tz
//! database (`zoneinfo`, `calendar_expected.py`) buckets the raw events of
//! merchants in eight zones (both 2026 DST changes of New York, London, Lord
//! Howe's 30-minute shift, St John's -03:30, Kolkata +05:30, Kathmandu +05:45,
//! UTC) into local hours, days, ISO weeks and months. The API's answers must
//! equal them bucket for bucket, with the watermark in the middle of the
//! events (batch, mixed and speed buckets) and after it moves past them, in
//! the merchant's own zone (the `merchants` table), with `tz=`, and after the
//! merchants change zones through `PUT .../settings`. Distinct customers must
//! equal the exact count where the API says it is exact (no bounds), and lie
//! within the bounds it gives where it estimates; totals likewise.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tally_batch_layer::{Archiver, BatchRun};
use tally_common::bucket::{parse_ts, MICROS_PER_HOUR};
use tally_common::lake::Lake;
use tally_common::source::{Position, Record, SourceId};
use tally_serving_layer::{router, AppState, Auth, ServeOptions, StoreChoice};
use tally_speed_layer::{EmbeddedStore, SpeedBatch};
use tower::ServiceExt as _;

const SECRET: &str = "calendar-test-secret";
const ZONES: [&str; 8] = [
    "America/New_York",
    "Europe/London",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/St_Johns",
    "UTC",
    "Asia/Tokyo",
];

/// The UTC days that get events: around every 2026 DST change of the zones
/// above and two month ends, with margins for every zone's local day.
const EVENT_DAYS: [(&str, u32); 4] = [
    ("2026-03-06", 5),
    ("2026-03-27", 12),
    ("2026-10-02", 5),
    ("2026-10-23", 12),
];

struct Event {
    id: String,
    merchant: String,
    kind: &'static str,
    ts_ms: i64,
    amount: i64,
    customer: Option<String>,
}

impl Event {
    fn line(&self) -> String {
        let mut v = json!({
            "event_id": self.id, "merchant_id": self.merchant, "type": self.kind, "ts": self.ts_ms,
        });
        if self.kind != "page_view" {
            v["amount"] = json!(self.amount);
        }
        if let Some(c) = &self.customer {
            v["customer_id"] = json!(c);
        }
        v.to_string()
    }
}

/// Events every 20 minutes or so per merchant over [`EVENT_DAYS`], some exactly
/// on quarter-hour boundaries and some a millisecond before one.
fn events() -> Vec<Event> {
    let mut out = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (mi, _) in ZONES.iter().enumerate() {
        let merchant = format!("m{mi}");
        for (first, days) in EVENT_DAYS {
            let start = parse_ts(&format!("{first}T00:00:00Z")).unwrap() / 1000;
            let end = start + i64::from(days) * 86_400_000;
            let mut t = start + (next() % 600_000) as i64;
            while t < end {
                let r = next();
                let ts = match r % 7 {
                    // on a quarter-hour boundary, and just before one
                    0 => t - t.rem_euclid(900_000),
                    1 => t - t.rem_euclid(900_000) - 1,
                    _ => t,
                };
                let kind = match r % 10 {
                    0..=4 => "page_view",
                    5..=8 => "order",
                    _ => "refund",
                };
                out.push(Event {
                    id: format!("e{}", out.len()),
                    merchant: merchant.clone(),
                    kind,
                    ts_ms: ts,
                    amount: (r >> 8) as i64 % 10_000,
                    customer: (r % 13 != 0).then(|| format!("c{}", (r >> 20) % 60)),
                });
                t += 8 * 60_000 + (next() % (24 * 60_000)) as i64;
            }
        }
    }
    out
}

/// What Python computes: per (merchant, zone) the expected answers.
fn expected(events: &[Event]) -> Vec<Value> {
    let input = json!({
        "merchants": (0..ZONES.len()).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "zones": ZONES,
        "events": events.iter().map(|e| json!({
            "merchant": e.merchant, "type": e.kind, "ts_ms": e.ts_ms,
            "amount": e.amount, "customer": e.customer,
        })).collect::<Vec<_>>(),
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/calendar_expected.py");
    let python = tally_testkit::venv_python();
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {} failed ({e}): run scripts/install-services.sh",
                python.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "calendar_expected.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn token(m: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"merchant_id": m, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    m: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", token(m)))
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

const COUNTERS: [&str; 5] = [
    "orders",
    "gross_sales",
    "refunds",
    "refunded_amount",
    "page_views",
];

/// Compare one API answer with Python's; returns how many buckets were estimates.
fn compare(what: &str, got: &Value, want: &Value) -> usize {
    let buckets = got["buckets"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {got}"));
    let wanted = want["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), wanted.len(), "{what}: bucket count");
    let mut estimates = 0;
    let check = |what: &str, b: &Value, w: &Value| -> bool {
        for (i, c) in COUNTERS.iter().enumerate() {
            assert_eq!(b[c], w["c"][i], "{what}: {c} in {b}");
        }
        let u = w["u"].as_i64().unwrap();
        match b["unique_customers_bounds"].as_array() {
            None => {
                assert_eq!(
                    b["unique_customers"].as_i64(),
                    Some(u),
                    "{what}: exact unique in {b}"
                );
                false
            }
            Some(bounds) => {
                let (lo, hi) = (bounds[0].as_i64().unwrap(), bounds[1].as_i64().unwrap());
                let e = b["unique_customers"].as_i64().unwrap();
                assert!(
                    lo <= u && u <= hi && lo <= e && e <= hi,
                    "{what}: {u} outside {b}"
                );
                true
            }
        }
    };
    for (b, w) in buckets.iter().zip(wanted) {
        let start = parse_ts(b["start"].as_str().unwrap()).unwrap() / 1000;
        assert_eq!(
            start,
            w["start"].as_i64().unwrap(),
            "{what}: bucket start {b}"
        );
        if check(&format!("{what} at {}", b["start"]), b, w) {
            estimates += 1;
        }
    }
    check(&format!("{what} totals"), &got["totals"], &want["totals"]);
    estimates
}

async fn archive(lake: &Lake, events: &[Event], now: i64) {
    let mut a = Archiver::open(lake).await.unwrap();
    let recs: Vec<(Position, Vec<u8>)> = events
        .chunks(500)
        .enumerate()
        .map(|(i, c)| {
            let text: String = c.iter().map(|e| e.line() + "\n").collect();
            (Position::from_u64(1 + i as u64), text.into_bytes())
        })
        .collect();
    let input: Vec<Record<'_>> = recs
        .iter()
        .map(|(p, d)| Record::new(p.clone(), d))
        .collect();
    a.archive(&SourceId::file("calendar"), &input, now)
        .await
        .unwrap();
}

/// Every expected answer of merchants in `zone_of`'s zones, asked without
/// `tz` (the merchant's own zone) or with it; returns the estimates seen.
async fn check_all(
    app: &Router,
    expected: &[Value],
    zone_of: &HashMap<String, String>,
    with_tz: bool,
    phase: &str,
) -> usize {
    let mut estimates = 0;
    let mut checked = 0;
    for want in expected {
        let m = want["merchant"].as_str().unwrap();
        if zone_of[m] != want["zone"].as_str().unwrap() {
            continue;
        }
        let mut uri = format!(
            "/v1/merchants/{m}/metrics?from={}&to={}&granularity={}",
            want["from"].as_str().unwrap(),
            want["to"].as_str().unwrap(),
            want["unit"].as_str().unwrap(),
        );
        if with_tz {
            uri.push_str(&format!("&tz={}", want["zone"].as_str().unwrap()));
        }
        let (status, got) = call(app, "GET", &uri, m, None).await;
        assert_eq!(status, StatusCode::OK, "{phase} {uri}: {got}");
        assert_eq!(got["time_zone"], want["zone"], "{phase} {uri}");
        assert!(!got["partial"].as_bool().unwrap(), "{phase} {uri}: {got}");
        estimates += compare(&format!("{phase} {m} {uri}"), &got, want);
        checked += 1;
    }
    assert_eq!(
        checked,
        ZONES.len() * 12,
        "{phase}: every range of every merchant"
    );
    estimates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_zone_s_buckets_equal_an_independent_tz_computation() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = events();
    let expected = expected(&events);

    // the events archived; the batch layer runs with its watermark on 2026-10-25
    let ingest_now = parse_ts("2026-11-20T00:00:00Z").unwrap();
    archive(&lake, &events, ingest_now).await;
    let first = parse_ts("2026-10-25T12:07:00Z").unwrap();
    BatchRun::new(&lake).now(first).execute().await.unwrap();
    // the speed view holds every event (it is read only from the watermark on)
    let speed = EmbeddedStore::new(10 * 365 * 86_400);
    let lines: Vec<Vec<u8>> = events
        .chunks(200)
        .map(|c| {
            c.iter()
                .map(|e| e.line() + "\n")
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    let records: Vec<Record<'_>> = lines
        .iter()
        .enumerate()
        .map(|(i, d)| Record::new(Position::from_u64(1 + i as u64), d))
        .collect();
    let batch = SpeedBatch::build(SourceId::file("calendar"), records, ingest_now);
    assert_eq!(batch.accepted as usize, events.len());
    speed.apply(&batch).await.unwrap();

    // merchant m{i} is in ZONES[i], by the merchants table
    let mut zone_of: HashMap<String, String> = HashMap::new();
    for (i, z) in ZONES.iter().enumerate() {
        let m = format!("m{i}");
        tally_common::merchants::set_time_zone(&lake, &m, z, ingest_now)
            .await
            .unwrap();
        zone_of.insert(m, z.to_string());
    }
    let options = ServeOptions {
        refresh_every: Duration::from_secs(3600),
        state_max_age: Duration::from_secs(3600),
        store: StoreChoice::Embedded,
        ..ServeOptions::default()
    };
    let state = AppState::new(lake.clone(), Auth::hs256(SECRET), speed, options)
        .await
        .unwrap();
    state.refresh_batch().await.unwrap();
    let app = router(state.clone());
    let w = state.batch().snapshot().unwrap().watermark().unwrap();
    assert!(
        w > parse_ts("2026-10-25T00:00:00Z").unwrap() && w <= first,
        "watermark {w}"
    );

    let estimated = check_all(&app, &expected, &zone_of, false, "watermark mid-events").await;
    check_all(&app, &expected, &zone_of, true, "with tz").await;
    assert!(
        estimated > 0,
        "no bucket was an estimate: the sketches were never read"
    );

    // the watermark moves past every event
    let later = parse_ts("2026-11-10T00:00:00Z").unwrap();
    BatchRun::new(&lake).now(later).execute().await.unwrap();
    state.refresh_batch().await.unwrap();
    let w2 = state.batch().snapshot().unwrap().watermark().unwrap();
    assert!(
        w2 > w + 24 * MICROS_PER_HOUR,
        "the watermark moved ({w} -> {w2})"
    );
    check_all(
        &app,
        &expected,
        &zone_of,
        false,
        "watermark past the events",
    )
    .await;

    // every merchant moves to the next zone through the API: history follows at once
    for i in 0..ZONES.len() {
        let m = format!("m{i}");
        let zone = ZONES[(i + 1) % ZONES.len()];
        let (status, body) = call(
            &app,
            "PUT",
            &format!("/v1/merchants/{m}/settings"),
            &m,
            Some(json!({"time_zone": zone})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["time_zone"], zone);
        zone_of.insert(m, zone.to_string());
    }
    check_all(&app, &expected, &zone_of, false, "after the zones changed").await;
    // another process reads the new zones from the table
    let fresh = AppState::new(
        lake.clone(),
        Auth::hs256(SECRET),
        EmbeddedStore::new(3600),
        ServeOptions {
            store: StoreChoice::LakeOnly,
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    let (status, got) = call(
        &router(fresh),
        "GET",
        "/v1/merchants/m0/metrics?from=2026-03-01T00:00:00Z&to=2026-04-01T00:00:00Z&granularity=month&tz=UTC",
        "m0",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["time_zone"], "UTC");
    let (status, got) = call(
        &router(AppState::new(
            lake.clone(),
            Auth::hs256(SECRET),
            EmbeddedStore::new(3600),
            ServeOptions {
                store: StoreChoice::LakeOnly,
                ..ServeOptions::default()
            },
        )
        .await
        .unwrap()),
        "GET",
        "/v1/merchants/m0/metrics?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&granularity=day",
        "m0",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(
        got["time_zone"], ZONES[1],
        "another process reads m0's new zone"
    );
}

#[tokio::test]
async fn settings_are_checked_like_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let state = AppState::new(
        lake,
        Auth::hs256(SECRET),
        EmbeddedStore::new(3600),
        ServeOptions {
            store: StoreChoice::LakeOnly,
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    let app = router(state);
    let put = |m: &'static str, who: &'static str, body: Value| {
        let app = app.clone();
        async move {
            call(
                &app,
                "PUT",
                &format!("/v1/merchants/{m}/settings"),
                who,
                Some(body),
            )
            .await
        }
    };
    let (s, b) = put("m1", "m2", json!({"time_zone": "Asia/Kolkata"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    for body in [
        json!({"time_zone": "IST"}),
        json!({"time_zone": "+05:30"}),
        json!({"time_zone": "Mars/Olympus"}),
        json!({"tz": "UTC"}),
        json!({"time_zone": "UTC", "other": 1}),
        json!([]),
    ] {
        let (s, b) = put("m1", "m1", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
        assert!(b["error"]["message"].is_string(), "{b}");
    }
    let (s, b) = put("m1", "m1", json!({"time_zone": "Asia/Kathmandu"})).await;
    assert_eq!(
        (s, &b["time_zone"]),
        (StatusCode::OK, &json!("Asia/Kathmandu"))
    );
    // an hour bucket of Kathmandu starts at :15 UTC; a UTC hour is misaligned there
    let (s, b) = call(
        &app,
        "GET",
        "/v1/merchants/m1/metrics?from=2026-11-24T00:00:00Z&to=2026-11-24T01:00:00Z",
        "m1",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = call(
        &app,
        "GET",
        "/v1/merchants/m1/metrics?from=2026-11-24T00:15:00Z&to=2026-11-24T01:15:00Z",
        "m1",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["buckets"][0]["start"], "2026-11-24T06:00:00+05:45");
    assert_eq!(b["time_zone"], "Asia/Kathmandu");
    // an offset that is not a whole number of quarter hours (Monrovia until
    // 1972): refused, never answered with zeros from misaligned slots
    let (s, b) = call(
        &app,
        "GET",
        "/v1/merchants/m1/metrics?from=1971-03-01T00:44:30Z&to=1971-03-02T00:44:30Z&granularity=day&tz=Africa/Monrovia",
        "m1",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quarter hour"),
        "{b}"
    );
}
