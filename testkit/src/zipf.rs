//! Zipf-skewed merchant traffic for benchmarks, drawn with the generator's own
//! random source and Zipf sampler ([`tally_gen::random`]).

use tally_gen::random::{Rng, Zipf};

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
        // UUID-shaped event ids, as producers send them; unique by their last part
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
