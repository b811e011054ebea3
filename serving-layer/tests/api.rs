//! End-to-end tests of the serving layer: the router on a real local lake and a
//! real Redis speed store, answers checked against a plain computation over the
//! same events; auth, validation, degraded reads, readiness, the OpenAPI
//! document, and one server over a real socket with a graceful shutdown.
//!
//! One file on purpose: every integration-test binary costs minutes of linking.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use deltalake::arrow::array::{
    ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tally_common::bucket::{date_string, format_ts, month_string, MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::lake::{Lake, Table};
use tally_common::metrics::{BucketRow, MetricValues, METRICS};
use tally_common::sketch_sql::sketch_of;
use tally_common::source::{Position, Record, SourceId};
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::watermark::WATERMARK_APP;
use tally_serving_layer::{router, serve_listener, AppState, Auth, ServeOptions};
use tally_speed_layer::{apply_records, RedisStore, SpeedStore};
use tally_testkit::check_bucket;
use tally_testkit::events::{generate, TestEvent};
use tally_testkit::RedisServer;
use tower::ServiceExt as _;

const SECRET: &str = "test-secret-not-for-production";

// ---------------------------------------------------------------- helpers

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An RS256 token signed with the test key in `tests/data/{pem}`, naming `kid`.
fn rs256(pem: &str, kid: &str, claims: Value) -> String {
    let data = tally_testkit::crate_dir().join("tests/data");
    let key = EncodingKey::from_rsa_pem(&std::fs::read(data.join(pem)).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    encode(&header, &claims, &key).unwrap()
}

fn merchant_token(m: &str) -> String {
    hs256(json!({"merchant_id": m, "exp": now_secs() + 600}))
}

fn admin_token() -> String {
    hs256(json!({"role": "admin", "exp": now_secs() + 600}))
}

async fn get(app: &Router, uri: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::builder().uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn metrics_uri(m: &str, from: i64, to: i64, granularity: &str) -> String {
    format!(
        "/v1/merchants/{m}/metrics?from={}&to={}&granularity={granularity}",
        format_ts(from),
        format_ts(to)
    )
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(!msg.is_empty());
    for leak in ["SELECT", "panicked", "DataFusion", ".parquet", "_delta_log"] {
        assert!(!msg.contains(leak), "error message leaks internals: {msg}");
    }
}

/// A speed view of the test's own: one order and one customer in every hour,
/// or failing on demand.
#[derive(Clone, Default)]
struct FakeSpeed {
    down: Arc<AtomicBool>,
}

impl SpeedView for FakeSpeed {
    fn read<'a>(
        &'a self,
        _merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, tally_common::Result<SpeedReading>> {
        Box::pin(async move {
            self.ping().await?;
            let mut one = MetricValues {
                unique_customers: Some(1),
                ..MetricValues::default()
            };
            one.counters.values[0] = 1;
            // each hour: one order by one customer, in its first quarter hour
            let mut quarter: [BucketRow; 4] = Default::default();
            quarter[0] = BucketRow {
                values: one,
                sketch: Some(tally_common::sketch_sql::sketch_of(["c"]).into()),
            };
            Ok(SpeedReading {
                hours: hours.iter().map(|_| one).collect(),
                quarters: hours.iter().map(|_| quarter.clone()).collect(),
                unions: unions.iter().map(|g| g.len() as i64).collect(),
                not_covered: Vec::new(),
            })
        })
    }

    fn ping(&self) -> BoxFuture<'_, tally_common::Result<()>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                Err(tally_common::Error::speed("fake speed view is down"))
            } else {
                Ok(())
            }
        })
    }
}

fn fast_options() -> ServeOptions {
    ServeOptions {
        drain_delay: Duration::from_millis(400),
        speed_timeout: Duration::from_secs(2),
        refresh_every: Duration::from_secs(3600),
        // refreshed by hand: the store's state stays readable between refreshes
        state_max_age: Duration::from_secs(3600),
        ..ServeOptions::default()
    }
}

async fn fake_state(lake_dir: &Path, auth: Auth) -> (AppState, FakeSpeed) {
    let lake = Lake::new(lake_dir.to_str().unwrap(), None, None).unwrap();
    let speed = FakeSpeed::default();
    let state = AppState::new(lake, auth, speed.clone(), fast_options())
        .await
        .unwrap();
    (state, speed)
}

// ------------------------------------------------------- the plain model

/// Per merchant and hour (µs): counters and the exact customer set, deduplicated
/// by event id as the batch layer does.
type Model = BTreeMap<(String, i64), ([i64; 5], BTreeSet<String>)>;

fn model(events: &[TestEvent]) -> Model {
    let mut seen = BTreeSet::new();
    let unique: Vec<TestEvent> = events
        .iter()
        .filter(|e| seen.insert(e.event_id.clone()))
        .cloned()
        .collect();
    tally_testkit::events::expected(&unique)
        .into_iter()
        .map(|((m, hour_ms), v)| ((m, hour_ms * 1000), v))
        .collect()
}

/// Counters and customers of `m` over the hours `[start, end)`.
fn sum(model: &Model, m: &str, start: i64, end: i64) -> ([i64; 5], BTreeSet<String>) {
    let mut counters = [0; 5];
    let mut customers = BTreeSet::new();
    for ((mm, h), (c, set)) in model {
        if mm == m && *h >= start && *h < end {
            for (total, v) in counters.iter_mut().zip(c) {
                *total += v;
            }
            customers.extend(set.iter().cloned());
        }
    }
    (counters, customers)
}

