//! Rows of `raw_events` the batch layer cannot compute, moved to `quarantine`
//! at batch time, so that one row never stops a run for every merchant.
//!
//! The archiver's decoder refuses such lines, but `raw_events` is an open Delta
//! table: an older archiver, a Spark job or any Delta writer may add a row whose
//! `event_time` lies outside what the batch layer computes ([`COMPUTABLE_FROM`]
//! to [`COMPUTABLE_UNTIL`]: from the Unix epoch, as the contract says, to the
//! last whole day of DataFusion's nanosecond timestamps), a row in a partition
//! that names no hour or another hour than its `event_time`, a null in a column
//! the metrics need, or an amount whose sums could overflow.
//!
//! Finding them costs nothing on a clean table: each file's statistics in the
//! Delta log (null counts, smallest and largest `event_time` and `amount`) prove
//! it clean, and only the hour partitions holding a file they do not clear (or
//! partitions naming no computable hour at all) are scanned. The rows found are
//! written to `quarantine` with their payload, a reason and their source, then
//! deleted from `raw_events` with the same predicate, evaluated on the same
//! snapshot, so the delete removes exactly the rows written. The quarantine
//! commit carries a mark per raw file it took rows from (`txn` actions): a run
//! killed between the two commits finds the marks on its rerun and only deletes.
//!
//! The metric queries also read only rows that pass [`computable_row_sql`], so
//! a row that arrives between this check and the queries is left out rather
//! than failing the run (and is moved by the next run that sees its hour dirty).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int32Type, Int64Type};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::{format_ts, MICROS_PER_HOUR};
use tally_common::decode::MAX_AMOUNT;
use tally_common::lake::{Lake, Table};
use tally_common::{Context as _, Error, Result};

use crate::archive::{backoff, is_retryable, quarantine_batch, writer_properties, COMMIT_ATTEMPTS};
use crate::dirty::RawFile;

/// The first instant the batch layer computes: the Unix epoch (events before it
/// break the contract).
pub const COMPUTABLE_FROM: i64 = 0;
/// The end of what the batch layer computes: 2262-04-11T00:00:00Z, the last
/// midnight DataFusion's nanosecond timestamps (which analysts' queries and
/// `date_trunc` go through) can hold.
pub const COMPUTABLE_UNTIL: i64 = 9_223_286_400_000_000;

/// The name of the file column of the scan that finds bad rows.
const FILE_COLUMN: &str = "__tally_raw_file";
/// App id prefix of the marks the quarantine commit carries, one per raw file.
const MARK_PREFIX: &str = "tally.batch.quarantined/";

/// Whether the hour starting at `h` (epoch µs) is one the batch layer computes.
pub fn computable_hour(h: i64) -> bool {
    (COMPUTABLE_FROM..COMPUTABLE_UNTIL).contains(&h)
}

/// An SQL condition true exactly for a row the batch layer can compute in the
/// hour starting at `hour_start` (an SQL integer expression, epoch µs): the
/// columns the metrics need are present, `event_time` lies in that hour and
/// `amount` is in the contract's range. Time is compared as integers
/// (`CAST(event_time AS BIGINT)` is the stored microseconds), never through
/// nanosecond timestamps.
pub fn computable_row_sql(hour_start: &str) -> String {
    format!(
        "(merchant_id IS NOT NULL AND event_id IS NOT NULL AND event_type IS NOT NULL \
         AND event_time IS NOT NULL \
         AND CAST(event_time AS BIGINT) >= ({hour_start}) \
         AND CAST(event_time AS BIGINT) < ({hour_start}) + {MICROS_PER_HOUR} \
         AND (amount IS NULL OR (amount >= 0 AND amount <= {MAX_AMOUNT})))"
    )
}

/// Whether a file of a computable hour partition may hold a row that is not
/// computable, judged from its statistics alone (missing statistics: it may).
/// Delta statistics are exact bounds (timestamps truncated to milliseconds,
/// which keeps the hour bounds' comparisons conservative) that every reader
/// already trusts to skip files.
pub fn suspect(file: &RawFile, hour: i64) -> bool {
    let Some(n) = file.num_records else {
        return true;
    };
    if n == 0 {
        return false;
    }
    if file.required_nulls != Some(0) {
        return true;
    }
    match file.event_time {
        Some((lo, hi)) if lo >= hour && hi < hour + MICROS_PER_HOUR => {}
        _ => return true,
    }
    if file.amount_nulls == Some(n) {
        return false;
    }
    match file.amount {
        Some((lo, hi)) => lo < 0 || hi > MAX_AMOUNT,
        None => true,
    }
}

