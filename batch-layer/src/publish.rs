//! The batch layer's writes: query output shaped to the metric tables'
//! schemas ([`MetricTable`]); a run's publish, one commit per table
//! (`publish_customer_hours`, `publish_rows`: a new file sorted by merchant
//! and time per partition it touches, [`crate::layout`]); the compaction of a
//! closed partition into one sorted file (`compact_partition`); commits that
//! only record the run's transactions (`record_only`); and the rows a run
//! replaces, read back. Every commit here is made on the version read, with
//! no retry (`commit_exact`): another writer's commit in between is a
//! [`Error::Conflict`] for the run to resolve, never a silent merge.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::logical_expr::{col, lit, Expr};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::{MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::lake::{register, Table, TIME_ZONE};
use tally_common::metric_table::{MetricTable, MERCHANT_COLUMN, SKETCH_COLUMN};
use tally_common::{Context as _, Error, Result};

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, Add, Remove};
use deltalake::protocol::DeltaOperation;
use tally_common::metrics::stored_metric_names;

use crate::dirty::{column, micros_column};
use crate::items::{adds_name, rows_dir};
use crate::job::LOGIC_VERSION;
use crate::layout::metric_writer_properties;
use crate::memory::MemoryBound;
use crate::plan::{customer_hours_files, Item, Plan};
use crate::stage::{file_schema, register_table_files, Staging};
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use futures::TryStreamExt as _;
use std::collections::{BTreeMap, HashSet};

/// A commit that changes no row of a metric table and records `commit`'s
/// transactions (progress or the daily mark).
pub(crate) async fn record_only(
    table: &DeltaTable,
    kind: MetricTable,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    commit_exact(table, kind.table(), Vec::new(), "record progress", commit).await
}

/// Commit `actions` (with `commit`'s metadata and transactions) on the version
/// of `table` that was read, and return the table at the new version. Errors:
/// [`Error::Conflict`] when another writer committed since (no retry and no
/// merging: files this commit removes may have been rewritten meanwhile).
pub(crate) async fn commit_exact(
    table: &DeltaTable,
    which: Table,
    actions: Vec<Action>,
    what: &str,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    use deltalake::kernel::transaction::TransactionError;
    use deltalake::DeltaTableError as E;
    let snapshot = table
        .snapshot()
        .context(format!("reading {}", which.name()))?;
    let result = CommitBuilder::from(commit)
        .with_actions(actions)
        .with_max_retries(0)
        .build(
            Some(snapshot),
            table.log_store(),
            DeltaOperation::Write {
                mode: SaveMode::Overwrite,
                partition_by: Some(
                    which
                        .partition_columns()
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                ),
                predicate: None,
            },
        )
        .await;
    match result {
        Ok(_) => {}
        Err(E::VersionAlreadyExists(_))
        | Err(E::Transaction {
            source: TransactionError::MaxCommitAttempts(_),
        }) => {
            return Err(Error::Conflict(format!(
                "{what}: {} changed since version {:?} was read",
                which.name(),
                table.version()
            )))
        }
        Err(e) => return Err(e).context(format!("{what} ({})", which.name())),
    }
    let mut table = table.clone();
    table
        .update_state()
        .await
        .context(format!("reloading {}", which.name()))?;
    Ok(table)
}

pub(crate) use tally_common::lake::utc_micros as ts_lit;