// ------------------------------------------------------ writing the lake

struct Row {
    merchant: String,
    start: i64,
    counters: [i64; 5],
    unique: i64,
    sketch: Option<Vec<u8>>,
}

fn metrics_batch(table: Table, rows: &[Row]) -> RecordBatch {
    let mut rows: Vec<&Row> = rows.iter().collect();
    // files sorted by merchant, as the batch layer writes them
    rows.sort_by(|a, b| (&a.merchant, a.start).cmp(&(&b.merchant, b.start)));
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.merchant.as_str()),
        )),
        ts(rows.iter().map(|r| r.start).collect()),
    ];
    for i in 0..5 {
        cols.push(Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.counters[i]),
        )));
    }
    cols.push(Arc::new(Int64Array::from_iter_values(
        rows.iter().map(|r| r.unique),
    )));
    cols.push(Arc::new(BinaryArray::from_iter(
        rows.iter().map(|r| r.sketch.as_deref()),
    )));
    cols.push(ts(rows.iter().map(|_| 0).collect()));
    cols.push(Arc::new(Int32Array::from_iter_values(
        rows.iter().map(|_| 1),
    )));
    let part = |t: i64| match table {
        Table::MetricsDaily => month_string(t),
        _ => date_string(t),
    };
    cols.push(Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| part(r.start)),
    )));
    RecordBatch::try_new(table.schema(), cols).unwrap()
}

async fn write_rows(lake: &Lake, table: Table, rows: &[Row], watermark: Option<i64>) {
    write_rows_with(lake, table, rows, watermark, WriterProperties::default()).await;
}

async fn write_rows_with(
    lake: &Lake,
    table: Table,
    rows: &[Row],
    watermark: Option<i64>,
    writer: WriterProperties,
) {
    let t = lake.open_or_create(table).await.unwrap();
    let mut props = CommitProperties::default();
    if let Some(w) = watermark {
        props = props.with_application_transactions(vec![Transaction::new(
            WATERMARK_APP,
            w / MICROS_PER_HOUR,
        )]);
    }
    t.write(vec![metrics_batch(table, rows)])
        .with_save_mode(SaveMode::Append)
        .with_partition_columns(table.partition_columns().iter().copied())
        .with_writer_properties(writer)
        .with_commit_properties(props)
        .await
        .unwrap();
}

// ------------------------------------------------------------------ tests

