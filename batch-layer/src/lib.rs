//! tally's master dataset and batch layer: the archiver writing raw facts to
//! Delta Lake idempotently, compaction, and the hourly DataFusion job with its
//! watermark and reprocessing over history.
//!
//! The batch run ([`job`]): a plan ([`plan`]) of items computed under the
//! memory bound ([`items`], [`memory`], [`parts`], the SQL in [`sql`]) whose
//! results wait in a staging area ([`stage`]) for one commit per table
//! ([`publish`], files laid out by [`layout`]). Its helpers: the hours to
//! compute, from the Delta log ([`dirty`]); rows it cannot compute, moved to
//! quarantine ([`quarantine`]); complete days' rows and their mark ([`daily`]);
//! a dry run's comparison ([`dry_run`]); compaction and vacuum ([`compact`]);
//! the lease that keeps runs apart ([`lease`]); undoing a run ([`rollback`]).
//! The batch Lambda's body, a run or a step requested by an event, is
//! [`run_request`].
//!
//! The stream reaches the archiver through [`ArchiveSink`], the layer's
//! `tally_stream::RecordSink`: the archiver Lambda function is that sink with
//! `tally_stream::kinesis_event::handle`, `tally archive consume` the same sink
//! with `tally_stream::Consumer`.

pub mod archive;
pub mod archive_sink;
pub mod compact;
pub mod daily;
pub mod dirty;
pub mod dry_run;
pub mod items;
pub mod job;
pub mod layout;
pub mod lease;
pub mod memory;
pub mod parts;
pub mod plan;
/// Source marks in a Delta log (defined in `tally_common::marks`, also read by the speed view's rebuild).
pub use tally_common::marks;
pub mod publish;
pub mod quarantine;
pub mod rollback;
pub mod run_request;
pub mod sql;
pub mod stage;

pub use archive::{ArchiveReport, Archiver};
pub use archive_sink::ArchiveSink;
pub use dry_run::DryRunDiff;
pub use job::{BatchRun, RunReport, LOGIC_VERSION};
