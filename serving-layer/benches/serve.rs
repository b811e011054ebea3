//! The serving layer under load: a lake with 100,000 merchants x 30 days of hours
//! (72 million `metrics_hourly` rows and the matching `metrics_daily`), the
//! watermark at the start of the current hour, the current hour live in a real
//! Redis fed through the speed layer, and the API served in process on loopback
//! while `wrk` asks for 24-hour hourly ranges (23 batch buckets + the speed
//! bucket) of random merchants. Prints requests/s, latency percentiles, the
//! latency histogram and the CPU seconds of the server, Redis and wrk, which all
//! share the machine's cores.
//!
//! Run: `cargo bench -p tally-serving-layer --bench serve` (needs redis-server and
//! wrk: scripts/install-services.sh). The lake is generated once into
//! `BENCH_LAKE_DIR` (default /tmp/tally-serve-bench-lake) and reused, topped up
//! to the current hour. Knobs: BENCH_MERCHANTS, BENCH_DAYS, BENCH_SECS (measured
//! run, default 30), BENCH_THREADS / BENCH_CONNECTIONS (wrk's -t / -c, default 2 /
//! 32), BENCH_SERVER_THREADS (default 2), BENCH_LAYOUT (`lookup`, the default: the
//! batch layer's metric-table writer properties; `lookup-zstd`, `lookup-lz4`,
//! `lookup-delta`: variants; `archive`: the raw table's zstd-with-dictionaries
//! properties, which the metric tables used before), BENCH_READ (`lookup`,
//! default, or `datafusion`: how the server reads the batch view), BENCH_FILES
//! (`day`, default: one file per date; `hour`: one file per hour; `runs`: as the
//! batch layer leaves its tables now: on the current day the files its hourly
//! publishes leave, one per bit of the hours so far, and one file per closed
//! date).

use std::collections::HashMap;
use std::f64::consts::TAU;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Int32Array, Int64Array, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::prelude::{col, lit};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::SaveMode;
use jsonwebtoken::{encode, EncodingKey, Header};
use tally_common::bucket::{
    date_string, day_floor, format_ts, hour_floor, month_string, now_micros, MICROS_PER_DAY,
    MICROS_PER_HOUR,
};
use tally_common::calendar::{Calendar, Unit, SLOT_MICROS};
use tally_common::lake::{Lake, Table};
use tally_common::shutdown;
use tally_common::sketch::CustomerSketch;
use tally_common::source::{Position, Record, SourceId};
use tally_common::watermark::{read_progress, WATERMARK_APP};
use tally_serving_layer::{serve_listener, AppState, Auth, ServeOptions};
use tally_speed_layer::{apply_records_and_fill, RedisStore, SpeedStore};
use tally_testkit::{cpu_secs, free_port, RedisServer};

const SECRET: &str = "serve-bench-secret";
/// Bumped when the generated data or its layout changes, so a cached lake is remade.
const LAKE_FORMAT: u32 = 5;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------- the data

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Page views per hour at a merchant's daily peak: Zipf-like, ~600 for m_0, under 1 in the tail.
fn merchant_size(m: u32) -> f64 {
    600.0 / (1.0 + f64::from(m)).powf(0.7)
}

/// The stored metrics of merchant `m` in hour `h` (hours since the epoch):
/// orders, gross_sales, refunds, refunded_amount, page_views, unique_customers.
/// Deterministic, so a cached lake, a topped-up one and the checks below agree.
fn hour_values(m: u32, h: i64) -> [i64; 6] {
    let r = mix((u64::from(m) << 32) ^ h as u64);
    let hod = h.rem_euclid(24) as f64;
    let diurnal = 0.3 + 0.7 * (0.5 - 0.5 * ((hod - 3.0) / 24.0 * TAU).cos());
    let pv = (merchant_size(m) * diurnal * (0.6 + 0.8 * unit(r)) + unit(mix(r))).floor() as i64;
    let conv = 0.01 + 0.04 * unit(mix(u64::from(m) ^ 0xC0FFEE));
    let aov = 1500.0 + 7500.0 * unit(mix(u64::from(m) ^ 0xA0A0));
    let orders = (pv as f64 * conv + unit(mix(r ^ 1))).floor() as i64;
    let gross = (orders as f64 * aov * (0.8 + 0.4 * unit(mix(r ^ 2)))) as i64;
    let refunds = (orders as f64 * 0.04 + 0.6 * unit(mix(r ^ 3))).floor() as i64;
    let refunded = (refunds as f64 * aov) as i64;
    let unique =
        ((pv as f64 * 0.65 + orders as f64 * 0.5).ceil() as i64).min(pv + orders + refunds);
    [orders, gross, refunds, refunded, pv, unique]
}

/// Merchant numbers in the order the batch layer's files hold them (by `merchant_id`).
fn merchants_by_id(n: u32) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = (0..n).map(|m| (format!("m_{m}"), m)).collect();
    v.sort();
    v
}

/// Column builders of one metric table's rows.
struct Rows {
    merchant: StringBuilder,
    time: Vec<i64>,
    metrics: [Vec<i64>; 6],
    sketches: Vec<Option<Vec<u8>>>,
}

