//! A Lambda function on the Kinesis stream (an event source mapping with
//! partial batch responses): the event's records grouped by shard in shard
//! order, each shard's records applied to a [`RecordSink`], and a response
//! naming the first record of each shard that was not applied. Lambda
//! redelivers from there; the sink's marks skip what was applied. The speed and
//! archiver functions are this with their layer's sink.

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use tally_common::bucket::now_micros;
use tally_common::source::{Position, Record, SourceId};

use crate::RecordSink;

/// One shard's records of an event, and the sequence number of its first record.
struct ShardBatch<'a> {
    source: SourceId,
    records: Vec<Record<'a>>,
    first_seq: &'a str,
}

/// Apply one Kinesis event to `sink`, shard by shard; the response lists the
/// first sequence number of every shard whose records were not applied (and of
/// any record whose sequence number is not a number).
pub async fn handle<K: RecordSink>(sink: &K, event: &KinesisEvent) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    let mut shards: Vec<ShardBatch<'_>> = Vec::new();
    // KPL aggregated records become their user records' lines
    let payloads: Vec<_> = event
        .records
        .iter()
        .map(|r| crate::kpl::payload(&r.kinesis.data.0))
        .collect();
    for (rec, data) in event.records.iter().zip(&payloads) {
        let source =
            SourceId::kinesis_from_lambda(rec.event_source_arn.as_deref(), rec.event_id.as_deref());
        let seq = &rec.kinesis.sequence_number;
        let Ok(position) = Position::parse(seq) else {
            tracing::error!(%seq, "record with a non-numeric sequence number; reporting it failed");
            response.add_failure(seq.clone());
            continue;
        };
        let record = Record::new(position, data);
        match shards.iter_mut().find(|s| s.source == source) {
            Some(shard) => shard.records.push(record),
            None => shards.push(ShardBatch {
                source,
                records: vec![record],
                first_seq: seq,
            }),
        }
    }
    let now = now_micros();
    for shard in shards {
        let source = &shard.source;
        match sink.apply(source, &shard.records, now).await {
            Ok(o) => tracing::info!(%source, records = shard.records.len(), accepted = o.accepted,
                rejected = o.rejected, skipped = o.skipped, "batch applied"),
            Err(e) => {
                tracing::error!(%source, error = %e, "batch not applied; asking Lambda to redeliver");
                response.add_failure(shard.first_seq.to_string());
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tally_common::{Error, Result};

    use super::*;
    use crate::SinkOutcome;

    /// Each batch applied: its source and its records' positions and data.
    type Seen = Vec<(String, Vec<(String, Vec<u8>)>)>;

    /// Records what it was given; fails every batch of the shards it is told to.
    #[derive(Default)]
    struct Recorder {
        failing: Vec<&'static str>,
        seen: Mutex<Seen>,
    }

    impl RecordSink for Recorder {
        async fn apply<'a>(
            &'a self,
            source: &'a SourceId,
            records: &'a [Record<'a>],
            _ingest_time: i64,
        ) -> Result<SinkOutcome> {
            let got = records
                .iter()
                .map(|r| (r.position.to_string(), r.data.to_vec()))
                .collect();
            self.seen.lock().unwrap().push((source.to_string(), got));
            if self.failing.iter().any(|s| source.as_str().ends_with(s)) {
                return Err(Error::invalid("down"));
            }
            Ok(SinkOutcome::default())
        }
        async fn checkpoint(&self, _: &str, _: &str) -> Result<Option<String>> {
            Ok(None)
        }
        async fn set_checkpoint(&self, _: &str, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
    }

    /// An event of `(shard, sequence number, data)` records, shaped as Lambda sends it.
    fn event(records: &[(&str, &str, &str)]) -> KinesisEvent {
        use base64::Engine as _;
        let records: Vec<_> = records
            .iter()
            .map(|(shard, seq, data)| {
                serde_json::json!({
                    "eventSource": "aws:kinesis",
                    "eventID": format!("{shard}:{seq}"),
                    "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/events",
                    "eventName": "aws:kinesis:record",
                    "kinesis": {
                        "kinesisSchemaVersion": "1.0",
                        "partitionKey": "m",
                        "sequenceNumber": seq,
                        "data": base64::engine::general_purpose::STANDARD.encode(data),
                        "approximateArrivalTimestamp": 1.7e9,
                    },
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
    }

    #[tokio::test]
    async fn records_go_to_their_shard_in_order_and_failures_name_the_first() {
        let sink = Recorder {
            failing: vec!["shardId-1"],
            ..Default::default()
        };
        let e = event(&[
            ("shardId-0", "10", "a"),
            ("shardId-1", "20", "b"),
            ("shardId-0", "11", "c"),
            ("shardId-1", "21", "d"),
            ("shardId-0", "x12", "e"),
        ]);
        let resp = handle(&sink, &e).await;
        let failed: Vec<_> = resp
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone().unwrap())
            .collect();
        assert_eq!(failed, ["x12", "20"]);
        let seen = sink.seen.into_inner().unwrap();
        let rec = |p: &str, d: &str| (p.to_string(), d.as_bytes().to_vec());
        assert_eq!(
            seen,
            [
                (
                    "kinesis/events/shardId-0".to_string(),
                    vec![rec("10", "a"), rec("11", "c")]
                ),
                (
                    "kinesis/events/shardId-1".to_string(),
                    vec![rec("20", "b"), rec("21", "d")]
                ),
            ]
        );
    }
}
