//! The master dataset as the stream's sink: records from a Lambda event (the
//! archiver function, with `tally_stream::kinesis_event::handle`) or the
//! Kinesis consumer (`tally archive consume`) go through the [`Archiver`]. Its
//! checkpoints are the source marks the archiver commits with the data, so it
//! keeps no state of its own.
//!
//! **Group commit.** The consumer reads every shard at once; batches that
//! arrive while a commit is under way wait in a queue, and whichever caller
//! gets the archiver next commits all of them in one commit per table
//! ([`Archiver::archive_group`], every shard's mark in it). Committing them one
//! by one, concurrent writers of one `raw_events` lose races to each other and
//! the log's commit rate binds (BENCHMARKS.md, "The stream side at scale").

use tally_common::source::{Position, Record, SourceId};
use tally_common::{Error, Result};
use tally_stream::{RecordSink, SinkOutcome};
use tokio::sync::{oneshot, Mutex};

use crate::{ArchiveReport, Archiver};

/// A batch waiting for the next group commit.
struct Pending {
    id: u64,
    source: SourceId,
    records: Vec<(Position, Vec<u8>)>,
    ingest_time: i64,
    reply: oneshot::Sender<Result<ArchiveReport>>,
}

/// `raw_events` and `quarantine` as a [`RecordSink`]; batches that meet are
/// committed together (see the module docs).
pub struct ArchiveSink {
    archiver: Mutex<Archiver>,
    queue: std::sync::Mutex<Vec<Pending>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl ArchiveSink {
    /// A sink writing with `archiver`.
    pub fn new(archiver: Archiver) -> Self {
        ArchiveSink {
            archiver: Mutex::new(archiver),
            queue: std::sync::Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Commit what waits in the queue, one source per group (a source queued
    /// twice goes in the next group), answering each waiter, until batch
    /// `mine` is answered (or the queue is empty: another caller did it).
    async fn commit_queued(&self, a: &mut Archiver, mine: u64) {
        loop {
            let mut group: Vec<Pending> = Vec::new();
            {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let mut i = 0;
                while i < q.len() {
                    if group.iter().any(|p| p.source == q[i].source) {
                        i += 1;
                    } else {
                        group.push(q.remove(i));
                    }
                }
            }
            if group.is_empty() {
                return;
            }
            let items: Vec<(SourceId, Vec<Record<'_>>, i64)> = group
                .iter()
                .map(|p| {
                    let records = p
                        .records
                        .iter()
                        .map(|(pos, d)| Record::new(pos.clone(), d))
                        .collect();
                    (p.source.clone(), records, p.ingest_time)
                })
                .collect();
            let result = a.archive_group(&items).await;
            drop(items);
            let done = group.iter().any(|p| p.id == mine);
            match result {
                Ok(reports) => {
                    for (p, r) in group.into_iter().zip(reports) {
                        let _ = p.reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for p in group {
                        let _ = p.reply.send(Err(Error::io(
                            format!("archiving {} (in a group commit)", p.source),
                            text.clone(),
                        )));
                    }
                }
            }
            if done {
                return;
            }
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
        let (reply, answer) = oneshot::channel();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                id,
                source: source.clone(),
                records: records
                    .iter()
                    .map(|r| (r.position.clone(), r.data.to_vec()))
                    .collect(),
                ingest_time,
                reply,
            });
        let mut answer = answer;
        // whoever holds the archiver next commits what is queued, this batch
        // included; a batch answered meanwhile (in another caller's group)
        // does not queue for the archiver at all
        let answered = tokio::select! {
            biased;
            r = &mut answer => Some(r),
            mut a = self.archiver.lock() => {
                self.commit_queued(&mut a, id).await;
                None
            }
        };
        let r = match answered {
            Some(r) => r,
            None => answer.await,
        }
        .map_err(|_| Error::internal("a group commit ended without an answer"))??;
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
