//! The embedded speed view's feed from the master dataset.
//!
//! With no Redis configured, the speed view lives in the serving process. At
//! start it is rebuilt from the `raw_events` rows newer than the batch watermark;
//! then it follows the table: every tick it reads the new commits of the Delta
//! log and applies the rows of the files they added (never rescanning the
//! table), so what another process ingested shows within seconds.

use std::time::Duration;

use tally_common::deltalake;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
use deltalake::datafusion::prelude::{col, lit, ParquetReadOptions, SessionContext};
use deltalake::DeltaTable;
use tally_common::bucket::{date_string, now_micros};
use tally_common::lake::{read_commit, register, FileChange, Lake, Table};
use tally_common::shutdown::Shutdown;
use tally_common::source::{Position, Record, SourceId};
use tally_common::watermark::read_progress;
use tally_common::{Context as _, Error, Result};

use crate::{apply_records, SpeedStore};

/// Follows `raw_events` into a speed store.
pub struct RawFeed {
    lake: Lake,
    table: Option<DeltaTable>,
    version: i64,
    position: u64,
    source: SourceId,
}

async fn watermark(lake: &Lake) -> Result<i64> {
    Ok(match lake.open(Table::MetricsHourly).await? {
        Some(t) => read_progress(&t).await?.watermark.unwrap_or(i64::MIN),
        None => i64::MIN,
    })
}

/// Concatenate the payloads of rows at or after `since` into one NDJSON record.
/// Errors: a batch without the `payload` and `event_time` columns
/// ([`Error::Internal`]), or whose columns cannot be read as text and
/// timestamps ([`Error::Arrow`]).
fn payloads(batches: &[RecordBatch], since: i64) -> Result<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut n = 0;
    for b in batches {
        let column = |name: &str| {
            b.column_by_name(name).ok_or_else(|| {
                Error::internal(format!("a batch of raw_events rows has no {name} column"))
            })
        };
        // DataFusion may hand strings out as views: normalise before reading
        let p = cast(column("payload")?, &DataType::Utf8).context("reading raw_events.payload")?;
        let t = cast(
            column("event_time")?,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )
        .context("reading raw_events.event_time")?;
        let p = p.as_string::<i32>();
        let t = t.as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            if !t.is_null(i) && t.value(i) >= since {
                out.extend_from_slice(p.value(i).as_bytes());
                out.push(b'\n');
                n += 1;
            }
        }
    }
    Ok((out, n))
}

impl RawFeed {
    /// Rebuild `store` from the rows of `raw_events` newer than the watermark.
    pub async fn start(lake: &Lake, store: &SpeedStore) -> Result<(Self, u64)> {
        let mut feed = RawFeed {
            lake: lake.clone(),
            table: None,
            version: -1,
            position: 0,
            source: SourceId::file(&format!("raw_events-feed-{}", now_micros())),
        };
        let Some(table) = lake.open(Table::RawEvents).await? else {
            return Ok((feed, 0));
        };
        let w = watermark(lake).await?;
        let ctx = SessionContext::new();
        register(&ctx, "raw_events", &table).await?;
        let mut df = ctx
            .table("raw_events")
            .await
            .context("reading raw_events")?;
        if w > i64::MIN {
            df = df
                .filter(
                    col("event_date")
                        .gt_eq(lit(date_string(w)))
                        .and(col("event_time").gt_eq(tally_common::lake::utc_micros(w))),
                )
                .context("filtering raw_events")?;
        }
        let batches = df
            .select_columns(&["payload", "event_time"])
            .context("projecting raw_events")?
            .collect()
            .await
            .context("reading raw_events")?;
        feed.version = table.version().map_or(-1, |v| v as i64);
        feed.table = Some(table);
        let n = feed.apply(store, &batches, w).await?;
        Ok((feed, n))
    }

    async fn apply(
        &mut self,
        store: &SpeedStore,
        batches: &[RecordBatch],
        since: i64,
    ) -> Result<u64> {
        let (record, n) = payloads(batches, since)?;
        if n == 0 {
            return Ok(0);
        }
        self.position += 1;
        apply_records(
            store,
            self.source.clone(),
            [Record::new(Position::from_u64(self.position), &record)],
            now_micros(),
        )
        .await?;
        Ok(n)
    }

    /// Apply what was committed since the last call; returns the events applied.
    pub async fn poll(&mut self, store: &SpeedStore) -> Result<u64> {
        if self.table.is_none() {
            self.table = self.lake.open(Table::RawEvents).await?;
            if self.table.is_none() {
                return Ok(0);
            }
        }
        let Some(table) = self.table.as_mut() else {
            return Ok(0);
        };
        table.update_state().await.context("following raw_events")?;
        let latest = table.version().map_or(-1, |v| v as i64);
        if latest <= self.version {
            return Ok(0);
        }
        let root = table.table_url().clone();
        let mut files = Vec::new();
        for v in (self.version + 1)..=latest {
            let Some(commit) = read_commit(table, v as u64).await? else {
                continue;
            };
            for file in commit.files {
                if file.change != FileChange::Added || !file.data_change {
                    continue;
                }
                let path = file.path.ok_or_else(|| {
                    Error::internal(format!("commit {v} of raw_events adds a file with no path"))
                })?;
                let url = root.join(&path).map_err(|e| {
                    Error::internal(format!(
                        "commit {v} of raw_events adds {path:?}, not a file of {root}: {e}"
                    ))
                })?;
                files.push(url.to_string());
            }
        }
        let table_snapshot = table.clone();
        self.version = latest;
        if files.is_empty() {
            return Ok(0);
        }
        let ctx = SessionContext::new();
        table_snapshot
            .update_datafusion_session(&ctx.state())
            .context("registering the lake")?;
        let batches = ctx
            .read_parquet(files, ParquetReadOptions::default())
            .await
            .context("reading new raw_events files")?
            .select_columns(&["payload", "event_time"])
            .context("projecting new raw_events files")?
            .collect()
            .await
            .context("reading new raw_events files")?;
        let w = watermark(&self.lake).await?;
        self.apply(store, &batches, w).await
    }

    /// Poll every `every` until shutdown (errors are logged; the next tick retries).
    pub async fn follow(mut self, store: SpeedStore, every: Duration, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
            match self.poll(&store).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(events = n, "speed view followed raw_events"),
                Err(e) => tracing::warn!(error = %e, "following raw_events failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deltalake::arrow::array::{ArrayRef, BooleanArray, StringArray, TimestampMicrosecondArray};

    use super::*;

    #[test]
    fn payloads_after_the_watermark_make_one_record_and_an_unreadable_batch_is_an_error() {
        let payload: ArrayRef = Arc::new(StringArray::from(vec!["{\"a\":1}", "{\"b\":2}"]));
        let time: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![5, 10]));
        let good = RecordBatch::try_from_iter([
            ("payload", payload.clone()),
            ("event_time", time.clone()),
        ])
        .unwrap();
        assert_eq!(
            payloads(std::slice::from_ref(&good), 10).unwrap(),
            (b"{\"b\":2}\n".to_vec(), 1)
        );

        let no_time = RecordBatch::try_from_iter([("payload", payload.clone())]).unwrap();
        let e = payloads(&[good.clone(), no_time], 0).unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");

        let bad_time = RecordBatch::try_from_iter([
            ("payload", payload),
            (
                "event_time",
                Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef,
            ),
        ])
        .unwrap();
        let e = payloads(&[good, bad_time], 0).unwrap_err();
        assert!(matches!(e, Error::Arrow { .. }), "{e}");
    }
}