/// The partition of `kind` holding the bucket that starts at `t`.
pub(crate) fn partition_of(kind: MetricTable, t: i64) -> Expr {
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

/// Columns cast to `schema`'s types, as one batch of it. Errors:
/// [`Error::Internal`] when the number of columns differs.
pub(crate) fn conform(schema: &SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
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

/// Commit a run's `customer_hours` files (the add actions its hour items
/// staged) and remove the stored files it supersedes ([`Plan::supersedes`]),
/// in one commit carrying `commit`; returns the table at the new version. A
/// publish retried after this commit landed finds its files there and commits
/// nothing again.
pub(crate) async fn publish_customer_hours(
    table: &DeltaTable,
    plan: &Plan,
    staging: &Staging,
    commit: CommitProperties,
) -> Result<DeltaTable> {
    let mut adds: Vec<Add> = Vec::new();
    for (i, item) in plan.items.iter().enumerate() {
        if let Item::Hour { hour, .. } = item {
            let staged: Vec<Add> = staging.get_json(&adds_name(i)).await?.ok_or_else(|| {
                Error::internal(format!(
                    "run {}: the item of hour {} has not staged its files",
                    plan.run_id,
                    tally_common::bucket::format_ts(*hour)
                ))
            })?;
            adds.extend(staged);
        }
    }
    let files = customer_hours_files(table)?;
    let ours: HashSet<&str> = adds.iter().map(|a| a.path.as_str()).collect();
    if !adds.is_empty() && files.iter().any(|f| ours.contains(f.path.as_str())) {
        // committed by an earlier attempt of this publish
        return Ok(table.clone());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let removes = files.into_iter().filter(|f| plan.supersedes(f)).map(|f| {
        Action::Remove(Remove {
            path: f.path,
            data_change: true,
            deletion_timestamp: Some(now),
            extended_file_metadata: Some(true),
            partition_values: Some([("date".to_string(), Some(f.date))].into()),
            size: Some(f.size),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
        })
    });
    let actions: Vec<Action> = adds.into_iter().map(Action::Add).chain(removes).collect();
    if actions.is_empty() {
        return Ok(table.clone());
    }
    commit_exact(
        table,
        Table::CustomerHours,
        actions,
        "publishing customer_hours",
        commit,
    )
    .await
}

/// The SQL adding up the parts' staged rows of `kind` (relation `staged`) per
/// merchant, bucket and partition, in the table's column order (unsorted:
/// [`publish_rows`] sorts what it writes).
pub(crate) fn combine_staged_sql(kind: MetricTable, staged: &str) -> String {
    let schema = kind.table().schema();
    let metrics: Vec<&str> = stored_metric_names().collect();
    let keys = [MERCHANT_COLUMN, kind.time_column(), kind.partition_column()];
    let cols: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            let n = f.name().as_str();
            if metrics.contains(&n) {
                format!("CAST(SUM({n}) AS BIGINT) AS {n}")
            } else if n == SKETCH_COLUMN {
                // parts split customers, so their sketches' union is the bucket's
                format!("hll_union_agg({n}) AS {n}")
            } else if keys.contains(&n) {
                n.to_string()
            } else {
                // computed_at and logic_version: the same in every part of a run
                format!("MAX({n}) AS {n}")
            }
        })
        .collect();
    format!(
        "SELECT {} FROM {staged} GROUP BY {}",
        cols.join(", "),
        keys.join(", ")
    )
}

/// Replace the rows of `kind` in the buckets `buckets` (their start, epoch µs)
/// with the parts' staged rows added up, in one commit carrying `commit`;
/// returns the table at the new version and the run's rows written.
///
/// Per partition the run touches, one new file sorted by merchant and time
/// ([`crate::layout`]) holds the run's rows (its parts' rows staged for that
/// partition, [`crate::items::rows_dir`], added up) and the other rows of the
/// files it replaces (those whose time statistics meet a replaced bucket;
/// files of other buckets stay as they are, so a run rewrites only what it
/// changed). Everything streams under `memory`, spilling.
pub(crate) async fn publish_rows(
    table: &DeltaTable,
    kind: MetricTable,
    staging: &Staging,
    memory: &MemoryBound,
    buckets: &[i64],
    commit: CommitProperties,
) -> Result<(DeltaTable, u64)> {
    let ctx = memory.ordered_session()?;
    let files = partition_files(table, kind)?;
    let time = kind.time_column();
    let pcol = kind.partition_column();
    let mut by_partition: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for &b in buckets {
        by_partition
            .entry(kind.partition_of(b))
            .or_default()
            .push(b);
    }
    let file_schema = file_schema(&kind.table().schema(), &[pcol]);
    let cols: Vec<&str> = file_schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let cols = cols.join(", ");
    let mut actions: Vec<Action> = Vec::new();
    let mut rows = 0;
    for (k, (value, replaced)) in by_partition.iter().enumerate() {
        let replaced_list = replaced
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let (mut touched, others): (Vec<&PartitionFile>, Vec<&PartitionFile>) = files
            .iter()
            .filter(|f| &f.partition == value)
            .partition(|f| f.meets(replaced));
        touched.extend(merged_into_new(kind, replaced.len(), others));
        // each source says whether its rows are the run's (`fresh`)
        let mut sources = Vec::new();
        let staged = format!("staged_{k}");
        if staging
            .register_dir(&ctx, &rows_dir(kind, value), &staged, kind.table().schema())
            .await?
        {
            let combined = combine_staged_sql(kind, &staged);
            sources.push(format!(
                "SELECT {cols}, TRUE AS {FRESH} FROM ({combined}) AS c"
            ));
        }
        if !touched.is_empty() {
            let name = format!("kept_{k}");
            register_table_files(
                &ctx,
                table,
                &name,
                touched.iter().map(|f| f.path.as_str()),
                file_schema.clone(),
            )
            .await?;
            sources.push(format!(
                "SELECT {cols}, FALSE AS {FRESH} FROM {name} WHERE CAST({time} AS BIGINT) NOT IN ({replaced_list})"
            ));
        }
        actions.extend(touched.iter().map(|f| f.remove(pcol)));
        if sources.is_empty() {
            continue;
        }
        let sql = format!(
            "SELECT * FROM ({}) AS rows ORDER BY {MERCHANT_COLUMN}, {time}",
            sources.join(" UNION ALL ")
        );
        let (adds, fresh) =
            write_sorted_partition(&ctx, table, kind, value, &file_schema, &sql).await?;
        actions.extend(adds);
        rows += fresh;
    }
    let what = format!("publishing {}", kind.name());
    let table = commit_exact(table, kind.table(), actions, &what, commit).await?;
    Ok((table, rows))
}

/// The column marking a run's own rows among those a publish writes.
const FRESH: &str = "tally_fresh";

/// The files of a partition (not touched by the run) that a publish writing
/// `new` buckets merges into its new file, so that a partition filled bucket
/// by bucket keeps few files: smallest first, every file spanning no more
/// buckets than what is being written so far (a binary counter: after n
/// hourly runs a date has as many files as n has bits set, at most 5 for a
/// day, and a row is rewritten about log2(n) times, against n/2 times when a
/// run rewrites the whole partition). A file whose span is unknown is left.
fn merged_into_new(
    kind: MetricTable,
    new: usize,
    mut others: Vec<&PartitionFile>,
) -> Vec<&PartitionFile> {
    let bucket = match kind {
        MetricTable::Hourly => MICROS_PER_HOUR,
        MetricTable::Daily => MICROS_PER_DAY,
        MetricTable::QuarterHourly => tally_common::calendar::SLOT_MICROS,
    };
    let span = |f: &PartitionFile| f.time.map(|(lo, hi)| ((hi - lo) / bucket + 1) as usize);
    others.retain(|f| span(f).is_some());
    others.sort_by_key(|f| span(f));
    let mut writing = new;
    let mut merged = Vec::new();
    for f in others {
        let s = span(f).unwrap_or(usize::MAX);
        if s > writing {
            break;
        }
        writing += s;
        merged.push(f);
    }
    merged
}

/// One file of a metric table, as its Delta log describes it.
pub(crate) struct PartitionFile {
    path: String,
    pub(crate) partition: String,
    size: i64,
    /// The first and last bucket its rows hold (epoch µs), if recorded.
    time: Option<(i64, i64)>,
}

impl PartitionFile {
    /// Whether the file may hold a row of one of `buckets`.
    fn meets(&self, buckets: &[i64]) -> bool {
        match self.time {
            Some((lo, hi)) => buckets.iter().any(|b| (lo..=hi).contains(b)),
            None => true,
        }
    }

    /// The action removing it.
    fn remove(&self, partition_column: &str) -> Action {
        Action::Remove(Remove {
            path: self.path.clone(),
            data_change: true,
            deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
            extended_file_metadata: Some(true),
            partition_values: Some(
                [(partition_column.to_string(), Some(self.partition.clone()))].into(),
            ),
            size: Some(self.size),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
        })
    }
}

/// The files of `kind` at the table's loaded version.
pub(crate) fn partition_files(table: &DeltaTable, kind: MetricTable) -> Result<Vec<PartitionFile>> {
    let Ok(state) = table.snapshot() else {
        return Ok(Vec::new());
    };
    let adds = state
        .add_actions_table(true)
        .context(format!("listing {} files", kind.name()))?;
    let (Some(paths), Some(parts), Some(sizes)) = (
        column(&adds, "path", &DataType::Utf8)?,
        column(
            &adds,
            &format!("partition.{}", kind.partition_column()),
            &DataType::Utf8,
        )?,
        column(&adds, "size_bytes", &DataType::Int64)?,
    ) else {
        return Ok(Vec::new());
    };
    let time = kind.time_column();
    let (lo, hi) = (
        micros_column(&adds, &format!("min.{time}"))?,
        micros_column(&adds, &format!("max.{time}"))?,
    );
    let get = |a: &Option<deltalake::arrow::array::ArrayRef>, i: usize| -> Option<i64> {
        let a = a.as_ref()?.as_primitive::<Int64Type>();
        (!a.is_null(i)).then(|| a.value(i))
    };
    let (paths, parts, sizes) = (
        paths.as_string::<i32>(),
        parts.as_string::<i32>(),
        sizes.as_primitive::<Int64Type>(),
    );
    Ok((0..paths.len())
        .filter(|&i| !parts.is_null(i))
        .map(|i| PartitionFile {
            path: paths.value(i).to_string(),
            partition: parts.value(i).to_string(),
            size: sizes.value(i),
            time: get(&lo, i).zip(get(&hi, i)),
        })
        .collect())
}

/// Stream the rows of `sql` (the file columns of `kind`, sorted, and
/// optionally a last boolean column [`FRESH`], counted where true and not
/// written) into new files of `kind`'s partition `value`, uncommitted;
/// returns their add actions and the fresh rows. An unpartitioned writer under
/// the partition's directory: delta-rs's partitioning writer reorders rows of
/// equal partition value.
async fn write_sorted_partition(
    ctx: &SessionContext,
    table: &DeltaTable,
    kind: MetricTable,
    value: &str,
    file_schema: &SchemaRef,
    sql: &str,
) -> Result<(Vec<Action>, u64)> {
    let pcol = kind.partition_column();
    let mut fresh = 0u64;
    let mut stream = ctx
        .sql(sql)
        .await
        .context(format!("planning the rows of {}", kind.name()))?
        .execute_stream()
        .await
        .context(format!("reading the rows of {}", kind.name()))?;
    let dir = format!("{pcol}={value}");
    let config = WriterConfig::new(
        file_schema.clone(),
        Vec::new(),
        Some(metric_writer_properties()),
        // a new file past this size: the writer holds at most a file in memory
        std::num::NonZeroU64::new(crate::compact::TARGET_FILE_SIZE),
        None,
        Default::default(),
        None,
    );
    let store = Arc::new(object_store::prefix::PrefixStore::new(
        table.object_store(),
        dir.as_str(),
    ));
    let mut writer = DeltaWriter::new(store, config);
    while let Some(batch) = stream
        .try_next()
        .await
        .context(format!("writing {}", kind.name()))?
    {
        if batch.num_rows() > 0 {
            let mut cols = batch.columns().to_vec();
            if batch.schema().field(cols.len() - 1).name() == FRESH {
                let marks = cols
                    .pop()
                    .unwrap_or_else(|| unreachable!("a column was there"));
                fresh += marks.as_boolean_opt().map_or(0, |m| m.true_count() as u64);
            }
            let batch = conform(file_schema, cols)?;
            writer
                .write(&batch)
                .await
                .context(format!("writing {}", kind.name()))?;
        }
    }
    let adds = writer
        .close()
        .await
        .context(format!("writing {}", kind.name()))?
        .into_iter()
        .map(|mut a| {
            a.path = format!("{dir}/{}", a.path);
            a.partition_values = [(pcol.to_string(), Some(value.to_string()))].into();
            Action::Add(a)
        })
        .collect();
    Ok((adds, fresh))
}

/// Rewrite `kind`'s partition holding `t` as one file sorted by merchant and
/// time (each run adds a file): a lookup of one merchant then reads a page or
/// two of one file. The sorted rows stream (under `memory`, spilling) into a
/// new file, and one commit removes the partition's files and adds it; a
/// writer that committed in the partition meanwhile makes it fail (Delta's
/// conflict check), and the next run compacts again. Returns whether it
/// rewrote (a partition of one file is left as it is).
pub(crate) async fn compact_partition(
    table: &DeltaTable,
    kind: MetricTable,
    t: i64,
    memory: &MemoryBound,
    commit: CommitProperties,
) -> Result<bool> {
    let value = kind.partition_of(t);
    let pcol = kind.partition_column();
    let files: Vec<PartitionFile> = partition_files(table, kind)?
        .into_iter()
        .filter(|f| f.partition == value)
        .collect();
    if files.len() <= 1 {
        return Ok(false);
    }
    let ctx = memory.ordered_session()?;
    let file_schema = file_schema(&kind.table().schema(), &[pcol]);
    register_table_files(
        &ctx,
        table,
        "partition_files",
        files.iter().map(|f| f.path.as_str()),
        file_schema.clone(),
    )
    .await?;
    let sql = format!(
        "SELECT * FROM partition_files ORDER BY {MERCHANT_COLUMN}, {}",
        kind.time_column()
    );
    let (mut actions, _) =
        write_sorted_partition(&ctx, table, kind, &value, &file_schema, &sql).await?;
    for a in actions.iter_mut() {
        if let Action::Add(add) = a {
            add.data_change = false;
        }
    }
    actions.extend(files.iter().map(|f| match f.remove(pcol) {
        Action::Remove(mut r) => {
            r.data_change = false;
            Action::Remove(r)
        }
        other => other,
    }));
    let what = format!("compacting {} {pcol}={value}", kind.name());
    commit_exact(table, kind.table(), actions, &what, commit).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 24 hourly runs into one date: the files left after each are the bits of
    /// the hours so far, and each hour is rewritten at most log2(24) times.
    #[test]
    fn hourly_publishes_keep_a_date_to_a_binary_counter_of_files() {
        let h = MICROS_PER_HOUR;
        let mut files: Vec<PartitionFile> = Vec::new();
        let mut rewrites = [0u32; 24];
        for hour in 0..24i64 {
            let others: Vec<&PartitionFile> = files.iter().collect();
            let merged: Vec<String> = merged_into_new(MetricTable::Hourly, 1, others)
                .iter()
                .map(|f| f.path.clone())
                .collect();
            let mut lo = hour * h;
            for f in files.iter().filter(|f| merged.contains(&f.path)) {
                let (a, b) = f.time.unwrap();
                lo = lo.min(a);
                for k in a / h..=b / h {
                    rewrites[k as usize] += 1;
                }
            }
            files.retain(|f| !merged.contains(&f.path));
            files.push(PartitionFile {
                path: format!("run-{hour}"),
                partition: "2026-11-24".into(),
                size: 0,
                time: Some((lo, hour * h)),
            });
            assert_eq!(
                files.len() as u32,
                (hour as u32 + 1).count_ones(),
                "after hour {hour}: {:?}",
                files.iter().map(|f| f.time).collect::<Vec<_>>()
            );
        }
        assert!(rewrites.iter().all(|&r| r <= 5), "{rewrites:?}");
        // a file of unknown span is never merged
        let unknown = PartitionFile {
            path: "x".into(),
            partition: "2026-11-24".into(),
            size: 0,
            time: None,
        };
        assert!(merged_into_new(MetricTable::Hourly, 24, vec![&unknown]).is_empty());
    }
}
