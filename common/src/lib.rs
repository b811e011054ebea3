//! tally's shared model: the event format and its decoder, the metric registry
//! and the metric tables' row shape, UTC buckets and merchants' calendars,
//! sources and positions, the speed view's read trait, configuration, the lake
//! handle (with its Delta log reader), analysts' read-only SQL and the error
//! type. Knows nothing of Redis, HTTP or how the layers write.
//!
//! Without the default `lake` feature only the pure parts build (decoder, metric
//! registry, buckets, sources, request parsing): what the fuzz targets need,
//! without compiling delta-rs and DataFusion with instrumentation.

#[cfg(feature = "lake")]
pub mod analyst;
pub mod bucket;
pub mod calendar;
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
pub mod merchants;
#[cfg(feature = "lake")]
pub mod metric_table;
pub mod metrics;
pub mod query;
#[cfg(feature = "lake")]
pub mod serving_store;
#[cfg(feature = "lake")]
pub mod shutdown;
pub mod sketch;
#[cfg(feature = "lake")]
pub mod sketch_sql;
pub mod source;
pub mod speed_view;
#[cfg(feature = "lake")]
pub mod watermark;

pub use error::{Context, Error, Result};
pub use event::{Event, EventType};

/// Re-exports of delta-rs and its DataFusion/Arrow so every crate builds one copy.
#[cfg(feature = "lake")]
pub use deltalake;

/// This crate's directory when its tests run: `CARGO_MANIFEST_DIR` as cargo sets
/// it at run time (a shared target directory may hold tests compiled in another
/// checkout), else as it was at compile time.
#[cfg(test)]
fn test_crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
