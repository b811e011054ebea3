//! The serving store on real parts: a lake on moto's S3 (behind a proxy that
//! counts the requests reaching it) loaded into a real redis-server, against the
//! same events on a local lake read directly. The API's answers must be equal
//! through hourly publishes, a late event, a reprocess, a rollback and a flush of
//! Redis, and once the store is loaded a request must reach S3 not once.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tally_batch_layer::{Archiver, BatchRun};
use tally_common::bucket::{format_ts, MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::lake::Lake;
use tally_common::serving_store::{DayWrite, ServingStore, StoreState};
use tally_common::source::{Position, Record, SourceId};
use tally_common::speed_view::BoxFuture;
use tally_serving_layer::{load, router, AppState, Auth, LoadOptions, ServeOptions, StoreChoice};
use tally_speed_layer::RedisStore;
use tally_testkit::events::{generate, TestEvent};
use tally_testkit::{MotoServer, Proxy, RedisServer};
use tower::ServiceExt as _;

const SECRET: &str = "store-test-secret";
/// A UTC midnight (Nov 2025).
const START_MS: i64 = 1_764_000_000_000 / 86_400_000 * 86_400_000;
const MERCHANTS: usize = 9;

fn token(m: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"merchant_id": m, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn get(app: &Router, uri: &str, m: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .uri(uri)
        .header("authorization", format!("Bearer {}", token(m)))
        .body(Body::empty())
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

async fn archive(lake: &Lake, name: &str, events: &[TestEvent], now: i64) {
    let mut a = Archiver::open(lake).await.unwrap();
    let recs: Vec<(Position, Vec<u8>)> = events
        .chunks(300)
        .enumerate()
        .map(|(i, c)| {
            let text: String = c.iter().map(|e| e.to_line(true) + "\n").collect();
            (Position::from_u64(1 + i as u64), text.into_bytes())
        })
        .collect();
    let input: Vec<Record<'_>> = recs
        .iter()
        .map(|(p, d)| Record::new(p.clone(), d))
        .collect();
    a.archive(&SourceId::file(name), &input, now).await.unwrap();
}

/// The two lakes, fed and run alike.
struct Lakes {
    local: Lake,
    s3: Lake,
}

impl Lakes {
    async fn archive(&self, name: &str, events: &[TestEvent], now: i64) {
        archive(&self.local, name, events, now).await;
        archive(&self.s3, name, events, now).await;
    }

    async fn run(&self, now: i64, range: Option<(i64, i64)>) {
        for lake in [&self.local, &self.s3] {
            let run = BatchRun::new(lake).now(now);
            let run = match range {
                Some((a, b)) => run.reprocess(a, b).unwrap(),
                None => run,
            };
            run.execute().await.unwrap();
        }
    }

    async fn rollback(&self) {
        for lake in [&self.local, &self.s3] {
            tally_batch_layer::rollback::rollback(lake, Duration::ZERO)
                .await
                .unwrap()
                .expect("a run to roll back");
        }
    }
}

/// Every merchant's hours over the three days, its days, and a range ending at
/// the newest closed hours, from `app`.
async fn answers(app: &Router, w_hint: i64) -> Vec<Value> {
    let from = START_MS * 1000;
    let mut out = Vec::new();
    for m in 0..MERCHANTS {
        let m = format!("m{m}");
        for (a, b, g) in [
            (from, from + 3 * MICROS_PER_DAY, "hour"),
            (from, from + 4 * MICROS_PER_DAY, "day"),
            (
                w_hint - 5 * MICROS_PER_HOUR,
                w_hint + 2 * MICROS_PER_HOUR,
                "hour",
            ),
        ] {
            let uri = format!(
                "/v1/merchants/{m}/metrics?from={}&to={}&granularity={g}",
                format_ts(a),
                format_ts(b)
            );
            let (s, body) = get(app, &uri, &m).await;
            assert_eq!(s, StatusCode::OK, "{uri}: {body}");
            out.push(body);
        }
    }
    out
}

fn options(store: StoreChoice) -> ServeOptions {
    ServeOptions {
        refresh_every: Duration::from_secs(3600),
        state_max_age: Duration::from_secs(3600),
        store,
        ..ServeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_store_equal_the_lakes_and_read_no_object_store_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let moto = MotoServer::start();
    moto.create_bucket("lake");
    let proxy = Proxy::start(moto.port());
    let mut s3 = Lake::new(
        "s3://lake/tally",
        Some(&proxy.endpoint()),
        Some("us-east-1"),
    )
    .unwrap();
    for (k, v) in moto.aws_env() {
        if k != "AWS_ENDPOINT_URL" {
            s3 = s3.with_option(k, &v);
        }
    }
    let lakes = Lakes {
        local: Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap(),
        s3,
    };
    let speed = RedisStore::connect(&redis.url(), 3600).await.unwrap();
    let store = speed.serving_store();
    let load_options = at_once();

    // two days and two hours of events; the run closes them
    let events = generate(5, 4_000, MERCHANTS, START_MS, 50);
    let mut now = (START_MS + 2 * 86_400_000 + 2 * 3_600_000 + 30 * 60_000) * 1000;
    let w = (START_MS + 2 * 86_400_000 + 2 * 3_600_000) * 1000;
    lakes.archive("first", &events, now).await;
    lakes.run(now, None).await;
    let report = load(&lakes.s3, &store, &load_options).await.unwrap();
    assert!(report.published && report.complete, "{report:?}");
    assert_eq!(
        report.dates.len(),
        35,
        "the whole window, days without rows too"
    );
    assert!(report.values >= 2 * MERCHANTS as u64, "{report:?}");

    let auth = || Auth::hs256(SECRET);
    let stored = AppState::new(
        lakes.s3.clone(),
        auth(),
        speed.clone(),
        options(StoreChoice::Shared(std::sync::Arc::new(store.clone()))),
    )
    .await
    .unwrap();
    let direct = AppState::new(
        lakes.local.clone(),
        auth(),
        speed.clone(),
        options(StoreChoice::LakeOnly),
    )
    .await
    .unwrap();
    let embedded = AppState::new(
        lakes.local.clone(),
        auth(),
        speed.clone(),
        options(StoreChoice::Embedded),
    )
    .await
    .unwrap();
    let apps = [&stored, &direct, &embedded].map(|s| router(s.clone()));
    let refresh = || async {
        for s in [&stored, &direct, &embedded] {
            s.refresh_batch().await.unwrap();
        }
    };
    let check = |what: &'static str, w: i64| {
        let apps = apps.clone();
        async move {
            let want = answers(&apps[1], w).await;
            assert_eq!(
                answers(&apps[0], w).await,
                want,
                "{what}: S3 lake + Redis store"
            );
            assert_eq!(answers(&apps[2], w).await, want, "{what}: embedded store");
            want
        }
    };
    assert!(stored.batch().snapshot().unwrap().serves_from_store());
    let first = check("first run", w).await;
    assert!(
        first[0]["buckets"][0]["orders"].as_i64() > Some(0),
        "{}",
        first[0]
    );
    assert_eq!(first[0]["batch_watermark"], json!(format_ts(w)));

    // warmed up: requests read Redis only
    let before = proxy.requests();
    answers(&apps[0], w).await;
    assert_eq!(
        proxy.requests(),
        before,
        "a request reached the object store"
    );

    // the next hour, with a late event for the first day
    let late = TestEvent {
        event_id: "late-1".into(),
        merchant_id: "m3".into(),
        kind: "order",
        ts_ms: START_MS + 5 * 3_600_000 + 17,
        amount: Some(999),
        customer_id: Some("c-late".into()),
    };
    now += MICROS_PER_HOUR;
    let w = w + MICROS_PER_HOUR;
    let next: Vec<TestEvent> = generate(6, 300, MERCHANTS, START_MS + 50 * 3_600_000, 1)
        .into_iter()
        .chain([late])
        .collect();
    lakes.archive("second", &next, now).await;
    lakes.run(now, None).await;
    // not loaded yet: the store still serves the state before, as a whole
    stored.refresh_batch().await.unwrap();
    assert_eq!(answers(&apps[0], w - MICROS_PER_HOUR).await, first);
    let report = load(&lakes.s3, &store, &load_options).await.unwrap();
    assert_eq!(
        report.dates,
        ["2025-11-26", "2025-11-24"].map(String::from),
        "the new hour's date and the late event's"
    );
    refresh().await;
    let second = check("a publish with a late event", w).await;
    assert_ne!(second, first);

    // a reprocess of the first day (one more late event in it)
    let late2 = TestEvent {
        event_id: "late-2".into(),
        merchant_id: "m1".into(),
        kind: "refund",
        ts_ms: START_MS + 9 * 3_600_000,
        amount: Some(50),
        customer_id: None,
    };
    lakes.archive("third", &[late2], now).await;
    lakes
        .run(
            now,
            Some((START_MS * 1000, START_MS * 1000 + MICROS_PER_DAY)),
        )
        .await;
    load(&lakes.s3, &store, &load_options).await.unwrap();
    refresh().await;
    let third = check("a reprocess", w).await;
    assert_ne!(third, second);
    // the slot the last load switched 2025-11-26 away from went with the
    // merchant's next write: one copy of that date left
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg("tally:sv1:{m1}:2025-11")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        fields.iter().filter(|f| f.starts_with("26.")).count(),
        1,
        "{fields:?}"
    );

    // rolled back: the answers before the reprocess
    lakes.rollback().await;
    let report = load(&lakes.s3, &store, &load_options).await.unwrap();
    assert!(
        report.dates.contains(&"2025-11-24".to_string()),
        "{report:?}"
    );
    refresh().await;
    assert_eq!(check("a rollback", w).await, second);

    // Redis loses everything: the lake answers meanwhile, the next load refills
    let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    assert_eq!(store.state().await.unwrap(), None);
    stored.refresh_batch().await.unwrap();
    assert!(!stored.batch().snapshot().unwrap().serves_from_store());
    assert_eq!(answers(&apps[0], w).await, second, "read from the S3 lake");
    let report = load(&lakes.s3, &store, &load_options).await.unwrap();
    assert!(report.complete && report.dates.len() == 35, "{report:?}");
    stored.refresh_batch().await.unwrap();
    assert!(stored.batch().snapshot().unwrap().serves_from_store());
    let before = proxy.requests();
    assert_eq!(answers(&apps[0], w).await, second, "refilled");
    assert_eq!(
        proxy.requests(),
        before,
        "a request reached the object store"
    );

    // a new process (a new Lambda container): it starts and answers the
    // store's dates without one object-store request; history older than the
    // window opens the lake's tables then
    let before = proxy.requests();
    let fresh = AppState::new(
        lakes.s3.clone(),
        auth(),
        speed.clone(),
        options(StoreChoice::Shared(std::sync::Arc::new(store.clone()))),
    )
    .await
    .unwrap();
    let fresh = router(fresh);
    assert_eq!(answers(&fresh, w).await, second);
    assert_eq!(
        proxy.requests(),
        before,
        "a cold start read the object store"
    );
    let old = START_MS * 1000 - 60 * MICROS_PER_DAY;
    let uri = format!(
        "/v1/merchants/m1/metrics?from={}&to={}&granularity=day",
        format_ts(old),
        format_ts(old + 3 * MICROS_PER_DAY)
    );
    let (s, body) = get(&fresh, &uri, "m1").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["buckets"][0]["orders"], 0, "{body}");
    assert!(
        proxy.requests() > before,
        "history outside the window is read from the lake"
    );

    // a process whose refresher did not run for a while (a Lambda container
    // thawed after idling): the first request confirms the store's state with
    // one Redis read, not by reading the lake
    let idle = AppState::new(
        lakes.s3.clone(),
        auth(),
        speed.clone(),
        ServeOptions {
            state_max_age: Duration::from_millis(200),
            ..options(StoreChoice::Shared(std::sync::Arc::new(store.clone())))
        },
    )
    .await
    .unwrap();
    let idle = router(idle);
    // the merchants' three days of hours: dates the store holds
    let in_store = |app: Router| async move {
        let from = START_MS * 1000;
        let mut out = Vec::new();
        for m in 0..MERCHANTS {
            let m = format!("m{m}");
            let uri = format!(
                "/v1/merchants/{m}/metrics?from={}&to={}&granularity=hour",
                format_ts(from),
                format_ts(from + 3 * MICROS_PER_DAY)
            );
            out.push(get(&app, &uri, &m).await.1);
        }
        out
    };
    let want: Vec<Value> = second.iter().step_by(3).cloned().collect();
    assert_eq!(in_store(idle.clone()).await, want);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = proxy.requests();
    assert_eq!(in_store(idle.clone()).await, want);
    assert_eq!(
        proxy.requests(),
        before,
        "a thawed process read the object store"
    );
}

/// A load of a store that may evict any key is refused, with the fix named.
#[tokio::test]
async fn a_store_that_may_evict_is_refused() {
    let redis = RedisServer::start();
    let speed = RedisStore::connect(&redis.url(), 3600).await.unwrap();
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut c)
        .await
        .unwrap();
    let err = speed.serving_store().check_retention().await.unwrap_err();
    assert!(err.to_string().contains("noeviction"), "{err}");
    // a volatile policy could evict the lease
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(speed.serving_store().check_retention().await.is_err());
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut c)
        .await
        .unwrap();
    speed.serving_store().check_retention().await.unwrap();
    // nor one so full that a load would crowd out the speed view
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1000000")
        .query_async(&mut c)
        .await
        .unwrap();
    let err = speed.serving_store().check_retention().await.unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
}

