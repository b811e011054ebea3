//! The batch layer at scale (issue 15): the peak hour of a 1 B events/day
//! stream, 83 M events in one UTC hour over 1 M Zipf(1.1) merchants plus one
//! merchant with a tenth of the events and of the distinct customers
//! ([`tally_testkit::zipf::HotZipfHour`]), computed by the release `tally batch
//! run --memory-limit 2GiB --no-compact` as a child process; wall time and peak
//! resident memory (`/usr/bin/time -v`), at 20 M and 40 M events too (peak
//! memory must stay flat). DuckDB, with the same memory limit and 2 threads,
//! runs the same hourly and daily SQL over the same Parquet files in the same
//! run as the reference (`scripts/bench_duckdb.py`, a separate process under
//! `/usr/bin/time -v`), writing its results to Parquet as the run writes its
//! tables. Targets: peak RSS within the limit plus 25% at every size; wall
//! time no more than 1.5x DuckDB's (hourly + daily).
//!
//! Run: `scripts/bench.sh batch-scale`, which builds the binary first
//! (`cargo build --release --workspace --bins`) and then runs this bench.
//! Environment:
//! - `BENCH_SCALE_EVENTS`: comma list of sizes, events (default `20000000,40000000,83000000`)
//! - `BENCH_SCALE_MERCHANTS`: ordinary merchants (default 1000000)
//! - `BENCH_SCALE_MEMORY`: the memory limit of both engines (default `2GiB`)
//! - `BENCH_SCALE_DIR`: where the loaded lakes are kept and reused (default
//!   `$HOME/.cache/tally/bench-scale`); a lake is complete once its `LOADED`
//!   file exists, and deleted and loaded again otherwise
//! - `TALLY_BIN`: the `tally` binary (default `tally` beside this bench's
//!   `deps/` directory, i.e. `$CARGO_TARGET_DIR/release/tally`)
//!
//! Each measurement starts from the lake as loaded: the run gets a copy of
//! `raw_events` (data files hard-linked, which Delta never modifies in place;
//! the log copied), DuckDB reads the loaded lake's files, and every file is
//! read once beforehand so that both find them in the page cache.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use bytesize::ByteSize;
use tally_batch_layer::dirty::raw_files;
use tally_batch_layer::sql::{computable_rows, daily_sql, hourly_sql};
use tally_batch_layer::Archiver;
use tally_common::bucket::{day_floor, parse_ts, MICROS_PER_HOUR};
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, Record, SourceId};
use tally_testkit::zipf::HotZipfHour;
use tally_testkit::{venv_python, workspace_root};

/// The hour all events fall in (closed long ago, so any run takes it).
const HOUR: &str = "2026-11-24T13:00:00Z";
/// Events generated and archived per archive call (one Delta commit).
const CHUNK: u64 = 1_000_000;
/// Events per NDJSON record (a stream record's worth).
const PER_RECORD: usize = 1_000;
/// The generator's seed.
const SEED: u64 = 15;
/// Names the data a lake holds: a lake loaded by another generator is not reused.
const GENERATOR: &str = "hotzipf1";
/// The file written into a lake once it is completely loaded.
const LOADED: &str = "LOADED";
/// Peak RSS may exceed the memory limit by this factor.
const RSS_TARGET: f64 = 1.25;
/// Wall time may be this multiple of DuckDB's.
const TIME_TARGET: f64 = 1.5;

/// What the bench runs: sizes, merchants, memory limit, where lakes live.
struct Config {
    /// Sizes to measure, events.
    sizes: Vec<u64>,
    /// Ordinary (Zipf) merchants.
    merchants: usize,
    /// The memory limit as given (e.g. `2GiB`), passed to `tally` as is.
    memory: String,
    /// The memory limit, bytes.
    memory_bytes: u64,
    /// Where lakes are kept.
    dir: PathBuf,
}

