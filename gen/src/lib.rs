//! tally's event generator (`tally gen`, `tally demo`'s history and live feed,
//! the tests): seeded, byte-for-byte reproducible synthetic events as NDJSON
//! (Zipf-skewed merchants, a daily rhythm, an order/refund/page-view mix,
//! returning customers, and shares of late, duplicate and malformed lines).
//! [`Generator`] is the line iterator (a Kinesis producer drives it itself,
//! pacing with [`Generator::due`]); [`run`] writes it to stdout or a file.
//! [`random`] holds its random source and Zipf sampler, which the benchmarks'
//! record builders (`tally-testkit`) share.

pub mod random;

use std::f64::consts::{FRAC_PI_2, TAU};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use tally_common::decode::MAX_FUTURE_MICROS;

pub use random::{Rng, Zipf};

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;
const DAY_SECS: f64 = 86_400.0;
/// Amplitude of the daily curve around its mean: peak/trough = 1.6/0.4 = 4.
const DIURNAL_AMPLITUDE: f64 = 0.6;
/// Second of the UTC day where the rate peaks (17:30); the trough is 12 h away (05:30).
const DIURNAL_PEAK_SOD: f64 = 17.5 * 3600.0;
/// How far ahead of the clock an event may be before the decoder rejects it.
const MAX_FUTURE_MS: i64 = MAX_FUTURE_MICROS / 1000;
/// How far in the future a deliberate "future timestamp" line is (100 years).
const FUTURE_FLAW_MS: i64 = 36_525 * MS_PER_DAY;
const CUSTOMER_SHARE: f64 = 0.8;
const EXTRA_FIELD_SHARE: f64 = 0.02;
const CHANNELS: [&str; 3] = ["web", "app", "pos"];
/// A retry re-emits one of the last this many valid lines.
const RETRY_WINDOW: usize = 4096;
/// Median order amount in minor units, and the spread of its logarithm.
const AMOUNT_MEDIAN: f64 = 3_000.0;
const AMOUNT_SIGMA: f64 = 1.0;
const MAX_GEN_AMOUNT: f64 = 1e9;

/// Arguments of `tally gen`.
#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// Random seed: the same arguments and seed give the same bytes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Lines to emit (0 = unbounded, which needs --rate).
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Number of merchants (`m_1` … `m_N`, `m_1` the busiest).
    #[arg(long, default_value_t = 5_000)]
    pub merchants: u32,
    /// Zipf exponent of the merchants' activity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Size of each merchant's pool of (returning) customers.
    #[arg(long, default_value_t = 2_000)]
    pub customers_per_merchant: u32,
    /// Event time where the stream starts, RFC 3339 [default: now minus --days,
    /// floored to the hour; now when --events is 0].
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub start: Option<DateTime<Utc>>,
    /// Event-time span of a bounded stream, in days.
    #[arg(long, default_value_t = 3.0)]
    pub days: f64,
    /// Share of events whose ts is 1–48 h older than the stream's position.
    #[arg(long, default_value_t = 0.01)]
    pub late_share: f64,
    /// Share of lines re-emitting a recent line byte for byte (a producer retry).
    #[arg(long, default_value_t = 0.005)]
    pub duplicate_share: f64,
    /// Share of lines breaking a rule (invalid JSON, order without amount, bad
    /// merchant id, future ts), which the pipeline must quarantine.
    #[arg(long, default_value_t = 0.001)]
    pub malformed_share: f64,
    /// Percentages of order,refund,page_view (adding up to 100).
    #[arg(long, value_name = "O,R,P", default_value = "25,3,72", value_parser = parse_mix)]
    pub mix: Mix,
    /// Mean events per second (0 = as fast as possible). An unbounded stream
    /// follows the daily curve around it, so its timestamps track the clock.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Output file, or `-` for standard output.
    #[arg(long, default_value = "-")]
    pub output: PathBuf,
    /// Put the events on this Kinesis stream instead.
    #[arg(long, value_name = "STREAM")]
    pub kinesis: Option<String>,
    /// With --kinesis: salt the partition key of a merchant sending more than
    /// this many events a second (`merchant_id#n`), so it spans shards; 0: never.
    #[arg(long, default_value_t = 0)]
    pub salt_above: u64,
    /// With --salt-above: salts per hot merchant (at most this many shards each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub salt_ways: u32,
}

