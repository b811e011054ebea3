//! The metric tables' row shape, defined once.
//!
//! `metrics_hourly`, `metrics_daily` and `metrics_quarter_hourly` hold one row
//! per merchant and UTC hour (day, 15-minute slot): `merchant_id`, the time
//! column (`hour`, `day`, `quarter_hour`: the bucket's start as a UTC timestamp
//! in µs), one `BIGINT` column per stored metric of the registry
//! ([`crate::metrics::stored_metric_names`], so the row grows with it; its
//! `unique_customers` is exact within the row's bucket), `customers_sketch`
//! (the bucket's distinct customers as an Apache DataSketches HLL sketch,
//! [`crate::sketch`]; null when no event had a customer), `computed_at`,
//! `logic_version`, then the partition column (`date`, `month`, `date`).
//!
//! The quarter hours are the grain every zone's calendar is exact on
//! ([`crate::calendar::SLOT_MICROS`]); the hourly and daily rows are their
//! sums over UTC hours and days, with exact distinct customers there.
//! The lake's schemas ([`crate::lake::Table::schema`]), the batch layer's writes
//! and dry-run diff, and the serving layer's reads take their columns from
//! [`MetricTable`] and decode rows with [`MetricRows`].

use deltalake::arrow::array::{Array, AsArray, BinaryArray, Int64Array, RecordBatch, StringArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Field, Int64Type};
use deltalake::arrow::error::ArrowError;

use crate::bucket::{date_string, month_string};
use crate::lake::{utc_timestamp, Table};
use crate::metrics::{stored_metric_names, BucketRow, MetricValues, STORED_COUNT};

/// The merchant column: every row is one merchant's, and files are sorted by it.
pub const MERCHANT_COLUMN: &str = "merchant_id";
/// The distinct-customer sketch column (binary DataSketches HLL, nullable).
pub const SKETCH_COLUMN: &str = "customers_sketch";
/// When the batch layer computed the row (UTC timestamp, µs).
pub const COMPUTED_AT_COLUMN: &str = "computed_at";
/// The metric logic version the row was computed with.
pub const LOGIC_VERSION_COLUMN: &str = "logic_version";

/// One of the two metric tables, by the bucket its rows hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricTable {
    /// `metrics_hourly`: a row per merchant and UTC hour, partitioned by date.
    Hourly,
    /// `metrics_daily`: a row per merchant and UTC day, partitioned by month.
    Daily,
    /// `metrics_quarter_hourly`: a row per merchant and 15-minute UTC slot,
    /// partitioned by date.
    QuarterHourly,
}

impl MetricTable {
    /// Both metric tables.
    pub const ALL: [MetricTable; 3] = [
        MetricTable::Hourly,
        MetricTable::Daily,
        MetricTable::QuarterHourly,
    ];

    /// The lake table.
    pub const fn table(self) -> Table {
        match self {
            MetricTable::Hourly => Table::MetricsHourly,
            MetricTable::Daily => Table::MetricsDaily,
            MetricTable::QuarterHourly => Table::MetricsQuarterHourly,
        }
    }

    /// The metric table a lake table is, if it is one.
    pub const fn of(table: Table) -> Option<MetricTable> {
        match table {
            Table::MetricsHourly => Some(MetricTable::Hourly),
            Table::MetricsDaily => Some(MetricTable::Daily),
            Table::MetricsQuarterHourly => Some(MetricTable::QuarterHourly),
            Table::RawEvents | Table::Quarantine | Table::CustomerHours | Table::Merchants => None,
        }
    }

    /// The table's name (its directory under the lake, and its SQL name).
    pub const fn name(self) -> &'static str {
        self.table().name()
    }

    /// The time column: the start of the row's bucket (UTC timestamp, µs).
    pub const fn time_column(self) -> &'static str {
        match self {
            MetricTable::Hourly => "hour",
            MetricTable::Daily => "day",
            MetricTable::QuarterHourly => "quarter_hour",
        }
    }

    /// The partition column: `date` (`YYYY-MM-DD`) or `month` (`YYYY-MM`) of the time column.
    pub const fn partition_column(self) -> &'static str {
        match self {
            MetricTable::Hourly | MetricTable::QuarterHourly => "date",
            MetricTable::Daily => "month",
        }
    }

    /// The partition value of the bucket starting at `t` (epoch µs).
    pub fn partition_of(self, t: i64) -> String {
        match self {
            MetricTable::Hourly | MetricTable::QuarterHourly => date_string(t),
            MetricTable::Daily => month_string(t),
        }
    }

    /// The table's columns in file order, the partition column last.
    pub(crate) fn fields(self) -> Vec<Field> {
        let mut f = vec![
            Field::new(MERCHANT_COLUMN, DataType::Utf8, false),
            Field::new(self.time_column(), utc_timestamp(), false),
        ];
        f.extend(stored_metric_names().map(|n| Field::new(n, DataType::Int64, false)));
        f.push(Field::new(SKETCH_COLUMN, DataType::Binary, true));
        f.extend([
            Field::new(COMPUTED_AT_COLUMN, utc_timestamp(), false),
            Field::new(LOGIC_VERSION_COLUMN, DataType::Int32, false),
            Field::new(self.partition_column(), DataType::Utf8, false),
        ]);
        f
    }
}