impl Config {
    fn from_env() -> Config {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let sizes = var("BENCH_SCALE_EVENTS", "20000000,40000000,83000000")
            .split(',')
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|e| panic!("BENCH_SCALE_EVENTS: {s:?}: {e}"))
            })
            .collect();
        let merchants = var("BENCH_SCALE_MERCHANTS", "1000000")
            .replace('_', "")
            .parse()
            .expect("BENCH_SCALE_MERCHANTS: a number");
        let memory = var("BENCH_SCALE_MEMORY", "2GiB");
        let memory_bytes = memory
            .parse::<ByteSize>()
            .unwrap_or_else(|e| panic!("BENCH_SCALE_MEMORY: {memory:?}: {e}"))
            .as_u64();
        let dir = std::env::var_os("BENCH_SCALE_DIR").map_or_else(
            || {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/tally/bench-scale")
            },
            PathBuf::from,
        );
        Config {
            sizes,
            merchants,
            memory,
            memory_bytes,
            dir,
        }
    }

    /// The command that reproduces this run.
    fn reproduce(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(u64::to_string).collect();
        format!(
            "BENCH_SCALE_EVENTS={} BENCH_SCALE_MERCHANTS={} BENCH_SCALE_MEMORY={} BENCH_SCALE_DIR={} scripts/bench.sh batch-scale",
            sizes.join(","),
            self.merchants,
            self.memory,
            self.dir.display()
        )
    }
}

/// A loaded lake.
struct Loaded {
    /// The lake's root (`raw_events` below it).
    path: PathBuf,
    /// Seconds the load took (when it was loaded, maybe by an earlier run).
    load_secs: f64,
    /// Bytes on disk of `raw_events`.
    bytes: u64,
    /// Whether this run loaded it.
    fresh: bool,
}

