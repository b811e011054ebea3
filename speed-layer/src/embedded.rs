//! The embedded speed store: in process, for runs with no Redis configured.
//! Exact distinct customers (a set per merchant-hour) instead of HyperLogLog,
//! the same marks and the same TTL as Redis.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tally_common::bucket::{now_micros, MICROS_PER_SECOND};
use tally_common::metrics::{Counters, MetricValues};
use tally_common::source::{Position, SourceId};
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::{Error, Result};

use crate::aggregate::SpeedBatch;
use crate::store::ApplyReport;

#[derive(Debug, Default)]
struct HourState {
    counters: Counters,
    customers: HashSet<String>,
    marks: HashMap<SourceId, Position>,
    /// When it was last updated (epoch µs): like a Redis key's TTL, expiry counts from here.
    touched: i64,
}

#[derive(Debug, Default)]
struct State {
    hours: HashMap<(String, i64), HourState>,
    checkpoints: HashMap<String, String>,
}

/// The in-process speed store.
#[derive(Debug)]
pub struct EmbeddedStore {
    state: Mutex<State>,
    ttl_micros: i64,
}

impl EmbeddedStore {
    /// An empty store whose hours expire `ttl_secs` after their end.
    pub fn new(ttl_secs: u64) -> Self {
        EmbeddedStore {
            state: Mutex::new(State::default()),
            ttl_micros: ttl_secs as i64 * MICROS_PER_SECOND,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::internal("the embedded speed store was poisoned by a panic"))
    }

    /// Drop merchant-hours last updated more than the TTL ago (as Redis expires its keys).
    pub fn expire(&self, now: i64) -> Result<()> {
        let ttl = self.ttl_micros;
        self.lock()?.hours.retain(|_, h| h.touched + ttl > now);
        Ok(())
    }

    /// Number of merchant-hours held.
    pub fn len(&self) -> usize {
        self.lock().map(|s| s.hours.len()).unwrap_or(0)
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The write side, as [`crate::SpeedStore`] has it.
impl EmbeddedStore {
    /// Apply a batch's updates (each merchant-hour under the store's lock).
    pub async fn apply(&self, batch: &SpeedBatch) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        let now = now_micros();
        {
            let mut state = self.lock()?;
            for (i, u) in batch.updates.iter().enumerate() {
                let h = state
                    .hours
                    .entry((u.merchant_id.clone(), u.hour))
                    .or_default();
                match h.marks.get(&batch.source) {
                    Some(m) if *m >= u.position => {
                        report.skipped += 1;
                        continue;
                    }
                    Some(m) if *m >= u.first_position => {
                        report.overlaps.push((i, m.clone()));
                        continue;
                    }
                    _ => {}
                }
                h.counters.merge(&u.counters);
                h.customers.extend(u.customers.iter().cloned());
                h.marks.insert(batch.source.clone(), u.position.clone());
                h.touched = now;
                report.applied += 1;
            }
        }
        self.expire(now)?;
        Ok(report)
    }

    /// The stored checkpoint of a consumer.
    pub async fn checkpoint(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock()?.checkpoints.get(key).cloned())
    }

    /// Store a consumer's checkpoint.
    pub async fn set_checkpoint(&self, key: &str, value: &str) -> Result<()> {
        self.lock()?
            .checkpoints
            .insert(key.to_string(), value.to_string());
        Ok(())
    }
}

impl SpeedView for EmbeddedStore {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>> {
        Box::pin(async move {
            let state = self.lock()?;
            let key = |h: i64| (merchant.to_string(), h);
            let mut reading = SpeedReading::default();
            let now = now_micros();
            for (i, &h) in hours.iter().enumerate() {
                if !crate::store::hour_alive(h, now, self.ttl_micros) {
                    reading.not_covered.push(i);
                }
                let v = state.hours.get(&key(h));
                reading.hours.push(MetricValues {
                    counters: v.map(|s| s.counters).unwrap_or_default(),
                    unique_customers: Some(v.map_or(0, |s| s.customers.len() as i64)),
                });
            }
            for group in unions {
                let mut all: HashSet<&str> = HashSet::new();
                for &i in group {
                    if let Some(s) = hours.get(i).and_then(|&h| state.hours.get(&key(h))) {
                        all.extend(s.customers.iter().map(String::as_str));
                    }
                }
                reading.unions.push(all.len() as i64);
            }
            Ok(reading)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.lock().map(|_| ()) })
    }
}
