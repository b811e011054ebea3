//! `tally demo`: the whole pipeline on embedded defaults in one process. A local
//! lake (reused on the next start), a few days of generated events ingested and
//! batch-processed, a live stream feeding the current hour, the API and the
//! dashboard on 127.0.0.1:8080, and a ready token printed with example queries.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use tally_batch_layer::{Archiver, BatchRun};
use tally_common::bucket::{format_ts, hour_floor, now_micros, MICROS_PER_HOUR};
use tally_common::calendar::{Calendar, Unit};
use tally_common::config::{AuthArgs, SpeedArgs};
use tally_common::lake::{Lake, Table};
use tally_common::shutdown::{self, Shutdown};
use tally_common::source::SourceId;
use tally_serving_layer::auth::Claims;
use tally_stream::LineBatch;

use crate::gen::{GenArgs, Generator};

/// How long the tokens the demo prints are valid.
const TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// Arguments of `tally demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory of the demo's lake and secret (reused on the next start).
    #[arg(long, default_value = "./tally-data")]
    pub dir: PathBuf,
    /// Address of the API and dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Merchants in the generated history.
    #[arg(long, default_value_t = 2_000)]
    pub merchants: u32,
    /// Days of history.
    #[arg(long, default_value_t = 3)]
    pub days: u32,
    /// Events of history.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Live events per second fed into the current hour.
    #[arg(long, default_value_t = 20.0)]
    pub live_rate: f64,
    /// Minutes between runs of the batch layer.
    #[arg(long, default_value_t = 5)]
    pub batch_every_minutes: u64,
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    crate::progress_bar(
        Some(len),
        &format!("{{spinner}} {what:<10} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} {{msg}}"),
    )
}

fn secret(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("jwt-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if s.trim().len() >= 32 {
            return Ok(s.trim().to_string());
        }
    }
    let s = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(&path, &s)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(s)
}

