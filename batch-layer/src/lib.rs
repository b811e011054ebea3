//! tally's master dataset and batch layer: the archiver writing raw facts to
//! Delta Lake idempotently, compaction, and the hourly DataFusion job with its
//! watermark and reprocessing over history.
//!
//! The batch run ([`job`]) and the modules of its steps: the hours to compute,
//! from the Delta log ([`dirty`]); rows it cannot compute, moved to quarantine
//! ([`quarantine`]); the metric SQL ([`sql`]); the metric tables' reads and
//! writes ([`publish`], files laid out by [`layout`]); complete days' rows and
//! their mark ([`daily`]); a dry run's comparison ([`dry_run`]); compaction and
//! vacuum ([`compact`]); the lease that keeps runs apart ([`lock`]). The batch
//! Lambda's body, a run requested by an event, is [`run_request`].

pub mod archive;
pub mod compact;
pub mod daily;
pub mod dirty;
pub mod dry_run;
pub mod job;
pub mod lambda;
pub mod layout;
pub mod lock;
/// Source marks in a Delta log (defined in `tally_common::marks`, also read by the speed view's rebuild).
pub use tally_common::marks;
pub mod publish;
pub mod quarantine;
pub mod run_request;
pub mod sql;

pub use archive::{ArchiveReport, Archiver};
pub use dry_run::DryRunDiff;
pub use job::{BatchRun, RunReport, LOGIC_VERSION};