/// A local lake with `events` random events of 3 merchants over `days` days
/// from START_MS, run by the batch layer 30 minutes after they closed; the
/// directory (keep it alive), the lake and the run's `now` (epoch µs).
async fn closed_days(seed: u64, events: usize, days: i64) -> (tempfile::TempDir, Lake, i64) {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
    let events = generate(seed, events, 3, START_MS, 24 * days);
    let now = (START_MS + days * 86_400_000 + 30 * 60_000) * 1000;
    archive(&lake, "first", &events, now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    (dir, lake, now)
}

/// Load options that do not wait for readers (the tests refresh by hand).
fn at_once() -> LoadOptions {
    LoadOptions {
        flip_guard: Duration::ZERO,
        ..LoadOptions::default()
    }
}

/// A store whose publish fails while `fail` is set: a load that dies after
/// writing its slots.
#[derive(Clone)]
struct DiesBeforePublish {
    inner: tally_common::serving_store::EmbeddedServingStore,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ServingStore for DiesBeforePublish {
    fn state(&self) -> BoxFuture<'_, tally_common::Result<Option<StoreState>>> {
        self.inner.state()
    }
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        days: &'a [(i64, u8)],
    ) -> BoxFuture<'a, tally_common::Result<Vec<Option<bytes::Bytes>>>> {
        self.inner.read(merchant, days)
    }
    fn write<'a>(&'a self, values: &'a [DayWrite]) -> BoxFuture<'a, tally_common::Result<()>> {
        self.inner.write(values)
    }
    fn zone<'a>(
        &'a self,
        merchant: &'a str,
    ) -> BoxFuture<'a, tally_common::Result<Option<String>>> {
        self.inner.zone(merchant)
    }
    fn set_zones<'a>(
        &'a self,
        zones: &'a [(String, String, i64)],
    ) -> BoxFuture<'a, tally_common::Result<()>> {
        self.inner.set_zones(zones)
    }
    fn publish<'a>(
        &'a self,
        expected: Option<u64>,
        state: &'a StoreState,
    ) -> BoxFuture<'a, tally_common::Result<bool>> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(tally_common::Error::serving("killed before publishing"))
            });
        }
        self.inner.publish(expected, state)
    }
    fn next_generation(&self) -> BoxFuture<'_, tally_common::Result<u64>> {
        self.inner.next_generation()
    }
    fn lease<'a>(
        &'a self,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, tally_common::Result<bool>> {
        self.inner.lease(holder, ttl)
    }
    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, tally_common::Result<()>> {
        self.inner.release(holder)
    }
    fn drop_before(&self, before: i64) -> BoxFuture<'_, tally_common::Result<u64>> {
        self.inner.drop_before(before)
    }
    fn check_retention(&self) -> BoxFuture<'_, tally_common::Result<()>> {
        self.inner.check_retention()
    }
    fn memory_used(&self) -> BoxFuture<'_, tally_common::Result<Option<u64>>> {
        self.inner.memory_used()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A load killed after writing its slots, then a rollback: the next load