/// A raw partition's values as the log holds them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Partition {
    date: Option<String>,
    hour: Option<i32>,
}

impl Partition {
    fn of(file: &RawFile) -> Self {
        Partition {
            date: file.event_date.clone(),
            hour: file.event_hour,
        }
    }

    fn sql(&self) -> String {
        let d = match &self.date {
            Some(d) => format!("event_date = '{}'", d.replace('\'', "''")),
            None => "event_date IS NULL".to_string(),
        };
        let h = match self.hour {
            Some(h) => format!("event_hour = {h}"),
            None => "event_hour IS NULL".to_string(),
        };
        format!("({d} AND {h})")
    }

    fn describe(&self) -> String {
        format!(
            "event_date={}/event_hour={}",
            self.date.as_deref().unwrap_or("null"),
            self.hour.map_or("null".to_string(), |h| h.to_string())
        )
    }
}

/// One row to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The raw file it is in (path relative to the table root).
    pub file: String,
    /// The original line (or, if a writer left `payload` null, the row as JSON).
    pub payload: Vec<u8>,
    /// Why it cannot be computed, `code: detail`.
    pub reason: String,
    /// Its `source` in `raw_events`.
    pub source: String,
    /// Its `ingest_time` (the run's time when that is not a computable instant).
    pub ingest_time: i64,
}

/// The rows of one `raw_events` snapshot the batch layer cannot compute.
#[derive(Debug, Default)]
pub struct BadRows {
    /// The rows.
    pub rows: Vec<BadRow>,
    /// An SQL predicate matching exactly these rows in the snapshot screened.
    predicate: String,
}