impl Default for GenArgs {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: GenArgs,
        }
        <Wrap as clap::Parser>::parse_from(["gen"]).args
    }
}

/// The event-type mix, as fractions adding up to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// Share of orders.
    pub order: f64,
    /// Share of refunds.
    pub refund: f64,
    /// Share of page views.
    pub page_view: f64,
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let number = |p: &str| {
        p.trim()
            .parse::<f64>()
            .map_err(|_| format!("`{p}` is not a number"))
    };
    let parts = s.split(',').map(number).collect::<Result<Vec<_>, _>>()?;
    let &[order, refund, page_view] = parts.as_slice() else {
        return Err("expected three percentages: order,refund,page_view".into());
    };
    if parts.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err("percentages must be finite and not negative".into());
    }
    let sum = order + refund + page_view;
    if (sum - 100.0).abs() > 1e-6 {
        return Err(format!("percentages must add up to 100, not {sum}"));
    }
    Ok(Mix {
        order: order / 100.0,
        refund: refund / 100.0,
        page_view: page_view / 100.0,
    })
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time with offset ({e})"))
}

/// What the last line of a [`Generator`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A valid event at the stream's position.
    Normal,
    /// A valid event 1–48 h older than the stream's position.
    Late,
    /// A byte-identical copy of an earlier valid line.
    Duplicate,
    /// A line the decoder must reject.
    Malformed(Flaw),
}

/// How a malformed line breaks the event rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flaw {
    /// Truncated: not a JSON object.
    InvalidJson,
    /// An order without `amount`.
    MissingAmount,
    /// A `merchant_id` with characters outside `[A-Za-z0-9_.:-]`, or empty.
    BadMerchant,
    /// A `ts` a century ahead.
    FutureTs,
}

const FLAWS: [Flaw; 4] = [
    Flaw::InvalidJson,
    Flaw::MissingAmount,
    Flaw::BadMerchant,
    Flaw::FutureTs,
];

/// The daily curve r(t) = 1 + A sin(θ(t)) with mean 1, over seconds t since
/// the start, and its integral Λ ("operational time").
struct Diurnal {
    /// θ at t = 0.
    theta0: f64,
}

impl Diurnal {
    fn new(start_ms: i64) -> Self {
        let sod = start_ms.rem_euclid(MS_PER_DAY) as f64 / 1000.0;
        Diurnal {
            theta0: TAU * (sod - DIURNAL_PEAK_SOD) / DAY_SECS + FRAC_PI_2,
        }
    }

    fn rate(&self, t: f64) -> f64 {
        1.0 + DIURNAL_AMPLITUDE * (self.theta0 + TAU * t / DAY_SECS).sin()
    }

    fn lambda(&self, t: f64) -> f64 {
        let k = DIURNAL_AMPLITUDE * DAY_SECS / TAU;
        t + k * (self.theta0.cos() - (self.theta0 + TAU * t / DAY_SECS).cos())
    }

    /// The t with Λ(t) = s: Newton from `guess`, kept inside a bracket.
    fn invert(&self, s: f64, guess: f64) -> f64 {
        let k = 2.0 * DIURNAL_AMPLITUDE * DAY_SECS / TAU;
        let (mut lo, mut hi) = (s - k, s + k);
        let mut t = guess.clamp(lo, hi);
        for _ in 0..100 {
            let f = self.lambda(t) - s;
            if f.abs() < 1e-7 || hi - lo < 1e-7 {
                break;
            }
            if f > 0.0 {
                hi = t;
            } else {
                lo = t;
            }
            let next = t - f / self.rate(t);
            t = if next > lo && next < hi {
                next
            } else {
                0.5 * (lo + hi)
            };
        }
        t
    }
}

/// The event stream: an iterator of NDJSON lines (without newline), fully
/// determined by the [`GenArgs`] (and, without --start, the clock at creation).
pub struct Generator {
    rng: Rng,
    seed: u64,
    /// Lines emitted so far.
    n: u64,
    /// Lines to emit; `None` = unbounded.
    total: Option<u64>,
    rate: f64,
    start_ms: i64,
    diurnal: Diurnal,
    /// Operational seconds per line: the n-th line sits at Λ⁻¹((n + U) · step).
    step: f64,
    /// The stream's position, seconds since the start.
    t: f64,
    /// The stream's position as event time (epoch ms).
    cursor_ms: i64,
    merchants: Zipf,
    customers: Option<Zipf>,
    mix: Mix,
    /// Shares of malformed, duplicate and late lines.
    shares: [f64; 3],
    recent: Vec<String>,
    recent_next: usize,
    last: LineKind,
}

