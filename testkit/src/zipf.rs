//! Zipf-skewed merchant traffic for benchmarks: ranks drawn from a precomputed CDF.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Draws ranks `0..n` with probability proportional to `1 / (rank + 1)^s`.
pub struct Zipf {
    cdf: Vec<f64>,
    rng: StdRng,
}

impl Zipf {
    /// A sampler over `n` ranks with exponent `s`, seeded.
    pub fn new(n: usize, s: f64, seed: u64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        for v in &mut cdf {
            *v /= total;
        }
        Zipf {
            cdf,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next rank.
    pub fn sample(&mut self) -> usize {
        let u: f64 = self.rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// The sampler's own random source, for the rest of an event.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// NDJSON records of `per_record` ~150-byte events over `merchants` Zipf-skewed
/// merchants, all within the hour starting at `hour_ms`.
pub fn zipf_records(
    events: usize,
    per_record: usize,
    merchants: usize,
    hour_ms: i64,
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut z = Zipf::new(merchants, 1.1, seed);
    let mut out = Vec::new();
    let mut cur = String::new();
    for i in 0..events {
        let m = z.sample();
        let r = z.rng();
        let kind = match r.random_range(0..100) {
            0..=24 => "order",
            25..=27 => "refund",
            _ => "page_view",
        };
        let detail = if kind == "page_view" {
            format!(",\"path\":\"/p/{:05}\"", r.random_range(0..100_000))
        } else {
            format!(",\"amount\":{}", r.random_range(100..90_000))
        };
        let ts = hour_ms + r.random_range(0..3_600_000);
        // UUID-shaped event ids, as producers send them; unique by their last part
        let id: u64 = r.random();
        cur.push_str(&format!(
            "{{\"event_id\":\"{:08x}-{:04x}-4{:03x}-8{seed:03x}-{i:012x}\",\"merchant_id\":\"m_{m}\",\"type\":\"{kind}\",\"ts\":{ts}{detail},\"customer_id\":\"c{:07}\"}}\n",
            id >> 32,
            (id >> 16) & 0xffff,
            id & 0xfff,
            r.random_range(0..5_000_000)
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
