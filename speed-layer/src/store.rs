//! The speed store: where the current hours' counters live. Two implementations
//! behind one trait, held to one conformance suite: Redis ([`crate::RedisStore`])
//! and the in-process embedded store ([`crate::EmbeddedStore`]).

use std::future::Future;

use tally_common::source::Position;
use tally_common::Result;

use crate::aggregate::SpeedBatch;

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Merchant-hour updates applied now.
    pub applied: usize,
    /// Updates skipped because the store's mark shows they were applied before.
    pub skipped: usize,
    /// Updates not applied because the store's mark falls inside their records
    /// (index into the batch's updates, and the mark): only the records beyond the
    /// mark may be applied. Happens only when a redelivery is cut differently from
    /// the delivery that half-applied; [`crate::apply_records`] resolves it.
    pub overlaps: Vec<(usize, Position)>,
    /// The store held no view before this batch: it lost its data (or never held
    /// any), so the hours before now are not whole until a rebuild
    /// ([`crate::rebuild`]) fills them from `raw_events`.
    pub view_created: bool,
}

/// Whether a speed store with keys living `ttl_micros` after their last write
/// still holds every event of the hour starting at `hour` at `now` (all epoch
/// µs). An hour's keys are last written no earlier than
/// [`MAX_FUTURE_MICROS`](tally_common::decode::MAX_FUTURE_MICROS) before it starts;
/// past that plus the TTL they may have expired, e.g. while the batch layer was
/// stalled and the watermark stayed behind.
pub fn hour_alive(hour: i64, now: i64, ttl_micros: i64) -> bool {
    now < hour
        .saturating_sub(tally_common::decode::MAX_FUTURE_MICROS)
        .saturating_add(ttl_micros)
}

/// The state of a Redis speed view (the view key, see [`crate::redis_store`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewState {
    /// Names this life of the view: a new one after every loss.
    pub generation: String,
    /// From when (epoch µs) every event written is in the view.
    pub covered_from: i64,
    /// Whether the hours before `covered_from` were rebuilt from `raw_events`.
    pub rebuilt: bool,
    /// Per source: the position up to which the rebuild, not the consumers, owns
    /// its records ('' when the consumers own them all).
    pub after: Vec<(String, String)>,
}

impl ViewState {
    /// From the view key's fields; None when it has none (no view).
    pub fn from_fields(fields: Vec<(String, String)>) -> Option<Self> {
        let mut v = ViewState::default();
        let mut any = false;
        for (k, val) in fields {
            any = true;
            match k.as_str() {
                "generation" => v.generation = val,
                "covered_from" => v.covered_from = val.parse().unwrap_or(i64::MAX),
                "rebuilt" => v.rebuilt = val == "1",
                _ => {
                    if let Some(src) = k.strip_prefix("after:") {
                        v.after.push((src.to_string(), val));
                    }
                }
            }
        }
        (any && !v.generation.is_empty()).then_some(v)
    }
}

pub use tally_common::metrics::SpeedReading;

/// A speed store. Every update carries its source's position; a store applies an
/// update only when it is beyond the mark it holds for that (merchant, hour,
/// source), and advances the mark in the same atomic step.
pub trait SpeedStore: Send + Sync {
    /// Apply a batch's updates (all of them, atomically per merchant-hour).
    fn apply(&self, batch: &SpeedBatch) -> impl Future<Output = Result<ApplyReport>> + Send;

    /// Read `hours` of `merchant`, plus the union estimate of each group of indices
    /// into `hours` (for day buckets).
    fn read(
        &self,
        merchant: &str,
        hours: &[i64],
        unions: &[Vec<usize>],
    ) -> impl Future<Output = Result<SpeedReading>> + Send;

    /// The stored checkpoint of a consumer (e.g. a shard's last sequence number).
    fn checkpoint(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Store a consumer's checkpoint.
    fn set_checkpoint(&self, key: &str, value: &str) -> impl Future<Output = Result<()>> + Send;

    /// Whether the store answers.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
}