impl Generator {
    /// Check the arguments and set the stream up (the start defaults from the clock).
    pub fn new(args: &GenArgs) -> anyhow::Result<Self> {
        let shares = [args.malformed_share, args.duplicate_share, args.late_share];
        let bounded = args.events > 0;
        for (flag, v) in ["malformed", "duplicate", "late"].into_iter().zip(shares) {
            ensure!(
                (0.0..=1.0).contains(&v),
                "--{flag}-share must be in 0..=1, not {v}"
            );
        }
        ensure!(
            shares.iter().sum::<f64>() <= 1.0,
            "the --*-share values exceed 1 together"
        );
        ensure!(args.merchants > 0, "--merchants must be at least 1");
        ensure!(
            args.zipf.is_finite() && args.zipf >= 0.0,
            "--zipf must be ≥ 0"
        );
        ensure!(
            args.rate.is_finite() && args.rate >= 0.0,
            "--rate must be ≥ 0"
        );
        ensure!(
            bounded || args.rate > 0.0,
            "--events 0 (unbounded) needs --rate"
        );
        let days_ok = args.days > 0.0 && args.days < 1e5;
        ensure!(
            !bounded || days_ok,
            "--days must be a positive number of days"
        );
        let now_ms = Utc::now().timestamp_millis();
        let span_ms = (args.days * MS_PER_DAY as f64).round() as i64;
        let start_ms = match args.start {
            Some(t) => t.timestamp_millis(),
            None if bounded => (now_ms - span_ms).div_euclid(MS_PER_HOUR) * MS_PER_HOUR,
            None => now_ms,
        };
        let end_ms = start_ms + if bounded { span_ms } else { 0 };
        ensure!(
            end_ms <= now_ms + MAX_FUTURE_MS,
            "the events would reach {}, in the future (the pipeline rejects a ts more than \
             5 minutes ahead); choose an earlier --start or fewer --days",
            rfc3339(end_ms)
        );
        let diurnal = Diurnal::new(start_ms);
        let step = if bounded {
            diurnal.lambda(span_ms as f64 / 1000.0) / args.events as f64
        } else {
            1.0 / args.rate
        };
        let pool = args.customers_per_merchant as usize;
        Ok(Generator {
            rng: Rng::new(args.seed),
            seed: args.seed,
            n: 0,
            total: bounded.then_some(args.events),
            rate: args.rate,
            start_ms,
            diurnal,
            step,
            t: 0.0,
            cursor_ms: start_ms,
            merchants: Zipf::new(args.merchants as usize, args.zipf),
            customers: (pool > 0).then(|| Zipf::new(pool, 1.0)),
            mix: args.mix,
            shares,
            recent: Vec::new(),
            recent_next: 0,
            last: LineKind::Normal,
        })
    }

    /// What the last line was.
    pub fn last_kind(&self) -> LineKind {
        self.last
    }

    /// When the lines emitted so far are due, counted from the moment the
    /// stream started going out: `None` without --rate. A bounded stream goes
    /// out at a steady --rate; an unbounded one as its event times advance,
    /// so a producer that waits for `due` never sends a ts from the future.
    pub fn due(&self) -> Option<Duration> {
        if self.rate <= 0.0 {
            return None;
        }
        let secs = match self.total {
            Some(_) => self.n as f64 / self.rate,
            None => self.t,
        };
        Some(Duration::from_secs_f64(secs.max(0.0)))
    }

