//! tally's shared model: the event format and its decoder, the metric registry,
//! UTC buckets, sources and positions, configuration, the lake handle and the
//! error type. Knows nothing of Redis, HTTP or how the layers write.

pub mod bucket;
pub mod config;
pub mod decode;
pub mod error;
pub mod event;
pub mod lake;
pub mod metrics;
pub mod shutdown;
pub mod source;
pub mod watermark;

pub use error::{Context, Error, Result};
pub use event::{Event, EventType};

/// Re-exports of delta-rs and its DataFusion/Arrow so every crate builds one copy.
pub use deltalake;
