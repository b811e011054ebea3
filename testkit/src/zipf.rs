//! Zipf-skewed merchant traffic for benchmarks, drawn with the generator's own
//! random source and Zipf sampler ([`tally_gen::random`]).

use std::fmt::Write as _;

use tally_gen::random::{Rng, Zipf};

/// Customers the ordinary (Zipf) merchants draw from, uniformly: `c0000000` to `c4999999`.
pub const CUSTOMER_POOL: u64 = 5_000_000;

/// Append one ~150-byte NDJSON event line of `merchant` at a uniform instant of
/// the hour starting at `hour_ms` (epoch ms), its customer drawn uniformly from
/// `0..customers`; its UUID-shaped event id is unique by `(seed, i)`.
fn push_event(
    out: &mut String,
    r: &mut Rng,
    merchant: std::fmt::Arguments<'_>,
    customers: u64,
    hour_ms: i64,
    seed: u64,
    i: u64,
) {
    let kind = match r.below(100) {
        0..=24 => "order",
        25..=27 => "refund",
        _ => "page_view",
    };
    let detail = r.below(if kind == "page_view" { 100_000 } else { 89_900 });
    let ts = hour_ms + r.below(3_600_000) as i64;
    // UUID-shaped event ids, as producers send them; unique by their last part
    let id = r.next_u64();
    let _ = write!(
        out,
        "{{\"event_id\":\"{:08x}-{:04x}-4{:03x}-8{seed:03x}-{i:012x}\",\"merchant_id\":\"{merchant}\",\"type\":\"{kind}\",\"ts\":{ts}",
        id >> 32,
        (id >> 16) & 0xffff,
        id & 0xfff,
    );
    let _ = if kind == "page_view" {
        write!(out, ",\"path\":\"/p/{detail:05}\"")
    } else {
        write!(out, ",\"amount\":{}", 100 + detail)
    };
    let _ = writeln!(out, ",\"customer_id\":\"c{:07}\"}}", r.below(customers));
}

/// NDJSON records of `per_record` ~150-byte events over `merchants` Zipf(1.1)-skewed
/// merchants, all within the hour starting at `hour_ms`.
pub fn zipf_records(
    events: usize,
    per_record: usize,
    merchants: usize,
    hour_ms: i64,
    seed: u64,
) -> Vec<Vec<u8>> {
    let zipf = Zipf::new(merchants, 1.1);
    let mut r = Rng::new(seed);
    let mut out = Vec::new();
    let mut cur = String::new();
    for i in 0..events {
        let m = zipf.sample(&mut r);
        push_event(
            &mut cur,
            &mut r,
            format_args!("m_{m}"),
            CUSTOMER_POOL,
            hour_ms,
            seed,
            i as u64,
        );
        if (i + 1) % per_record == 0 {
            out.push(std::mem::take(&mut cur).into_bytes());
        }
    }
    if !cur.is_empty() {
        out.push(cur.into_bytes());
    }
    out
}

/// One hour of a stream with a hot merchant, generated chunk by chunk so that
/// no more than a chunk is ever in memory: `events` events in the hour
/// starting at `hour_ms`, every tenth one of [`HotZipfHour::HOT_MERCHANT`] and
/// the rest over `merchants` Zipf(1.1)-skewed merchants `m_0`, `m_1`, ...
/// (drawn as [`zipf_records`] draws them, customers uniform over
/// [`CUSTOMER_POOL`]).
///
/// The hot merchant draws its customers uniformly from a pool sized so that
/// it is expected to hold a tenth of the distinct (merchant, customer) pairs
/// of the hour as well ([`HotZipfHour::hot_customer_pool`]): a tenth of the
/// events alone would be easy on the per-customer aggregation if they came
/// from few customers.
pub struct HotZipfHour {
    zipf: Zipf,
    rng: Rng,
    hour_ms: i64,
    seed: u64,
    events: u64,
    next: u64,
    hot_pool: u64,
    expected_ordinary: f64,
    expected_hot: f64,
}

impl HotZipfHour {
    /// The hot merchant's id.
    pub const HOT_MERCHANT: &'static str = "m_hot";

