//! tally's master dataset and batch layer: the archiver writing raw facts to
//! Delta Lake idempotently, compaction, and the hourly DataFusion job with its
//! watermark and reprocessing over history.

pub mod archive;
pub mod lambda;
pub mod marks;

pub use archive::{ArchiveReport, Archiver};