    /// Replace `line` with the next line; false when the stream is over.
    pub fn next_into(&mut self, line: &mut String) -> bool {
        if self.total.is_some_and(|total| self.n >= total) {
            return false;
        }
        line.clear();
        let s = (self.n as f64 + self.rng.unit()) * self.step;
        self.t = self.diurnal.invert(s, self.t);
        self.cursor_ms = self.start_ms + (self.t * 1000.0).floor() as i64;
        let u = self.rng.unit();
        let [m, d, l] = self.shares;
        self.last = if u < m {
            let flaw = FLAWS[self.rng.below(FLAWS.len() as u64) as usize];
            self.write_event(line, self.cursor_ms, Some(flaw));
            LineKind::Malformed(flaw)
        } else if u < m + d && !self.recent.is_empty() {
            let i = self.rng.below(self.recent.len() as u64) as usize;
            line.push_str(&self.recent[i]);
            LineKind::Duplicate
        } else {
            let late = u < m + d + l;
            let ts = if late {
                self.cursor_ms - MS_PER_HOUR - self.rng.below(47 * MS_PER_HOUR as u64 + 1) as i64
            } else {
                self.cursor_ms
            };
            self.write_event(line, ts, None);
            self.remember(line);
            if late {
                LineKind::Late
            } else {
                LineKind::Normal
            }
        };
        self.n += 1;
        true
    }

    fn remember(&mut self, line: &str) {
        if self.recent.len() < RETRY_WINDOW {
            self.recent.push(line.to_owned());
        } else {
            let slot = &mut self.recent[self.recent_next];
            slot.clear();
            slot.push_str(line);
            self.recent_next = (self.recent_next + 1) % RETRY_WINDOW;
        }
    }

    /// Log-normal order amount in minor units.
    fn amount(&mut self) -> i64 {
        let x = (AMOUNT_MEDIAN.ln() + AMOUNT_SIGMA * self.rng.normal()).exp();
        x.round().clamp(1.0, MAX_GEN_AMOUNT) as i64
    }