impl BadRows {
    /// Whether there is nothing to move.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Find the rows of `raw` (at its loaded version) that the batch layer cannot
/// compute: in partitions naming no computable hour, and in the `hours` about to
/// be computed wherever a file's statistics do not clear it.
pub async fn screen(
    raw: &DeltaTable,
    files: &[RawFile],
    hours: &BTreeSet<i64>,
    now: i64,
    memory: &crate::memory::MemoryBound,
) -> Result<BadRows> {
    // partition -> Some(hour start) when it names a computable hour (only its bad
    // rows go), None when every row in it goes
    let mut parts: BTreeMap<Partition, Option<i64>> = BTreeMap::new();
    for f in files {
        match f.hour() {
            Some(h) if computable_hour(h) => {
                if hours.contains(&h) && suspect(f, h) {
                    parts.insert(Partition::of(f), Some(h));
                }
            }
            _ => {
                parts.insert(Partition::of(f), None);
            }
        }
    }
    if parts.is_empty() {
        return Ok(BadRows::default());
    }
    let predicate = parts
        .iter()
        .map(|(p, h)| match h {
            Some(h) => format!(
                "({} AND {} IS NOT TRUE)",
                p.sql(),
                computable_row_sql(&h.to_string())
            ),
            None => p.sql(),
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    tracing::info!(
        partitions = parts.len(),
        "raw partitions that may hold rows the batch layer cannot compute; scanning them"
    );

    let ctx = memory.session()?;
    raw.update_datafusion_session(&ctx.state())
        .context("registering the object store of raw_events")?;
    let provider = raw
        .table_provider()
        .with_file_column(FILE_COLUMN)
        .await
        .context("reading raw_events")?;
    ctx.register_table("raw_screen", provider)
        .context("registering raw_events")?;
    let sql = format!(
        "SELECT \"{FILE_COLUMN}\" AS file, event_id, merchant_id, event_type, \
         CAST(event_time AS BIGINT) AS event_us, amount, customer_id, \
         CAST(ingest_time AS BIGINT) AS ingest_us, source, payload, event_date, event_hour \
         FROM raw_screen WHERE {predicate}"
    );
    let batches = ctx
        .sql(&sql)
        .await
        .context("planning the raw_events check")?
        .collect()
        .await
        .context("checking raw_events for rows the batch layer cannot compute")?;

    let mut rows = Vec::new();
    for b in &batches {
        let s = |name: &str| strings(b, name);
        let (file, event_id, merchant, event_type) = (
            s("file")?,
            s("event_id")?,
            s("merchant_id")?,
            s("event_type")?,
        );
        let (customer, source, payload, date) = (
            s("customer_id")?,
            s("source")?,
            s("payload")?,
            s("event_date")?,
        );
        let (event_us, amount, ingest_us) = (
            ints(b, "event_us")?,
            ints(b, "amount")?,
            ints(b, "ingest_us")?,
        );
        let hour = b
            .column_by_name("event_hour")
            .map(|c| cast(c, &DataType::Int32))
            .transpose()
            .context("reading event_hour")?;
        for i in 0..b.num_rows() {
            let part = Partition {
                date: date[i].clone(),
                hour: hour.as_ref().and_then(|h| {
                    let h = h.as_primitive::<Int32Type>();
                    (!h.is_null(i)).then(|| h.value(i))
                }),
            };
            let hour_start = parts.get(&part).copied().flatten();
            let row = RowView {
                event_id: event_id[i].as_deref(),
                merchant_id: merchant[i].as_deref(),
                event_type: event_type[i].as_deref(),
                event_us: event_us[i],
                amount: amount[i],
                customer_id: customer[i].as_deref(),
            };
            let file = file[i].clone().unwrap_or_default();
            rows.push(BadRow {
                reason: reason(&row, &part, hour_start),
                payload: match &payload[i] {
                    Some(p) => p.clone().into_bytes(),
                    None => row.to_json().into_bytes(),
                },
                source: source[i]
                    .clone()
                    .unwrap_or_else(|| format!("raw_events/{file}")),
                ingest_time: ingest_us[i]
                    .filter(|&t| (COMPUTABLE_FROM..COMPUTABLE_UNTIL).contains(&t))
                    .unwrap_or(now),
                file,
            });
        }
    }
    Ok(BadRows { rows, predicate })
}

/// The fields of a raw row that decide whether it can be computed.
struct RowView<'a> {
    event_id: Option<&'a str>,
    merchant_id: Option<&'a str>,
    event_type: Option<&'a str>,
    event_us: Option<i64>,
    amount: Option<i64>,
    customer_id: Option<&'a str>,
}

impl RowView<'_> {
    /// The row as an event line, for a row whose writer left `payload` null.
    fn to_json(&self) -> String {
        let ts = self.event_us.map(|t| match format_ts(t) {
            s if s.starts_with('@') => serde_json::json!(t.div_euclid(1000)),
            s => serde_json::json!(s),
        });
        serde_json::json!({
            "event_id": self.event_id,
            "merchant_id": self.merchant_id,
            "type": self.event_type,
            "ts": ts,
            "amount": self.amount,
            "customer_id": self.customer_id,
        })
        .to_string()
    }
}

/// Why a row the screen selected cannot be computed, as `code: detail`.
fn reason(row: &RowView<'_>, part: &Partition, hour_start: Option<i64>) -> String {
    let detail = || -> String {
        for (name, missing) in [
            ("event_id", row.event_id.is_none()),
            ("merchant_id", row.merchant_id.is_none()),
            ("event_type", row.event_type.is_none()),
            ("event_time", row.event_us.is_none()),
        ] {
            if missing {
                return format!("missing_field: `{name}` is null");
            }
        }
        let t = row.event_us.unwrap_or_default();
        if !(COMPUTABLE_FROM..COMPUTABLE_UNTIL).contains(&t) {
            return format!(
                "out_of_range: event_time {} cannot be computed (the batch layer computes {} to {})",
                format_ts(t),
                format_ts(COMPUTABLE_FROM),
                format_ts(COMPUTABLE_UNTIL)
            );
        }
        match hour_start {
            None => {
                return format!(
                    "invalid_partition: {} names no hour the batch layer computes (event_time {})",
                    part.describe(),
                    format_ts(t)
                )
            }
            Some(h) if t < h || t >= h + MICROS_PER_HOUR => {
                return format!(
                    "misplaced: event_time {} is not in its partition {}",
                    format_ts(t),
                    part.describe()
                )
            }
            Some(_) => {}
        }
        match row.amount {
            Some(a) if !(0..=MAX_AMOUNT).contains(&a) => {
                format!("out_of_range: amount {a} is outside 0..={MAX_AMOUNT}")
            }
            _ => "uncomputable: the row fails the batch layer's checks".to_string(),
        }
    };
    format!("{}; moved from raw_events by the batch layer", detail())
}

fn strings(b: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| Error::internal(format!("the raw_events check returned no {name}")))?;
    let c: ArrayRef = cast(c, &DataType::Utf8).context(format!("reading {name}"))?;
    let c = c.as_string::<i32>();
    Ok((0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i).to_string()))
        .collect())
}