/// The lake of `events` events, loaded now unless a complete one is there.
fn lake_of(cfg: &Config, events: u64, hour_ms: i64) -> Loaded {
    let path = cfg
        .dir
        .join(format!("lake-{events}-{}-{GENERATOR}", cfg.merchants));
    let marker = path.join(LOADED);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        let load_secs = text
            .lines()
            .find_map(|l| l.strip_prefix("load_secs="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        return Loaded {
            bytes: dir_bytes(&path.join(Table::RawEvents.name())),
            path,
            load_secs,
            fresh: false,
        };
    }
    if path.exists() {
        eprintln!("{}: incomplete, loading again", path.display());
        std::fs::remove_dir_all(&path).unwrap();
    }
    std::fs::create_dir_all(&path).unwrap();
    let t = Instant::now();
    load(&path, events, cfg.merchants, hour_ms);
    let load_secs = t.elapsed().as_secs_f64();
    let bytes = dir_bytes(&path.join(Table::RawEvents.name()));
    let g = HotZipfHour::new(events, cfg.merchants, hour_ms, SEED);
    let (ordinary, hot) = g.expected_distinct_customers();
    let tmp = path.join(format!("{LOADED}.tmp"));
    std::fs::write(
        &tmp,
        format!(
            "events={events}\nmerchants={}\nhour={HOUR}\ngenerator={GENERATOR}\nseed={SEED}\n\
             hot_customer_pool={}\nexpected_distinct_ordinary={ordinary:.0}\nexpected_distinct_hot={hot:.0}\n\
             load_secs={load_secs:.1}\nraw_bytes={bytes}\n",
            cfg.merchants,
            g.hot_customer_pool()
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &marker).unwrap();
    Loaded {
        path,
        load_secs,
        bytes,
        fresh: true,
    }
}

/// Generate and archive `events` events chunk by chunk: a thread generates the
/// next chunk while the archiver writes the last (at most two chunks waiting).
fn load(path: &Path, events: u64, merchants: usize, hour_ms: i64) {
    let (tx, rx) = sync_channel::<Vec<Vec<u8>>>(1);
    let generator = std::thread::spawn(move || {
        let mut g = HotZipfHour::new(events, merchants, hour_ms, SEED);
        while g.remaining() > 0 {
            if tx.send(g.next_records(CHUNK, PER_RECORD)).is_err() {
                return;
            }
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let lake = Lake::new(path.to_str().unwrap(), None, None).unwrap();
    // received a minute after the hour
    let ingest = (hour_ms + 3_660_000) * 1000;
    let t = Instant::now();
    rt.block_on(async {
        let mut a = Archiver::open(&lake).await.unwrap();
        let (mut pos, mut done) = (0u64, 0u64);
        for (n, recs) in rx.iter().enumerate() {
            let input: Vec<Record<'_>> = recs
                .iter()
                .map(|r| {
                    pos += 1;
                    Record::new(Position::from_u64(pos), r)
                })
                .collect();
            let report = a
                .archive(&SourceId::file("bench-scale"), &input, ingest)
                .await
                .unwrap();
            assert_eq!(
                report.quarantined, 0,
                "the generator's events are all valid"
            );
            done += report.accepted;
            if (n + 1) % 10 == 0 || done == events {
                eprintln!(
                    "  loaded {done}/{events} events in {:.0}s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
        assert_eq!(done, events);
    });
    generator.join().unwrap();
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// What `/usr/bin/time -v` reported for a child process, and its output.
struct Timed {
    /// Wall time from spawn to exit, seconds.
    wall: f64,
    /// Peak resident set size, bytes.
    rss: u64,
    /// User plus system CPU time, seconds.
    cpu: f64,
    /// Its standard output.
    stdout: String,
}

/// Run `program args` under `/usr/bin/time -v` (report to `time_file`); its
/// output and time report if it fails.
fn timed(
    program: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
    time_file: &Path,
) -> Result<Timed, String> {
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v")
        .arg("-o")
        .arg(time_file)
        .arg(program)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running /usr/bin/time (apt-get install time): {e}");
    });
    let wall = t.elapsed().as_secs_f64();
    let report = std::fs::read_to_string(time_file).unwrap_or_default();
    let field = |name: &str| -> Option<f64> {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
    };
    let rss_field = "Maximum resident set size (kbytes)";
    if !out.status.success() {
        // a signal (the kernel's OOM killer) is in time's first line
        let how = report
            .lines()
            .next()
            .filter(|l| l.starts_with("Command"))
            .map_or_else(|| out.status.to_string(), str::to_string);
        return Err(format!(
            "{} failed after {wall:.1}s, peak RSS {}: {how}; {}",
            program.display(),
            field(rss_field).map_or("?".into(), |k| mib(k as u64 * 1024)),
            last_lines(&String::from_utf8_lossy(&out.stderr), 8)
        ));
    }
    let field = |name: &str| -> f64 {
        field(name).unwrap_or_else(|| panic!("no {name:?} in /usr/bin/time's report:\n{report}"))
    };
    Ok(Timed {
        wall,
        rss: field(rss_field) as u64 * 1024,
        cpu: field("User time (seconds)") + field("System time (seconds)"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// What a run said in its report line.
struct RunLine {
    line: String,
    hours: u64,
    days: u64,
    hourly_rows: u64,
    daily_rows: u64,
    /// Bytes spilled as the run printed them (e.g. `1.2 GiB`), or `0 B`.
    spilled: String,
}

/// Parse `tally batch run`'s report: `batch: H hours and D days recomputed (N
/// hourly rows, M daily rows) ...; X spilled to disk ...`.
fn parse_run(stdout: &str) -> RunLine {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("batch: ") && l.contains("recomputed"))
        .unwrap_or_else(|| panic!("no report line in tally's output:\n{stdout}"))
        .to_string();
    let num_before = |word: &str| -> u64 {
        let end = line
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} in {line}"));
        line[..end]
            .trim_end()
            .rsplit([' ', '('])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number before {word:?} in {line}"))
    };
    let spilled = line
        .find(" spilled to disk")
        .map(|end| line[..end].rsplit("; ").next().unwrap_or("?").to_string())
        .unwrap_or_else(|| "0 B".into());
    RunLine {
        hours: num_before(" hours and"),
        days: num_before(" days recomputed"),
        hourly_rows: num_before(" hourly rows"),
        daily_rows: num_before(" daily rows"),
        spilled,
        line,
    }
}

/// The run's figures at one size.
struct TallyRun {
    timed: Timed,
    run: RunLine,
    /// m_hot's share of events and of distinct customers, from `metrics_hourly`.
    hot_share: (f64, f64),
    /// Merchants with a row in `metrics_hourly`.
    merchants_with_rows: u64,
}

/// DuckDB's figures at one size.
struct DuckRun {
    timed: Timed,
    /// The hourly query, seconds.
    hourly: f64,
    /// The daily query, seconds.
    daily: f64,
    /// Rows of the hourly and daily results.
    rows: (u64, u64),
    /// Peak bytes of its temp directory seen while the queries ran.
    temp_peak: u64,
    version: String,
}

impl DuckRun {
    /// Both queries, seconds.
    fn secs(&self) -> f64 {
        self.hourly + self.daily
    }
}

/// One size's figures; a side that failed (out of memory, say) has its error.
struct Row {
    events: u64,
    tally: Result<TallyRun, String>,
    duck: Result<DuckRun, String>,
}

/// Run `tally batch run` on the lake at `lake`, then read back what it computed.
fn run_tally(
    cfg: &Config,
    tally: &Path,
    lake: &Path,
    run_dir: &Path,
    events: u64,
) -> Result<TallyRun, String> {
    let spill = run_dir.join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let timed = timed(
        tally,
        &[
            "batch",
            "run",
            "--memory-limit",
            &cfg.memory,
            "--no-compact",
        ],
        &[("TALLY_LAKE", lake), ("TALLY_BATCH_SPILL_DIR", &spill)],
        &run_dir.join("time-tally.txt"),
    )?;
    let run = parse_run(&timed.stdout);
    assert_eq!(
        (run.hours, run.days),
        (1, 1),
        "the run should compute the one hour and its day: {}",
        run.line
    );
    // what the run computed: every event counted once, m_hot's shares
    let check = Command::new(tally)
        .args([
            "sql",
            "--format",
            "csv",
            &format!(
                "SELECT CAST(SUM(orders + refunds + page_views) AS BIGINT) AS events, \
                 CAST(SUM(CASE WHEN merchant_id = '{hot}' THEN orders + refunds + page_views ELSE 0 END) AS BIGINT) AS hot_events, \
                 CAST(SUM(unique_customers) AS BIGINT) AS customers, \
                 CAST(SUM(CASE WHEN merchant_id = '{hot}' THEN unique_customers ELSE 0 END) AS BIGINT) AS hot_customers, \
                 COUNT(*) AS merchants FROM metrics_hourly",
                hot = HotZipfHour::HOT_MERCHANT
            ),
        ])
        .env("TALLY_LAKE", lake)
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{csv}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let v: Vec<u64> = csv
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("tally sql: {csv}"))
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    assert_eq!(v[0], events, "metrics_hourly counts every event once");
    Ok(TallyRun {
        timed,
        run,
        hot_share: (v[1] as f64 / v[0] as f64, v[3] as f64 / v[2] as f64),
        merchants_with_rows: v[4],
    })
}

/// Run the hourly and daily SQL of `hour_us` in DuckDB over the files in `list`
/// (relative to `raw`).
fn run_duckdb(
    cfg: &Config,
    raw: &Path,
    list: &Path,
    run_dir: &Path,
    hour_us: i64,
) -> Result<DuckRun, String> {
    let day = day_floor(hour_us);
    let rows = computable_rows("raw_events", day);
    let hourly = hourly_sql(&rows, day, &[hour_us]);
    let daily = daily_sql(&rows, day);
    let script = workspace_root().join("scripts/bench_duckdb.py");
    let limit = format!("{}B", cfg.memory_bytes);
    let (spill, out) = (run_dir.join("duck-spill"), run_dir.join("duck-out"));
    let timed = timed(
        &venv_python(),
        &[
            script.to_str().unwrap(),
            raw.to_str().unwrap(),
            &hourly,
            "--daily-sql",
            &daily,
            "--files",
            list.to_str().unwrap(),
            "--memory-limit",
            &limit,
            "--temp-dir",
            spill.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
        &run_dir.join("time-duckdb.txt"),
    )?;
    let j: serde_json::Value = serde_json::from_str(timed.stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("DuckDB's output {:?}: {e}", timed.stdout));
    let q = |i: usize, k: &str| j["queries"][i][k].as_f64().unwrap();
    Ok(DuckRun {
        hourly: q(0, "secs"),
        daily: q(1, "secs"),
        rows: (q(0, "rows") as u64, q(1, "rows") as u64),
        temp_peak: j["peak_temp_bytes"].as_u64().unwrap_or(0),
        version: j["duckdb"].as_str().unwrap_or("?").to_string(),
        timed,
    })
}

/// Measure one size: the run on a fresh copy of the loaded lake, then DuckDB
/// over the loaded lake's files.
fn measure(cfg: &Config, tally: &Path, loaded: &Loaded, events: u64, hour_us: i64) -> Row {
    let run_dir = cfg.dir.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
    let run_lake = run_dir.join("lake");
    std::fs::create_dir_all(&run_lake).unwrap();
    let raw = loaded.path.join(Table::RawEvents.name());
    let run_raw = run_lake.join(Table::RawEvents.name());
    let sh = |args: &[&std::ffi::OsStr]| {
        let s = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(s.success(), "{args:?}");
    };
    sh(&[
        "cp".as_ref(),
        "-al".as_ref(),
        raw.as_os_str(),
        run_raw.as_os_str(),
    ]);
    let log = run_raw.join("_delta_log");
    std::fs::remove_dir_all(&log).unwrap();
    sh(&[
        "cp".as_ref(),
        "-r".as_ref(),
        raw.join("_delta_log").as_os_str(),
        log.as_os_str(),
    ]);

    // the loaded snapshot's files: DuckDB's list, and read once into the page cache
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files: Vec<String> = rt.block_on(async {
        let lake = Lake::new(loaded.path.to_str().unwrap(), None, None).unwrap();
        let t = lake.open(Table::RawEvents).await.unwrap().unwrap();
        raw_files(&t).unwrap().into_iter().map(|f| f.path).collect()
    });
    let list = run_dir.join("files.txt");
    std::fs::write(&list, files.join("\n")).unwrap();
    for f in &files {
        let mut file = std::fs::File::open(raw.join(f)).unwrap();
        std::io::copy(&mut file, &mut std::io::sink()).unwrap();
    }

    eprintln!("  tally batch run ({events} events)");
    let tally = run_tally(cfg, tally, &run_lake, &run_dir, events);
    eprintln!("  DuckDB ({events} events)");
    let duck = run_duckdb(cfg, &raw, &list, &run_dir, hour_us);
    if let (Ok(t), Ok(d)) = (&tally, &duck) {
        assert_eq!(
            d.rows,
            (t.run.hourly_rows, t.run.daily_rows),
            "DuckDB and the run computed as many rows"
        );
    }
    for e in [tally.as_ref().err(), duck.as_ref().err()]
        .into_iter()
        .flatten()
    {
        eprintln!("  {e}");
    }
    std::fs::remove_dir_all(&run_dir).unwrap();
    Row {
        events,
        tally,
        duck,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The last `n` lines of `text`, joined on one line.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

fn yes_no(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

fn tally_binary() -> PathBuf {
    let bin = std::env::var_os("TALLY_BIN").map_or_else(
        || {
            let exe = std::env::current_exe().unwrap();
            // $CARGO_TARGET_DIR/release/deps/batch_scale-… -> $CARGO_TARGET_DIR/release/tally
            exe.parent()
                .and_then(Path::parent)
                .map(|d| d.join("tally"))
                .unwrap()
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "no tally binary at {}: build it with `cargo build --release --workspace --bins` \
         (scripts/bench.sh batch-scale does), or set TALLY_BIN",
        bin.display()
    );
    bin
}

fn main() {
    // `cargo bench` passes --bench; this bench takes no arguments
    let cfg = Config::from_env();
    let tally = tally_binary();
    assert!(
        Path::new("/usr/bin/time").is_file(),
        "/usr/bin/time is missing: apt-get install time"
    );
    let hour_us = parse_ts(HOUR).unwrap();
    let hour_ms = hour_us / 1000;
    assert_eq!(hour_us % MICROS_PER_HOUR, 0);
    std::fs::create_dir_all(&cfg.dir).unwrap();

    let mut loads = Vec::new();
    for &events in &cfg.sizes {
        eprintln!("lake of {events} events");
        loads.push(lake_of(&cfg, events, hour_ms));
    }
    let mut rows = Vec::new();
    for (&events, loaded) in cfg.sizes.iter().zip(&loads) {
        eprintln!("measuring {events} events");
        rows.push(measure(&cfg, &tally, loaded, events, hour_us));
    }

    let commit = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let built = std::fs::metadata(&tally)
        .and_then(|m| m.modified())
        .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
        .unwrap_or_default();
    let limit = cfg.memory_bytes;
    let duck_version = rows
        .iter()
        .find_map(|r| r.duck.as_ref().ok())
        .map_or("?", |d| d.version.as_str());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nbatch layer at scale: one hour ({HOUR}) of {} ordinary Zipf(1.1) merchants plus {} \
         (10% of events and of distinct customers), memory limit {} ({}), {} cores; \
         tally {} at commit {commit} (built {built}) vs DuckDB {duck_version} (2 threads, same limit, spilling to the same disk)",
        cfg.merchants,
        HotZipfHour::HOT_MERCHANT,
        cfg.memory,
        mib(limit),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tally.display(),
    );
    let _ = writeln!(
        out,
        "\n`tally batch run --memory-limit {} --no-compact` (hourly + daily queries and metric writes, no compaction), \
         its whole process; DuckDB: the same hourly and daily SQL, each written to Parquet, sum of the two queries\n",
        cfg.memory
    );
    let _ = writeln!(
        out,
        "| events | tally wall s | tally peak RSS | DuckDB s (hourly + daily) | DuckDB peak RSS | tally / DuckDB | tally spilled | RSS <= {} | wall <= {TIME_TARGET}x DuckDB |",
        mib((limit as f64 * RSS_TARGET) as u64)
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let failed = "failed (see below)";
    for r in &rows {
        let (t_wall, t_rss, spilled, rss_ok) = match &r.tally {
            Ok(t) => (
                format!("{:.1}", t.timed.wall),
                mib(t.timed.rss),
                t.run.spilled.clone(),
                yes_no(t.timed.rss as f64 <= limit as f64 * RSS_TARGET),
            ),
            Err(_) => (failed.into(), "-".into(), "-".into(), yes_no(false)),
        };
        let (d_secs, d_rss) = match &r.duck {
            Ok(d) => (
                format!("{:.1} ({:.1} + {:.1})", d.secs(), d.hourly, d.daily),
                mib(d.timed.rss),
            ),
            Err(_) => (failed.into(), "-".into()),
        };
        let (ratio, time_ok) = match (&r.tally, &r.duck) {
            (Ok(t), Ok(d)) => {
                let x = t.timed.wall / d.secs();
                (format!("{x:.2}x"), yes_no(x <= TIME_TARGET))
            }
            (Err(_), _) => ("-".into(), yes_no(false)),
            (Ok(_), Err(_)) => ("-".into(), "no reference"),
        };
        let _ = writeln!(
            out,
            "| {} | {t_wall} | {t_rss} | {d_secs} | {d_rss} | {ratio} | {spilled} | {rss_ok} | {time_ok} |",
            r.events,
        );
    }
    let _ = writeln!(out);
    for (r, l) in rows.iter().zip(&loads) {
        let _ = writeln!(out, "- {} events:", r.events);
        let _ = match &r.tally {
            Ok(t) => writeln!(
                out,
                "  tally CPU {:.1}s; `{}`; {} hourly rows for {} merchants ({}: {:.1}% of events, {:.1}% of distinct customers)",
                t.timed.cpu,
                t.run.line,
                t.run.hourly_rows,
                t.merchants_with_rows,
                HotZipfHour::HOT_MERCHANT,
                t.hot_share.0 * 100.0,
                t.hot_share.1 * 100.0,
            ),
            Err(e) => writeln!(out, "  tally {e}"),
        };
        let _ = match &r.duck {
            Ok(d) => writeln!(
                out,
                "  DuckDB process {:.1}s wall, CPU {:.1}s, temp dir peak {}",
                d.timed.wall,
                d.timed.cpu,
                mib(d.temp_peak),
            ),
            Err(e) => writeln!(out, "  DuckDB: {e}"),
        };
        let _ = writeln!(
            out,
            "  lake {}: {} ({:.1} MiB per M events), load {:.0}s{}",
            l.path.display(),
            mib(l.bytes),
            l.bytes as f64 / (1 << 20) as f64 / (r.events as f64 / 1e6),
            l.load_secs,
            if l.fresh {
                " (loaded now)"
            } else {
                " (when it was loaded; reused)"
            },
        );
    }
    let rss: Vec<u64> = rows
        .iter()
        .filter_map(|r| r.tally.as_ref().ok().map(|t| t.timed.rss))
        .collect();
    if rss.len() > 1 {
        let lo = rss.iter().copied().min().unwrap_or(0);
        let hi = rss.iter().copied().max().unwrap_or(0);
        let _ = writeln!(
            out,
            "- tally peak RSS across sizes: {} to {} ({:.2}x)",
            mib(lo),
            mib(hi),
            hi as f64 / lo.max(1) as f64
        );
    }
    let _ = writeln!(out, "\nreproduce: `{}`", cfg.reproduce());
    print!("{out}");
}
