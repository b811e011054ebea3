//! A long-running Kinesis consumer: `tally speed consume` (into the speed view)
//! and `tally archive consume` (into the master dataset) are this loop with
//! different [`RecordSink`]s ([`consume`] runs one until SIGTERM).
//!
//! It lists the stream's shards, reads each from its checkpoint with
//! GetRecords, applies every batch to the sink and then stores the checkpoint. A
//! crash between the two redelivers the batch on restart and the sink's marks
//! skip it. After a reshard, a child shard is read only once its parents are
//! finished. A failing sink (Redis restarting, S3 unreachable) or a failing
//! GetRecords is retried with capped backoff, the batch held, until it succeeds
//! or shutdown. On shutdown it finishes the batch in hand and stores its
//! checkpoint before returning.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_kinesis::types::{Shard, ShardIteratorType};
use aws_sdk_kinesis::Client;
use tally_common::bucket::now_micros;
use tally_common::shutdown::{self, Shutdown};
use tally_common::source::{Position, Record, SourceId};
use tally_common::{Error, Result};

use crate::{kinesis_client, RecordSink};

const SHARD_END: &str = "SHARD_END";
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The most records one GetRecords call returns (Kinesis' limit), and the
/// default [`ConsumeOptions::limit`].
pub const MAX_GET_RECORDS: i32 = 10_000;

/// Options of a consumer run.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Records per GetRecords call (at most [`MAX_GET_RECORDS`]).
    pub limit: i32,
    /// Pause when a whole round over the shards found nothing.
    pub idle_pause: Duration,
    /// Return once every readable shard is caught up (for tests, demos and backfills).
    pub until_caught_up: bool,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            limit: MAX_GET_RECORDS,
            // Kinesis allows 5 GetRecords per second per shard across all its
            // consumers; the speed and archive consumers each polling an idle
            // shard 2.5 times a second stay within it
            idle_pause: Duration::from_millis(400),
            until_caught_up: false,
        }
    }
}

/// Totals of a consumer run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeStats {
    /// Records read.
    pub records: u64,
    /// Events accepted.
    pub accepted: u64,
    /// Lines rejected.
    pub rejected: u64,
    /// Units skipped as already applied (see [`crate::SinkOutcome::skipped`]).
    pub skipped: u64,
    /// Failed attempts retried (sink or GetRecords).
    pub retries: u64,
}

struct ShardState {
    shard: Shard,
    iterator: Option<String>,
    finished: bool,
    caught_up: bool,
}

fn aws_err<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> Error {
    Error::aws_from(what, e)
}

/// A Kinesis consumer applying a stream to a [`RecordSink`].
pub struct Consumer<K> {
    client: Client,
    stream: String,
    sink: K,
    options: ConsumeOptions,
}

impl<K: RecordSink> Consumer<K> {
    /// A consumer of `stream` into `sink`.
    pub fn new(
        client: Client,
        stream: impl Into<String>,
        sink: K,
        options: ConsumeOptions,
    ) -> Self {
        Consumer {
            client,
            stream: stream.into(),
            sink,
            options,
        }
    }

    /// Whether `checkpoint` covers the whole of a closed shard.
    fn is_finished(shard: &Shard, checkpoint: Option<&str>) -> bool {
        let Some(cp) = checkpoint else {
            return false;
        };
        if cp == SHARD_END {
            return true;
        }
        let end = shard
            .sequence_number_range
            .as_ref()
            .and_then(|r| r.ending_sequence_number.as_deref());
        match (end.map(Position::parse), Position::parse(cp)) {
            (Some(Ok(end)), Ok(cp)) => cp >= end,
            _ => false,
        }
    }

