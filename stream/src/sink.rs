//! Where records go: the one trait each layer implements to take a shard's
//! records, from the consumer or from a Lambda event alike.

use std::future::Future;

use tally_common::source::{Record, SourceId};
use tally_common::Result;

/// What applying one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkOutcome {
    /// Events accepted.
    pub accepted: u64,
    /// Lines rejected (kept with their reason by the sink).
    pub rejected: u64,
    /// Units skipped as already applied (merchant-hours, records).
    pub skipped: u64,
}

/// Where a shard's records are put. `apply` must be idempotent per source and
/// position (a redelivered batch changes nothing), since a crash between
/// `apply` and `set_checkpoint` (or a Lambda retry) redelivers it.
pub trait RecordSink: Send + Sync {
    /// Apply one source's records, in source order, received at `ingest_time`
    /// (epoch µs). An error leaves the batch to be redelivered.
    fn apply<'a>(
        &'a self,
        source: &'a SourceId,
        records: &'a [Record<'a>],
        ingest_time: i64,
    ) -> impl Future<Output = Result<SinkOutcome>> + Send + 'a;
    /// The last sequence number of `shard` known applied (or `SHARD_END`).
    fn checkpoint(
        &self,
        stream: &str,
        shard: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Record that `shard` is applied up to `value` (a sequence number or `SHARD_END`).
    fn set_checkpoint(
        &self,
        stream: &str,
        shard: &str,
        value: &str,
    ) -> impl Future<Output = Result<()>> + Send;
}