    /// The generator of `events` events over `merchants` (at least 1) ordinary
    /// merchants plus the hot one, in the hour starting at `hour_ms` (epoch ms).
    pub fn new(events: u64, merchants: usize, hour_ms: i64, seed: u64) -> Self {
        let zipf = Zipf::new(merchants, 1.1);
        let hot_events = events.div_ceil(10) as f64;
        let ordinary_events = events as f64 - hot_events;
        // expected distinct customers of n uniform draws from a pool of p: p(1 - e^(-n/p))
        let distinct = |n: f64, p: f64| -p * (-n / p).exp_m1();
        let pool = CUSTOMER_POOL as f64;
        let mut prev = 0.0;
        let expected_ordinary: f64 = (0..merchants)
            .map(|k| {
                let c = zipf.cdf(k);
                let share = c - prev;
                prev = c;
                distinct(ordinary_events * share, pool)
            })
            .sum();
        // the pool giving the hot merchant a ninth of the ordinary merchants' pairs
        // (a tenth of all), found by bisection: distinct() grows with the pool
        let target = expected_ordinary / 9.0;
        let (mut lo, mut hi) = (1.0f64, 1e12f64);
        for _ in 0..200 {
            let mid = (lo * hi).sqrt();
            if distinct(hot_events, mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let hot_pool = hi.ceil().max(1.0) as u64;
        HotZipfHour {
            zipf,
            rng: Rng::new(seed),
            hour_ms,
            seed,
            events,
            next: 0,
            hot_pool,
            expected_ordinary,
            expected_hot: distinct(hot_events, hot_pool as f64),
        }
    }

    /// Customers the hot merchant draws from (`c0000000` up).
    pub fn hot_customer_pool(&self) -> u64 {
        self.hot_pool
    }

    /// Expected distinct (merchant, customer) pairs of the hour: of the ordinary
    /// merchants together, and of the hot merchant.
    pub fn expected_distinct_customers(&self) -> (f64, f64) {
        (self.expected_ordinary, self.expected_hot)
    }

    /// Events not generated yet.
    pub fn remaining(&self) -> u64 {
        self.events - self.next
    }

    /// The next (up to) `chunk` events as NDJSON records of `per_record`
    /// events each; empty once all events are out.
    pub fn next_records(&mut self, chunk: u64, per_record: usize) -> Vec<Vec<u8>> {
        let end = (self.next + chunk).min(self.events);
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut in_cur = 0;
        for i in self.next..end {
            if i % 10 == 0 {
                push_event(
                    &mut cur,
                    &mut self.rng,
                    format_args!("{}", Self::HOT_MERCHANT),
                    self.hot_pool,
                    self.hour_ms,
                    self.seed,
                    i,
                );
            } else {
                let m = self.zipf.sample(&mut self.rng);
                push_event(
                    &mut cur,
                    &mut self.rng,
                    format_args!("m_{m}"),
                    CUSTOMER_POOL,
                    self.hour_ms,
                    self.seed,
                    i,
                );
            }
            in_cur += 1;
            if in_cur == per_record {
                out.push(std::mem::take(&mut cur).into_bytes());
                in_cur = 0;
            }
        }
        if !cur.is_empty() {
            out.push(cur.into_bytes());
        }
        self.next = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// `zipf_records` as it was written before the line writer was shared.
    fn zipf_records_before(
        events: usize,
        per_record: usize,
        merchants: usize,
        hour_ms: i64,
        seed: u64,
    ) -> Vec<Vec<u8>> {
        let zipf = Zipf::new(merchants, 1.1);
        let mut r = Rng::new(seed);
        let mut out = Vec::new();
        let mut cur = String::new();
        for i in 0..events {
            let m = zipf.sample(&mut r);
            let kind = match r.below(100) {
                0..=24 => "order",
                25..=27 => "refund",
                _ => "page_view",
            };
            let detail = if kind == "page_view" {
                format!(",\"path\":\"/p/{:05}\"", r.below(100_000))
            } else {
                format!(",\"amount\":{}", 100 + r.below(89_900))
            };
            let ts = hour_ms + r.below(3_600_000) as i64;
            let id = r.next_u64();
            cur.push_str(&format!(
                "{{\"event_id\":\"{:08x}-{:04x}-4{:03x}-8{seed:03x}-{i:012x}\",\"merchant_id\":\"m_{m}\",\"type\":\"{kind}\",\"ts\":{ts}{detail},\"customer_id\":\"c{:07}\"}}\n",
                id >> 32,
                (id >> 16) & 0xffff,
                id & 0xfff,
                r.below(5_000_000)
            ));
            if (i + 1) % per_record == 0 {
                out.push(std::mem::take(&mut cur).into_bytes());
            }
        }
        if !cur.is_empty() {
            out.push(cur.into_bytes());
        }
        out
    }

    /// The shared line writer keeps `zipf_records`' bytes as they were, so the
    /// benchmarks' figures stay comparable.
    #[test]
    fn zipf_records_bytes_are_unchanged() {
        for (events, per, seed) in [(3, 2, 5), (10_000, 1_000, 103)] {
            let now = zipf_records(events, per, 1_000, 1_795_525_200_000, seed);
            let before = zipf_records_before(events, per, 1_000, 1_795_525_200_000, seed);
            assert_eq!(now, before);
        }
    }

    /// A tenth of the events and about a tenth of the distinct customers are the
    /// hot merchant's, chunking changes nothing, and ids are unique.
    #[test]
    fn the_hot_merchant_has_a_tenth_of_events_and_customers() {
        let whole = HotZipfHour::new(200_000, 1_000, 0, 9).next_records(200_000, 1_000);
        let mut g = HotZipfHour::new(200_000, 1_000, 0, 9);
        let mut chunked = Vec::new();
        while g.remaining() > 0 {
            chunked.extend(g.next_records(30_000, 1_000));
        }
        assert_eq!(whole.concat(), chunked.concat());
        let text = String::from_utf8(whole.concat()).unwrap();
        let (mut hot, mut ids) = (0, HashSet::new());
        let mut pairs: HashSet<(String, String)> = HashSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let m = v["merchant_id"].as_str().unwrap().to_string();
            hot += usize::from(m == HotZipfHour::HOT_MERCHANT);
            assert!(ids.insert(v["event_id"].as_str().unwrap().to_string()));
            pairs.insert((m, v["customer_id"].as_str().unwrap().to_string()));
        }
        assert_eq!(ids.len(), 200_000);
        assert_eq!(hot, 20_000);
        let hot_pairs = pairs
            .iter()
            .filter(|(m, _)| m == HotZipfHour::HOT_MERCHANT)
            .count();
        let share = hot_pairs as f64 / pairs.len() as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
        let (ord, h) = g.expected_distinct_customers();
        assert!((h / (ord + h) - 0.1).abs() < 0.001);
        assert!(((ord + h) / pairs.len() as f64 - 1.0).abs() < 0.02);
    }
}
