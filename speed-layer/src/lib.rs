//! tally's speed layer: Kinesis records to the speed view, seconds behind the
//! stream, with an exactly-once effect per shard.
//!
//! [`SpeedBatch`] decodes and aggregates a batch per (merchant, hour) with the
//! metric registry; a [`SpeedStore`] (Redis, or the embedded store) applies it
//! in one round trip, guarded by per-source marks. Readers see the stores
//! through [`SpeedView`](tally_common::speed_view::SpeedView), the read trait the
//! serving layer holds, which both stores implement. The stream reaches it
//! through [`SpeedSink`], the layer's `tally_stream::RecordSink` around
//! [`apply_records`]: the Lambda function is that sink with
//! `tally_stream::kinesis_event::handle`, `tally speed consume` the same sink
//! with `tally_stream::Consumer`.

pub mod aggregate;
pub mod embedded;
pub mod feed;
pub mod rebuild;
pub mod redis_conn;
pub mod redis_serving;
pub mod redis_store;
pub mod speed_entry;
pub mod speed_sink;
pub mod store;

pub use aggregate::{HourUpdate, SpeedBatch};
pub use embedded::EmbeddedStore;
pub use rebuild::{Rebuild, RebuildReport};
pub use redis_serving::RedisServingStore;
pub use redis_store::RedisStore;
pub use speed_sink::SpeedSink;
pub use store::{ApplyReport, SpeedStore, ViewState};

use tally_common::source::{Position, Record, SourceId};
use tally_common::Result;

/// The index in `batch` of update `i` of `sub` (same merchant and hour).
/// Errors: [`tally_common::Error::Internal`] when `sub` is not part of `batch`.
fn batch_index(batch: &SpeedBatch, sub: &SpeedBatch, i: usize) -> Result<usize> {
    let u = sub.updates.get(i);
    u.and_then(|u| {
        batch
            .updates
            .iter()
            .position(|b| b.merchant_id == u.merchant_id && b.hour == u.hour)
    })
    .ok_or_else(|| {
        tally_common::Error::internal(format!(
            "the store reported an overlap at update {i} of a re-sent batch of {}, which is not one of the batch's merchant-hours",
            batch.source
        ))
    })
}

/// What happened to one source's batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events accepted by the decoder.
    pub accepted: u64,
    /// Lines rejected by the decoder (counted and logged here; the archiver quarantines them).
    pub rejected: u64,
    /// What the store did.
    pub report: ApplyReport,
}

/// [`apply_records`] for a writer that is not a long-running process (`tally
/// ingest`): when the batch found no view (the store lost its data, or never
/// held any), fill what a rebuild can own from `lake`'s `raw_events` at once,
/// without waiting for the archiver (a running `tally serve` or `tally speed
/// consume` finishes it).
pub async fn apply_records_and_fill<'a>(
    store: &SpeedStore,
    lake: &tally_common::lake::Lake,
    settle: std::time::Duration,
    source: SourceId,
    records: impl IntoIterator<Item = Record<'a>>,
    ingest_time: i64,
) -> Result<BatchOutcome> {
    let outcome = apply_records(store, source, records, ingest_time).await?;
    if let (true, SpeedStore::Redis(redis)) = (outcome.report.view_created, store) {
        let r = Rebuild::new(lake, redis)
            .settle(settle)
            .wait(std::time::Duration::ZERO)
            .run()
            .await?;
        tracing::info!(
            complete = r.complete,
            events = r.events,
            "speed view rebuild"
        );
    }
    Ok(outcome)
}