fn ints(b: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| Error::internal(format!("the raw_events check returned no {name}")))?;
    let c: ArrayRef = cast(c, &DataType::Int64).context(format!("reading {name}"))?;
    let c = c.as_primitive::<Int64Type>();
    Ok((0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i)))
        .collect())
}

fn mark_app(file: &str) -> String {
    format!("{MARK_PREFIX}{file}")
}

/// Write `bad`'s rows to `quarantine`, except those of raw files whose mark the
/// table already holds (a killed run wrote them); returns the rows written.
pub async fn write(lake: &Lake, bad: &BadRows) -> Result<u64> {
    if bad.is_empty() {
        return Ok(0);
    }
    let mut table = lake.open_or_create(Table::Quarantine).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut per_file: BTreeMap<&str, Vec<&BadRow>> = BTreeMap::new();
        for r in &bad.rows {
            per_file.entry(r.file.as_str()).or_default().push(r);
        }
        let mut marked = HashMap::new();
        if let Ok(state) = table.snapshot() {
            for f in per_file.keys() {
                let v = state
                    .transaction_version(table.log_store().as_ref(), mark_app(f))
                    .await
                    .context("reading quarantine marks")?;
                marked.insert(*f, v.is_some());
            }
        }
        per_file.retain(|f, _| !marked.get(f).copied().unwrap_or(false));
        if per_file.is_empty() {
            tracing::info!("the rows to quarantine are there already (an earlier run was stopped before deleting them)");
            return Ok(0);
        }
        let rows: Vec<&BadRow> = per_file.values().flatten().copied().collect();
        let n = rows.len() as u64;
        let now = chrono::Utc::now().timestamp_millis();
        let marks: Vec<Transaction> = per_file
            .iter()
            .map(|(f, rows)| {
                Transaction::new_with_last_update(mark_app(f), rows.len() as i64, Some(now))
            })
            .collect();
        let commit = CommitProperties::default()
            .with_application_transactions(marks)
            .with_metadata([tally_common::lake::operation("batch quarantine")]);
        let result = table
            .clone()
            .write(vec![quarantine_batch(rows.iter().map(|r| {
                (r.payload.as_slice(), &r.reason, &r.source, r.ingest_time)
            }))?])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(Table::Quarantine.partition_columns().iter().copied())
            .with_writer_properties(writer_properties())
            .with_commit_properties(commit)
            .await;
        match result {
            Ok(_) => {
                tracing::warn!(
                    rows = n,
                    "moved rows the batch layer cannot compute from raw_events to quarantine"
                );
                return Ok(n);
            }
            Err(e) if attempt < COMMIT_ATTEMPTS && is_retryable(&e) => {
                tracing::warn!(attempt, error = %e, "quarantine commit lost a race; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                table
                    .update_state()
                    .await
                    .context("refreshing quarantine")?;
            }
            Err(e) => return Err(e).context("committing rows to quarantine"),
        }
    }
}

