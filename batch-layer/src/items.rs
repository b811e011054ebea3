//! Computing a run's items ([`crate::plan::Item`]) within the memory bound.
//!
//! An hour item reads its part of the hour's raw rows once: the deduplicated
//! events' partial sums per merchant and customer stream into new files of
//! `customer_hours` (written in the table's directory by delta-rs's writer and
//! not committed: the publish step commits them, so a reader never sees them
//! before), and the hour's metrics for this part are computed from those rows
//! and staged. A day item computes its part of a day's metrics from the day's
//! `customer_hours` rows: the files the run's hour items wrote for that day
//! and the stored files of the day's other hours. Running an item again
//! overwrites its staged results; files an earlier attempt wrote and nobody
//! commits are removed by vacuum.

use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::Add;
use deltalake::DeltaTable;
use futures::TryStreamExt as _;
use tally_common::bucket::day_floor;
use tally_common::lake::{register, Lake, Table};
use tally_common::metric_table::MetricTable;
use tally_common::{Context as _, Error, Result};

use crate::memory::{MemoryBound, SpillMeter};
use crate::parts::{part_udf, PART_FUNCTION};
use crate::plan::{customer_hours_files, Item, Plan};
use crate::publish::{conform, table_rows};
use crate::sql::{
    computable_rows, customer_hour_sql, daily_from_customers_sql, hourly_from_customers_sql,
    quarter_hourly_from_customers_sql,
};
use crate::stage::{file_schema, register_table_files, Staging};

/// Staged name of the `customer_hours` files item `i` wrote.
pub(crate) fn adds_name(i: usize) -> String {
    format!("adds/{i:06}.json")
}

/// Staged name of item `i`'s share of `kind`'s rows (bucket `t`'s partition):
/// under the directory of the metric table's partition it goes to
/// ([`rows_dir`]).
pub(crate) fn rows_name(kind: MetricTable, t: i64, i: usize) -> String {
    format!("{}{i:06}.parquet", rows_dir(kind, &kind.partition_of(t)))
}

/// Staged directory of the rows of `kind`'s partition `value`.
pub(crate) fn rows_dir(kind: MetricTable, value: &str) -> String {
    let table = match kind {
        MetricTable::Hourly => "hourly",
        MetricTable::Daily => "daily",
        MetricTable::QuarterHourly => "quarter_hourly",
    };
    format!("{table}/{}={value}/", kind.partition_column())
}

/// What the items of one plan share in one process: a session under the
/// memory bound over the planned snapshots.
pub struct ItemContext {
    plan: Arc<Plan>,
    staging: Staging,
    ctx: SessionContext,
    spill: SpillMeter,
    customer_hours: DeltaTable,
    /// Its files at the planned version.
    customer_hours_files: Vec<crate::plan::CustomerHoursFile>,
}

impl ItemContext {
    /// A context for `plan`'s items in `lake`, within `memory`. Errors: the
    /// planned snapshots cannot be opened (e.g. vacuumed away: plan again).
    pub async fn new(
        lake: &Lake,
        memory: &MemoryBound,
        plan: Arc<Plan>,
        staging: Staging,
    ) -> Result<Self> {
        let ctx = memory.session()?;
        ctx.register_udf(part_udf());
        if let Ok(v) = u64::try_from(plan.raw_version) {
            let raw = lake.open_at_version(Table::RawEvents, v).await?;
            register(&ctx, Table::RawEvents.name(), &raw).await?;
        }
        let customer_hours = match plan
            .customer_hours_version
            .and_then(|v| u64::try_from(v).ok())
        {
            Some(v) => lake.open_at_version(Table::CustomerHours, v).await?,
            None => lake.open_or_create(Table::CustomerHours).await?,
        };
        let customer_hours_files = customer_hours_files(&customer_hours)?;
        Ok(ItemContext {
            plan,
            staging,
            ctx,
            spill: SpillMeter::default(),
            customer_hours,
            customer_hours_files,
        })
    }