impl Rows {
    fn with_capacity(n: usize) -> Self {
        Rows {
            merchant: StringBuilder::with_capacity(n, n * 8),
            time: Vec::with_capacity(n),
            metrics: std::array::from_fn(|_| Vec::with_capacity(n)),
            sketches: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, merchant: &str, time: i64, v: [i64; 6], sketch: Option<Vec<u8>>) {
        self.merchant.append_value(merchant);
        self.time.push(time);
        for (c, x) in self.metrics.iter_mut().zip(v) {
            c.push(x);
        }
        self.sketches.push(sketch);
    }

    fn finish(mut self, table: Table, partition: &str, computed_at: i64) -> RecordBatch {
        let n = self.time.len();
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let mut cols: Vec<ArrayRef> = vec![Arc::new(self.merchant.finish()), ts(self.time)];
        for c in self.metrics {
            cols.push(Arc::new(Int64Array::from(c)));
        }
        cols.push(Arc::new(BinaryArray::from_iter(
            self.sketches.iter().map(|s| s.as_deref()),
        )));
        cols.push(ts(vec![computed_at; n]));
        cols.push(Arc::new(Int32Array::from(vec![1; n])));
        cols.push(Arc::new(StringArray::from(vec![partition; n])));
        RecordBatch::try_new(table.schema(), cols).expect("metric rows match the table schema")
    }
}

/// The customers of merchant `m` in hour `h`: `unique` ids drawn from the
/// merchant's pool (about 50 hours of its traffic, so customers return).
fn hour_customers(m: u32, h: i64, unique: i64) -> Vec<u64> {
    let pool = (merchant_size(m) * 50.0).max(4.0) as u64;
    (0..unique.max(0) as u64)
        .map(|j| mix((u64::from(m) << 40) ^ ((h as u64) << 8) ^ j) % pool)
        .collect()
}

fn sketch_of_ids(ids: impl IntoIterator<Item = u64>) -> Option<Vec<u8>> {
    let mut s = CustomerSketch::new();
    for id in ids {
        s.update(&id.to_string());
    }
    (!s.is_empty()).then(|| s.to_bytes())
}

/// The rows of day `day` (epoch µs): `metrics_hourly` and
/// `metrics_quarter_hourly` for its hours in `hours` (each hour's counters and
/// customers split over its quarter hours; quarter hours without either have
/// no row, as the batch layer writes), and `metrics_daily` when `daily`
/// (sorted by merchant, as the batch layer writes).
fn day_rows(
    merchants: &[(String, u32)],
    day: i64,
    hours: std::ops::Range<i64>,
    daily: bool,
    computed_at: i64,
) -> [Option<RecordBatch>; 3] {
    let first = hours.start.max(day);
    let last = hours.end.min(day + MICROS_PER_DAY);
    let n_hours = usize::try_from((last - first).max(0) / MICROS_PER_HOUR).unwrap_or(0);
    let mut hourly = Rows::with_capacity(merchants.len() * n_hours);
    let mut quarters = Rows::with_capacity(merchants.len() * n_hours);
    let mut days = Rows::with_capacity(if daily { merchants.len() } else { 0 });
    for (name, m) in merchants {
        let mut total = [0i64; 6];
        let mut day_customers = Vec::new();
        for i in 0..24 {
            let t = day + i * MICROS_PER_HOUR;
            let v = hour_values(*m, t / MICROS_PER_HOUR);
            let customers = hour_customers(*m, t / MICROS_PER_HOUR, v[5]);
            if t >= first && t < last {
                hourly.push(name, t, v, sketch_of_ids(customers.iter().copied()));
                for q in 0..4i64 {
                    let mut qv = [0i64; 6];
                    for (x, whole) in qv.iter_mut().zip(v).take(5) {
                        *x = whole * (q + 1) / 4 - whole * q / 4;
                    }
                    let mine: Vec<u64> = customers
                        .iter()
                        .copied()
                        .enumerate()
                        .filter(|(j, _)| *j as i64 % 4 == q)
                        .map(|(_, c)| c)
                        .collect();
                    let distinct: std::collections::BTreeSet<u64> = mine.iter().copied().collect();
                    qv[5] = distinct.len() as i64;
                    if qv.iter().any(|x| *x != 0) {
                        quarters.push(name, t + q * SLOT_MICROS, qv, sketch_of_ids(mine));
                    }
                }
            }
            for (s, x) in total.iter_mut().zip(v) {
                *s += x;
            }
            if daily {
                day_customers.extend(customers);
            }
        }
        if daily {
            // returning customers: a day's distinct customers are fewer than the hours' sum
            total[5] = total[5] * 85 / 100;
            days.push(name, day, total, sketch_of_ids(day_customers));
        }
    }
    let date = date_string(day);
    [
        (n_hours > 0).then(|| hourly.finish(Table::MetricsHourly, &date, computed_at)),
        daily.then(|| days.finish(Table::MetricsDaily, &month_string(day), computed_at)),
        (n_hours > 0).then(|| quarters.finish(Table::MetricsQuarterHourly, &date, computed_at)),
    ]
}

/// Writer properties of the generated lake.
fn writer_properties(layout: &str) -> WriterProperties {
    // `lookup` is what the batch layer writes (tally_batch_layer::layout, reasons
    // there); the others are the variants it was chosen against.
    let variant = |compression, delta: bool| {
        let b = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(128 * 1024))
            .set_data_page_row_count_limit(1024)
            .set_dictionary_enabled(false);
        let b = if delta {
            b.set_encoding(Encoding::DELTA_BINARY_PACKED)
                .set_column_encoding(ColumnPath::from("merchant_id"), Encoding::DELTA_BYTE_ARRAY)
        } else {
            b
        };
        b.build()
    };
    let zstd = || Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default());
    match layout {
        "lookup" => tally_batch_layer::layout::metric_writer_properties(),
        "archive" => tally_batch_layer::archive::writer_properties(),
        "lookup-delta" => variant(Compression::UNCOMPRESSED, true),
        "lookup-lz4" => variant(Compression::LZ4_RAW, false),
        "lookup-zstd" => variant(zstd(), false),
        other => panic!(
            "BENCH_LAYOUT={other}: use lookup, lookup-delta, lookup-lz4, lookup-zstd or archive"
        ),
    }
}

async fn write_rows(
    lake: &Lake,
    table: Table,
    rows: RecordBatch,
    props: WriterProperties,
    watermark_hours: Option<i64>,
    replace_date: Option<String>,
) {
    let t = lake
        .open_or_create(table)
        .await
        .expect("creating the table");
    let mut commit = CommitProperties::default();
    if let Some(w) = watermark_hours {
        commit = commit.with_application_transactions(vec![Transaction::new(WATERMARK_APP, w)]);
    }
    let write = t
        .write(vec![rows])
        .with_partition_columns(table.partition_columns().iter().copied())
        .with_writer_properties(props)
        .with_commit_properties(commit);
    let write = match replace_date {
        Some(date) => write
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(col("date").eq(lit(date))),
        None => write.with_save_mode(SaveMode::Append),
    };
    write.await.expect("writing metric rows");
}

