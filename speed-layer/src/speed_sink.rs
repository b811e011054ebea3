//! The speed view as the stream's sink: records from the Kinesis consumer
//! (`tally speed consume`) or a Lambda event (the speed function, with
//! `tally_stream::kinesis_event::handle`) go through [`crate::apply_records`].
//! The consumer's checkpoints live in the speed store beside the view.

use tally_common::source::{Record, SourceId};
use tally_common::Result;
use tally_stream::{RecordSink, SinkOutcome};

use crate::{apply_records, SpeedStore};

/// A speed store as a [`RecordSink`]; checkpoints live in the store under
/// `{stream}/{shard}`.
pub struct SpeedSink(pub SpeedStore);

impl RecordSink for SpeedSink {
    async fn apply<'a>(
        &'a self,
        source: &'a SourceId,
        records: &'a [Record<'a>],
        ingest_time: i64,
    ) -> Result<SinkOutcome> {
        let o = apply_records(
            &self.0,
            source.clone(),
            records.iter().cloned(),
            ingest_time,
        )
        .await?;
        Ok(SinkOutcome {
            accepted: o.accepted,
            rejected: o.rejected,
            skipped: o.report.skipped as u64,
        })
    }

    async fn checkpoint(&self, stream: &str, shard: &str) -> Result<Option<String>> {
        self.0.checkpoint(&format!("{stream}/{shard}")).await
    }

    async fn set_checkpoint(&self, stream: &str, shard: &str, value: &str) -> Result<()> {
        self.0
            .set_checkpoint(&format!("{stream}/{shard}"), value)
            .await
    }
}
