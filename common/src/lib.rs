//! tally's shared model: the event format and its decoder, the metric registry
//! and the metric tables' row shape, UTC buckets, sources and positions,
//! configuration, the lake handle (with its Delta log reader) and the error
//! type. Knows nothing of Redis, HTTP or how the layers write.

//!
//! Without the default `lake` feature only the pure parts build (decoder, metric
//! registry, buckets, sources, request parsing): what the fuzz targets need,
//! without compiling delta-rs and DataFusion with instrumentation.

pub mod bucket;
#[cfg(feature = "lake")]
pub mod config;
pub mod decode;
pub mod error;
pub mod event;
#[cfg(feature = "lake")]
pub mod lake;
#[cfg(feature = "lake")]
pub mod marks;
#[cfg(feature = "lake")]
pub mod metric_table;
pub mod metrics;
pub mod query;
#[cfg(feature = "lake")]
pub mod shutdown;
pub mod source;
#[cfg(feature = "lake")]
pub mod watermark;

pub use error::{Context, Error, Result};
pub use event::{Event, EventType};

/// Re-exports of delta-rs and its DataFusion/Arrow so every crate builds one copy.
#[cfg(feature = "lake")]
pub use deltalake;