/// Write the hours `[from, to)` into `metrics_hourly`, the last commit moving the
/// watermark to `to`, and the days that complete within `(from, to]` into
/// `metrics_daily` (one file per day). Hourly rows go one file per date; topping a
/// lake up (`rewrite_dates`) rewrites each touched date whole, so a date stays one
/// sorted file. With [`HourFiles::Hour`], one file per hour instead (how hourly
/// runs left a date before the batch layer rewrote it whole); with
/// [`HourFiles::Runs`], for the current day files of 16, 8, 4, 2 and 1 hours
/// (the bits of its hours so far) and one per date before (how the batch layer
/// leaves its tables now: a publish merges the smaller files into its own,
/// `tally_batch_layer::publish`, and a closed date is compacted into one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HourFiles {
    Day,
    Hour,
    Runs,
}
async fn extend_lake(
    lake: &Lake,
    merchants: &Arc<Vec<(String, u32)>>,
    from: i64,
    to: i64,
    layout: &str,
    files: HourFiles,
    rewrite_dates: bool,
) {
    let computed_at = now_micros();
    let mut day = day_floor(from);
    while day < to {
        let daily = day + MICROS_PER_DAY <= to && day + MICROS_PER_DAY > from;
        let t = Instant::now();
        let m = Arc::clone(merchants);
        let hour_files = match files {
            HourFiles::Day => false,
            HourFiles::Hour => true,
            HourFiles::Runs => day + MICROS_PER_DAY >= to,
        };
        let rewrite = rewrite_dates && !hour_files;
        let first = if rewrite { day } else { from };
        let [hourly_rows, daily_rows, quarter_rows] =
            tokio::task::spawn_blocking(move || day_rows(&m, day, first..to, daily, computed_at))
                .await
                .expect("generating rows");
        if let Some(q) = quarter_rows {
            // one file per date (rewritten whole when topped up), before the
            // hourly commit that moves the watermark, as a publish orders them
            write_rows(
                lake,
                Table::MetricsQuarterHourly,
                q,
                writer_properties(layout),
                None,
                (rewrite || !hour_files).then(|| date_string(day)),
            )
            .await;
        }
        let is_last = day + MICROS_PER_DAY >= to;
        let mut rows = 0;
        if let Some(h) = hourly_rows {
            rows = h.num_rows();
            if hour_files {
                // as the hourly batch runs leave a date: one file (and commit) per hour
                let times = h
                    .column(1)
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .expect("the hour column")
                    .clone();
                // HourFiles::Hour: one file per hour; HourFiles::Runs: as the
                // batch layer's publishes leave an open date, files of 16, 8,
                // 4, 2 and 1 hours (the bits of the hours so far)
                let end = to.min(day + MICROS_PER_DAY);
                let mut t = from.max(day);
                while t < end {
                    let left = ((end - t) / MICROS_PER_HOUR) as u32;
                    let hours = match files {
                        HourFiles::Runs => 1i64 << (31 - left.leading_zeros()),
                        _ => 1,
                    };
                    let next = t + hours * MICROS_PER_HOUR;
                    let mask: BooleanArray = times
                        .iter()
                        .map(|v| Some(v.is_some_and(|v| v >= t && v < next)))
                        .collect();
                    let part = filter_record_batch(&h, &mask).expect("the file's rows");
                    let w = (next >= to).then_some(to / MICROS_PER_HOUR);
                    write_rows(
                        lake,
                        Table::MetricsHourly,
                        part,
                        writer_properties(layout),
                        w,
                        None,
                    )
                    .await;
                    t = next;
                }
            } else {
                let w = is_last.then_some(to / MICROS_PER_HOUR);
                let replace = rewrite.then(|| date_string(day));
                write_rows(
                    lake,
                    Table::MetricsHourly,
                    h,
                    writer_properties(layout),
                    w,
                    replace,
                )
                .await;
            }
        }
        if let Some(d) = daily_rows {
            write_rows(
                lake,
                Table::MetricsDaily,
                d,
                writer_properties(layout),
                None,
                None,
            )
            .await;
        }
        println!(
            "  {}: {rows} hourly rows{} in {:.1}s",
            date_string(day),
            if daily { " + daily rows" } else { "" },
            t.elapsed().as_secs_f64()
        );
        day += MICROS_PER_DAY;
    }
}

/// The cached lake, made or topped up so its watermark is `w`.
async fn prepare_lake(
    dir: &Path,
    merchants: &Arc<Vec<(String, u32)>>,
    days: i64,
    w: i64,
    layout: &str,
    hour_files: HourFiles,
) -> Lake {
    let marker = dir.join("bench-lake.txt");
    let want = format!(
        "format={LAKE_FORMAT} layout={layout} merchants={} days={days}{}\n",
        merchants.len(),
        match hour_files {
            HourFiles::Day => "",
            HourFiles::Hour => " files=hour",
            HourFiles::Runs => " files=runs",
        }
    );
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        let lake =
            Lake::new(dir.join("lake").to_str().expect("utf-8 path"), None, None).expect("lake");
        let hourly = lake
            .open(Table::MetricsHourly)
            .await
            .expect("opening metrics_hourly");
        let watermark = match &hourly {
            Some(t) => {
                read_progress(t)
                    .await
                    .expect("reading the watermark")
                    .watermark
            }
            None => None,
        };
        match watermark {
            Some(old) if old == w => {
                println!(
                    "reusing the lake in {} (watermark {})",
                    dir.display(),
                    format_ts(w)
                );
                return lake;
            }
            Some(old) if old < w && w - old <= days * MICROS_PER_DAY => {
                println!(
                    "topping up the lake in {} from {} to {}",
                    dir.display(),
                    format_ts(old),
                    format_ts(w)
                );
                extend_lake(&lake, merchants, old, w, layout, hour_files, true).await;
                return lake;
            }
            _ => {}
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("removing the old bench lake");
    }
    std::fs::create_dir_all(dir).expect("creating the bench lake directory");
    let lake = Lake::new(dir.join("lake").to_str().expect("utf-8 path"), None, None).expect("lake");
    println!(
        "generating the lake in {}: {} merchants x {days} days of hours, layout {layout} (once; reused later)",
        dir.display(),
        merchants.len()
    );
    let t = Instant::now();
    extend_lake(
        &lake,
        merchants,
        w - days * MICROS_PER_DAY,
        w,
        layout,
        hour_files,
        false,
    )
    .await;
    std::fs::write(&marker, want).expect("writing the lake marker");
    println!("lake generated in {:.0}s", t.elapsed().as_secs_f64());
    lake
}

fn dir_stats(dir: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("_delta_log") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "parquet") {
                files += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (files, bytes)
}

// ------------------------------------------------------- the speed view

