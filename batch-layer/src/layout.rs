//! How the metric tables are laid out on storage, for the serving layer's point
//! lookups of one merchant (figures in BENCHMARKS.md, "Serving layer").
//!
//! A run adds a file per partition it publishes (only the hours it changed are
//! rewritten); when a day closes, its `metrics_hourly` date is compacted into
//! one file sorted by merchant and time ([`crate::publish`]), so a lookup of a
//! closed day opens one file and reads a page or two of it.

use deltalake::parquet::basic::{Compression, Encoding};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use tally_common::metric_table::{MERCHANT_COLUMN, SKETCH_COLUMN};

/// Writer properties of `metrics_hourly` and `metrics_daily`:
/// - pages of 1,024 rows: a merchant's day is 24 sorted rows, so a lookup
///   decodes a page or two per column instead of 20,000-row pages (the page
///   index, column and offset index, is written by default);
/// - no dictionaries: a dictionary page is read whole before any page of its
///   column chunk;
/// - `DELTA_BINARY_PACKED` integers and timestamps, `DELTA_BYTE_ARRAY` merchant
///   ids (sorted, so mostly shared prefixes): small pages before any codec;
/// - `LZ4_RAW` rather than zstd: the reader makes a decompressor per column chunk
///   it opens, and a zstd context runs `cpuid`, which traps to the hypervisor in a
///   VM (Firecracker, so Lambda too); creating them cost more than decoding.
///   Files are the same size as zstd over plain pages.
///
/// Every stored column but `merchant_id` and `customers_sketch` is an integer
/// or a timestamp (the partition columns `date` and `month` live in the Delta
/// log, not in the files); the sketches are `DELTA_LENGTH_BYTE_ARRAY` (their
/// bytes back to back, lengths delta-packed).
pub fn metric_writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_data_page_row_count_limit(1024)
        .set_dictionary_enabled(false)
        .set_encoding(Encoding::DELTA_BINARY_PACKED)
        .set_column_encoding(
            ColumnPath::from(MERCHANT_COLUMN),
            Encoding::DELTA_BYTE_ARRAY,
        )
        .set_column_encoding(
            ColumnPath::from(SKETCH_COLUMN),
            Encoding::DELTA_LENGTH_BYTE_ARRAY,
        )
        .build()
}

/// Writer properties of `customer_hours`: read whole by the batch layer, never
/// looked up by merchant, so Parquet's defaults (dictionaries, which suit the
/// repeated merchant and customer ids) with zstd.
pub fn customer_hours_writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(1024 * 1024))
        .build()
}
