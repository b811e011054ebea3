//! The speed layer as a Lambda function on the Kinesis stream: the event's
//! records grouped by shard, applied with [`crate::apply_records`], and a
//! partial batch response naming the first record of each shard that was not
//! applied (Lambda redelivers from there; the marks skip what was applied).

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use tally_common::bucket::now_micros;
use tally_common::source::{Position, SourceId};

use crate::{apply_records, SpeedStore};

/// One shard's records of an event: position, sequence number text, data.
type ShardRecords<'a> = Vec<(Position, String, &'a [u8])>;

/// Handle one Kinesis event.
pub async fn handle(store: &SpeedStore, event: KinesisEvent) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    // group by shard, keeping each shard's record order
    let mut shards: Vec<(SourceId, ShardRecords<'_>)> = Vec::new();
    for rec in &event.records {
        let source =
            SourceId::kinesis_from_lambda(rec.event_source_arn.as_deref(), rec.event_id.as_deref());
        let seq = rec.kinesis.sequence_number.clone();
        let Ok(position) = Position::parse(&seq) else {
            tracing::error!(%seq, "record with a non-numeric sequence number; reporting it failed");
            response.add_failure(seq);
            continue;
        };
        match shards.iter_mut().find(|(s, _)| *s == source) {
            Some((_, v)) => v.push((position, seq, &rec.kinesis.data.0)),
            None => shards.push((source, vec![(position, seq, &rec.kinesis.data.0)])),
        }
    }
    let now = now_micros();
    for (source, records) in shards {
        let first_seq = records.first().map(|r| r.1.clone());
        let input = records.iter().map(|(p, _, d)| (p.clone(), *d));
        if let Err(e) = apply_records(store, source.clone(), input, now).await {
            tracing::error!(%source, error = %e, "speed batch not applied; asking Lambda to redeliver");
            if let Some(seq) = first_seq {
                response.add_failure(seq);
            }
        }
    }
    response
}
