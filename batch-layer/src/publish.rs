//! The metric tables' I/O: query output shaped to the metric tables' schemas
//! ([`MetricTable`]) and written with atomic Delta commits that replace a day's
//! row or some hours' rows by rewriting their whole partition, sorted by
//! merchant and time ([`crate::layout`]), or that only record the run's
//! transactions; and the rows a run replaces, read back.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::compute::{
    cast, concat_batches, lexsort_to_indices, take_record_batch, SortColumn,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::logical_expr::{col, lit, Expr};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::MICROS_PER_HOUR;
use tally_common::lake::{register, TIME_ZONE};
use tally_common::metric_table::{MetricTable, MERCHANT_COLUMN};
use tally_common::{Context as _, Error, Result};

use crate::job::LOGIC_VERSION;
use crate::layout::metric_writer_properties;

/// A commit that changes no row of a metric table and records `commit`'s
/// transactions (progress or the daily mark).
pub(crate) async fn record_only(
    table: &DeltaTable,
    kind: MetricTable,
    at: i64,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let time = kind.time_column();
    let never = col(time).gt_eq(ts_lit(at)).and(col(time).lt(ts_lit(at)));
    replace_rows(table, kind, Vec::new(), never, commit).await
}

pub(crate) use tally_common::lake::utc_micros as ts_lit;

/// The partition of `kind` holding the bucket that starts at `t`.
fn partition_of(kind: MetricTable, t: i64) -> Expr {
    col(kind.partition_column()).eq(lit(kind.partition_of(t)))
}

/// `date = D AND (hour in contiguous runs of the given hours)`.
pub(crate) fn hours_predicate(day: i64, hours: &[i64]) -> Expr {
    let hour = MetricTable::Hourly.time_column();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &h in hours {
        match runs.last_mut() {
            Some((_, end)) if *end == h => *end = h + MICROS_PER_HOUR,
            _ => runs.push((h, h + MICROS_PER_HOUR)),
        }
    }
    let any = runs
        .into_iter()
        .map(|(a, b)| col(hour).gt_eq(ts_lit(a)).and(col(hour).lt(ts_lit(b))))
        .reduce(Expr::or)
        .unwrap_or(lit(false));
    partition_of(MetricTable::Hourly, day).and(any)
}

/// Replace the `metrics_hourly` rows of `hours` (all on `day`) with `rows`, in one
/// commit carrying `commit`; returns the table at the new version.
pub(crate) async fn replace_hours(
    hourly: &DeltaTable,
    day: i64,
    hours: &[i64],
    rows: Vec<RecordBatch>,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    rewrite_partition(
        hourly,
        MetricTable::Hourly,
        partition_of(MetricTable::Hourly, day),
        hours_predicate(day, hours),
        rows,
        commit,
    )
    .await
}

/// Replace the `metrics_daily` rows of `day` with `rows`, in one commit carrying
/// `commit`; returns the table at the new version.
pub(crate) async fn replace_day(
    daily: &DeltaTable,
    day: i64,
    rows: Vec<RecordBatch>,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let kind = MetricTable::Daily;
    let month = partition_of(kind, day);
    let the_day = month.clone().and(col(kind.time_column()).eq(ts_lit(day)));
    rewrite_partition(daily, kind, month, the_day, rows, commit).await
}

/// The `metrics_hourly` rows of `hours` (all on `day`) as stored now.
pub(crate) async fn stored_hours(
    hourly: &DeltaTable,
    day: i64,
    hours: &[i64],
) -> Result<Vec<RecordBatch>> {
    read_rows(hourly, MetricTable::Hourly, hours_predicate(day, hours)).await
}