/// writes the same slots, and a merchant the killed load wrote but the rolled
/// back tables do not hold reads as no rows (the next load never reuses the
/// killed one's generation). And one load at a time: a second one while the
/// lease is held is refused as busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_a_load_killed_before_publishing_are_never_read() {
    let (_dir, lake, now) = closed_days(9, 500, 1).await;
    let store = DiesBeforePublish {
        inner: tally_common::serving_store::EmbeddedServingStore::new(),
        fail: Default::default(),
    };
    let load_options = at_once();
    load(&lake, &store, &load_options).await.unwrap();
    let day = START_MS * 1000;

    // a new merchant's late order; its load dies before publishing
    let late = TestEvent {
        event_id: "late".into(),
        merchant_id: "mnew".into(),
        kind: "order",
        ts_ms: START_MS + 3 * 3_600_000,
        amount: Some(5),
        customer_id: None,
    };
    archive(&lake, "late", &[late], now).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(load(&lake, &store, &load_options).await.is_err());
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    // the run is undone: the tables hold no row of mnew
    tally_batch_layer::rollback::rollback(&lake, Duration::ZERO)
        .await
        .unwrap()
        .expect("a run to roll back");

    // one load at a time
    assert!(store
        .lease("someone else", Duration::from_secs(60))
        .await
        .unwrap());
    let err = load(&lake, &store, &load_options).await.unwrap_err();
    assert!(matches!(err, tally_common::Error::Busy(_)), "{err}");
    store.release("someone else").await.unwrap();

    let report = load(&lake, &store, &load_options).await.unwrap();
    assert!(
        report.dates.contains(&"2025-11-24".to_string()),
        "{report:?}"
    );
    let app = router(
        AppState::new(
            lake.clone(),
            Auth::hs256(SECRET),
            tally_speed_layer::EmbeddedStore::new(3600),
            options(StoreChoice::Shared(std::sync::Arc::new(store.clone()))),
        )
        .await
        .unwrap(),
    );
    assert!(
        store.state().await.unwrap().unwrap().date(day).is_some(),
        "the date is served from the store"
    );
    let uri = format!(
        "/v1/merchants/mnew/metrics?from={}&to={}&granularity=hour",
        format_ts(day),
        format_ts(day + 6 * MICROS_PER_HOUR)
    );
    let (s, body) = get(&app, &uri, "mnew").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["buckets"][3]["source"], "batch", "{body}");
    assert_eq!(body["buckets"][3]["orders"], 0, "{body}");
}