/// The heart of it: hour and day buckets across the watermark equal a plain
/// computation; then Redis dies and the same queries degrade to `partial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_answers_equal_a_plain_computation_and_degrade_without_redis() {
    // four days ago: every event is in the past, and within the speed view's TTL below
    let d0 =
        tally_common::bucket::day_floor(tally_common::bucket::now_micros()) - 4 * MICROS_PER_DAY;
    let (d1, d2, d3) = (
        d0 + MICROS_PER_DAY,
        d0 + 2 * MICROS_PER_DAY,
        d0 + 3 * MICROS_PER_DAY,
    );
    let w = d1 + 15 * MICROS_PER_HOUR;
    let events = generate(7, 6000, 4, d0 / 1000, 72);
    let truth = model(&events);

    // the batch view: every hour before W, and day d0 (the only day that ends by W)
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let hourly: Vec<Row> = truth
        .iter()
        .filter(|((_, h), _)| *h < w)
        .map(|((m, h), (c, set))| Row {
            merchant: m.clone(),
            start: *h,
            counters: *c,
            unique: set.len() as i64,
            sketch: Some(sketch_of(set.iter().map(String::as_str))),
        })
        .collect();
    write_rows(&lake, Table::MetricsHourly, &hourly, Some(w)).await;
    let mut daily = Vec::new();
    for m in ["m0", "m1", "m2", "m3"] {
        let (c, set) = sum(&truth, m, d0, d1);
        daily.push(Row {
            merchant: m.into(),
            start: d0,
            counters: c,
            unique: set.len() as i64,
            sketch: Some(sketch_of(set.iter().map(String::as_str))),
        });
        // a partial row for the straddling day, which must never be served
        daily.push(Row {
            merchant: m.into(),
            start: d1,
            counters: [999_999; 5],
            unique: 999_999,
            sketch: None,
        });
    }
    write_rows(&lake, Table::MetricsDaily, &daily, None).await;

    // the speed view saw every event, plus producer duplicates before W that the
    // batch layer removed: serving them for a batch hour would be caught below
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 14 * 24 * 3600)
        .await
        .unwrap();
    let speed = SpeedStore::Redis(store.clone());
    let mut lines: Vec<String> = events.iter().map(|e| e.to_line(true)).collect();
    lines.extend(
        events
            .iter()
            .filter(|e| e.ts_ms * 1000 < w)
            .take(300)
            .map(|e| e.to_line(false)),
    );
    let records: Vec<String> = lines.chunks(100).map(|c| c.join("\n")).collect();
    let now = tally_common::bucket::now_micros();
    apply_records(
        &speed,
        SourceId::file("serving-test"),
        records
            .iter()
            .enumerate()
            .map(|(i, r)| Record::new(Position::from_u64(i as u64 + 1), r.as_bytes())),
        now,
    )
    .await
    .unwrap();
    // a view new to the server vouches for nothing before it until rebuilt (this
    // lake holds no raw_events: nothing to add, it is whole)
    let rebuilt = tally_speed_layer::Rebuild::new(&lake, &store)
        .settle(std::time::Duration::ZERO)
        .run()
        .await
        .unwrap();
    assert!(rebuilt.complete);

    // the speed view really holds those duplicates (so the checks below can tell the views apart)
    let probe: Vec<i64> = (0..24).map(|i| d0 + i * MICROS_PER_HOUR).collect();
    let reading = speed.read("m1", &probe, &[]).await.unwrap();
    let in_speed: i64 = reading
        .hours
        .iter()
        .map(|v| v.counters.values.iter().sum::<i64>())
        .sum();
    let in_truth: i64 = sum(&truth, "m1", d0, d1).0.iter().sum();
    assert!(in_speed > in_truth, "{in_speed} vs {in_truth}");

    let state = AppState::new(lake, Auth::hs256(SECRET), speed, fast_options())
        .await
        .unwrap();
    let app = router(state);
    let token = merchant_token("m1");

    // hours across the watermark
    let (from, to) = (d1 + 10 * MICROS_PER_HOUR, d1 + 20 * MICROS_PER_HOUR);
    let (status, body) = get(&app, &metrics_uri("m1", from, to, "hour"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["batch_watermark"], format_ts(w));
    assert_eq!(body["partial"], false);
    assert_eq!(body["granularity"], "hour");
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 10);
    for (i, b) in buckets.iter().enumerate() {
        let h = from + i as i64 * MICROS_PER_HOUR;
        assert_eq!(b["start"], format_ts(h));
        let (c, set) = sum(&truth, "m1", h, h + MICROS_PER_HOUR);
        let batch = h < w;
        assert_eq!(b["source"], if batch { "batch" } else { "speed" }, "{b}");
        check_bucket(b, c, set.len());
        // a batch hour is exact
        assert_eq!(
            b["unique_customers_bounds"].is_null(),
            batch || set.is_empty(),
            "{b}"
        );
    }

    // hours where nothing happened (after the events) are present with zeros
    let (status, body) = get(
        &app,
        &metrics_uri(
            "m1",
            d3 - 2 * MICROS_PER_HOUR,
            d3 + 3 * MICROS_PER_HOUR,
            "hour",
        ),
        Some(&token),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 5);
    for b in &buckets[2..] {
        check_bucket(b, [0; 5], 0);
    }

    // days: d0 batch, d1 mixed (straddles W), d2 speed
    let (status, body) = get(&app, &metrics_uri("m1", d0, d3, "day"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 3);
    let expect = [
        ("batch", d0, true),
        ("mixed", d1, false),
        ("speed", d2, false),
    ];
    for (b, (source, day, exact)) in buckets.iter().zip(expect) {
        assert_eq!(b["source"], source, "{b}");
        assert_eq!(b["start"], format_ts(day));
        let (c, set) = sum(&truth, "m1", day, day + MICROS_PER_DAY);
        check_bucket(b, c, set.len());
        assert_eq!(b["unique_customers_bounds"].is_null(), exact, "{b}");
    }

    // a metric subset keeps API order and nothing else
    let uri = format!(
        "{}&metrics=net_sales,orders",
        metrics_uri("m1", d0, d1, "day")
    );
    let (status, body) = get(&app, &uri, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&String> = body["buckets"][0].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 4, "{body}");
    assert!(body["buckets"][0].get("gross_sales").is_none());

    // an admin reads any merchant
    let (status, body) = get(
        &app,
        &metrics_uri("m2", d0, d3, "day"),
        Some(&admin_token()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (c, _) = sum(&truth, "m2", d0, d1);
    assert_eq!(body["buckets"][0]["orders"], c[0]);

    let (status, _) = get(&app, "/ready", None).await;
    assert_eq!(status, StatusCode::OK);

    // Redis dies: answers degrade to partial, batch buckets keep their numbers
    redis.stop();
    let (status, body) = get(&app, &metrics_uri("m1", from, to, "hour"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["partial"], true);
    for (i, b) in body["buckets"].as_array().unwrap().iter().enumerate() {
        let h = from + i as i64 * MICROS_PER_HOUR;
        if h < w {
            let (c, set) = sum(&truth, "m1", h, h + MICROS_PER_HOUR);
            check_bucket(b, c, set.len());
        } else {
            assert_eq!(b["source"], "speed");
            for def in &METRICS {
                assert!(b[def.name].is_null(), "{b}");
            }
        }
    }
    let (status, body) = get(&app, &metrics_uri("m1", d0, d3, "day"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["partial"], true);
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets[0]["source"], "batch");
    assert!(buckets[0]["orders"].is_i64());
    assert_eq!(buckets[1]["source"], "mixed");
    assert!(buckets[1]["orders"].is_null() && buckets[2]["orders"].is_null());
    // a range wholly before W needs no speed view and is not partial
    let (status, body) = get(&app, &metrics_uri("m1", d0, d1, "hour"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["partial"], false);

    let (status, body) = get(&app, "/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["speed"], false);
    assert_eq!(body["lake"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_hs256_and_rs256() {
    let dir = tempfile::tempdir().unwrap();
    let data = tally_testkit::crate_dir().join("tests/data");
    // a JWKS from a file, as TALLY_JWKS names it
    let auth = Auth::from_args(&tally_common::config::AuthArgs {
        jwt_secret: Some(SECRET.into()),
        jwks: Some(data.join("test-jwks.json").to_str().unwrap().into()),
        jwks_refresh_secs: 600,
    })
    .await
    .unwrap();
    let (state, _) = fake_state(dir.path(), auth).await;
    let app = router(state);
    let d = tally_common::bucket::parse_ts("2026-11-24T00:00:00Z").unwrap();
    let uri = metrics_uri("m_42", d, d + 3 * MICROS_PER_HOUR, "hour");

    let (s, b) = get(&app, &uri, None).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    let (s, b) = get(&app, &uri, Some("not-a-jwt")).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    let expired = hs256(json!({"merchant_id": "m_42", "exp": now_secs() - 3600}));
    let (s, b) = get(&app, &uri, Some(&expired)).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    let no_exp = hs256(json!({"merchant_id": "m_42"}));
    let (s, b) = get(&app, &uri, Some(&no_exp)).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"merchant_id": "m_42", "exp": now_secs() + 600}),
        &EncodingKey::from_secret(b"some other secret"),
    )
    .unwrap();
    let (s, b) = get(&app, &uri, Some(&forged)).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");

    let (s, b) = get(&app, &uri, Some(&merchant_token("m_7"))).await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    let viewer = hs256(json!({"role": "viewer", "exp": now_secs() + 600}));
    let (s, b) = get(&app, &uri, Some(&viewer)).await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");

    let (s, b) = get(&app, &uri, Some(&merchant_token("m_42"))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = get(&app, &uri, Some(&admin_token())).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // RS256 with the JWKS's key; a token of an unknown key is refused
    let pem = std::fs::read(data.join("test-rsa-key.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-key".into());
    let rs = encode(
        &header,
        &json!({"merchant_id": "m_42", "exp": now_secs() + 600}),
        &key,
    )
    .unwrap();
    let (s, b) = get(&app, &uri, Some(&rs)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    header.kid = Some("rotated-away".into());
    let rs = encode(
        &header,
        &json!({"merchant_id": "m_42", "exp": now_secs() + 600}),
        &key,
    )
    .unwrap();
    let (s, b) = get(&app, &uri, Some(&rs)).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");

    // `nbf` (30 s of leeway) and NumericDates with fractions, on both paths
    let now = now_secs() as f64;
    let timed = |exp: f64, nbf: Option<f64>| {
        let mut c = json!({"merchant_id": "m_42", "exp": exp});
        if let Some(nbf) = nbf {
            c["nbf"] = json!(nbf);
        }
        [hs256(c.clone()), rs256("test-rsa-key.pem", "test-key", c)]
    };
    for token in timed(now + 7200.0, Some(now + 3600.0))
        .into_iter()
        .chain(timed(now + 7200.0, Some(now + 45.5)))
        .chain(timed(now - 31.5, None))
    {
        let (s, b) = get(&app, &uri, Some(&token)).await;
        assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let (s, b) = get(
        &app,
        &uri,
        Some(&timed(now + 7200.0, Some(now + 3600.0))[0]),
    )
    .await;
    assert!(
        b["error"]["message"].as_str().unwrap().contains("nbf"),
        "{s} {b}"
    );
    for token in timed(now + 600.5, None)
        .into_iter()
        .chain(timed(now + 600.5, Some(now + 10.25)))
        .chain(timed(now + 600.0, Some(now - 3600.0)))
        .chain(timed(now - 10.5, None))
        .chain(timed(
            1_798_625_942.5_f64.max(now + 600.5),
            Some(1_700_000_000.5),
        ))
    {
        let (s, b) = get(&app, &uri, Some(&token)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    // a time claim that is not a number makes the token invalid, not unchecked
    for claims in [
        json!({"merchant_id": "m_42", "exp": now + 600.0, "nbf": "tomorrow"}),
        json!({"merchant_id": "m_42", "exp": (now + 600.0).to_string()}),
    ] {
        let (s, b) = get(&app, &uri, Some(&hs256(claims))).await;
        assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    }

    // a server with no key configured refuses everything
    let (state, _) = fake_state(dir.path(), Auth::default()).await;
    let (s, b) = get(&router(state), &uri, Some(&merchant_token("m_42"))).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
}

/// A key server for the tests: serves a JWKS that the test changes, with an
/// optional `Cache-Control`, or a 500 while it is "down"; counts its fetches.
#[derive(Clone, Default)]
struct KeyServer {
    state: Arc<std::sync::Mutex<(Value, Option<&'static str>, bool)>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
}

impl KeyServer {
    async fn start(keys: Value) -> (KeyServer, String) {
        let server = KeyServer::default();
        server.publish(keys);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let app = Router::new()
            .route(
                "/.well-known/jwks.json",
                axum::routing::get(
                    |axum::extract::State(ks): axum::extract::State<KeyServer>| async move {
                        ks.fetches.fetch_add(1, Ordering::SeqCst);
                        let (keys, cache_control, down) = ks.state.lock().unwrap().clone();
                        let mut response =
                            axum::response::IntoResponse::into_response(axum::Json(keys));
                        if down {
                            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        if let Some(cc) = cache_control {
                            response.headers_mut().insert(
                                axum::http::header::CACHE_CONTROL,
                                axum::http::HeaderValue::from_static(cc),
                            );
                        }
                        response
                    },
                ),
            )
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, url)
    }

    fn publish(&self, keys: Value) {
        self.state.lock().unwrap().0 = keys;
    }

    fn cache_control(&self, value: Option<&'static str>) {
        self.state.lock().unwrap().1 = value;
    }

    fn set_down(&self, down: bool) {
        self.state.lock().unwrap().2 = down;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// The key sets of the tests: `a` (kid `test-key`), `b` (kid `test-key-b`).
fn key_set(a: bool, b: bool) -> Value {
    let data = tally_testkit::crate_dir().join("tests/data");
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(data.join(f)).unwrap()).unwrap()
    };
    let mut keys = Vec::new();
    if a {
        keys.extend(read("test-jwks.json")["keys"].as_array().unwrap().clone());
    }
    if b {
        keys.extend(read("test-jwks-b.json")["keys"].as_array().unwrap().clone());
    }
    json!({ "keys": keys })
}

/// A key removed from the JWKS stops working within the refresh period (or the
/// server's shorter `max-age`), whether the set comes from a URL or a file; a
/// refresh failure keeps the last good set for a while, then RS256 requests are
/// 503 until the key server is back; unknown `kid`s do not hammer the key server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_jwks_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = tally_common::bucket::parse_ts("2026-11-24T00:00:00Z").unwrap();
    let uri = metrics_uri("m_42", d, d + MICROS_PER_HOUR, "hour");
    let claims = || json!({"merchant_id": "m_42", "exp": now_secs() + 600});
    let token_a = || rs256("test-rsa-key.pem", "test-key", claims());
    let token_b = || rs256("test-rsa-key-b.pem", "test-key-b", claims());
    let app_for = |jwks: String, refresh: u64| {
        let dir = dir.path().to_path_buf();
        async move {
            let auth = Auth::from_args(&tally_common::config::AuthArgs {
                jwt_secret: None,
                jwks: Some(jwks),
                jwks_refresh_secs: refresh,
            })
            .await
            .unwrap();
            router(fake_state(&dir, auth).await.0)
        }
    };
    let status = |app: Router, token: String| {
        let uri = uri.clone();
        async move { get(&app, &uri, Some(&token)).await }
    };

    // by URL, refreshed every second
    let (keys, url) = KeyServer::start(key_set(true, false)).await;
    let app = app_for(url.clone(), 1).await;
    assert_eq!(status(app.clone(), token_a()).await.0, StatusCode::OK);
    let (s, b) = status(app.clone(), token_b()).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    // A revoked, B published: within the period A is refused and B accepted
    keys.publish(key_set(false, true));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = status(app.clone(), token_a()).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(status(app.clone(), token_b()).await.0, StatusCode::OK);

    // the key server fails: the last good set is kept...
    keys.set_down(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetched = keys.fetches();
    assert_eq!(status(app.clone(), token_b()).await.0, StatusCode::OK);
    assert_eq!(keys.fetches(), fetched + 1, "the refresh was tried");
    // ...for JWKS_STALE_PERIODS periods, then the server cannot vouch for it any more
    let stale = Duration::from_secs(u64::from(tally_serving_layer::auth::JWKS_STALE_PERIODS));
    tokio::time::sleep(stale).await;
    let (s, b) = status(app.clone(), token_b()).await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("JWKS"),
        "{b}"
    );
    // the key server is back: so are RS256 requests
    keys.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(app.clone(), token_b()).await.0, StatusCode::OK);

    // a long refresh period, but the server says max-age=1: refreshed within a second
    keys.publish(key_set(true, true));
    keys.cache_control(Some("public, max-age=1"));
    let app = app_for(url.clone(), 600).await;
    assert_eq!(status(app.clone(), token_a()).await.0, StatusCode::OK);
    keys.publish(key_set(false, true));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = status(app.clone(), token_a()).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(status(app.clone(), token_b()).await.0, StatusCode::OK);

    // a long period and no max-age: forged kids cost no fetch within the rate limit
    keys.cache_control(None);
    let app = app_for(url.clone(), 600).await;
    let fetched = keys.fetches();
    for i in 0..20 {
        let forged = rs256("test-rsa-key.pem", &format!("forged-{i}"), claims());
        let (s, b) = status(app.clone(), forged).await;
        assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(
        keys.fetches(),
        fetched,
        "unknown kids refetched the key set"
    );

    // a file is read again on the same schedule
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, key_set(true, false).to_string()).unwrap();
    let app = app_for(file.to_str().unwrap().into(), 1).await;
    assert_eq!(status(app.clone(), token_a()).await.0, StatusCode::OK);
    std::fs::write(&file, key_set(false, true).to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = status(app.clone(), token_a()).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(status(app.clone(), token_b()).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_with_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _) = fake_state(dir.path(), Auth::hs256(SECRET)).await;
    let app = router(state);
    let token = merchant_token("m1");
    let base = "/v1/merchants/m1/metrics";
    for query in [
        "from=2026-11-24T00:30:00Z&to=2026-11-24T03:00:00Z", // misaligned from
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:01Z", // misaligned to
        "from=2026-11-24T01:00:00Z&to=2026-11-25T00:00:00Z&granularity=day", // misaligned to the day
        "from=2026-10-01T00:00:00Z&to=2026-11-24T00:00:00Z", // more than 31 days of hours
        "from=2025-01-01T00:00:00Z&to=2026-11-24T00:00:00Z&granularity=day", // more than 366 days
        "from=2026-11-24T03:00:00Z&to=2026-11-24T00:00:00Z", // backwards
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&metrics=orders,revenue",
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&granularity=week",
        "from=yesterday&to=2026-11-24T03:00:00Z",
        "to=2026-11-24T03:00:00Z",
        "",
        // unknown parameters and zones are refused, not ignored
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&tz=Europe/Pariss",
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&timezone=UTC",
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&granularity=",
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&metrics=",
        // far from now, either way
        "from=1600-01-01T00:00:00Z&to=1600-01-02T00:00:00Z&granularity=day",
        "from=9999-12-31T23:00:00Z&to=10000-01-01T00:00:00Z",
        "from=%2B275760-09-13T00:00:00Z&to=%2B275760-09-13T01:00:00Z",
        "from=-9223372036854775808&to=9223372036854775807",
        "from=1970-01-01T00:00:00Z&to=9999-12-31T00:00:00Z&granularity=day",
    ] {
        let (s, b) = get(&app, &format!("{base}?{query}"), Some(&token)).await;
        assert_error(s, &b, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (s, b) = get(
        &app,
        "/v1/merchants/m1/metrics?from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&metrics=revenue",
        Some(&token),
    )
    .await;
    assert!(
        b["error"]["message"].as_str().unwrap().contains("revenue"),
        "{s} {b}"
    );
    for (query, says) in [
        ("tz=Europe/Pariss", "unknown time zone"),
        ("tz=UTC&verbose=1", "unknown query parameter"),
    ] {
        let uri = format!("{base}?from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&{query}");
        let (s, b) = get(&app, &uri, Some(&token)).await;
        assert_error(s, &b, StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(says),
            "{b}"
        );
    }
    let (s, b) = get(
        &app,
        &format!("{base}?from=1600-01-01T00:00:00Z&to=1600-01-02T00:00:00Z&granularity=day"),
        Some(&token),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "bad_request");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1970 to 9999"),
        "{b}"
    );
    // tz=UTC is the one zone there is; the ends of the years served answer
    for query in [
        "from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z&tz=UTC",
        "from=1970-01-01T00:00:00Z&to=1970-01-02T00:00:00Z&granularity=day",
        "from=9999-12-31T00:00:00Z&to=9999-12-31T23:00:00Z",
    ] {
        let (s, b) = get(&app, &format!("{base}?{query}"), Some(&token)).await;
        assert_eq!(s, StatusCode::OK, "{query}: {b}");
    }
    // a malformed merchant id is a 400 for an admin (anyone else gets 403 first)
    let uri = "/v1/merchants/m%20x/metrics?from=2026-11-24T00:00:00Z&to=2026-11-24T03:00:00Z";
    let (s, b) = get(&app, uri, Some(&admin_token())).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "bad_request");
    let (s, b) = get(&app, "/v2/nothing", None).await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
}

/// A lake the batch layer never wrote: no watermark, every bucket from the speed view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_lake_serves_everything_from_the_speed_view() {
    let dir = tempfile::tempdir().unwrap();
    let (state, speed) = fake_state(dir.path(), Auth::hs256(SECRET)).await;
    let app = router(state);
    let token = merchant_token("m1");
    let d = tally_common::bucket::parse_ts("2026-11-20T00:00:00Z").unwrap();
    let (s, b) = get(
        &app,
        &metrics_uri("m1", d, d + 2 * MICROS_PER_DAY, "day"),
        Some(&token),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["batch_watermark"].is_null());
    for bucket in b["buckets"].as_array().unwrap() {
        assert_eq!(bucket["source"], "speed");
        assert_eq!(bucket["orders"], 24, "{bucket}");
        // one customer in every hour of the fake view: one over the day
        assert_eq!(bucket["unique_customers"], 1, "{bucket}");
        assert_eq!(bucket["avg_order_value"], 0.0);
    }
    speed.down.store(true, Ordering::SeqCst);
    let (s, b) = get(
        &app,
        &metrics_uri("m1", d, d + 2 * MICROS_PER_HOUR, "hour"),
        Some(&token),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["partial"], true);
    assert!(b["buckets"][0]["orders"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let (state, speed) = fake_state(dir.path(), Auth::hs256(SECRET)).await;
    let app = router(state.clone());
    let (s, b) = get(&app, "/health", None).await;
    assert_eq!((s, b["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, b) = get(&app, "/ready", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    speed.down.store(true, Ordering::SeqCst);
    let (s, b) = get(&app, "/ready", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    speed.down.store(false, Ordering::SeqCst);
    state.start_draining();
    let (s, b) = get(&app, "/ready", None).await;
    assert_eq!(
        (s, &b["draining"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!(true))
    );

    let (s, doc) = get(&app, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let op = &doc["paths"]["/v1/merchants/{merchant_id}/metrics"]["get"];
    assert!(op.is_object(), "{doc}");
    let params: Vec<&str> = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["merchant_id", "from", "to", "granularity", "metrics", "tz"] {
        assert!(params.contains(&p), "{params:?}");
    }
    // every constraint of the parser, as the parser states it
    let param = |name: &str| {
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    use tally_common::query::{INSTANT_PATTERN, MERCHANT_ID_PATTERN};
    assert_eq!(
        param("merchant_id")["schema"]["pattern"],
        MERCHANT_ID_PATTERN
    );
    for p in ["from", "to"] {
        assert_eq!(param(p)["required"], true);
        assert_eq!(param(p)["schema"]["format"], "date-time");
        assert_eq!(param(p)["schema"]["pattern"], INSTANT_PATTERN);
    }
    assert_eq!(
        param("granularity")["schema"]["enum"],
        json!(["hour", "day", "week", "month"])
    );
    // every IANA name the server takes, and no abbreviation or offset
    let zones = param("tz")["schema"]["enum"].as_array().unwrap().clone();
    for z in [
        "UTC",
        "Asia/Kathmandu",
        "America/St_Johns",
        "Australia/Lord_Howe",
    ] {
        assert!(zones.contains(&json!(z)), "{z}");
    }
    assert!(zones.len() > 300 && !zones.contains(&json!("IST")) && !zones.contains(&json!("EST")));
    let metrics = param("metrics");
    assert_eq!(
        (&metrics["style"], &metrics["explode"]),
        (&json!("form"), &json!(false))
    );
    let names: Vec<&str> = METRICS.iter().map(|d| d.name).collect();
    assert_eq!(metrics["schema"]["items"]["enum"], json!(names));
    assert_eq!(metrics["schema"]["minItems"], 1);
    for status in ["200", "400", "401", "403", "404", "503"] {
        assert!(op["responses"][status].is_object(), "no {status}");
    }
    let bucket = &doc["components"]["schemas"]["Bucket"]["properties"];
    let text = doc.to_string();
    for def in &METRICS {
        assert!(
            bucket[def.name].is_object(),
            "{} not in the Bucket schema",
            def.name
        );
        assert!(text.contains(def.name));
    }
    assert!(bucket["unique_customers"]["description"]
        .as_str()
        .unwrap()
        .contains("mixed"));
    for path in ["/health", "/ready", "/openapi.json"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// The cached batch view follows the tables: created after the server started,
/// then a new version with a later watermark, each picked up by the refresher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_view_follows_new_table_versions() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), None, None).unwrap();
    let options = ServeOptions {
        refresh_every: Duration::from_millis(100),
        ..fast_options()
    };
    let state = AppState::new(
        lake.clone(),
        Auth::hs256(SECRET),
        FakeSpeed::default(),
        options,
    )
    .await
    .unwrap();
    let app = router(state);
    let token = merchant_token("m1");
    let d = tally_common::bucket::parse_ts("2026-11-20T00:00:00Z").unwrap();
    let uri = metrics_uri("m1", d, d + 3 * MICROS_PER_HOUR, "hour");
    let watermark_after = |w: i64| {
        let (app, uri, token) = (app.clone(), uri.clone(), token.clone());
        async move {
            for _ in 0..100 {
                let (s, b) = get(&app, &uri, Some(&token)).await;
                assert_eq!(s, StatusCode::OK, "{b}");
                if b["batch_watermark"] == format_ts(w) {
                    return b;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the batch view never showed watermark {}", format_ts(w));
        }
    };
    let (_, b) = get(&app, &uri, Some(&token)).await;
    assert!(b["batch_watermark"].is_null(), "{b}");

    let row = |h: i64, n: i64| Row {
        merchant: "m1".into(),
        start: h,
        counters: [n; 5],
        unique: n,
        sketch: None,
    };
    write_rows(
        &lake,
        Table::MetricsHourly,
        &[row(d, 7)],
        Some(d + MICROS_PER_HOUR),
    )
    .await;
    let b = watermark_after(d + MICROS_PER_HOUR).await;
    assert_eq!(b["buckets"][0]["source"], "batch");
    assert_eq!(b["buckets"][0]["orders"], 7);
    assert_eq!(b["buckets"][1]["source"], "speed");

    write_rows(
        &lake,
        Table::MetricsHourly,
        &[row(d + MICROS_PER_HOUR, 9)],
        Some(d + 2 * MICROS_PER_HOUR),
    )
    .await;
    let b = watermark_after(d + 2 * MICROS_PER_HOUR).await;
    assert_eq!(b["buckets"][1]["source"], "batch");
    assert_eq!(b["buckets"][1]["orders"], 9);
    assert_eq!(b["buckets"][2]["source"], "speed");
}

/// Point lookups (row groups, pages and files pruned by the page index) give the
/// same rows as a DataFusion query and as the rows written: over tiny row groups
/// and pages, several files per partition, merchants absent from a file, ranges
/// that start and end inside days, and again after a new version adds files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_lookups_equal_datafusion_and_the_rows_written() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), None, None).unwrap();
    let d = tally_common::bucket::parse_ts("2026-11-20T00:00:00Z").unwrap();
    let small = || {
        WriterProperties::builder()
            .set_max_row_group_row_count(Some(300))
            .set_data_page_row_count_limit(16)
            .set_write_batch_size(16)
            .build()
    };
    // every third merchant skips odd hours, so some pages hold a merchant's gap
    let value = |m: usize, t: i64| (m as i64 * 1000 + t / MICROS_PER_HOUR % 10_000) % 9973;
    let hour_rows = |hours: std::ops::Range<i64>| -> Vec<Row> {
        let mut rows = Vec::new();
        for m in 0..120usize {
            for h in hours.clone() {
                let t = d + h * MICROS_PER_HOUR;
                if m.is_multiple_of(3) && h % 2 == 1 {
                    continue;
                }
                let v = value(m, t);
                rows.push(Row {
                    merchant: format!("m{m}"),
                    start: t,
                    counters: [v, v * 3, v % 7, v % 11, v + 1],
                    unique: v / 2,
                    sketch: None,
                });
            }
        }
        rows
    };
    // day 0 in one file, day 1 in two (an hourly run after a daily one), day 2 partly
    for (hours, w) in [(0..24, 24), (24..36, 36), (36..48, 48), (48..60, 60)] {
        let rows = hour_rows(hours);
        write_rows_with(
            &lake,
            Table::MetricsHourly,
            &rows,
            Some(d + w * MICROS_PER_HOUR),
            small(),
        )
        .await;
    }
    let day_rows: Vec<Row> = (0..2)
        .flat_map(|day| {
            (0..120).map(move |m| Row {
                merchant: format!("m{m}"),
                start: d + day * MICROS_PER_DAY,
                counters: [m as i64 + day; 5],
                unique: m as i64,
                sketch: None,
            })
        })
        .collect();
    write_rows_with(&lake, Table::MetricsDaily, &day_rows, None, small()).await;

    let (state, _) = fake_state(dir.path(), Auth::hs256(SECRET)).await;
    let check = |state: AppState, hours: i64| async move {
        let snap = state.batch().snapshot().unwrap();
        let ranges = [
            (0, hours),
            (5, 29),
            (23, 25),
            (30, 31),
            (40, hours),
            (hours, hours + 5),
        ];
        for m in [
            "m0", "m1", "m9", "m10", "m42", "m99", "m119", "m2x", "a", "z",
        ] {
            for (a, b) in ranges {
                let (a, b) = (d + a * MICROS_PER_HOUR, d + b * MICROS_PER_HOUR);
                state.batch().set_point_lookups(true);
                let fast = snap.hourly(m, a, b).await.unwrap();
                state.batch().set_point_lookups(false);
                let slow = snap.hourly(m, a, b).await.unwrap();
                assert_eq!(fast, slow, "{m} {}..{}", format_ts(a), format_ts(b));
                let n: usize = m
                    .strip_prefix('m')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                let mut t = a;
                while t < b.min(d + hours * MICROS_PER_HOUR) {
                    let h = (t - d) / MICROS_PER_HOUR;
                    let present = n < 120 && !(n.is_multiple_of(3) && h % 2 == 1);
                    assert_eq!(fast.contains_key(&t), present, "{m} at {}", format_ts(t));
                    if present {
                        assert_eq!(
                            fast[&t].values.counters.values[0],
                            value(n, t),
                            "{m} at {}",
                            format_ts(t)
                        );
                    }
                    t += MICROS_PER_HOUR;
                }
            }
            state.batch().set_point_lookups(true);
            let fast = snap.daily(m, d, d + 3 * MICROS_PER_DAY).await.unwrap();
            state.batch().set_point_lookups(false);
            let slow = snap.daily(m, d, d + 3 * MICROS_PER_DAY).await.unwrap();
            assert_eq!(fast, slow, "{m} by day");
            assert_eq!(
                fast.len(),
                if m.len() <= 4 && m != "m2x" && m.starts_with('m') {
                    2
                } else {
                    0
                },
                "{m}"
            );
        }
        state.batch().set_point_lookups(true);
    };
    check(state.clone(), 60).await;
    // a new version: the rest of day 2 in a new file, footers of the old ones kept
    write_rows_with(
        &lake,
        Table::MetricsHourly,
        &hour_rows(60..72),
        Some(d + 72 * MICROS_PER_HOUR),
        small(),
    )
    .await;
    assert!(state.refresh_batch().await.unwrap());
    check(state.clone(), 72).await;
}

/// A failed read of the lake is a 503 with a plain message, never the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_lake_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let lake = Lake::new(lake_dir.to_str().unwrap(), None, None).unwrap();
    let d = tally_common::bucket::parse_ts("2026-11-20T00:00:00Z").unwrap();
    let rows = [Row {
        merchant: "m1".into(),
        start: d,
        counters: [1; 5],
        unique: 1,
        sketch: None,
    }];
    write_rows(&lake, Table::MetricsHourly, &rows, Some(d + MICROS_PER_DAY)).await;
    // the serving store answers from memory; the lake alone reads the files
    let stored = fake_state(&lake_dir, Auth::hs256(SECRET)).await.0;
    // loaded in the background from start; here at once
    stored.refresh_batch().await.unwrap();
    assert!(stored.batch().snapshot().unwrap().serves_from_store());
    let lake_only = AppState::new(
        lake.clone(),
        Auth::hs256(SECRET),
        FakeSpeed::default(),
        ServeOptions {
            store: tally_serving_layer::StoreChoice::LakeOnly,
            ..fast_options()
        },
    )
    .await
    .unwrap();
    let (stored, lake_only) = (router(stored), router(lake_only));
    let token = merchant_token("m1");
    let uri = metrics_uri("m1", d, d + 3 * MICROS_PER_HOUR, "hour");
    for app in [&stored, &lake_only] {
        let (s, b) = get(app, &uri, Some(&token)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["buckets"][0]["orders"], 1);
    }
    // the data files vanish (a lost bucket, revoked credentials...)
    let table_dir = lake_dir.join("metrics_hourly");
    for part in std::fs::read_dir(&table_dir).unwrap() {
        let part = part.unwrap().path();
        if part.file_name().unwrap() != "_delta_log" {
            std::fs::remove_dir_all(part).unwrap();
        }
    }
    let (s, b) = get(&lake_only, &uri, Some(&token)).await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    // the store holds the date: the same request reads no lake file
    let (s, b) = get(&stored, &uri, Some(&token)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["buckets"][0]["orders"], 1);
}

/// One server over a real socket: it answers, and on shutdown `/ready` turns 503
/// before the listener closes, then the server returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_a_socket_and_drains_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _) = fake_state(dir.path(), Auth::hs256(SECRET)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = tally_common::shutdown::channel();
    let server = tokio::spawn(serve_listener(listener, state, shutdown));
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");

    let r = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let d = tally_common::bucket::parse_ts("2026-11-24T00:00:00Z").unwrap();
    let r = client
        .get(format!(
            "{base}{}",
            metrics_uri("m1", d, d + MICROS_PER_HOUR, "hour")
        ))
        .bearer_auth(merchant_token("m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["buckets"][0]["orders"], 1);

    trigger.fire();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // draining: still serving, but no longer ready
    let r = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let r = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    drop(client);
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server did not stop after the drain delay")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
}