/// Query output shaped to `kind`'s schema: the hourly query's columns
/// (merchant, hour, metrics...) or the daily query's (merchant, metrics...: the
/// `day` column goes in second place), then `computed_at`, `logic_version` and
/// the partition column of `day`, each cast to the table's type.
pub(crate) fn table_rows(
    kind: MetricTable,
    batches: &[RecordBatch],
    day: i64,
    computed_at: i64,
) -> Result<Vec<RecordBatch>> {
    let partition = kind.partition_of(day);
    let utc_micros = |t: i64, n: usize| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(vec![t; n]).with_timezone(TIME_ZONE))
    };
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let n = b.num_rows();
            let mut cols = b.columns().to_vec();
            if kind == MetricTable::Daily {
                // the daily query has no time column: every row is the day's
                cols.insert(1, utc_micros(day, n));
            }
            cols.push(utc_micros(computed_at, n));
            cols.push(Arc::new(Int32Array::from(vec![LOGIC_VERSION; n])));
            cols.push(Arc::new(StringArray::from(vec![partition.as_str(); n])));
            conform(&kind.table().schema(), cols)
        })
        .collect()
}

fn conform(schema: &SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    if cols.len() != schema.fields().len() {
        return Err(Error::internal(format!(
            "metrics query returned {} columns, table has {}",
            cols.len(),
            schema.fields().len()
        )));
    }
    let cols = cols
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                cast(&c, f.data_type()).context(format!("casting {}", f.name()))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), cols).context("shaping metric rows")
}

/// Replace the rows of `table` matching `predicate` with `rows`, in one commit.
async fn replace_rows(
    table: &DeltaTable,
    kind: MetricTable,
    rows: Vec<RecordBatch>,
    predicate: Expr,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    // an empty replacement still commits: it removes the hours' old rows (or only
    // records progress)
    let rows = if rows.is_empty() {
        vec![RecordBatch::new_empty(kind.table().schema())]
    } else {
        rows
    };
    table
        .clone()
        .write(rows)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_partition_columns([kind.partition_column()])
        .with_writer_properties(metric_writer_properties())
        .with_commit_properties(commit)
        .await
        .context(format!("replacing rows of {}", kind.name()))
}

/// Replace the rows matching `replaced` (within the partition `partition`) with
/// `rows` by rewriting the whole partition in one commit: its other rows are read
/// back and everything is written sorted by merchant and time, so a partition
/// stays one file a lookup of one merchant reads a page or two of
/// ([`crate::layout`]).
async fn rewrite_partition(
    table: &DeltaTable,
    kind: MetricTable,
    partition: Expr,
    replaced: Expr,
    rows: Vec<RecordBatch>,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let kept = read_rows(table, kind, partition.clone().and(!replaced)).await?;
    let rows = sorted_by_merchant(kind, kept.into_iter().chain(rows).collect())?;
    replace_rows(table, kind, rows, partition, commit).await
}

/// The rows of `table` matching `filter`, in the table's column order and types.
async fn read_rows(
    table: &DeltaTable,
    kind: MetricTable,
    filter: Expr,
) -> Result<Vec<RecordBatch>> {
    if table.snapshot().is_err() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    register(&ctx, kind.name(), table).await?;
    let schema = kind.table().schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let batches = ctx
        .table(kind.name())
        .await
        .context(format!("reading {}", kind.name()))?
        .filter(filter)
        .context(format!("filtering {}", kind.name()))?
        .select_columns(&names)
        .context(format!("projecting {}", kind.name()))?
        .collect()
        .await
        .context(format!("reading {}", kind.name()))?;
    batches
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| conform(&schema, b.columns().to_vec()))
        .collect()
}

/// One batch sorted by `merchant_id`, then the table's time column.
fn sorted_by_merchant(kind: MetricTable, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    let schema = kind.table().schema();
    let all = concat_batches(&schema, &batches).context("gathering metric rows")?;
    let key = |name: &str| -> Result<SortColumn> {
        Ok(SortColumn {
            values: all
                .column_by_name(name)
                .ok_or_else(|| Error::internal(format!("no {name} column")))?
                .clone(),
            options: None,
        })
    };
    let order = lexsort_to_indices(&[key(MERCHANT_COLUMN)?, key(kind.time_column())?], None)
        .context("sorting metric rows")?;
    Ok(vec![
        take_record_batch(&all, &order).context("sorting metric rows")?
    ])
}
