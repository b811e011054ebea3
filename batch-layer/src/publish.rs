//! Publishing metric rows: query output shaped to the metric tables' schemas
//! and written with atomic Delta commits that replace whole partitions, sorted by
//! merchant and time ([`crate::layout`]), or that only record the run's
//! transactions.

use std::sync::Arc;

use deltalake::arrow::array::{ArrayRef, RecordBatch};
use deltalake::arrow::compute::{
    cast, concat_batches, lexsort_to_indices, take_record_batch, SortColumn,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::logical_expr::{col, lit, Expr};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::scalar::ScalarValue;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::{date_string, month_string, MICROS_PER_HOUR};
use tally_common::lake::{register, Table};
use tally_common::{Context as _, Error, Result};

use crate::job::LOGIC_VERSION;
use crate::layout::metric_writer_properties;

/// A commit that changes no row of a metric table and records `commit`'s
/// transactions (progress or the daily mark).
pub(crate) async fn record_only(
    table: &DeltaTable,
    kind: Table,
    at: i64,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let time = match kind {
        Table::MetricsDaily => "day",
        _ => "hour",
    };
    let never = col(time).gt_eq(ts_lit(at)).and(col(time).lt(ts_lit(at)));
    replace_rows(table, kind, Vec::new(), never, commit).await
}

pub(crate) fn ts_lit(t: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t),
        Some("UTC".into()),
    ))
}

/// `date = D AND (hour in contiguous runs of the given hours)`.
pub(crate) fn hours_predicate(day: i64, hours: &[i64]) -> Expr {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &h in hours {
        match runs.last_mut() {
            Some((_, end)) if *end == h => *end = h + MICROS_PER_HOUR,
            _ => runs.push((h, h + MICROS_PER_HOUR)),
        }
    }
    let any = runs
        .into_iter()
        .map(|(a, b)| col("hour").gt_eq(ts_lit(a)).and(col("hour").lt(ts_lit(b))))
        .reduce(Expr::or)
        .unwrap_or(lit(false));
    col("date").eq(lit(date_string(day))).and(any)
}

/// Query output plus `computed_at`, `logic_version` and the partition column, cast to the table's schema.
pub(crate) fn to_table_rows(
    table: Table,
    batches: &[RecordBatch],
    computed_at: i64,
    partition: &str,
) -> Result<Vec<RecordBatch>> {
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            finish_rows(
                table,
                b.columns().to_vec(),
                b.num_rows(),
                computed_at,
                partition,
            )
        })
        .collect()
}

fn finish_rows(
    table: Table,
    mut cols: Vec<ArrayRef>,
    n: usize,
    computed_at: i64,
    partition: &str,
) -> Result<RecordBatch> {
    cols.push(Arc::new(
        deltalake::arrow::array::TimestampMicrosecondArray::from(vec![computed_at; n])
            .with_timezone("UTC"),
    ));
    cols.push(Arc::new(deltalake::arrow::array::Int32Array::from(
        vec![LOGIC_VERSION; n],
    )));
    cols.push(Arc::new(deltalake::arrow::array::StringArray::from(
        vec![partition; n],
    )));
    conform(&table.schema(), cols)
}

/// Daily query output (merchant, metrics...) with the `day` column put in second place.
pub(crate) fn daily_rows(
    batches: &[RecordBatch],
    day: i64,
    computed_at: i64,
) -> Result<Vec<RecordBatch>> {
    let month = month_string(day);
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let n = b.num_rows();
            let mut cols: Vec<ArrayRef> = vec![b.column(0).clone()];
            cols.push(Arc::new(
                deltalake::arrow::array::TimestampMicrosecondArray::from(vec![day; n])
                    .with_timezone("UTC"),
            ));
            cols.extend(b.columns()[1..].iter().cloned());
            finish_rows(Table::MetricsDaily, cols, n, computed_at, &month)
        })
        .collect()
}

fn conform(schema: &SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    if cols.len() != schema.fields().len() {
        return Err(Error::invalid(format!(
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

pub(crate) async fn replace_rows(
    table: &DeltaTable,
    kind: Table,
    rows: Vec<RecordBatch>,
    predicate: Expr,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    // an empty replacement still commits: it removes the hours' old rows (or only
    // records progress)
    let rows = if rows.is_empty() {
        vec![RecordBatch::new_empty(kind.schema())]
    } else {
        rows
    };
    table
        .clone()
        .write(rows)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_partition_columns(kind.partition_columns().iter().copied())
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
pub(crate) async fn rewrite_partition(
    table: &DeltaTable,
    kind: Table,
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
pub(crate) async fn read_rows(
    table: &DeltaTable,
    kind: Table,
    filter: Expr,
) -> Result<Vec<RecordBatch>> {
    if table.snapshot().is_err() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    register(&ctx, kind.name(), table).await?;
    let schema = kind.schema();
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
fn sorted_by_merchant(kind: Table, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    let schema = kind.schema();
    let all = concat_batches(&schema, &batches).context("gathering metric rows")?;
    let time = match kind {
        Table::MetricsDaily => "day",
        _ => "hour",
    };
    let key = |name: &str| -> Result<SortColumn> {
        Ok(SortColumn {
            values: all
                .column_by_name(name)
                .ok_or_else(|| Error::invalid(format!("no {name} column")))?
                .clone(),
            options: None,
        })
    };
    let order = lexsort_to_indices(&[key("merchant_id")?, key(time)?], None)
        .context("sorting metric rows")?;
    Ok(vec![
        take_record_batch(&all, &order).context("sorting metric rows")?
    ])
}