/// The rows of one record batch of a metric table, or of a query or projection
/// of one, read by column name.
///
/// Integers of any width and timestamps of any unit are cast to `i64` (µs for
/// times), so a table written with narrower types still reads. A metric column
/// missing from the batch reads as 0, and so does a null.
pub struct MetricRows {
    len: usize,
    merchants: Option<StringArray>,
    times: Int64Array,
    stored: [Option<Int64Array>; STORED_COUNT],
    sketches: Option<BinaryArray>,
}

impl MetricRows {
    /// The rows of `batch`, whose time column is `time_column`.
    ///
    /// Errors: the batch has no `time_column`, or a column cannot be cast.
    pub fn new(batch: &RecordBatch, time_column: &str) -> Result<Self, ArrowError> {
        let ints = |name: &str| -> Result<Option<Int64Array>, ArrowError> {
            batch
                .column_by_name(name)
                .map(|c| {
                    Ok(cast(c, &DataType::Int64)?
                        .as_primitive::<Int64Type>()
                        .clone())
                })
                .transpose()
        };
        let times = ints(time_column)?.ok_or_else(|| {
            ArrowError::SchemaError(format!("metric rows without a {time_column} column"))
        })?;
        let merchants = batch
            .column_by_name(MERCHANT_COLUMN)
            .map(|c| Ok::<_, ArrowError>(cast(c, &DataType::Utf8)?.as_string::<i32>().clone()))
            .transpose()?;
        let mut stored: [Option<Int64Array>; STORED_COUNT] = Default::default();
        for (column, name) in stored.iter_mut().zip(stored_metric_names()) {
            *column = ints(name)?;
        }
        let sketches = batch
            .column_by_name(SKETCH_COLUMN)
            .map(|c| Ok::<_, ArrowError>(cast(c, &DataType::Binary)?.as_binary::<i32>().clone()))
            .transpose()?;
        Ok(MetricRows {
            len: batch.num_rows(),
            merchants,
            times,
            stored,
            sketches,
        })
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Row `row`'s merchant; None when null or not in the batch.
    pub fn merchant(&self, row: usize) -> Option<&str> {
        let m = self.merchants.as_ref()?;
        m.is_valid(row).then(|| m.value(row))
    }

    /// Row `row`'s bucket start (epoch µs); None when null.
    pub fn time(&self, row: usize) -> Option<i64> {
        self.times.is_valid(row).then(|| self.times.value(row))
    }

    /// Row `row`'s stored metrics in column order
    /// ([`crate::metrics::stored_metric_names`]).
    pub fn stored(&self, row: usize) -> [i64; STORED_COUNT] {
        let mut out = [0; STORED_COUNT];
        for (v, c) in out.iter_mut().zip(&self.stored) {
            if let Some(c) = c.as_ref().filter(|c| c.is_valid(row)) {
                *v = c.value(row);
            }
        }
        out
    }

    /// Row `row`'s distinct-customer sketch; None when null or not in the batch.
    pub fn sketch(&self, row: usize) -> Option<&[u8]> {
        let s = self.sketches.as_ref()?;
        s.is_valid(row).then(|| s.value(row))
    }

    /// Row `row`'s values.
    pub fn values(&self, row: usize) -> MetricValues {
        MetricValues::from_stored(self.stored(row))
    }

    /// Row `row`'s values and sketch.
    pub fn row(&self, row: usize) -> BucketRow {
        BucketRow {
            values: self.values(row),
            sketch: self.sketch(row).map(bytes::Bytes::copy_from_slice),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deltalake::arrow::array::{ArrayRef, Int32Array, TimestampMicrosecondArray};
    use deltalake::arrow::datatypes::Schema;

    use super::*;

    #[test]
    fn rows_decode_by_name_with_missing_and_null_metrics_as_zero() {
        let schema = Schema::new(vec![
            Field::new("hour", utc_timestamp(), true),
            Field::new("merchant_id", DataType::Utf8, true),
            Field::new("orders", DataType::Int32, true),
            Field::new("unique_customers", DataType::Int64, true),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(vec![Some(10), None]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec![Some("m"), None])),
            Arc::new(Int32Array::from(vec![Some(3), None])),
            Arc::new(Int64Array::from(vec![Some(2), Some(5)])),
        ];
        let batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
        let rows = MetricRows::new(&batch, MetricTable::Hourly.time_column()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows.merchant(0), rows.time(0)), (Some("m"), Some(10)));
        assert_eq!((rows.merchant(1), rows.time(1)), (None, None));
        assert_eq!(rows.stored(0), [3, 0, 0, 0, 0, 2]);
        assert_eq!(rows.stored(1), [0, 0, 0, 0, 0, 5]);
        assert_eq!(rows.values(0).unique_customers, Some(2));
        assert!(MetricRows::new(&batch, "day").is_err());
    }

    #[test]
    fn both_tables_name_their_columns_once() {
        for t in MetricTable::ALL {
            assert_eq!(MetricTable::of(t.table()), Some(t));
            let schema = t.table().schema();
            assert_eq!(schema.field(1).name(), t.time_column());
            assert_eq!(
                t.table().partition_columns(),
                [t.partition_column()].as_slice()
            );
        }
        assert_eq!(MetricTable::of(Table::RawEvents), None);
    }
}
