//! tally's master dataset and batch layer: the archiver writing raw facts to
//! Delta Lake idempotently, compaction, and the hourly DataFusion job with its
//! watermark and reprocessing over history.

pub mod archive;
pub mod compact;
pub mod daily;
pub mod dirty;
pub mod job;
pub mod lambda;
pub mod layout;
pub mod lock;
/// Source marks in a Delta log (defined in `tally_common::marks`, also read by the speed view's rebuild).
pub use tally_common::marks;
pub mod publish;
pub mod quarantine;
pub mod sql;

pub use archive::{ArchiveReport, Archiver};
pub use job::{BatchRun, RunReport, LOGIC_VERSION};
