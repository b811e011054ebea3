//! The archiver as a Lambda function on the Kinesis stream (its own event source
//! mapping beside the speed layer's): records grouped by shard, each shard's
//! records archived in one commit per table, and a partial batch response
//! naming the first record of each shard that was not archived.

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use tally_common::bucket::now_micros;
use tally_common::source::{Position, SourceId};

use crate::Archiver;

/// One shard's records of an event, and the sequence number of its first record.
type ShardBatch<'a> = (SourceId, Vec<(Position, &'a [u8])>, String);

/// Archive one Kinesis event.
pub async fn handle_kinesis(archiver: &mut Archiver, event: KinesisEvent) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    let mut shards: Vec<ShardBatch<'_>> = Vec::new();
    for rec in &event.records {
        let source =
            SourceId::kinesis_from_lambda(rec.event_source_arn.as_deref(), rec.event_id.as_deref());
        let seq = &rec.kinesis.sequence_number;
        let Ok(position) = Position::parse(seq) else {
            response.add_failure(seq.clone());
            continue;
        };
        match shards.iter_mut().find(|(s, ..)| *s == source) {
            Some((_, v, _)) => v.push((position, &rec.kinesis.data.0)),
            None => shards.push((source, vec![(position, &rec.kinesis.data.0)], seq.clone())),
        }
    }
    let now = now_micros();
    for (source, records, first_seq) in shards {
        match archiver.archive(&source, &records, now).await {
            Ok(r) => tracing::info!(%source, accepted = r.accepted, quarantined = r.quarantined,
                already_archived = r.already_archived, "archived"),
            Err(e) => {
                tracing::error!(%source, error = %e, "archive failed; asking Lambda to redeliver");
                response.add_failure(first_seq);
            }
        }
    }
    response
}
