//! Decoding typical ~150-byte events: a record of 100 NDJSON lines, plain and
//! gzip-compressed, plus the `serde_json::Value` parse of the same lines as the
//! reference a naive decoder would use.
//!
//! Run: `cargo bench -p tally-common --bench decode`

use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tally_common::bucket::parse_ts;
use tally_common::decode::decode_record;

fn record(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        let kind = ["order", "page_view", "page_view", "refund"][i % 4];
        let amount = if kind == "page_view" {
            String::new()
        } else {
            format!(",\"amount\":{}", 1000 + i * 7)
        };
        let ts = if i % 3 == 0 {
            "1795600000123".to_string()
        } else {
            "\"2026-11-24T10:15:00.123Z\"".to_string()
        };
        s.push_str(&format!(
            "{{\"event_id\":\"evt-{i:08}-7f3a\",\"merchant_id\":\"m_{}\",\"type\":\"{kind}\",\"ts\":{ts}{amount},\"customer_id\":\"cust-{:06}\"}}\n",
            i % 997,
            i * 31 % 100_000
        ));
    }
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let now = parse_ts("2026-12-01T00:00:00Z").unwrap();
    let plain = record(100);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    println!("average event size: {} bytes", plain.len() / 100);

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(100));
    g.bench_with_input(BenchmarkId::new("tally", "ndjson"), &plain, |b, r| {
        b.iter(|| {
            let d = decode_record(r, now);
            assert_eq!(d.events.len(), 100);
            d
        })
    });
    g.bench_with_input(BenchmarkId::new("tally", "gzip"), &gz, |b, r| {
        b.iter(|| decode_record(r, now).events.len())
    });
    g.bench_with_input(
        BenchmarkId::new("serde_json_value", "ndjson"),
        &plain,
        |b, r| {
            b.iter(|| {
                r.split(|&c| c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap())
                    .fold(0usize, |n, v| n + usize::from(v.is_object()))
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