/// Events of the current hour (from `w` to now) for every merchant, through the
/// speed layer's own path into Redis. Returns the number of events.
async fn feed_current_hour(store: &SpeedStore, lake: &Lake, merchants: u32, w: i64) -> usize {
    let now_ms = now_micros() / 1000;
    let w_ms = w / 1000;
    let span = (now_ms - w_ms).max(1) as u64;
    let frac = ((now_ms - w_ms) as f64 / 3_600_000.0).clamp(0.05, 1.0);
    let mut lines = Vec::new();
    for m in 0..merchants {
        let n = 1 + (merchant_size(m) * frac).min(20.0) as u64;
        for i in 0..n {
            let r = mix((u64::from(m) << 20) ^ i ^ 0x5EED);
            let ts = w_ms + (r % span) as i64;
            let line = if i % 4 == 1 {
                format!(
                    r#"{{"event_id":"bench-{w_ms}-{m}-{i}","merchant_id":"m_{m}","type":"order","ts":{ts},"amount":{},"customer_id":"c_{m}_{}"}}"#,
                    1000 + r % 9000,
                    i % 3
                )
            } else {
                format!(
                    r#"{{"event_id":"bench-{w_ms}-{m}-{i}","merchant_id":"m_{m}","type":"page_view","ts":{ts},"customer_id":"c_{m}_{}"}}"#,
                    i % 3
                )
            };
            lines.push(line);
        }
    }
    let records: Vec<String> = lines.chunks(500).map(|c| c.join("\n")).collect();
    let source = SourceId::file("serve-bench");
    let mut pos = 0u64;
    for chunk in records.chunks(100) {
        let input: Vec<Record<'_>> = chunk
            .iter()
            .map(|r| {
                pos += 1;
                Record::new(Position::from_u64(pos), r.as_bytes())
            })
            .collect();
        // the first write makes a new view, whose hours before now readers
        // take as unknown until it is rebuilt from raw_events: the rebuild
        // (nothing to read: the bench archives none of the live hour) marks it
        // whole at once, as `tally ingest` does
        apply_records_and_fill(
            store,
            lake,
            Duration::ZERO,
            source.clone(),
            input,
            now_micros(),
        )
        .await
        .expect("feeding the speed view");
    }
    lines.len()
}

fn redis_cpu(port: u16) -> f64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "cpu"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// A line of /proc/self/status (`VmRSS:`, `VmHWM:`).
fn proc_status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

// ------------------------------------------------------------- the load

