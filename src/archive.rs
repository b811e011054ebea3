//! `tally archive consume`: the archiver as a long-running Kinesis consumer, the
//! same loop as `tally speed consume` with the master dataset as its sink. Its
//! checkpoints are the source marks the archiver commits with the data, so it
//! keeps no state of its own.

use tally_batch_layer::Archiver;
use tally_common::source::{Position, SourceId};
use tally_common::Result;
use tally_speed_layer::consumer::{RecordSink, SinkOutcome};
use tokio::sync::Mutex;

/// `raw_events` and `quarantine` as a [`RecordSink`].
pub struct ArchiveSink {
    archiver: Mutex<Archiver>,
}

impl ArchiveSink {
    pub fn new(archiver: Archiver) -> Self {
        ArchiveSink {
            archiver: Mutex::new(archiver),
        }
    }
}

impl RecordSink for ArchiveSink {
    async fn apply<'a>(
        &'a self,
        source: SourceId,
        records: Vec<(Position, &'a [u8])>,
        ingest_time: i64,
    ) -> Result<SinkOutcome> {
        let mut a = self.archiver.lock().await;
        let r = a.archive(&source, &records, ingest_time).await?;
        Ok(SinkOutcome {
            accepted: r.accepted,
            rejected: r.quarantined,
            skipped: r.already_archived,
        })
    }

    async fn checkpoint(&self, stream: &str, shard: &str) -> Result<Option<String>> {
        let mut a = self.archiver.lock().await;
        let mark = a.archived_up_to(&SourceId::kinesis(stream, shard)).await?;
        Ok(mark.map(|p| p.as_str().to_string()))
    }

    async fn set_checkpoint(&self, _stream: &str, _shard: &str, _value: &str) -> Result<()> {
        // committed with the data: nothing more to store
        Ok(())
    }
}
