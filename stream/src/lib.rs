//! tally's stream plumbing: how records reach the layers, in one place.
//!
//! A record is a [`Record`] (a position in its source and the bytes, NDJSON
//! lines). A layer that takes records implements [`RecordSink`] (the speed
//! layer's `SpeedSink`, the batch layer's `ArchiveSink`); everything else here
//! is shared by both:
//!
//! - [`consumer`]: the long-running Kinesis consumer (`tally speed consume`,
//!   `tally archive consume`), checkpointing per shard through its sink;
//! - [`kinesis_event`]: the Lambda side, a Kinesis event grouped by shard into
//!   a sink and answered with a partial batch response;
//! - [`producer`]: NDJSON lines onto a stream with PutRecords (`tally ingest
//!   --kinesis`, `tally gen --kinesis`);
//! - [`lines`]: lines of a file or a generator as records whose positions are
//!   line numbers (`tally ingest`, `tally demo`);
//! - [`kinesis_client`]: the one place a Kinesis client is built.
//!
//! De-aggregation of KPL aggregated records (one Kinesis record holding many
//! user records) belongs here too, between the Kinesis record and the
//! [`Record`]s handed to a sink, so that both layers and both ways of reading
//! the stream see the same records.

pub mod consumer;
pub mod kinesis_event;
pub mod kpl;
pub mod lines;
pub mod producer;
mod sink;

pub use consumer::{consume, ConsumeOptions, ConsumeStats, Consumer};
pub use lines::LineBatch;
pub use producer::{KinesisProducer, Salting};
pub use sink::{RecordSink, SinkOutcome};
pub use tally_common::source::Record;

/// A Kinesis client from the environment's AWS configuration (region,
/// credentials, and `AWS_ENDPOINT_URL` for an emulator).
pub async fn kinesis_client() -> aws_sdk_kinesis::Client {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    aws_sdk_kinesis::Client::new(&config)
}