fn wrk_script(token: &str, merchants: u32, query: &str) -> String {
    format!(
        r#"-- 24-hour hourly ranges of random merchants (written by serving-layer/benches/serve.rs)
wrk.headers["Authorization"] = "Bearer {token}"
local query = "{query}"
local threads = 0
function setup(thread)
  thread:set("seed", threads)
  threads = threads + 1
end
function init(args)
  math.randomseed(os.time() * 1000 + seed * 7919)
end
function request()
  return wrk.format("GET", "/v1/merchants/m_" .. math.random(0, {max}) .. query)
end
function done(summary, latency, requests)
  io.write(string.format("BENCH requests %d\n", summary.requests))
  io.write(string.format("BENCH duration_us %d\n", summary.duration))
  io.write(string.format("BENCH errors %d %d %d %d %d\n", summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
  io.write(string.format("BENCH min %d\nBENCH max %d\nBENCH mean %f\nBENCH stdev %f\n",
    latency.min, latency.max, latency.mean, latency.stdev))
  for i = 1, 1000 do
    io.write(string.format("BENCH q %d %d\n", i, latency:percentile(i / 10)))
  end
  for _, p in ipairs({{99.9, 99.99}}) do
    io.write(string.format("BENCH p %s %d\n", p, latency:percentile(p)))
  end
end
"#,
        max = merchants - 1
    )
}

struct WrkResult {
    stdout: String,
    requests: u64,
    duration_s: f64,
    errors: [u64; 5],
    max_us: f64,
    mean_us: f64,
    /// Latency at 0.1%, 0.2%, ... 100% of requests, µs.
    quantiles: Vec<f64>,
    p999: f64,
    p9999: f64,
}

impl WrkResult {
    fn q(&self, pct: f64) -> f64 {
        let i = ((pct * 10.0).round() as usize).clamp(1, 1000) - 1;
        self.quantiles.get(i).copied().unwrap_or(0.0)
    }
}

fn run_wrk(threads: u32, connections: u32, secs: u32, script: &Path, url: &str) -> WrkResult {
    let out = Command::new("wrk")
        .args([
            format!("-t{threads}"),
            format!("-c{connections}"),
            format!("-d{secs}s"),
            "--latency".into(),
            "-s".into(),
            script.display().to_string(),
            url.into(),
        ])
        .output()
        .expect("running wrk: install it with scripts/install-services.sh (apt-get install wrk)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = WrkResult {
        stdout: String::new(),
        requests: 0,
        duration_s: 0.0,
        errors: [0; 5],
        max_us: 0.0,
        mean_us: 0.0,
        quantiles: Vec::with_capacity(1000),
        p999: 0.0,
        p9999: 0.0,
    };
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("BENCH ") else {
            r.stdout.push_str(line);
            r.stdout.push('\n');
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match f.first().copied() {
            Some("requests") => r.requests = num(1) as u64,
            Some("duration_us") => r.duration_s = num(1) / 1e6,
            Some("errors") => {
                for (i, e) in r.errors.iter_mut().enumerate() {
                    *e = num(i + 1) as u64;
                }
            }
            Some("max") => r.max_us = num(1),
            Some("mean") => r.mean_us = num(1),
            Some("q") => r.quantiles.push(num(2)),
            Some("p") if f.get(1) == Some(&"99.9") => r.p999 = num(2),
            Some("p") => r.p9999 = num(2),
            _ => {}
        }
    }
    r
}

/// A histogram of latencies from the 1,000 quantiles (0.1% resolution).
fn histogram(r: &WrkResult) -> String {
    let edges_ms = [
        0.25,
        0.5,
        1.0,
        2.0,
        3.0,
        5.0,
        10.0,
        15.0,
        25.0,
        50.0,
        100.0,
        f64::INFINITY,
    ];
    let mut out = String::new();
    let mut lo = 0.0;
    for hi in edges_ms {
        let share = r
            .quantiles
            .iter()
            .filter(|&&q| q / 1000.0 > lo && q / 1000.0 <= hi)
            .count() as f64
            / 10.0;
        let label = if hi.is_finite() {
            format!("{lo:>6} - {hi:<6} ms")
        } else {
            format!("{lo:>6} ms and up  ")
        };
        let bar = "#".repeat((share / 2.0).round() as usize);
        let _ = writeln!(out, "  {label} | {share:5.1}% {bar}");
        lo = hi;
    }
    out
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

// ------------------------------------------------------------------ main

fn main() {
    let merchants: u32 = env_or("BENCH_MERCHANTS", 100_000);
    let days: i64 = env_or("BENCH_DAYS", 30);
    let secs: u32 = env_or("BENCH_SECS", 30);
    let threads: u32 = env_or("BENCH_THREADS", 2);
    let connections: u32 = env_or("BENCH_CONNECTIONS", 32);
    let server_threads: usize = env_or("BENCH_SERVER_THREADS", 2);
    let layout: String = env_or("BENCH_LAYOUT", "lookup".to_string());
    let read_path: String = env_or("BENCH_READ", "lookup".to_string());
    let hour_files = match env_or("BENCH_FILES", "day".to_string()).as_str() {
        "day" => HourFiles::Day,
        "hour" => HourFiles::Hour,
        "runs" => HourFiles::Runs,
        other => panic!("BENCH_FILES={other}: use day, hour or runs"),
    };
    let mut suffix = String::new();
    if layout != "lookup" {
        suffix.push_str(&format!("-{layout}"));
    }
    match hour_files {
        HourFiles::Day => {}
        HourFiles::Hour => suffix.push_str("-hourfiles"),
        HourFiles::Runs => suffix.push_str("-runfiles"),
    }
    let lake_dir = PathBuf::from(env_or(
        "BENCH_LAKE_DIR",
        format!("/tmp/tally-serve-bench-lake{suffix}"),
    ));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // `tally serve` logs an access line per request; so does the bench (to /dev/null)
    let sink = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("opening /dev/null");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,deltalake=warn,datafusion=warn",
        ))
        .with_writer(std::sync::Mutex::new(sink))
        .with_ansi(false)
        .compact()
        .init();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let w = hour_floor(now_micros());
    let from = w - 23 * MICROS_PER_HOUR;
    let to = w + MICROS_PER_HOUR;
    let by_id = Arc::new(merchants_by_id(merchants));

    // 1. the lake and the live hour
    let lake = rt.block_on(prepare_lake(
        &lake_dir, &by_id, days, w, &layout, hour_files,
    ));
    // give back what generating the lake took, so the memory printed is the server's
    // SAFETY: malloc_trim only returns free heap memory to the system
    unsafe { libc::malloc_trim(0) };
    let (files, bytes) = dir_stats(&lake_dir.join("lake").join(Table::MetricsHourly.name()));
    let redis = RedisServer::start();
    let store = SpeedStore::Redis(
        rt.block_on(RedisStore::connect(&redis.url(), 2 * 3600))
            .expect("connecting to Redis"),
    );
    let t = Instant::now();
    let events = rt.block_on(feed_current_hour(&store, &lake, merchants, w));
    println!(
        "speed view: {events} events of the current hour for {merchants} merchants fed through the speed layer into Redis in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // 2. the API on a free loopback port
    let state = rt
        .block_on(AppState::new(
            lake,
            Auth::hs256(SECRET),
            store,
            ServeOptions {
                store: tally_serving_layer::StoreChoice::LakeOnly,
                ..ServeOptions::default()
            },
        ))
        .expect("serving state");
    let snapshot = state.batch().snapshot().expect("the batch view loaded");
    assert_eq!(snapshot.watermark(), Some(w), "the lake's watermark");
    let port = free_port();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("binding the API's port");
    let (trigger, signal) = shutdown::channel();
    let server = rt.spawn(serve_listener(listener, state.clone(), signal));
    let token = encode(
        &Header::default(),
        &serde_json::json!({"role": "admin", "exp": chrono::Utc::now().timestamp() + 24 * 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing the admin token");
    // BENCH_QUERY: `hour` (24 hourly buckets, the default), `kathmandu-days`
    // (the 30 local days before today's local midnight in Asia/Kathmandu,
    // +05:45) or `kathmandu-months` (12 local months up to this one's end)
    let bench_query: String = env_or("BENCH_QUERY", "hour".to_string());
    let kathmandu = Calendar::parse("Asia/Kathmandu").expect("a zone");
    let query = match bench_query.as_str() {
        "hour" => format!(
            "/metrics?from={}&to={}&granularity=hour",
            format_ts(from),
            format_ts(to)
        ),
        "kathmandu-days" => {
            let end = kathmandu.floor(Unit::Day, w);
            let mut start = end;
            for _ in 0..30 {
                start = kathmandu.floor(Unit::Day, start - 1);
            }
            format!(
                "/metrics?from={}&to={}&granularity=day&tz=Asia/Kathmandu",
                format_ts(start),
                format_ts(end)
            )
        }
        "kathmandu-months" => {
            let end = kathmandu.next(Unit::Month, w);
            let mut start = end;
            for _ in 0..12 {
                start = kathmandu.floor(Unit::Month, start - 1);
            }
            format!(
                "/metrics?from={}&to={}&granularity=month&tz=Asia/Kathmandu",
                format_ts(start),
                format_ts(end)
            )
        }
        other => panic!("BENCH_QUERY={other}: use hour, kathmandu-days or kathmandu-months"),
    };
    println!("query: {query}");
    let base = format!("http://127.0.0.1:{port}");

    // 3. a sample answer is right: 23 batch buckets equal to the generated rows, then the live hour
    let sample = 42.min(merchants - 1);
    let first = Instant::now();
    let body: serde_json::Value = rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/merchants/m_{sample}{query}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("the sample request");
        assert_eq!(resp.status().as_u16(), 200, "sample status");
        serde_json::from_str(&resp.text().await.expect("sample body")).expect("sample JSON")
    });
    let first_ms = first.elapsed().as_secs_f64() * 1000.0;
    let buckets = body["buckets"].as_array().expect("buckets");
    if bench_query != "hour" {
        assert!(body["totals"]["orders"].as_i64().unwrap_or(0) > 0, "{body}");
        assert!(
            !buckets.is_empty() && body["time_zone"] == "Asia/Kathmandu",
            "{body}"
        );
    }
    for (i, b) in buckets.iter().enumerate().filter(|_| bench_query == "hour") {
        let start = from + i as i64 * MICROS_PER_HOUR;
        if i < 23 {
            assert_eq!(b["source"], "batch", "{b}");
            let v = hour_values(sample, start / MICROS_PER_HOUR);
            for (name, want) in [
                "orders",
                "gross_sales",
                "refunds",
                "refunded_amount",
                "page_views",
                "unique_customers",
            ]
            .iter()
            .zip(v)
            {
                assert_eq!(b[name], want, "{name} of bucket {i}: {b}");
            }
        } else {
            assert_eq!(b["source"], "speed", "{b}");
            let live = b["orders"].as_i64().unwrap_or(0) + b["page_views"].as_i64().unwrap_or(0);
            assert!(live > 0, "the live hour is empty: {b}");
        }
    }
    assert_eq!(body["partial"], false, "{body}");
    println!(
        "sample answer for m_{sample}: 200, 24 buckets (23 batch, equal to the generated rows; 1 speed)"
    );
    println!("the first request (footers and page indexes loaded on demand) took {first_ms:.1} ms");

    let rss_loaded = proc_status("VmRSS:");

    // the batch read alone, in process: point lookups against DataFusion, same answers
    let (lookup_us, datafusion_us) = rt.block_on(async {
        let snap = state.batch().snapshot().expect("snapshot");
        let (a, b) = (w - 23 * MICROS_PER_HOUR, w);
        let pick = |i: u64| format!("m_{}", mix(i ^ 0xBEEF) % u64::from(merchants));
        let mut time = [0.0f64; 2];
        for (k, on) in [(0, true), (1, false)] {
            state.batch().set_point_lookups(on);
            for i in 0..20 {
                let _ = snap
                    .hourly(&pick(5000 + i), a, b)
                    .await
                    .expect("batch read");
            }
            let t = Instant::now();
            for i in 0..200 {
                let _ = snap.hourly(&pick(i), a, b).await.expect("batch read");
            }
            time[k] = t.elapsed().as_secs_f64() * 1e6 / 200.0;
        }
        for i in 0..50 {
            let m = pick(1000 + i);
            state.batch().set_point_lookups(true);
            let x: HashMap<i64, tally_common::metrics::BucketRow> =
                snap.hourly(&m, a, b).await.expect("lookup");
            state.batch().set_point_lookups(false);
            let y = snap.hourly(&m, a, b).await.expect("datafusion");
            assert_eq!(x, y, "point lookup and DataFusion disagree for {m}");
            assert_eq!(x.len(), 23, "{m}");
        }
        state.batch().set_point_lookups(read_path != "datafusion");
        (time[0], time[1])
    });
    println!(
        "batch read alone (23 hours of one merchant, in process, one at a time): point lookup {lookup_us:.0} us, DataFusion query {datafusion_us:.0} us; equal answers for 50 merchants"
    );

    // 4. the load: a warm-up, then the measured run
    let script_dir = tempfile::tempdir().expect("temp dir");
    let script = script_dir.path().join("serve.lua");
    std::fs::File::create(&script)
        .and_then(|mut f| f.write_all(wrk_script(&token, merchants, &query).as_bytes()))
        .expect("writing the wrk script");
    let warm = run_wrk(threads, connections, 5, &script, &base);
    assert!(
        warm.requests > 0,
        "warm-up made no requests: {}",
        warm.stdout
    );
    assert_eq!(
        warm.errors[3], 0,
        "non-2xx answers in the warm-up: {}",
        warm.stdout
    );

    let (cpu0, child0, redis0) = (cpu_secs(), children_cpu_secs(), redis_cpu(redis.port()));
    let run = run_wrk(threads, connections, secs, &script, &base);
    let (server_cpu, wrk_cpu, redis_cpu) = (
        cpu_secs() - cpu0,
        children_cpu_secs() - child0,
        redis_cpu(redis.port()) - redis0,
    );

    rt.block_on(async {
        trigger.fire();
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });

    // 5. the results
    let rps = run.requests as f64 / run.duration_s.max(1e-9);
    let (p50, p90, p99) = (run.q(50.0), run.q(90.0), run.q(99.0));
    let errors: u64 = run.errors.iter().sum();
    println!();
    println!("wrk output:");
    print!("{}", run.stdout);
    println!();
    println!(
        "serving layer under load: {merchants} merchants x {days} days of hours in metrics_hourly ({files} files, {:.0} MiB, layout `{layout}`), read path `{read_path}`",
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "24-hour hourly ranges ending at the current hour (23 batch buckets + 1 speed bucket) of random merchants;"
    );
    println!(
        "wrk -t{threads} -c{connections} -d{secs}s on loopback; server ({server_threads} worker threads), Redis and wrk share this machine's {cores} cores"
    );
    println!();
    println!("| requests/s | p50 | p90 | p99 | p99.9 | max | errors |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {rps:.0} | {} | {} | {} | {} | {} | {errors} |",
        ms(p50),
        ms(p90),
        ms(p99),
        ms(run.p999),
        ms(run.max_us)
    );
    println!();
    println!(
        "latency histogram ({} requests in {:.1}s, mean {}):",
        run.requests,
        run.duration_s,
        ms(run.mean_us)
    );
    print!("{}", histogram(&run));
    println!();
    let cap = run.duration_s * cores as f64;
    println!(
        "CPU seconds during the run ({:.0} available): server {server_cpu:.1} ({:.0} us/request), Redis {redis_cpu:.1} ({:.0} us/request), wrk {wrk_cpu:.1} ({:.0} us/request); idle {:.1}",
        cap,
        server_cpu * 1e6 / run.requests.max(1) as f64,
        redis_cpu * 1e6 / run.requests.max(1) as f64,
        wrk_cpu * 1e6 / run.requests.max(1) as f64,
        (cap - server_cpu - redis_cpu - wrk_cpu).max(0.0)
    );
    println!(
        "bench process memory: RSS {} after the lake was loaded, {} after the run (peak {})",
        rss_loaded,
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: p99 <= 25 ms: {} ({}); >= 3,000 requests/s: {} ({rps:.0})",
        verdict(p99 <= 25_000.0),
        ms(p99),
        verdict(rps >= 3000.0)
    );
    if env_or("BENCH_STORE", 1u32) == 1 {
        let lake_row = Row {
            name: "local lake, read per request (no serving store)",
            rps,
            p50,
            p99,
            object_requests: None,
        };
        rt.block_on(store_comparison(StoreBench {
            lake_dir: &lake_dir,
            redis: &redis,
            token: &token,
            query: &query,
            script: &script,
            threads,
            connections,
            secs,
            days,
            w,
            lake_row,
        }));
    }
    drop(redis);

    let run_events: usize = env_or("BENCH_HOURLY_RUN_EVENTS", 0);
    if run_events > 0 {
        rt.block_on(hourly_run(&lake_dir, merchants, w, run_events));
    }
}

/// One measured configuration.
struct Row {
    name: &'static str,
    rps: f64,
    p50: f64,
    p99: f64,
    /// Requests that reached the object store during the measured run.
    object_requests: Option<u64>,
}

/// What the serving-store comparison needs of the main bench.
struct StoreBench<'a> {
    lake_dir: &'a Path,
    redis: &'a RedisServer,
    token: &'a str,
    query: &'a str,
    script: &'a Path,
    threads: u32,
    connections: u32,
    secs: u32,
    days: i64,
    w: i64,
    lake_row: Row,
}

/// Issue 18: the same lake copied to moto's S3 behind a proxy that holds every
/// answer back `BENCH_S3_DELAY_MS` (default 20 ms), loaded into the Redis
/// serving store (`BENCH_STORE_DAYS` dates, default the lake's days + 1, at most
/// 35); a fresh server on it (a new Lambda container: its start and first
/// request, with the object-store requests each made), then the load on it and
/// on the local lake with the same store, side by side with the lake read per
/// request measured above.
async fn store_comparison(b: StoreBench<'_>) {
    let delay_ms: u64 = env_or("BENCH_S3_DELAY_MS", 20);
    let window: u32 = env_or("BENCH_STORE_DAYS", (b.days as u32 + 1).min(35));
    println!();
    println!("## the serving store (issue 18)");
    let moto = tally_testkit::MotoServer::start();
    moto.create_bucket("lake");
    let t = Instant::now();
    let upload = String::from(
        r#"
import boto3, os, sys
from concurrent.futures import ThreadPoolExecutor
root = sys.argv[1]
s3 = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
def put(p):
    s3.upload_file(p, "lake", "bench/" + os.path.relpath(p, root))
with ThreadPoolExecutor(8) as ex:
    list(ex.map(put, files))
print(len(files))
"#,
    );
    let out = Command::new(tally_testkit::venv_python())
        .arg("-c")
        .arg(upload)
        .arg(b.lake_dir.join("lake"))
        .arg(moto.endpoint())
        .output()
        .expect("running the upload");
    assert!(
        out.status.success(),
        "uploading the lake to moto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "lake copied to moto's S3: {} files in {:.1}s; S3 reached through a proxy adding {delay_ms} ms to every answer",
        String::from_utf8_lossy(&out.stdout).trim(),
        t.elapsed().as_secs_f64()
    );
    let proxy =
        tally_testkit::Proxy::start_with_delay(moto.port(), Duration::from_millis(delay_ms));
    let mut s3 = Lake::new(
        "s3://lake/bench",
        Some(&proxy.endpoint()),
        Some("us-east-1"),
    )
    .expect("s3 lake");
    for (k, v) in moto.aws_env() {
        if k != "AWS_ENDPOINT_URL" {
            s3 = s3.with_option(k, &v);
        }
    }
    let local =
        Lake::new(b.lake_dir.join("lake").to_str().expect("utf-8"), None, None).expect("lake");

    // the load, from S3
    let redis = RedisStore::connect(&b.redis.url(), 2 * 3600)
        .await
        .expect("redis");
    let store = redis.serving_store();
    use tally_common::serving_store::ServingStore as _;
    let mem0 = store.memory_used().await.expect("INFO").unwrap_or(0);
    let r0 = proxy.requests();
    let options = tally_serving_layer::LoadOptions {
        window_days: window,
        flip_guard: Duration::ZERO,
        ..Default::default()
    };
    let report = tally_serving_layer::load(&s3, &store, &options)
        .await
        .expect("loading the serving store");
    let mem1 = store.memory_used().await.expect("INFO").unwrap_or(0);
    println!(
        "load from the S3 lake: {} dates, {} merchant-dates, {} encoded, in {:.1}s with {} object-store requests; Redis memory {} -> {} (+{:.0} bytes per merchant-date)",
        report.dates.len(),
        report.values,
        mib(report.bytes),
        report.seconds,
        proxy.requests() - r0,
        mib(mem0),
        mib(mem1),
        mem1.saturating_sub(mem0) as f64 / report.values.max(1) as f64
    );

    // a fresh process on the S3 lake: start and first request
    let speed = || async {
        SpeedStore::Redis(
            RedisStore::connect(&b.redis.url(), 2 * 3600)
                .await
                .expect("redis"),
        )
    };
    let shared = || tally_serving_layer::StoreChoice::Shared(Arc::new(store.clone()));
    let r0 = proxy.requests();
    let t = Instant::now();
    let s3_state = AppState::new(
        s3.clone(),
        Auth::hs256(SECRET),
        speed().await,
        ServeOptions {
            store: shared(),
            ..ServeOptions::default()
        },
    )
    .await
    .expect("serving state on S3");
    let start_ms = t.elapsed().as_secs_f64() * 1000.0;
    let start_requests = proxy.requests() - r0;
    assert!(s3_state
        .batch()
        .snapshot()
        .expect("snapshot")
        .serves_from_store());
    let mut rows = vec![b.lake_row];
    let mut cold = None;
    // the embedded store (`tally serve` without Redis), loaded before the run
    let t = Instant::now();
    let embedded = AppState::new(
        local.clone(),
        Auth::hs256(SECRET),
        speed().await,
        ServeOptions {
            window_days: window,
            ..ServeOptions::default()
        },
    )
    .await
    .expect("serving state");
    embedded
        .refresh_batch()
        .await
        .expect("loading the embedded store");
    assert!(embedded
        .batch()
        .snapshot()
        .expect("snapshot")
        .serves_from_store());
    println!(
        "embedded serving store (in the server's process) loaded from the local lake in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for (name, state) in [
        (
            "S3 lake (+20 ms per answer) with the Redis serving store",
            s3_state,
        ),
        (
            "local lake with the Redis serving store",
            AppState::new(
                local.clone(),
                Auth::hs256(SECRET),
                speed().await,
                ServeOptions {
                    store: shared(),
                    ..ServeOptions::default()
                },
            )
            .await
            .expect("serving state"),
        ),
        (
            "local lake with the embedded serving store (no Redis)",
            embedded,
        ),
    ] {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("port");
        let (trigger, signal) = shutdown::channel();
        let server = tokio::spawn(serve_listener(listener, state, signal));
        let base = format!("http://127.0.0.1:{port}");
        if cold.is_none() {
            let r0 = proxy.requests();
            let t = Instant::now();
            let resp = reqwest::Client::new()
                .get(format!("{base}/v1/merchants/m_42{}", b.query))
                .bearer_auth(b.token)
                .send()
                .await
                .expect("first request");
            assert_eq!(resp.status().as_u16(), 200);
            let body = resp.text().await.expect("body");
            cold = Some((t.elapsed().as_secs_f64() * 1000.0, proxy.requests() - r0));
            assert!(body.contains("\"source\":\"batch\""), "{body}");
        }
        let (threads, connections, secs, script) =
            (b.threads, b.connections, b.secs, b.script.to_path_buf());
        let base2 = base.clone();
        tokio::task::spawn_blocking(move || run_wrk(threads, connections, 5, &script, &base2))
            .await
            .expect("warm-up");
        let r0 = proxy.requests();
        let script = b.script.to_path_buf();
        let run = tokio::task::spawn_blocking(move || {
            run_wrk(threads, connections, secs, &script, &base)
        })
        .await
        .expect("wrk");
        assert_eq!(run.errors[3], 0, "non-2xx answers: {}", run.stdout);
        rows.push(Row {
            name,
            rps: run.requests as f64 / run.duration_s.max(1e-9),
            p50: run.q(50.0),
            p99: run.q(99.0),
            object_requests: Some(proxy.requests() - r0),
        });
        trigger.fire();
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    }
    let (first_ms, first_requests) = cold.unwrap_or_default();
    println!(
        "cold start on the S3 lake (a new Lambda container): serving state ready in {start_ms:.0} ms with {start_requests} object-store requests; first request {first_ms:.1} ms with {first_requests} object-store requests"
    );
    println!();
    println!("| configuration | requests/s | p50 | p99 | object-store requests during the run |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            r.name,
            r.rps,
            ms(r.p50),
            ms(r.p99),
            r.object_requests.map_or("-".to_string(), |n| n.to_string())
        );
    }
    let (s3_row, local_row) = (&rows[1], &rows[2]);
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    println!(
        "targets (issue 18): S3 p99 <= 1.25 x local p99: {} ({} vs {}); S3 p99 <= 10 ms: {}; >= 5,000 requests/s: {} ({:.0})",
        ok(s3_row.p99 <= 1.25 * local_row.p99),
        ms(s3_row.p99),
        ms(local_row.p99),
        ok(s3_row.p99 <= 10_000.0),
        ok(s3_row.rps >= 5000.0),
        s3_row.rps
    );
    let _ = b.w;
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// An ordinary hourly run on this lake (issue 15): `events` Zipf events of the
/// current hour archived into a copy of the lake (data files hard-linked, which
/// Delta never changes in place), then `tally batch run` as the hourly schedule
/// starts it after the hour closes; prints its seconds and the bytes its
/// `metrics_hourly` commit added and removed (what a run rewrites).
async fn hourly_run(lake_dir: &Path, merchants: u32, w: i64, events: usize) {
    let copy = lake_dir.with_file_name(format!(
        "{}-hourly-run",
        lake_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("lake")
    ));
    let _ = std::fs::remove_dir_all(&copy);
    let status = Command::new("cp")
        .arg("-al")
        .arg(lake_dir)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success(), "copying the lake");
    let lake =
        Lake::new(copy.join("lake").to_str().expect("utf-8 path"), None, None).expect("lake");
    let now = w + MICROS_PER_HOUR + 6 * 60 * 1_000_000;
    let t = Instant::now();
    let records = tally_testkit::zipf::zipf_records(events, 1000, merchants as usize, w / 1000, 15);
    let mut archiver = tally_batch_layer::Archiver::open(&lake)
        .await
        .expect("archiver");
    for (i, chunk) in records.chunks(100).enumerate() {
        let input: Vec<tally_common::source::Record<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(j, r)| {
                tally_common::source::Record::new(
                    tally_common::source::Position::from_u64((i * 100 + j) as u64 + 1),
                    r,
                )
            })
            .collect();
        archiver
            .archive(
                &tally_common::source::SourceId::file("hourly-run"),
                &input,
                now,
            )
            .await
            .expect("archiving the hour");
    }
    drop(records);
    println!();
    println!(
        "ordinary hourly run: {events} events of {} over {merchants} merchants archived in {:.1}s",
        format_ts(w),
        t.elapsed().as_secs_f64()
    );
    let before = lake
        .open(Table::MetricsHourly)
        .await
        .expect("metrics_hourly")
        .and_then(|t| t.version())
        .unwrap_or(0);
    let t = Instant::now();
    let report = tally_batch_layer::BatchRun::new(&lake)
        .now(now)
        .compact(false)
        .execute()
        .await
        .expect("the hourly run");
    let secs = t.elapsed().as_secs_f64();
    let hourly = lake
        .open(Table::MetricsHourly)
        .await
        .expect("metrics_hourly")
        .expect("metrics_hourly");
    let table_dir = copy.join("lake").join(Table::MetricsHourly.name());
    let (mut added, mut removed) = (0u64, 0u64);
    for v in before + 1..=hourly.version().unwrap_or(before) {
        let Some(c) = tally_common::lake::read_commit(&hourly, v)
            .await
            .expect("reading the log")
        else {
            continue;
        };
        for f in c.files {
            let size = f
                .path
                .and_then(|p| std::fs::metadata(table_dir.join(p)).ok())
                .map_or(0, |m| m.len());
            match f.change {
                tally_common::lake::FileChange::Added => added += size,
                tally_common::lake::FileChange::Removed => removed += size,
            }
        }
    }
    let (files, bytes) = dir_stats(&table_dir);
    println!("{report}");
    println!(
        "| hourly run | seconds | metrics_hourly bytes added | bytes removed (rewritten) | metrics_hourly on disk |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} hour(s), {} hourly rows | {secs:.1} | {} | {} | {} in {files} files |",
        report.hours,
        report.hourly_rows,
        mib(added),
        mib(removed),
        mib(bytes)
    );
    let _ = std::fs::remove_dir_all(&copy);
}