    /// Run `f` until it succeeds, backing off (capped) between attempts; give up
    /// only at shutdown.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        shutdown: &Shutdown,
        stats: &mut ConsumeStats,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if shutdown.is_fired() => return Err(e),
                Err(e) => {
                    stats.retries += 1;
                    tracing::warn!(error = %e, ?backoff, "{what} failed; retrying");
                    let mut sd = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = sd.wait() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn list_shards(&self) -> Result<Vec<Shard>> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let req = match &next {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(&self.stream),
            };
            let out = req
                .send()
                .await
                .map_err(|e| aws_err(&format!("listing shards of {}", self.stream), e))?;
            shards.extend(out.shards.unwrap_or_default());
            next = out.next_token;
            if next.is_none() {
                return Ok(shards);
            }
        }
    }

    async fn iterator_for(&self, shard: &str, checkpoint: Option<&str>) -> Result<String> {
        let req = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(shard);
        let req = match checkpoint {
            Some(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = req
            .send()
            .await
            .map_err(|e| aws_err(&format!("shard iterator for {shard}"), e))?;
        out.shard_iterator
            .ok_or_else(|| Error::aws(format!("no shard iterator for {shard}")))
    }

    /// Consume until shutdown (or until caught up, when asked).
    pub async fn run(&self, shutdown: Shutdown) -> Result<ConsumeStats> {
        let mut stats = ConsumeStats::default();
        let mut states: HashMap<String, ShardState> = HashMap::new();
        let mut backoff = Duration::from_millis(200);
        let mut rounds = 0u64;
        loop {
            if shutdown.is_fired() {
                return Ok(stats);
            }
            if rounds.is_multiple_of(20) {
                let shards = self
                    .retrying("listing shards", &shutdown, &mut stats, || {
                        self.list_shards()
                    })
                    .await?;
                for shard in shards {
                    let id = shard.shard_id.clone();
                    if states.contains_key(&id) {
                        continue;
                    }
                    let cp = self
                        .retrying("reading a checkpoint", &shutdown, &mut stats, || {
                            self.sink.checkpoint(&self.stream, &id)
                        })
                        .await?;
                    states.insert(
                        id,
                        ShardState {
                            finished: Self::is_finished(&shard, cp.as_deref()),
                            shard,
                            iterator: None,
                            caught_up: false,
                        },
                    );
                }
            }
            rounds += 1;
            let mut got_any = false;
            let mut ids: Vec<String> = states.keys().cloned().collect();
            ids.sort();
            for id in ids {
                if shutdown.is_fired() {
                    return Ok(stats);
                }
                if !self.readable(&states, &id) {
                    continue;
                }
                match self
                    .poll_shard(&mut states, &id, &mut stats, &shutdown)
                    .await
                {
                    Ok(n) => {
                        got_any |= n > 0;
                        backoff = Duration::from_millis(200);
                    }
                    Err(PollError::Throttled) => {
                        tracing::debug!(shard = %id, ?backoff, "throughput exceeded; backing off");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(PollError::Transient(e)) => {
                        stats.retries += 1;
                        tracing::warn!(shard = %id, error = %e, ?backoff, "GetRecords failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(PollError::Fatal(e)) => return Err(e),
                }
            }
            let all_caught_up = states
                .iter()
                .all(|(id, s)| s.finished || s.caught_up || !self.readable(&states, id));
            if self.options.until_caught_up && all_caught_up && !got_any {
                return Ok(stats);
            }
            if !got_any {
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(self.options.idle_pause) => {}
                    _ = sd.wait() => {}
                }
            }
        }
    }

    /// A shard is readable when unfinished and its parents (if still listed) are finished.
    fn readable(&self, states: &HashMap<String, ShardState>, id: &str) -> bool {
        let Some(s) = states.get(id) else {
            return false;
        };
        if s.finished {
            return false;
        }
        [&s.shard.parent_shard_id, &s.shard.adjacent_parent_shard_id]
            .into_iter()
            .flatten()
            .all(|p| states.get(p).is_none_or(|ps| ps.finished))
    }

    async fn poll_shard(
        &self,
        states: &mut HashMap<String, ShardState>,
        id: &str,
        stats: &mut ConsumeStats,
        shutdown: &Shutdown,
    ) -> std::result::Result<usize, PollError> {
        let iterator = match states.get(id).and_then(|s| s.iterator.clone()) {
            Some(it) => it,
            None => {
                let cp = self
                    .retrying("reading a checkpoint", shutdown, stats, || {
                        self.sink.checkpoint(&self.stream, id)
                    })
                    .await?;
                self.iterator_for(id, cp.as_deref())
                    .await
                    .map_err(PollError::Transient)?
            }
        };
        let out = match self
            .client
            .get_records()
            .shard_iterator(&iterator)
            .limit(self.options.limit)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let svc = e.as_service_error();
                if svc.is_some_and(|s| {
                    s.is_provisioned_throughput_exceeded_exception()
                        || s.is_kms_throttling_exception()
                }) {
                    return Err(PollError::Throttled);
                }
                if svc.is_some_and(|s| s.is_expired_iterator_exception()) {
                    if let Some(s) = states.get_mut(id) {
                        s.iterator = None;
                    }
                    return Ok(0);
                }
                let fatal = svc.is_some_and(|s| {
                    s.is_resource_not_found_exception() || s.is_access_denied_exception()
                });
                let err = aws_err(&format!("GetRecords on {id}"), e);
                // an unreachable endpoint or a 5xx: keep the iterator and try again
                return Err(if fatal {
                    PollError::Fatal(err)
                } else {
                    PollError::Transient(err)
                });
            }
        };
        let records = out.records;
        let n = records.len();
        if n > 0 {
            let source = SourceId::kinesis(&self.stream, id);
            // KPL aggregated records become their user records' lines
            let payloads: Vec<_> = records
                .iter()
                .map(|r| crate::kpl::payload(r.data.as_ref()))
                .collect();
            let mut input = Vec::with_capacity(n);
            for (r, data) in records.iter().zip(&payloads) {
                let pos = Position::parse(&r.sequence_number)?;
                input.push(Record::new(pos, data));
            }
            let now = now_micros();
            let outcome = self
                .retrying("applying a batch", shutdown, stats, || {
                    self.sink.apply(&source, &input, now)
                })
                .await?;
            stats.records += n as u64;
            stats.accepted += outcome.accepted;
            stats.rejected += outcome.rejected;
            stats.skipped += outcome.skipped;
            if let Some(last) = records.last() {
                self.retrying("storing a checkpoint", shutdown, stats, || {
                    self.sink
                        .set_checkpoint(&self.stream, id, &last.sequence_number)
                })
                .await?;
            }
        }
        let state = states.get_mut(id).ok_or_else(|| {
            Error::internal(format!("polled shard {id} is not one of the consumer's"))
        })?;
        state.caught_up = n == 0 && out.millis_behind_latest.unwrap_or(0) == 0;
        match out.next_shard_iterator {
            Some(next) => state.iterator = Some(next),
            None => {
                // the shard was closed by a reshard and is fully read: children may start
                self.retrying("storing a checkpoint", shutdown, stats, || {
                    self.sink.set_checkpoint(&self.stream, id, SHARD_END)
                })
                .await?;
                state.finished = true;
                state.iterator = None;
                tracing::info!(shard = %id, "shard finished");
            }
        }
        Ok(n)
    }
}

enum PollError {
    Throttled,
    Transient(Error),
    Fatal(Error),
}

impl From<Error> for PollError {
    fn from(e: Error) -> Self {
        PollError::Fatal(e)
    }
}

/// Consume `stream` into `sink` with a client from the environment's AWS
/// configuration ([`kinesis_client`]) until SIGTERM or Ctrl-C (or until caught
/// up, when `options` ask); the batch in hand is finished and checkpointed first.
pub async fn consume<K: RecordSink>(
    stream: &str,
    sink: K,
    options: ConsumeOptions,
) -> Result<ConsumeStats> {
    let client = kinesis_client().await;
    let (trigger, signal) = shutdown::channel();
    trigger.fire_on_signals();
    Consumer::new(client, stream, sink, options)
        .run(signal)
        .await
}
