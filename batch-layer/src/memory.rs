//! The batch layer's memory bound: every query runs in a DataFusion session
//! whose memory pool holds at most a set number of bytes and whose operators
//! (the aggregations, sorts) spill to local disk beyond it, so a bigger hour is
//! slower, never killed. The spill it caused is read back from the plan's
//! metrics and reported.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use deltalake::datafusion::execution::memory_pool::FairSpillPool;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::execution::SessionStateBuilder;
use deltalake::datafusion::physical_plan::{
    collect, execute_stream, ExecutionPlan, SendableRecordBatchStream,
};
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::delta_datafusion::planner::DeltaPlanner;
use tally_common::config::parse_bytes;
use tally_common::{Context as _, Error, Result};

/// DataFusion's default rows per batch, used from [`FULL_BATCH_FROM`] bytes up.
const FULL_BATCH_ROWS: usize = 8192;

/// The memory bound from which queries use full batches.
const FULL_BATCH_FROM: usize = 512 << 20;

/// How much memory a run's queries may hold, and where they spill.
#[derive(Debug, Clone)]
pub struct MemoryBound {
    /// Bytes of the memory pool shared by a session's operators.
    pub limit: u64,
    /// Directory of spill files; None: the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
}

impl Default for MemoryBound {
    /// [`tally_common::config::DEFAULT_BATCH_MEMORY`], spilling to the temporary directory.
    fn default() -> Self {
        MemoryBound {
            limit: parse_bytes(tally_common::config::DEFAULT_BATCH_MEMORY).unwrap_or(2 << 30),
            spill_dir: None,
        }
    }
}

impl MemoryBound {
    /// A session under this bound: a fair spill pool of `limit` bytes (each
    /// spilling operator gets its share and spills past it) and a disk manager
    /// writing to `spill_dir`. Errors: [`Error::Config`] when the runtime cannot
    /// be built (e.g. the spill directory cannot be created).
    pub fn session(&self) -> Result<SessionContext> {
        self.session_with(SessionConfig::new())
    }

    /// A session under this bound for writing sorted rows: one partition, so
    /// the order of the plan's output is the order written.
    pub fn ordered_session(&self) -> Result<SessionContext> {
        self.session_with(SessionConfig::new().with_target_partitions(1))
    }

    fn session_with(&self, config: SessionConfig) -> Result<SessionContext> {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let disk = DiskManagerBuilder::default().with_mode(match &self.spill_dir {
            Some(dir) => DiskManagerMode::Directories(vec![dir.clone()]),
            None => DiskManagerMode::OsTmpDirectory,
        });
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(limit)))
            .with_disk_manager_builder(disk)
            .build_arc()
            .map_err(|e| Error::config(format!("the batch layer's query runtime: {e}")))?;
        // a sort keeps this much back for merging its spill files (DataFusion's
        // default, 10 MiB, is more than a small bound holds in all)
        let merge_reserve = (limit / 16).min(10 << 20);
        // each of a plan's spilling operators (the aggregations and sorts of every
        // partition) gets an equal share of the pool and must fit one batch of
        // rows in it: small bounds get smaller batches
        let batch_rows = (FULL_BATCH_ROWS * limit / FULL_BATCH_FROM).clamp(256, FULL_BATCH_ROWS);
        let config = config
            .with_sort_spill_reservation_bytes(merge_reserve)
            .with_batch_size(batch_rows);
        // delta-rs's planner: its writes from a plan run in this session too
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_query_planner(DeltaPlanner::new())
            .build();
        let ctx = SessionContext::new_with_state(state);
        tally_common::sketch_sql::register_sketch_functions(&ctx);
        Ok(ctx)
    }
}

/// Bytes the queries of a run spilled to disk, summed over its queries.
#[derive(Debug, Default)]
pub struct SpillMeter(AtomicU64);

impl SpillMeter {
    /// Run `sql` in `ctx`, collect its rows and add what its plan spilled.
    pub async fn run(&self, ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
        let plan = ctx
            .sql(sql)
            .await
            .context("planning the metrics query")?
            .create_physical_plan()
            .await
            .context("planning the metrics query")?;
        let rows = collect(Arc::clone(&plan), ctx.task_ctx())
            .await
            .context("running the metrics query")?;
        self.0
            .fetch_add(spilled_bytes(plan.as_ref()), Ordering::Relaxed);
        Ok(rows)
    }

    /// Plan `sql` in `ctx` and start it: the plan (hand it to
    /// [`SpillMeter::add`] once its stream is drained) and the stream of its rows.
    pub async fn stream(
        &self,
        ctx: &SessionContext,
        sql: &str,
    ) -> Result<(Arc<dyn ExecutionPlan>, SendableRecordBatchStream)> {
        let plan = ctx
            .sql(sql)
            .await
            .context("planning the metrics query")?
            .create_physical_plan()
            .await
            .context("planning the metrics query")?;
        let stream = execute_stream(Arc::clone(&plan), ctx.task_ctx())
            .context("running the metrics query")?;
        Ok((plan, stream))
    }

    /// Add what a plan run with [`SpillMeter::stream`] spilled.
    pub fn add(&self, plan: &dyn ExecutionPlan) {
        self.0.fetch_add(spilled_bytes(plan), Ordering::Relaxed);
    }

    /// Bytes spilled so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bytes spilled by `plan` and its children (DataFusion's `spilled_bytes` metric).
fn spilled_bytes(plan: &dyn ExecutionPlan) -> u64 {
    let own = plan.metrics().and_then(|m| m.spilled_bytes()).unwrap_or(0) as u64;
    own + plan
        .children()
        .into_iter()
        .map(|c| spilled_bytes(c.as_ref()))
        .sum::<u64>()
}