    /// Bytes the items' queries spilled to disk so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.bytes()
    }

    /// Compute item `i` of the plan and stage its results; returns the metric
    /// rows it staged. Errors: [`Error::Invalid`] for an index out of the plan.
    pub async fn compute(&self, i: usize) -> Result<u64> {
        let item = *self.plan.items.get(i).ok_or_else(|| {
            Error::invalid(format!("item {i}: the plan has {}", self.plan.items.len()))
        })?;
        let staged = match item {
            Item::Hour { hour, part, parts } => {
                let (hourly, quarters) = self.hour(i, hour, part, parts).await?;
                vec![
                    (MetricTable::Hourly, hour, hourly),
                    (MetricTable::QuarterHourly, hour, quarters),
                ]
            }
            Item::Day { day, part, parts } => {
                vec![(MetricTable::Daily, day, self.day(day, part, parts).await?)]
            }
        };
        let mut n = 0;
        for (kind, t, rows) in staged {
            if kind != MetricTable::QuarterHourly {
                n += rows.iter().map(|b| b.num_rows() as u64).sum::<u64>();
            }
            self.staging
                .put_batches(&rows_name(kind, t, i), &rows)
                .await?;
        }
        Ok(n)
    }

    /// An hour's part: its `customer_hours` files, then its hourly and
    /// quarter-hourly metric rows from them.
    async fn hour(
        &self,
        i: usize,
        hour: i64,
        part: u32,
        parts: u32,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let day = day_floor(hour);
        if self.plan.raw_version < 0 {
            self.staging
                .put_json(&adds_name(i), &Vec::<Add>::new())
                .await?;
            return Ok(Default::default());
        }
        let raw = computable_rows(Table::RawEvents.name(), day);
        let raw = if parts > 1 {
            format!(
                "(SELECT * FROM {raw} WHERE {PART_FUNCTION}(merchant_id, COALESCE(customer_id, event_id), {parts}) = {part}) AS part"
            )
        } else {
            raw
        };
        let schema = Table::CustomerHours.schema();
        let (plan, mut stream) = self
            .spill
            .stream(&self.ctx, &customer_hour_sql(&raw, hour))
            .await?;
        let config = WriterConfig::new(
            schema.clone(),
            vec!["date".to_string()],
            Some(crate::layout::customer_hours_writer_properties()),
            // a new file past this size: the writer holds at most a file in memory
            std::num::NonZeroU64::new(crate::compact::TARGET_FILE_SIZE),
            None,
            Default::default(),
            None,
        );
        let mut writer = DeltaWriter::new(self.customer_hours.object_store(), config);
        while let Some(batch) = stream
            .try_next()
            .await
            .context("computing customer_hours")?
        {
            if batch.num_rows() == 0 {
                continue;
            }
            let batch = conform(&schema, batch.columns().to_vec())?;
            writer
                .write(&batch)
                .await
                .context("writing customer_hours files")?;
        }
        self.spill.add(plan.as_ref());
        let adds = writer
            .close()
            .await
            .context("writing customer_hours files")?;
        self.staging.put_json(&adds_name(i), &adds).await?;
        if adds.is_empty() {
            return Ok(Default::default());
        }
        let name = format!("customer_hours_{i}");
        self.register_customer_hours(&name, adds.iter().map(|a| a.path.as_str()))
            .await?;
        let hourly = self
            .spill
            .run(&self.ctx, &hourly_from_customers_sql(&name))
            .await;
        let quarters = match hourly {
            Ok(_) => {
                self.spill
                    .run(&self.ctx, &quarter_hourly_from_customers_sql(&name))
                    .await
            }
            Err(_) => Ok(Vec::new()),
        };
        let _ = self.ctx.deregister_table(name.as_str());
        let at = self.plan.computed_at;
        Ok((
            table_rows(MetricTable::Hourly, &hourly?, day, at)?,
            table_rows(MetricTable::QuarterHourly, &quarters?, day, at)?,
        ))
    }

    /// A day's part: its metric rows from the day's `customer_hours` rows.
    async fn day(&self, day: i64, part: u32, parts: u32) -> Result<Vec<RecordBatch>> {
        let mut paths: Vec<String> = Vec::new();
        // the stored files of the day's hours this run does not recompute
        let date = tally_common::bucket::date_string(day);
        for f in &self.customer_hours_files {
            if f.date == date && !self.plan.supersedes(f) {
                paths.push(f.path.clone());
            }
        }
        // and what this run's hour items wrote for it
        for (i, item) in self.plan.items.iter().enumerate() {
            if let Item::Hour { hour, .. } = item {
                if day_floor(*hour) == day {
                    let adds: Vec<Add> = self.staging.get_json(&adds_name(i)).await?.ok_or_else(|| {
                        Error::internal(format!(
                            "run {}: hour item {i} has not staged its files (day items run after every hour item)",
                            self.plan.run_id
                        ))
                    })?;
                    paths.extend(adds.into_iter().map(|a| a.path));
                }
            }
        }
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let name = format!("customer_days_{day}_{part}");
        self.register_customer_hours(&name, paths.iter().map(String::as_str))
            .await?;
        let rows = if parts > 1 {
            format!(
                "(SELECT * FROM {name} WHERE {PART_FUNCTION}(merchant_id, COALESCE(customer_id, ''), {parts}) = {part}) AS part"
            )
        } else {
            name.clone()
        };
        let out = self
            .spill
            .run(&self.ctx, &daily_from_customers_sql(&rows))
            .await;
        let _ = self.ctx.deregister_table(name.as_str());
        table_rows(MetricTable::Daily, &out?, day, self.plan.computed_at)
    }

    /// Register `customer_hours` files (paths relative to the table root, as in
    /// add actions) as table `name`.
    async fn register_customer_hours<'p>(
        &self,
        name: &str,
        paths: impl Iterator<Item = &'p str>,
    ) -> Result<()> {
        let schema = file_schema(&Table::CustomerHours.schema(), &["date"]);
        register_table_files(&self.ctx, &self.customer_hours, name, paths, schema).await
    }
}
