//! Speed layer throughput on one core: record bytes to applied in a real Redis on
//! loopback, 100,000 Zipf-skewed merchants, NDJSON records of 100 events. The
//! reference, in the same run against the same server, is the naive way: decode
//! with the same decoder, then one HINCRBY per event counter and one PFADD per
//! customer, pipelined per batch (and without any exactly-once guard).
//!
//! Besides time, each way's Redis engine CPU (`INFO cpu`, user + sys) per
//! event and its memory (`INFO memory` `used_memory`, over an empty server) per
//! merchant-hour written are reported, from the same server.
//!
//! Run: `cargo bench -p tally-speed-layer --bench speed`

use std::time::Instant;

use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::decode::decode_record;
use tally_common::metrics::counter_defs;
use tally_common::source::{Position, Record, SourceId};
use tally_speed_layer::{apply_records, RedisStore, SpeedStore};
use tally_testkit::zipf::zipf_records;
use tally_testkit::{cpu_secs, RedisServer};

const EVENTS: usize = 2_000_000;
const PER_RECORD: usize = 100;

const MERCHANTS: usize = 100_000;
/// Reads of one merchant's current hour after the writes, one at a time as
/// the API makes them (merchants drawn as the events are: Zipf).
const READS: usize = 20_000;

async fn naive(url: &str, records: &[Vec<u8>], now: i64, per_batch: usize) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut n = 0u64;
    for batch in records.chunks(per_batch) {
        let mut pipe = redis::pipe();
        for r in batch {
            let d = decode_record(r, now);
            for e in &d.events {
                let key = format!(
                    "naive:{{{}}}:{}",
                    e.merchant_id,
                    e.ts.div_euclid(MICROS_PER_HOUR)
                );
                for (def, kind, measure, _) in counter_defs() {
                    if kind == e.event_type.as_str() {
                        let v = match measure {
                            tally_common::metrics::Measure::Count => 1,
                            tally_common::metrics::Measure::Amount => e.amount.unwrap_or(0),
                        };
                        pipe.cmd("HINCRBY")
                            .arg(format!("{key}:c"))
                            .arg(def.name)
                            .arg(v)
                            .ignore();
                    }
                }
                if let Some(cust) = &e.customer_id {
                    pipe.cmd("PFADD").arg(format!("{key}:u")).arg(cust).ignore();
                }
                n += 1;
            }
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
    }
    n
}

/// The naive way's read of a merchant-hour: its counters and its HLL count.
async fn naive_reads(url: &str, merchants: &[String], hour: i64) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for m in merchants {
        let key = format!("naive:{{{m}}}:{}", hour.div_euclid(MICROS_PER_HOUR));
        let _: (Vec<(String, i64)>, i64) = redis::pipe()
            .hgetall(format!("{key}:c"))
            .cmd("PFCOUNT")
            .arg(format!("{key}:u"))
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

/// The server's CPU seconds (user + sys) and bytes of memory in use.
fn engine(url: &str) -> (f64, f64) {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("cpu").query(&mut c).unwrap();
    let mem: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let field = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (
        field(&info, "used_cpu_user") + field(&info, "used_cpu_sys"),
        field(&mem, "used_memory"),
    )
}

/// Script calls the server ran so far (`INFO commandstats`, `EVALSHA`).
fn script_calls(url: &str) -> u64 {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The commands the server spent most time in (`INFO commandstats`): name,
/// calls, µs in all, the top `n` by time.
fn command_time(url: &str, n: usize) -> String {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    let mut rows: Vec<(String, u64, u64)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |f: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{f}=")))?
                    .parse()
                    .ok()
            };
            Some((name.to_string(), field("calls")?, field("usec")?))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.2));
    rows.iter()
        .take(n)
        .map(|(name, calls, usec)| format!("{name} {calls} calls {:.3} s", *usec as f64 / 1e6))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Keys matching `pattern` (SCAN), for counting merchant-hours.
fn count_keys(url: &str, pattern: &str) -> usize {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut c).unwrap();
    keys.len()
}

/// Merchant-hours in the speed view: distinct (bucket-hour, merchant) over
/// the bucket-hours' merged fields and their logs' frames.
fn count_merchant_hours(url: &str) -> usize {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tally:v6:{*}:*")
        .query(&mut c)
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for k in &keys {
        if let Some(hash) = k.strip_suffix(":log") {
            let log: Vec<u8> = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            for (_, e) in tally_speed_layer::speed_entry::log_entries(&log).unwrap() {
                seen.insert((hash.to_string(), e.merchant));
            }
        } else {
            let fields: Vec<String> = redis::cmd("HKEYS").arg(k).query(&mut c).unwrap();
            // merchants' merged fields (not `m/r`, nor the compaction count)
            seen.extend(
                fields
                    .into_iter()
                    .filter(|f| !f.contains('/'))
                    .map(|f| (k.clone(), f)),
            );
        }
    }
    seen.len()
}

