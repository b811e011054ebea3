//! The embedded speed store: in process, for runs with no Redis configured.
//! The same grain (15-minute slots), sketches, marks and TTL as Redis.

use std::collections::HashMap;
use std::sync::Mutex;

use tally_common::bucket::{now_micros, MICROS_PER_SECOND};
use tally_common::metrics::{BucketRow, Counters, MetricValues};
use tally_common::sketch::CustomerUnion;
use tally_common::source::{Position, SourceId};
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::{Error, Result};

use crate::aggregate::SpeedBatch;
use crate::store::ApplyReport;

#[derive(Debug, Default)]
struct HourState {
    quarters: [Counters; 4],
    customers: [CustomerUnion; 4],
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
                for q in 0..4 {
                    h.quarters[q].merge(&u.quarters[q]);
                    for c in &u.customers[q] {
                        h.customers[q].update(c);
                    }
                }
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
            let mut per_hour: Vec<CustomerUnion> = Vec::with_capacity(hours.len());
            for (i, &h) in hours.iter().enumerate() {
                if !crate::store::hour_alive(h, now, self.ttl_micros) {
                    reading.not_covered.push(i);
                }
                let v = state.hours.get(&key(h));
                let mut counters = Counters::default();
                let mut union = CustomerUnion::new();
                let mut quarters: [BucketRow; 4] = Default::default();
                if let Some(v) = v {
                    for (q, row) in quarters.iter_mut().enumerate() {
                        counters.merge(&v.quarters[q]);
                        union.merge(&v.customers[q]);
                        let e = v.customers[q].estimate();
                        *row = BucketRow {
                            values: MetricValues {
                                counters: v.quarters[q],
                                unique_customers: Some(e.estimate),
                            },
                            sketch: (!v.customers[q].is_empty())
                                .then(|| v.customers[q].to_bytes().into()),
                        };
                    }
                }
                reading.hours.push(MetricValues {
                    counters,
                    unique_customers: Some(union.estimate().estimate),
                });
                reading.quarters.push(quarters);
                per_hour.push(union);
            }
            for group in unions {
                let mut all = CustomerUnion::new();
                for &i in group {
                    if let Some(u) = per_hour.get(i) {
                        all.merge(u);
                    }
                }
                reading.unions.push(all.estimate().estimate);
            }
            Ok(reading)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.lock().map(|_| ()) })
    }
}