/// A run killed between its `metrics_daily` and `metrics_hourly` commits: a
/// load then keeps the daily table as it was before that run (never the run's
/// daily rows beside the hourly rows of the run before), and takes both once
/// the next run has published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_never_pairs_a_runs_daily_rows_with_older_hourly_rows() {
    let (_dir, lake, now) = closed_days(11, 600, 1).await;
    let store = tally_common::serving_store::EmbeddedServingStore::new();
    let load_options = at_once();
    load(&lake, &store, &load_options).await.unwrap();
    let before = store.state().await.unwrap().unwrap();

    // a late event of the closed day; the run that takes it in is killed after
    // its metrics_daily commit (its second of three)
    let late = TestEvent {
        event_id: "late".into(),
        merchant_id: "m1".into(),
        kind: "order",
        ts_ms: START_MS + 5 * 3_600_000,
        amount: Some(7),
        customer_id: None,
    };
    archive(&lake, "late", &[late], now).await;
    let killed_lake = lake.clone();
    let killed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let run = BatchRun::new(&killed_lake)
            .now(now)
            .lease_expiry(Duration::from_secs(1))
            .on_progress(|done, total| {
                if done == total - 1 {
                    panic!("killed after the metrics_daily commit (expected by the test)");
                }
            });
        rt.block_on(run.execute())
    })
    .join();
    assert!(killed.is_err(), "the run was not killed");
    let daily = lake
        .open(tally_common::lake::Table::MetricsDaily)
        .await
        .unwrap()
        .unwrap();
    assert!(
        daily.version().map(|v| v as i64) > before.daily_version,
        "the killed run's daily commit landed"
    );

    let report = load(&lake, &store, &load_options).await.unwrap();
    assert_eq!(report.daily_version, before.daily_version, "{report:?}");
    assert_eq!(report.hourly_version, before.hourly_version, "{report:?}");

    // the next run publishes both; the load takes both
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    BatchRun::new(&lake).now(now).execute().await.unwrap();
    let report = load(&lake, &store, &load_options).await.unwrap();
    let daily = lake
        .open(tally_common::lake::Table::MetricsDaily)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report.daily_version,
        daily.version().map(|v| v as i64),
        "{report:?}"
    );
    assert!(
        report.dates.contains(&"2025-11-24".to_string()),
        "{report:?}"
    );
}

/// A load with a time budget publishes what it loaded and says it is not
/// complete; the next loads go on from there (what the state machine's Load
/// loop does on Lambda).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_out_of_time_publishes_what_it_has_and_the_next_goes_on() {
    let (_dir, lake, _) = closed_days(12, 300, 2).await;
    let store = tally_common::serving_store::EmbeddedServingStore::new();
    let options = LoadOptions {
        window_days: 4,
        time_budget: Some(Duration::ZERO),
        ..at_once()
    };
    for n in 1..=4 {
        let report = load(&lake, &store, &options).await.unwrap();
        assert_eq!(report.dates.len(), 1, "one date a call: {report:?}");
        assert_eq!(report.complete, n == 4, "{report:?}");
        assert_eq!(store.state().await.unwrap().unwrap().dates.len(), n);
    }
    let report = load(&lake, &store, &options).await.unwrap();
    assert!(report.dates.is_empty() && report.complete, "{report:?}");
}