fn main() {
    let hour_ms = 1_795_600_800_000 / 3_600_000 * 3_600_000;
    let now = (hour_ms + 3_700_000) * 1000;
    let records = zipf_records(EVENTS, PER_RECORD, MERCHANTS, hour_ms, 7);
    let bytes: usize = records.iter().map(Vec::len).sum();
    let readers: Vec<String> = records
        .iter()
        .flat_map(|r| decode_record(r, now).events)
        .take(READS)
        .map(|e| e.merchant_id)
        .collect();
    let hour = hour_ms * 1000;
    println!("speed layer, {EVENTS} events ({} bytes avg), {MERCHANTS} Zipf(1.1) merchants, NDJSON records of {PER_RECORD}", bytes / EVENTS);
    println!("| batch (records) | way | wall s | events/s (wall) | client CPU s | Lua calls | Redis engine µs/event | Redis bytes/merchant-hour |");
    println!("|---|---|---|---|---|---|---|---|");
    // 100 records = 10,000 events (`tally ingest --chunk-lines 10000`, the speed
    // function's default batch); 400 records (6 MB) = the most a Lambda
    // invocation carries; 660 records (10 MB) = the most one GetRecords page
    // carries; 10,000 records (1 M events), more than either, for reference
    for per_batch in [100usize, 400, 660, 10_000] {
        let mut redis = RedisServer::start();
        // one core for the client: a current-thread runtime; redis-server has the other
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (cpu0, mem0) = engine(&redis.url());
        let (ours, ours_cpu, _applied) = rt.block_on(async {
            let store = SpeedStore::Redis(RedisStore::connect(&redis.url(), 3600).await.unwrap());
            let (t, c) = (Instant::now(), cpu_secs());
            let mut applied = 0;
            for (b, batch) in records.chunks(per_batch).enumerate() {
                let input = batch.iter().enumerate().map(|(i, r)| {
                    Record::new(Position::from_u64((b * per_batch + i) as u64 + 1), r)
                });
                let out = apply_records(&store, SourceId::kinesis("bench", "shard-0"), input, now)
                    .await
                    .unwrap();
                applied += out.report.applied;
            }
            (t.elapsed().as_secs_f64(), cpu_secs() - c, applied)
        });
        let (cpu1, mem1) = engine(&redis.url());
        let ours_hours = count_merchant_hours(&redis.url());
        let calls = script_calls(&redis.url());
        let ours_commands = command_time(&redis.url(), 5);
        let (cpu_r0, _) = engine(&redis.url());
        rt.block_on(async {
            let store = RedisStore::connect(&redis.url(), 3600).await.unwrap();
            for m in &readers {
                tally_common::speed_view::SpeedView::read(&store, m, &[hour], &[])
                    .await
                    .unwrap();
            }
        });
        let (cpu_r1, _) = engine(&redis.url());
        redis.restart();
        let (cpu2, mem2) = engine(&redis.url());
        let (naive_t, naive_cpu, n) = rt.block_on(async {
            let (t, c) = (Instant::now(), cpu_secs());
            let n = naive(&redis.url(), &records, now, per_batch.min(1_000)).await;
            (t.elapsed().as_secs_f64(), cpu_secs() - c, n)
        });
        let (cpu3, mem3) = engine(&redis.url());
        let naive_hours = count_keys(&redis.url(), "naive:{*}:*:c");
        let naive_commands = command_time(&redis.url(), 3);
        let (cpu_r2, _) = engine(&redis.url());
        rt.block_on(naive_reads(&redis.url(), &readers, hour));
        let (cpu_r3, _) = engine(&redis.url());
        assert_eq!(n as usize, EVENTS);
        let e = EVENTS as f64;
        let us = |a: f64, b: f64| (b - a) * 1e6 / e;
        let per_hour = |a: f64, b: f64, hours: usize| (b - a) / hours.max(1) as f64;
        println!("| {per_batch} | tally (aggregate per merchant-hour and 15-minute slot, client-built sketches, one APPEND per bucket-hour and batch to a log, compacted into merged fields past 32 KiB, in Lua calls of up to 1,024 merchant-hours, exactly once) | {ours:.2} | {:.0} | {ours_cpu:.2} | {calls} | {:.2} | {:.0} ({ours_hours} merchant-hours) |", e / ours, us(cpu0, cpu1), per_hour(mem0, mem1, ours_hours));
        println!("| {per_batch} | naive (HINCRBY + PFADD per event, pipelined; hour grain, Redis HLL) | {naive_t:.2} | {:.0} | {naive_cpu:.2} | - | {:.2} | {:.0} ({naive_hours} merchant-hours) |", e / naive_t, us(cpu2, cpu3), per_hour(mem2, mem3, naive_hours));
        println!(
            "| {per_batch} | ratio tally / naive | | {:.2}x | | |",
            naive_t / ours
        );
        let per_read = |a: f64, b: f64| (b - a) * 1e6 / READS as f64;
        println!(
            "| {per_batch} | reads of a merchant's current hour ({READS}, one at a time): engine µs/read tally {:.1}, naive {:.1} | | | | | | |",
            per_read(cpu_r0, cpu_r1),
            per_read(cpu_r2, cpu_r3)
        );
        eprintln!("batch {per_batch}: tally's engine time by command: {ours_commands}");
        eprintln!("batch {per_batch}: the naive way's: {naive_commands}");
    }
}
