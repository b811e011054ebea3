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