    fn write_event(&mut self, line: &mut String, ts_ms: i64, flaw: Option<Flaw>) {
        let rank = self.merchants.sample(&mut self.rng) + 1;
        let u = self.rng.unit();
        let kind = match flaw {
            Some(Flaw::MissingAmount) => "order",
            _ if u < self.mix.order => "order",
            _ if u < self.mix.order + self.mix.refund => "refund",
            _ => "page_view",
        };
        let _ = write!(
            line,
            r#"{{"event_id":"{:x}-{:x}","merchant_id":""#,
            self.seed, self.n
        );
        let _ = match flaw {
            Some(Flaw::BadMerchant) => match self.rng.below(3) {
                0 => write!(line, "m {rank}"),
                1 => write!(line, "m_{rank}/eu"),
                _ => Ok(()),
            },
            _ => write!(line, "m_{rank}"),
        };
        let _ = write!(line, r#"","type":"{kind}","ts":"#);
        let ts_ms = match flaw {
            Some(Flaw::FutureTs) => {
                ts_ms + FUTURE_FLAW_MS + self.rng.below(MS_PER_DAY as u64) as i64
            }
            _ => ts_ms,
        };
        // both wire forms: every third line as integer epoch milliseconds
        if self.n % 3 == 2 {
            let _ = write!(line, "{ts_ms}");
        } else {
            let _ = write!(line, "\"{}\"", rfc3339(ts_ms));
        }
        let amount = match kind {
            _ if flaw == Some(Flaw::MissingAmount) => None,
            "order" => Some(self.amount()),
            // half the refunds are whole orders, the rest part of one
            "refund" => Some(match (self.amount(), self.rng.unit()) {
                (order, f) if f < 0.5 => order,
                (order, f) => ((order as f64) * (f - 0.4) * 1.5).round().max(1.0) as i64,
            }),
            _ => None,
        };
        if let Some(a) = amount {
            let _ = write!(line, r#","amount":{a}"#);
        }
        if let Some(customers) = &self.customers {
            if self.rng.unit() < CUSTOMER_SHARE {
                let c = customers.sample(&mut self.rng) + 1;
                let _ = write!(line, r#","customer_id":"c_{rank}_{c}""#);
            }
        }
        if self.rng.unit() < EXTRA_FIELD_SHARE {
            let channel = CHANNELS[self.rng.below(CHANNELS.len() as u64) as usize];
            let _ = write!(line, r#","channel":"{channel}""#);
        }
        line.push('}');
        if flaw == Some(Flaw::InvalidJson) {
            // all ASCII, so any cut is a char boundary; an unclosed object never parses
            line.truncate(line.len() / 2);
        }
    }
}

impl Iterator for Generator {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        let mut line = String::with_capacity(192);
        self.next_into(&mut line).then_some(line)
    }
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Write the stream to stdout or --output (blocking; sleeps to honour --rate).
/// Returns the number of lines written; a closed pipe ends the stream quietly.
pub fn run(args: &GenArgs) -> anyhow::Result<u64> {
    if args.kinesis.is_some() {
        bail!("--kinesis is handled by the caller");
    }
    let mut stream = Generator::new(args)?;
    let sink: Box<dyn Write> = if args.output == Path::new("-") {
        Box::new(io::stdout().lock())
    } else {
        let file = File::create(&args.output)
            .with_context(|| format!("cannot create {}", args.output.display()))?;
        Box::new(file)
    };
    let mut out = BufWriter::with_capacity(8 << 20, sink);
    // with --rate, about 20 batches a second, each flushed and then waited for
    let batch = if args.rate > 0.0 {
        ((args.rate / 20.0).ceil() as u64).clamp(1, 1 << 20)
    } else {
        u64::MAX
    };
    let mut counts = [0u64; 4];
    match pump(&mut stream, &mut out, batch, &mut counts) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot write to {}", args.output.display()))
        }
    }
    let [lines, late, duplicate, malformed] = counts;
    tracing::info!(lines, late, duplicate, malformed, "tally gen: done");
    Ok(lines)
}

fn pump(
    stream: &mut Generator,
    out: &mut impl Write,
    batch: u64,
    counts: &mut [u64; 4],
) -> io::Result<()> {
    let began = Instant::now();
    let mut line = String::with_capacity(256);
    loop {
        for _ in 0..batch {
            if !stream.next_into(&mut line) {
                return out.flush();
            }
            line.push('\n');
            out.write_all(line.as_bytes())?;
            counts[0] += 1;
            match stream.last_kind() {
                LineKind::Late => counts[1] += 1,
                LineKind::Duplicate => counts[2] += 1,
                LineKind::Malformed(_) => counts[3] += 1,
                LineKind::Normal => {}
            }
        }
        if let Some(due) = stream.due() {
            out.flush()?;
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::OnceLock;

    use clap::Parser;
    use tally_common::bucket::now_micros;
    use tally_common::decode::{decode_line, RejectReason};
    use tally_common::event::{Event, EventType};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenArgs,
    }

    fn args(flags: &[&str]) -> GenArgs {
        let argv = std::iter::once("gen").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    fn lines(flags: &[&str]) -> Vec<String> {
        Generator::new(&args(flags)).unwrap().collect()
    }

    const START: &str = "2024-05-01T00:00:00Z";

    /// A line, what it is meant to be, the stream's position (ms) and the decoded event.
    type Row = (String, LineKind, i64, Option<Event>);

    /// 200k lines on the default settings over three whole days, shared by the tests.
    fn sample() -> &'static [Row] {
        static SAMPLE: OnceLock<Vec<Row>> = OnceLock::new();
        SAMPLE.get_or_init(|| {
            let flags = ["--seed", "7", "--events", "200000", "--start", START];
            let mut g = Generator::new(&args(&flags)).unwrap();
            let now = now_micros();
            std::iter::from_fn(|| {
                let line = g.next()?;
                let event = decode_line(line.as_bytes(), now).ok();
                Some((line, g.last, g.cursor_ms, event))
            })
            .collect()
        })
    }

    fn share(rows: &[Row], f: impl Fn(&Row) -> bool) -> f64 {
        rows.iter().filter(|r| f(r)).count() as f64 / rows.len() as f64
    }

    #[test]
    fn reproducible_for_a_seed() {
        let a = lines(&["--events", "20000", "--start", START]);
        assert_eq!(a, lines(&["--events", "20000", "--start", START]));
        assert_ne!(
            a,
            lines(&["--seed", "1", "--events", "20000", "--start", START])
        );
        assert!(
            a[0].starts_with(r#"{"event_id":"2a-0","merchant_id":"m_"#),
            "{}",
            a[0]
        );
    }

    #[test]
    fn run_writes_the_same_bytes_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        let flags = [
            "--events",
            "5000",
            "--start",
            START,
            "--output",
            path.to_str().unwrap(),
        ];
        assert_eq!(run(&args(&flags)).unwrap(), 5000);
        let expected = lines(&flags).join("\n") + "\n";
        assert!(std::fs::read_to_string(&path).unwrap() == expected);
    }

    #[test]
    fn lines_are_valid_unless_meant_to_be_malformed() {
        let rows = sample();
        let mut flaws = HashSet::new();
        for (line, kind, _, event) in rows {
            let LineKind::Malformed(flaw) = kind else {
                assert!(event.is_some(), "rejected: {line}");
                continue;
            };
            let reason = decode_line(line.as_bytes(), now_micros()).expect_err(line);
            let expected = match (flaw, &reason) {
                (Flaw::InvalidJson, RejectReason::InvalidJson(_)) => true,
                (Flaw::MissingAmount, RejectReason::InvalidField { field, .. }) => {
                    *field == "amount"
                }
                (Flaw::BadMerchant, RejectReason::InvalidField { field, .. }) => {
                    *field == "merchant_id"
                }
                (Flaw::FutureTs, RejectReason::FutureTimestamp { .. }) => true,
                _ => false,
            };
            assert!(expected, "{flaw:?} {line}: {reason}");
            flaws.insert(*flaw);
        }
        assert_eq!(flaws.len(), 4, "every kind of flaw shows up");
        let malformed = share(rows, |r| matches!(r.1, LineKind::Malformed(_)));
        assert!(
            (malformed - 0.001).abs() < 0.0004,
            "malformed share {malformed}"
        );
        let duplicate = share(rows, |r| r.1 == LineKind::Duplicate);
        assert!(
            (duplicate - 0.005).abs() < 0.001,
            "duplicate share {duplicate}"
        );
        let late = share(rows, |r| r.1 == LineKind::Late);
        assert!((late - 0.01).abs() < 0.0015, "late share {late}");
        // both wire forms of ts, and unknown fields (kept by the decoder)
        let int_ts = share(rows, |r| r.0.contains(r#""ts":1"#));
        assert!(
            (int_ts - 1.0 / 3.0).abs() < 0.01,
            "integer ts share {int_ts}"
        );
        let extra = share(rows, |r| r.3.is_some() && r.0.contains(r#""channel":"#));
        assert!(extra > 0.01 && extra < 0.03, "extra field share {extra}");
    }

    #[test]
    fn skew_and_mix_match_the_settings() {
        let events: Vec<&Event> = sample().iter().filter_map(|r| r.3.as_ref()).collect();
        let total = events.len() as f64;
        let share =
            |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count() as f64 / total;
        for (kind, want) in [
            (EventType::Order, 0.25),
            (EventType::Refund, 0.03),
            (EventType::PageView, 0.72),
        ] {
            let got = share(&|e| e.event_type == kind);
            assert!((got - want).abs() < 0.01, "{kind:?}: {got} vs {want}");
        }
        let zipf = Zipf::new(5_000, 1.1);
        let top = share(&|e| e.merchant_id == "m_1");
        assert!(
            (top - zipf.cdf(0)).abs() < 0.005,
            "top merchant {top} vs {}",
            zipf.cdf(0)
        );
        let top10 = share(&|e| e.merchant_id[2..].parse::<u32>().unwrap() <= 10);
        assert!(
            (top10 - zipf.cdf(9)).abs() < 0.01,
            "top 10 {top10} vs {}",
            zipf.cdf(9)
        );
        let mut per_merchant: HashMap<&str, u64> = HashMap::new();
        for e in &events {
            *per_merchant.entry(&e.merchant_id).or_default() += 1;
        }
        assert!(
            per_merchant["m_1"] > per_merchant["m_2"] && per_merchant["m_2"] > per_merchant["m_10"]
        );
        // customers come back: far fewer (merchant, customer) pairs than events carrying one
        let with_customer = share(&|e| e.customer_id.is_some());
        assert!(
            (with_customer - 0.8).abs() < 0.01,
            "customer share {with_customer}"
        );
        let pairs: HashSet<_> = events
            .iter()
            .filter_map(|e| Some((&e.merchant_id, e.customer_id.as_ref()?)))
            .collect();
        assert!(
            (pairs.len() as f64) < 0.75 * with_customer * total,
            "{} pairs",
            pairs.len()
        );
        let refund_max = events
            .iter()
            .filter(|e| e.event_type == EventType::Refund)
            .map(|e| e.amount.unwrap())
            .max();
        assert!(refund_max.unwrap() <= 1_000_000_000);
    }

    #[test]
    fn duplicates_repeat_earlier_lines_and_late_events_lag() {
        let mut seen = HashSet::new();
        let mut ids = HashSet::new();
        let mut last_normal = i64::MIN;
        for (line, kind, cursor, event) in sample() {
            match (kind, event) {
                (LineKind::Duplicate, _) => assert!(seen.contains(line.as_str()), "{line}"),
                (LineKind::Normal | LineKind::Late, Some(e)) => {
                    assert!(ids.insert(&e.event_id), "event ids are unique");
                    let ts = e.ts / 1000;
                    if *kind == LineKind::Late {
                        assert!(ts <= cursor - MS_PER_HOUR && ts >= cursor - 48 * MS_PER_HOUR);
                    } else {
                        assert!(ts == *cursor && ts >= last_normal, "in order: {line}");
                        last_normal = ts;
                    }
                }
                _ => {}
            }
            seen.insert(line.as_str());
        }
        let end = parse_time(START).unwrap().timestamp_millis() + 3 * MS_PER_DAY;
        assert!(last_normal < end && last_normal > end - MS_PER_HOUR);
    }

    #[test]
    fn the_day_peaks_in_the_evening() {
        let mut per_hour = [0u64; 24];
        for (_, kind, cursor, _) in sample() {
            if *kind == LineKind::Normal {
                per_hour[(cursor.rem_euclid(MS_PER_DAY) / MS_PER_HOUR) as usize] += 1;
            }
        }
        let ratio = per_hour[18] as f64 / per_hour[4] as f64;
        assert!(ratio > 2.5 && ratio < 5.0, "18:00 vs 04:00: {per_hour:?}");
        let peak = (0..24).max_by_key(|&h| per_hour[h]).unwrap();
        let trough = (0..24).min_by_key(|&h| per_hour[h]).unwrap();
        assert!(
            (16..=19).contains(&peak) && (4..=7).contains(&trough),
            "{per_hour:?}"
        );
    }

    #[test]
    fn unbounded_streams_follow_the_clock_and_run_paces() {
        let mut g = Generator::new(&args(&["--events", "0", "--rate", "1000"])).unwrap();
        assert_eq!(g.by_ref().take(10_000).count(), 10_000);
        let due = g.due().unwrap().as_secs_f64();
        // the daily curve bends the pace by at most 1.6x either way
        assert!(due > 10.0 / 1.7 && due < 10.0 / 0.3, "{due}");
        assert!((g.cursor_ms - g.start_ms - (due * 1000.0).floor() as i64).abs() <= 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paced.ndjson");
        let began = Instant::now();
        let flags = ["--events", "300", "--rate", "1000", "--start", START];
        let out = ["--output", path.to_str().unwrap()];
        assert_eq!(run(&args(&[&flags[..], &out[..]].concat())).unwrap(), 300);
        assert!(
            began.elapsed() >= Duration::from_millis(250),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        let future = (Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
        for flags in [
            &["--start", &future][..],
            &["--events", "0"],
            &["--late-share", "0.7", "--duplicate-share", "0.7"],
            &["--merchants", "0"],
        ] {
            assert!(Generator::new(&args(flags)).is_err(), "{flags:?}");
        }
        assert!(run(&args(&["--kinesis", "s"]))
            .unwrap_err()
            .to_string()
            .contains("caller"));
        for bad in [
            ["--mix", "25,3"],
            ["--mix", "25,3,70"],
            ["--start", "yesterday"],
        ] {
            assert!(Cli::try_parse_from(["gen", bad[0], bad[1]]).is_err());
        }
        let defaults = GenArgs::default();
        assert_eq!(
            (defaults.seed, defaults.events, defaults.merchants),
            (42, 100_000, 5_000)
        );
        assert_eq!(
            defaults.mix,
            Mix {
                order: 0.25,
                refund: 0.03,
                page_view: 0.72
            }
        );
        // the default start: --days back from now, on the hour
        let start = Generator::new(&defaults).unwrap().start_ms;
        assert!(
            start % MS_PER_HOUR == 0 && start + 3 * MS_PER_DAY <= Utc::now().timestamp_millis()
        );
    }
}
