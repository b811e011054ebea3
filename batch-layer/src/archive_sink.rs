//! The master dataset as the stream's sink: records from a Lambda event (the
//! archiver function, with `tally_stream::kinesis_event::handle`) or the
//! Kinesis consumer (`tally archive consume`) go through the [`Archiver`]. Its
//! checkpoints are the source marks the archiver commits with the data, so it
//! keeps no state of its own.

use tally_common::source::{Record, SourceId};
use tally_common::Result;
use tally_stream::{RecordSink, SinkOutcome};
use tokio::sync::Mutex;

use crate::Archiver;

/// `raw_events` and `quarantine` as a [`RecordSink`]; one batch at a time.
pub struct ArchiveSink {
    archiver: Mutex<Archiver>,
}

impl ArchiveSink {
    /// A sink writing with `archiver`.
    pub fn new(archiver: Archiver) -> Self {
        ArchiveSink {
            archiver: Mutex::new(archiver),
        }
    }
}

impl RecordSink for ArchiveSink {
    async fn apply<'a>(
        &'a self,
        source: &'a SourceId,
        records: &'a [Record<'a>],
        ingest_time: i64,
    ) -> Result<SinkOutcome> {
        let mut a = self.archiver.lock().await;
        let r = a.archive(source, records, ingest_time).await?;
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