/// Delete `bad`'s rows from `raw`, the snapshot they were found in; returns the
/// table at the delete's version, or None when the delete lost a race with
/// another writer (the caller screens a fresh snapshot again).
pub async fn delete(raw: &DeltaTable, bad: &BadRows) -> Result<Option<DeltaTable>> {
    let result = raw
        .clone()
        .delete()
        .with_predicate(bad.predicate.clone())
        .with_writer_properties(writer_properties())
        .with_commit_properties(
            CommitProperties::default()
                .with_metadata([tally_common::lake::operation("batch quarantine")]),
        )
        .await;
    match result {
        Ok((table, metrics)) => {
            if metrics
                .num_deleted_rows
                .is_some_and(|n| n != bad.rows.len())
            {
                tracing::error!(
                    deleted = metrics.num_deleted_rows,
                    quarantined = bad.rows.len(),
                    "the quarantine delete removed another number of rows than it found"
                );
            }
            Ok(Some(table))
        }
        Err(e) if is_retryable(&e) => {
            tracing::warn!(error = %e, "the quarantine delete lost a race; screening again");
            Ok(None)
        }
        Err(e) => Err(e).context("deleting quarantined rows from raw_events"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::parse_ts;

    fn file(n: i64, t: (i64, i64)) -> RawFile {
        RawFile {
            path: "p".into(),
            event_date: Some("2025-11-24".into()),
            event_hour: Some(3),
            num_records: Some(n),
            required_nulls: Some(0),
            event_time: Some(t),
            amount_nulls: Some(0),
            amount: Some((0, 100)),
        }
    }

    #[test]
    fn statistics_clear_only_files_that_are_surely_computable() {
        let h = parse_ts("2025-11-24T03:00:00Z").unwrap();
        let ok = file(10, (h, h + MICROS_PER_HOUR - 1));
        assert!(!suspect(&ok, h));
        assert!(
            suspect(&file(10, (h - 1, h + 5)), h),
            "an earlier hour's row"
        );
        assert!(
            suspect(&file(10, (h, h + MICROS_PER_HOUR)), h),
            "the next hour's row"
        );
        assert!(suspect(
            &RawFile {
                num_records: None,
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                required_nulls: Some(1),
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                required_nulls: None,
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                event_time: None,
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                amount: Some((-1, 5)),
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                amount: Some((0, MAX_AMOUNT + 1)),
                ..ok.clone()
            },
            h
        ));
        assert!(suspect(
            &RawFile {
                amount: None,
                amount_nulls: Some(3),
                ..ok.clone()
            },
            h
        ));
        // page views only: no amounts at all
        assert!(!suspect(
            &RawFile {
                amount: None,
                amount_nulls: Some(10),
                ..ok.clone()
            },
            h
        ));
        assert!(!suspect(
            &RawFile {
                num_records: Some(0),
                event_time: None,
                ..ok
            },
            h
        ));
    }

    #[test]
    fn the_computable_range_is_whole_hours_from_the_epoch_to_2262() {
        assert_eq!(format_ts(COMPUTABLE_UNTIL), "2262-04-11T00:00:00Z");
        assert!(computable_hour(0));
        assert!(!computable_hour(-MICROS_PER_HOUR));
        assert!(computable_hour(COMPUTABLE_UNTIL - MICROS_PER_HOUR));
        assert!(!computable_hour(COMPUTABLE_UNTIL));
        // every nanosecond of the last computable hour fits an i64
        assert!((COMPUTABLE_UNTIL as i128) * 1000 < i64::MAX as i128);
    }

    #[test]
    fn reasons_name_the_first_problem() {
        let p = Partition {
            date: Some("2025-11-24".into()),
            hour: Some(3),
        };
        let h = parse_ts("2025-11-24T03:00:00Z").unwrap();
        let row = |t: Option<i64>, amount: Option<i64>| RowView {
            event_id: Some("e"),
            merchant_id: Some("m"),
            event_type: Some("order"),
            event_us: t,
            amount,
            customer_id: None,
        };
        let old = parse_ts("1600-01-01T00:00:00Z").unwrap();
        assert!(reason(&row(Some(old), Some(1)), &p, Some(h))
            .starts_with("out_of_range: event_time 1600-01-01T00:00:00Z cannot be computed"));
        assert!(reason(&row(Some(i64::MIN), None), &p, Some(h)).starts_with("out_of_range"));
        assert!(reason(&row(None, None), &p, Some(h)).starts_with("missing_field: `event_time`"));
        assert!(reason(&row(Some(h + MICROS_PER_HOUR), None), &p, Some(h))
            .starts_with("misplaced: event_time 2025-11-24T04:00:00Z is not in its partition event_date=2025-11-24/event_hour=3"));
        assert!(reason(&row(Some(h), Some(-5)), &p, Some(h)).starts_with("out_of_range: amount -5"));
        let weird = Partition {
            date: Some("garbage".into()),
            hour: None,
        };
        assert!(reason(&row(Some(h), None), &weird, None)
            .starts_with("invalid_partition: event_date=garbage/event_hour=null"));
        assert!(row(Some(old), Some(1))
            .to_json()
            .contains("\"ts\":\"1600-01-01T00:00:00Z\""));
    }
}