/// Generate history and archive it in chunks, with a progress bar.
async fn load_history(lake: &Lake, args: &DemoArgs) -> anyhow::Result<u64> {
    let start = hour_floor(now_micros()) - i64::from(args.days) * 24 * MICROS_PER_HOUR;
    let g = GenArgs {
        merchants: args.merchants,
        events: args.events,
        days: f64::from(args.days),
        start: chrono::DateTime::from_timestamp_micros(start),
        ..GenArgs::default()
    };
    let mut generator = Generator::new(&g)?;
    let mut archiver = Archiver::open(lake).await?;
    let source = SourceId::file(&format!("demo-history-{}", g.seed));
    let progress = bar(args.events, "history");
    let (mut batch, mut line, mut accepted) = (LineBatch::default(), String::new(), 0u64);
    loop {
        batch.clear();
        while batch.len() < 100_000 && generator.next_into(&mut line) {
            batch.push(line.as_bytes());
        }
        if batch.is_empty() {
            break;
        }
        let r = archiver
            .archive(&source, &batch.records(), now_micros())
            .await?;
        accepted += r.accepted;
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    Ok(accepted)
}

/// Feed live events (event time = now) into raw_events every two seconds; the
/// embedded speed view follows raw_events, so they show in the current hour.
async fn live_feed(lake: Lake, rate: f64, mut shutdown: Shutdown) {
    let g = GenArgs {
        events: 0,
        rate,
        seed: now_micros() as u64,
        late_share: 0.0,
        ..GenArgs::default()
    };
    let mut generator = match Generator::new(&g) {
        Ok(g) => g,
        Err(e) => return tracing::error!(error = %e, "live feed: bad generator settings"),
    };
    let mut archiver = match Archiver::open(&lake).await {
        Ok(a) => a,
        Err(e) => return tracing::error!(error = %e, "live feed: cannot open the lake"),
    };
    let source = SourceId::file(&format!("demo-live-{}", g.seed));
    let started = Instant::now();
    let (mut batch, mut line) = (LineBatch::default(), String::new());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.wait() => return,
        }
        batch.clear();
        while generator.due().is_some_and(|d| d <= started.elapsed())
            && generator.next_into(&mut line)
        {
            batch.push(line.as_bytes());
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = archiver
            .archive(&source, &batch.records(), now_micros())
            .await
        {
            tracing::warn!(error = %e, "live feed: archive failed; retrying with the next chunk");
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.dir)?;
    let lake_dir = args.dir.join("lake");
    let lake = Lake::new(lake_dir.to_str().unwrap_or("./tally-data/lake"), None, None)?;
    let secret = secret(&args.dir)?;
    let (trigger, signal) = shutdown::channel();
    trigger.fire_on_signals();

    if lake.open(Table::RawEvents).await?.is_none() {
        eprintln!(
            "tally demo: generating {} events of {} days for {} merchants into {}",
            args.events,
            args.days,
            args.merchants,
            lake_dir.display()
        );
        let n = load_history(&lake, &args).await?;
        eprintln!(
            "tally demo: {n} events archived in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!("tally demo: reusing the lake at {}", lake_dir.display());
    }
    let r = BatchRun::new(&lake)
        .wait_for_other_runs(Duration::from_secs(60))
        .execute()
        .await?;
    eprintln!(
        "tally demo: batch layer recomputed {} hours; watermark {}",
        r.hours,
        r.watermark_after.map_or("none".into(), format_ts)
    );

    let view =
        crate::serve::speed_store(&lake, &SpeedArgs::embedded(), signal.clone(), true).await?;
    let auth = AuthArgs {
        jwt_secret: Some(secret.clone()),
        jwks: None,
        jwks_refresh_secs: tally_common::config::DEFAULT_JWKS_REFRESH_SECS,
    };
    let state = crate::serve::state(lake.clone(), &auth, view).await?;
    tokio::spawn(live_feed(lake.clone(), args.live_rate, signal.clone()));
    tokio::spawn(tally_batch_layer::job::run_every(
        lake.clone(),
        Duration::from_secs(args.batch_every_minutes * 60),
        signal.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another tally running? pass --addr)",
                args.addr
            )
        })?;
    let merchant = "m_1";
    let t = Claims::hs256_token(&secret, Some(merchant), TOKEN_TTL)?;
    let admin = Claims::hs256_token(&secret, None, TOKEN_TTL)?;
    let now = hour_floor(now_micros());
    let base = format!("http://{}", args.addr);
    let from_h = format_ts(now - 23 * MICROS_PER_HOUR);
    let to_h = format_ts(now + MICROS_PER_HOUR);
    let day0 = tally_common::bucket::day_floor(now);
    println!();
    println!(
        "tally demo is ready ({:.1}s) — API and dashboard on {base}",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("  token for merchant {merchant} (30 days):\n    export TOKEN={t}");
    println!("  admin token:\n    export ADMIN={admin}");
    println!();
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" \"{base}/v1/merchants/{merchant}/metrics?from={from_h}&to={to_h}&granularity=hour\"");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" \"{base}/v1/merchants/{merchant}/metrics?from={}&to={}&granularity=day&metrics=orders,net_sales,unique_customers\"",
        format_ts(day0 - (i64::from(args.days)) * 24 * MICROS_PER_HOUR), format_ts(day0 + 24 * MICROS_PER_HOUR));
    println!("  curl -s -H \"Authorization: Bearer $ADMIN\" \"{base}/v1/merchants/m_2/metrics?from={from_h}&to={to_h}\"");
    // the last local days of Kolkata (+05:30): its midnights are 18:30 UTC
    let kolkata = Calendar::parse("Asia/Kolkata")?;
    let k_to = kolkata.next(Unit::Day, now_micros());
    let mut k_from = k_to;
    for _ in 0..=args.days {
        k_from = kolkata.floor(Unit::Day, k_from - 1);
    }
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" \"{base}/v1/merchants/{merchant}/metrics?from={}&to={}&granularity=day&tz=Asia/Kolkata\"",
        format_ts(k_from), format_ts(k_to));
    println!("  curl -s -X PUT -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' -d '{{\"time_zone\":\"Asia/Kolkata\"}}' {base}/v1/merchants/{merchant}/settings");
    println!("  curl -s {base}/openapi.json");
    println!();
    println!("  dashboard: {base}/#merchant={merchant}&token={t}");
    println!("  SQL:       TALLY_LAKE={} tally sql \"SELECT merchant_id, SUM(orders) FROM metrics_daily GROUP BY 1 ORDER BY 2 DESC LIMIT 5\"", lake_dir.display());
    println!("  local days: TALLY_LAKE={} tally sql \"SELECT date_trunc('day', local_start) AS day, SUM(orders), hll_sketch_estimate(hll_union_agg(customers_sketch)) AS customers FROM metrics_local WHERE merchant_id = '{merchant}' GROUP BY 1 ORDER BY 1\"", lake_dir.display());
    println!();
    println!("Ctrl-C stops; the next start reuses the lake.");
    tally_serving_layer::serve_listener(listener, state, signal).await?;
    Ok(())
}