/// Decode, aggregate and apply one source's records (in source order). Bad lines
/// never fail the batch; a store failure (after the store's bounded retries) does,
/// so the caller can have the records redelivered.
pub async fn apply_records<'a>(
    store: &SpeedStore,
    source: SourceId,
    records: impl IntoIterator<Item = Record<'a>>,
    ingest_time: i64,
) -> Result<BatchOutcome> {
    let records: Vec<Record<'a>> = records.into_iter().collect();
    let batch = SpeedBatch::build(source, records.iter().cloned(), ingest_time);
    for (pos, r) in batch.rejected.iter().take(5) {
        tracing::warn!(source = %batch.source, position = %pos, line = r.line, reason = %r.reason, "rejected line");
    }
    let mut report = store.apply(&batch).await?;
    if report.view_created {
        tracing::warn!(source = %batch.source,
            "the speed view was new (the store lost its data, or never held any): readers treat the hours before now as unknown until it is rebuilt from raw_events (tally speed rebuild; tally serve and tally speed consume do it by themselves)");
    }
    // A redelivery cut differently from an earlier, half-applied delivery: for each
    // merchant-hour whose mark falls inside its records, re-send only the records
    // beyond the mark. Rare (only after crashes), so a second round trip is fine.
    let mut overlaps = std::mem::take(&mut report.overlaps);
    let mut rounds = 0;
    while !overlaps.is_empty() && rounds < 8 {
        rounds += 1;
        let mut next = Vec::new();
        let mut by_mark: Vec<(Position, Vec<(String, i64)>)> = Vec::new();
        for (i, mark) in overlaps {
            let u = &batch.updates[i];
            let key = (u.merchant_id.clone(), u.hour);
            match by_mark.iter_mut().find(|(m, _)| *m == mark) {
                Some((_, keys)) => keys.push(key),
                None => by_mark.push((mark, vec![key])),
            }
        }
        for (mark, keys) in by_mark {
            let mut sub = SpeedBatch::build(
                batch.source.clone(),
                records.iter().filter(|r| r.position > mark).cloned(),
                ingest_time,
            );
            sub.updates.retain(|u| {
                keys.iter()
                    .any(|(m, h)| *m == u.merchant_id && *h == u.hour)
            });
            let r = store.apply(&sub).await?;
            report.applied += r.applied;
            report.skipped += r.skipped;
            report.view_created |= r.view_created;
            for (i, m) in r.overlaps {
                next.push((batch_index(&batch, &sub, i)?, m));
            }
        }
        overlaps = next;
    }
    if !overlaps.is_empty() {
        return Err(tally_common::Error::speed(format!(
            "{} merchant-hours of {} kept overlapping marks; not applied",
            overlaps.len(),
            batch.source
        )));
    }
    tracing::debug!(source = %batch.source, records = batch.records, accepted = batch.accepted,
        applied = report.applied, skipped = report.skipped, "speed batch applied");
    Ok(BatchOutcome {
        accepted: batch.accepted,
        rejected: batch.rejected.len() as u64,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::parse_ts;

    fn batch(lines: &[u8]) -> SpeedBatch {
        let now = parse_ts("2026-11-24T12:00:00Z").unwrap();
        SpeedBatch::build(
            SourceId::file("t"),
            [Record::new(Position::from_u64(1), lines)],
            now,
        )
    }

    #[test]
    fn an_overlap_maps_to_its_own_merchant_hour_or_is_an_error() {
        let whole = batch(br#"{"event_id":"1","merchant_id":"a","type":"order","ts":"2026-11-24T10:01:00Z","amount":5}
{"event_id":"2","merchant_id":"b","type":"order","ts":"2026-11-24T10:02:00Z","amount":7}"#);
        let sub = batch(br#"{"event_id":"2","merchant_id":"b","type":"order","ts":"2026-11-24T10:02:00Z","amount":7}"#);
        assert_eq!(batch_index(&whole, &sub, 0).unwrap(), 1);
        // never update 0 (another merchant's) for an overlap the batch does not hold
        let other = batch(br#"{"event_id":"3","merchant_id":"c","type":"order","ts":"2026-11-24T10:03:00Z","amount":1}"#);
        let e = batch_index(&whole, &other, 0).unwrap_err();
        assert!(matches!(e, tally_common::Error::Internal(_)), "{e}");
        assert!(batch_index(&whole, &sub, 5).is_err());
    }
}
