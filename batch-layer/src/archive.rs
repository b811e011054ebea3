//! The archiver: batches of records into the master dataset.
//!
//! A batch of one source's records becomes one Delta commit to `raw_events`
//! (one zstd Parquet file per touched hour partition, rows sorted by
//! `merchant_id`, the original line kept in `payload`) and, when it had bad
//! lines, one commit to `quarantine`. Each commit carries the source's mark
//! ([`crate::marks`]) in the same atomic step, and records at or below the
//! table's mark are dropped before writing: a retried, bisected or rerun batch
//! adds no row twice and loses none. A commit that loses a race is retried on a
//! fresh snapshot (re-checking the mark) and never dropped silently.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use tally_common::bucket::{date_string, hour_floor, hour_of_day};
use tally_common::decode::{decode_record, DecodedRecord};
use tally_common::lake::{self, Lake, Table};
use tally_common::source::{Position, Record, RowOrigin, SourceId};
use tally_common::{Context as _, Result};

use tally_common::marks::{commit_with_mark, commit_with_marks, read_mark};

/// How many times a commit that lost to concurrent writers is retried on a fresh snapshot.
pub(crate) const COMMIT_ATTEMPTS: u32 = 8;

/// What archiving one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Events written to `raw_events`.
    pub accepted: u64,
    /// Lines written to `quarantine`.
    pub quarantined: u64,
    /// Blank lines skipped.
    pub blank: u64,
    /// Records skipped because the table's mark shows they were archived before.
    pub already_archived: u64,
    /// The `raw_events` version written (None when nothing was new).
    pub raw_version: Option<u64>,
}

/// Parquet settings of the master dataset (`raw_events`, `quarantine`): zstd at
/// level 1 (the archiver's largest single cost at level 3, for files about 6%
/// larger), no dictionary for the columns whose values are all different
/// (building one and giving it up cost time for nothing), and no min/max
/// statistics for the original lines (never filtered on).
pub fn writer_properties() -> WriterProperties {
    let unique = ["event_id", "payload", "source", "reason"];
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        .set_max_row_group_row_count(Some(128 * 1024));
    for c in unique {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false);
    }
    b.set_column_statistics_enabled(ColumnPath::from("payload"), EnabledStatistics::None)
        .build()
}

/// Writes batches of one or many sources to the master dataset, keeping both
/// tables' snapshots between batches.
pub struct Archiver {
    lake: Lake,
    raw: ArchiveTable,
    quarantine: ArchiveTable,
}

/// A snapshot older than this is refreshed before a first commit attempt: a
/// long-idle archiver (a Lambda container reused after an hour) would otherwise
/// have Delta's conflict check read every commit since.
const MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(10);

/// One record of a batch, decoded: its position and its events and rejects.
type Decoded<'a> = (&'a Position, DecodedRecord);

struct RawRow<'a> {
    hour: i64,
    event: &'a tally_common::Event,
    payload: &'a str,
    position: &'a Position,
}

impl Archiver {
    /// Open (creating when missing) `raw_events` and `quarantine` of `lake`.
    pub async fn open(lake: &Lake) -> Result<Self> {
        Ok(Archiver {
            raw: ArchiveTable::open(lake, Table::RawEvents).await?,
            quarantine: ArchiveTable::open(lake, Table::Quarantine).await?,
            lake: lake.clone(),
        })
    }

    /// The lake written to.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Archive one source's records (in source order) received at `ingest_time` (epoch µs).
    pub async fn archive(
        &mut self,
        source: &SourceId,
        records: &[Record<'_>],
        ingest_time: i64,
    ) -> Result<ArchiveReport> {
        let Some(last) = records.last().map(|r| r.position.clone()) else {
            return Ok(ArchiveReport::default());
        };
        let decoded: Vec<Decoded<'_>> = records
            .iter()
            .map(|r| (&r.position, decode_record(r.data, ingest_time)))
            .collect();
        // quarantine first: a crash between the two commits re-runs the batch, and the
        // quarantine mark then skips what it already holds
        let quarantined = self
            .quarantine_rejects(source, &last, &decoded, ingest_time)
            .await?;
        let mut report = self
            .archive_events(source, &last, &decoded, ingest_time)
            .await?;
        report.quarantined = quarantined;
        Ok(report)
    }

    /// Archive several sources' records (each in source order) in one commit
    /// per table carrying every source's mark: a **group commit**. Writers of
    /// one `raw_events` that commit at once lose races to each other (each
    /// loser writes its files again), so the log's commit rate binds before S3
    /// does (BENCHMARKS.md, "The stream side at scale"); one committer for many
    /// shards makes one commit of many batches. Reports are in `items`' order.
    /// `items`: each source (at most once) with its records and the time they
    /// were received (epoch µs). Errors: as [`Archiver::archive`]; the group is
    /// then not archived (none of it: one commit per table) and is delivered
    /// again.
    pub async fn archive_group(
        &mut self,
        items: &[(SourceId, Vec<Record<'_>>, i64)],
    ) -> Result<Vec<ArchiveReport>> {
        let mut seen = std::collections::HashSet::new();
        if let Some((s, _, _)) = items.iter().find(|(s, _, _)| !seen.insert(s.as_str())) {
            return Err(tally_common::Error::invalid(format!(
                "a group commit holds {s} twice: one batch per source"
            )));
        }
        let decoded: Vec<Vec<Decoded<'_>>> = items
            .iter()
            .map(|(_, records, ingest_time)| {
                records
                    .iter()
                    .map(|r| (&r.position, decode_record(r.data, *ingest_time)))
                    .collect()
            })
            .collect();
        let lasts: Vec<Option<Position>> = items
            .iter()
            .map(|(_, r, _)| r.last().map(|r| r.position.clone()))
            .collect();
        let marks: Vec<(&SourceId, &Position)> = items
            .iter()
            .zip(&lasts)
            .filter_map(|((s, _, _), l)| l.as_ref().map(|l| (s, l)))
            .collect();
        let index: Vec<usize> = lasts
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some())
            .map(|(i, _)| i)
            .collect();
        // quarantine first, as [`Archiver::archive`]
        let quarantined = if decoded
            .iter()
            .all(|d| d.iter().all(|(_, d)| d.rejected.is_empty()))
        {
            vec![0; marks.len()]
        } else {
            let (counts, _) = self
                .quarantine
                .commit_group(&marks, |k, mark| {
                    let (source, _, ingest_time) = &items[index[k]];
                    rejects_beyond(source, &decoded[index[k]], mark, *ingest_time)
                })
                .await?;
            counts
        };
        let (reports, version) = self
            .raw
            .commit_group(&marks, |k, mark| {
                let (source, _, ingest_time) = &items[index[k]];
                let last = marks[k].1;
                events_beyond(source, last, &decoded[index[k]], mark, *ingest_time)
            })
            .await?;
        let mut out = vec![ArchiveReport::default(); items.len()];
        for (k, (mut r, q)) in reports.into_iter().zip(quarantined).enumerate() {
            r.quarantined = q;
            r.raw_version = version;
            out[index[k]] = r;
        }
        Ok(out)
    }

    /// Commit the rejected lines of the records beyond the `quarantine` mark,
    /// with the mark `last`; returns the lines written.
    async fn quarantine_rejects(
        &mut self,
        source: &SourceId,
        last: &Position,
        decoded: &[Decoded<'_>],
        ingest_time: i64,
    ) -> Result<u64> {
        if decoded.iter().all(|(_, d)| d.rejected.is_empty()) {
            return Ok(0);
        }
        let (rows, _) = self
            .quarantine
            .commit_beyond_mark(source, last, |mark| {
                rejects_beyond(source, decoded, mark, ingest_time)
            })
            .await?;
        Ok(rows)
    }

    /// Commit the events of the records beyond the `raw_events` mark, sorted by
    /// hour and merchant, with the mark `last`; the report counts them, the
    /// blank lines and the records archived before.
    async fn archive_events(
        &mut self,
        source: &SourceId,
        last: &Position,
        decoded: &[Decoded<'_>],
        ingest_time: i64,
    ) -> Result<ArchiveReport> {
        let (mut report, version) = self
            .raw
            .commit_beyond_mark(source, last, |mark| {
                events_beyond(source, last, decoded, mark, ingest_time)
            })
            .await?;
        report.raw_version = version;
        Ok(report)
    }

    /// The position up to which `source` is archived (its `raw_events` mark), read
    /// from the table's latest version.
    pub async fn archived_up_to(&mut self, source: &SourceId) -> Result<Option<Position>> {
        self.raw.sync(true).await?;
        self.raw.mark(source).await
    }

    /// The current `raw_events` table.
    pub fn raw_table(&self) -> &DeltaTable {
        &self.raw.table
    }
}

/// One table of the master dataset (`raw_events` or `quarantine`) as the
/// archiver holds it: its snapshot, how fresh that is, and the marks read from it.
/// The `quarantine` batch of `decoded`'s rejected lines in records beyond
/// `mark` and its row count; no batch when every record is at or below it.
fn rejects_beyond(
    source: &SourceId,
    decoded: &[Decoded<'_>],
    mark: Option<&Position>,
    ingest_time: i64,
) -> Result<(Option<RecordBatch>, u64)> {
    let fresh: Vec<_> = decoded
        .iter()
        .filter(|(p, _)| mark.is_none_or(|m| *p > m))
        .collect();
    if fresh.is_empty() {
        return Ok((None, 0));
    }
    let batch = quarantine_batch(fresh.iter().flat_map(|(p, d)| {
        d.rejected.iter().map(move |r| {
            let origin = RowOrigin {
                source: source.clone(),
                position: (*p).clone(),
                line: r.line,
            };
            (r.payload.as_slice(), &r.reason, origin, ingest_time)
        })
    }))?;
    let rows = batch.num_rows() as u64;
    Ok((Some(batch), rows))
}

/// The `raw_events` batch of `decoded`'s events beyond `mark` (sorted by hour
/// and merchant) and the report counting them; no batch when every record is
/// at or below the mark.
fn events_beyond(
    source: &SourceId,
    last: &Position,
    decoded: &[Decoded<'_>],
    mark: Option<&Position>,
    ingest_time: i64,
) -> Result<(Option<RecordBatch>, ArchiveReport)> {
    let mut report = ArchiveReport::default();
    let mut rows = Vec::new();
    for (p, d) in decoded {
        if mark.is_some_and(|m| *p <= m) {
            report.already_archived += 1;
            continue;
        }
        report.blank += u64::from(d.blank_lines);
        for ev in &d.events {
            rows.push(RawRow {
                hour: hour_floor(ev.ts),
                payload: d.payload(ev),
                position: p,
                event: ev,
            });
        }
    }
    if mark.is_some_and(|m| m >= last) {
        return Ok((None, report));
    }
    // Only bad or blank lines still commit (no rows, the mark alone): the
    // raw mark is then the source's exact progress, which a consumer
    // resumes from and compares with a closed shard's end.
    rows.sort_unstable_by(|a, b| {
        (a.hour, &a.event.merchant_id, a.position, a.event.line).cmp(&(
            b.hour,
            &b.event.merchant_id,
            b.position,
            b.event.line,
        ))
    });
    report.accepted = rows.len() as u64;
    Ok((Some(raw_batch(source, &rows, ingest_time)?), report))
}

struct ArchiveTable {
    kind: Table,
    table: DeltaTable,
    /// When the snapshot was last brought up to date (a refresh, or a commit of ours).
    synced_at: Instant,
    /// Marks known at a table version: source -> (version, mark).
    marks: HashMap<String, (Option<u64>, Option<Position>)>,
}

impl ArchiveTable {
    async fn open(lake: &Lake, kind: Table) -> Result<Self> {
        Ok(ArchiveTable {
            kind,
            table: lake.open_or_create(kind).await?,
            synced_at: Instant::now(),
            marks: HashMap::new(),
        })
    }

    /// Bring the snapshot up to date when `always` or when it is older than
    /// [`MAX_SNAPSHOT_AGE`].
    async fn sync(&mut self, always: bool) -> Result<()> {
        if always || self.synced_at.elapsed() > MAX_SNAPSHOT_AGE {
            self.table
                .update_state()
                .await
                .context(format!("refreshing {}", self.kind.name()))?;
            self.synced_at = Instant::now();
        }
        Ok(())
    }

    /// `source`'s mark at the snapshot held. Reading it from the log replays the
    /// log's transactions (milliseconds per batch), so the mark this archiver
    /// committed last is remembered with the version it committed.
    async fn mark(&mut self, source: &SourceId) -> Result<Option<Position>> {
        let version = self.table.version();
        if let Some((v, m)) = self.marks.get(source.as_str()) {
            if *v == version {
                return Ok(m.clone());
            }
        }
        let m = read_mark(&self.table, source).await?;
        self.remember(source, version, m.clone());
        Ok(m)
    }

    fn remember(&mut self, source: &SourceId, version: Option<u64>, mark: Option<Position>) {
        if self.marks.len() >= 1024 {
            // entries of other versions are stale anyway; bound the map
            self.marks.clear();
        }
        self.marks
            .insert(source.as_str().to_string(), (version, mark));
    }

    /// Commit what `plan` makes of the records beyond `source`'s mark, in one
    /// commit that moves the mark to `last`; a commit that loses a race is
    /// planned again on a fresh snapshot. `plan` gets the mark and returns the
    /// batch to write (None: nothing to commit) and what it counted; returned
    /// are those counts and the version committed.
    async fn commit_beyond_mark<T>(
        &mut self,
        source: &SourceId,
        last: &Position,
        mut plan: impl FnMut(Option<&Position>) -> Result<(Option<RecordBatch>, T)>,
    ) -> Result<(T, Option<u64>)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A first attempt within MAX_SNAPSHOT_AGE reads the mark from the
            // snapshot this archiver last committed or refreshed. Should another
            // writer have committed this source since, its commit carries this
            // source's transaction ids, so Delta's conflict check rejects ours
            // and this retry reads the mark afresh. Not refreshing first saves a
            // log listing per batch (a seventh of the archiver's time on a local
            // lake).
            self.sync(attempt > 1).await?;
            let mark = self.mark(source).await?;
            let (batch, counts) = plan(mark.as_ref())?;
            let Some(batch) = batch else {
                return Ok((counts, None));
            };
            match self.append(batch, source, last).await {
                Ok(t) => {
                    let version = t.version();
                    self.remember(source, version, Some(last.clone()));
                    self.table = t;
                    // the commit brought the snapshot up to its own version
                    self.synced_at = Instant::now();
                    return Ok((counts, version));
                }
                Err(e) if attempt < COMMIT_ATTEMPTS && is_retryable(&e) => {
                    tracing::warn!(%source, attempt, error = %e, "{} commit lost a race; retrying", self.kind.name());
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    return Err(e).context(format!("committing {} for {source}", self.kind.name()))
                }
            }
        }
    }

    /// [`ArchiveTable::commit_beyond_mark`] for several sources at once (each
    /// at most once): `plan(k, mark)` plans `marks[k]`'s source; one commit
    /// carries every planned batch and the marks of the sources planned (a
    /// source planned to nothing keeps its mark). Returns the counts in
    /// `marks`' order and the version committed.
    async fn commit_group<T>(
        &mut self,
        marks: &[(&SourceId, &Position)],
        mut plan: impl FnMut(usize, Option<&Position>) -> Result<(Option<RecordBatch>, T)>,
    ) -> Result<(Vec<T>, Option<u64>)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.sync(attempt > 1).await?;
            let mut counts = Vec::with_capacity(marks.len());
            let mut batches = Vec::new();
            let mut moved = Vec::new();
            for (k, (source, last)) in marks.iter().enumerate() {
                let mark = self.mark(source).await?;
                let (batch, c) = plan(k, mark.as_ref())?;
                counts.push(c);
                if let Some(b) = batch {
                    batches.push(b);
                    moved.push((*source, *last));
                }
            }
            if moved.is_empty() {
                return Ok((counts, None));
            }
            let write = self
                .table
                .clone()
                .write(batches)
                .with_save_mode(SaveMode::Append)
                .with_partition_columns(self.kind.partition_columns().iter().copied())
                .with_writer_properties(writer_properties())
                .with_commit_properties(commit_with_marks(&moved, "archive"));
            let result = match self.kind {
                Table::RawEvents => write.with_target_file_size(None).await,
                _ => write.await,
            };
            match result {
                Ok(t) => {
                    let version = t.version();
                    for (source, last) in &moved {
                        self.remember(source, version, Some((*last).clone()));
                    }
                    self.table = t;
                    self.synced_at = Instant::now();
                    return Ok((counts, version));
                }
                Err(e) if attempt < COMMIT_ATTEMPTS && is_retryable(&e) => {
                    tracing::warn!(sources = moved.len(), attempt, error = %e, "{} group commit lost a race; retrying", self.kind.name());
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "committing {} for {} sources",
                        self.kind.name(),
                        moved.len()
                    ))
                }
            }
        }
    }

    /// Append `batch` in one commit carrying `source`'s new mark `last`.
    async fn append(
        &self,
        batch: RecordBatch,
        source: &SourceId,
        last: &Position,
    ) -> std::result::Result<DeltaTable, deltalake::DeltaTableError> {
        let write = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(self.kind.partition_columns().iter().copied())
            .with_writer_properties(writer_properties())
            .with_commit_properties(commit_with_mark(source, last, "archive"));
        match self.kind {
            // one file per hour partition and batch, however large
            Table::RawEvents => write.with_target_file_size(None).await,
            _ => write.await,
        }
    }
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50 * (1 << attempt.min(6)) as u64 + u64::from(rand_jitter()))
}

fn rand_jitter() -> u16 {
    // cheap jitter without a RNG dependency: the clock's sub-millisecond digits
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        % 50) as u16
}

/// Whether a failed commit is worth retrying on a fresh snapshot: conflicts and
/// transient storage errors are; schema or protocol errors are not.
pub(crate) fn is_retryable(e: &deltalake::DeltaTableError) -> bool {
    use deltalake::DeltaTableError as E;
    match e {
        E::Transaction { .. }
        | E::VersionAlreadyExists(_)
        | E::ObjectStore { .. }
        | E::Io { .. } => true,
        E::CommitValidation { .. } => false,
        other => {
            let s = other.to_string();
            s.contains("onflict")
                || s.contains("etry")
                || s.contains("already exists")
                || s.contains("Concurrent")
        }
    }
}

fn ts_builder(n: usize) -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::with_capacity(n).with_timezone(lake::TIME_ZONE)
}

fn raw_batch(source_id: &SourceId, rows: &[RawRow<'_>], ingest_time: i64) -> Result<RecordBatch> {
    let n = rows.len();
    let mut event_id = StringBuilder::with_capacity(n, n * 24);
    let mut merchant = StringBuilder::with_capacity(n, n * 12);
    let mut event_type = StringBuilder::with_capacity(n, n * 8);
    let mut event_time = ts_builder(n);
    let mut amount = Int64Builder::with_capacity(n);
    let mut customer = StringBuilder::with_capacity(n, n * 12);
    let mut ingest = ts_builder(n);
    let mut source = StringBuilder::with_capacity(n, n * 48);
    let mut payload = StringBuilder::with_capacity(n, n * 160);
    let mut date = StringBuilder::with_capacity(n, n * 10);
    let mut hour = Int32Builder::with_capacity(n);
    // rows come sorted by hour: the date string changes a few times per batch
    let mut day: Option<(i64, String)> = None;
    for r in rows {
        let e = &r.event;
        event_id.append_value(&e.event_id);
        merchant.append_value(&e.merchant_id);
        event_type.append_value(e.event_type.as_str());
        event_time.append_value(e.ts);
        amount.append_option(e.amount);
        customer.append_option(e.customer_id.as_deref());
        ingest.append_value(ingest_time);
        // written straight into the column's buffer
        RowOrigin::write(&mut source, source_id, r.position, e.line).ok();
        source.append_value("");
        payload.append_value(r.payload);
        let d = match &day {
            Some((h, d)) if *h == r.hour => d,
            _ => &day.insert((r.hour, date_string(r.hour))).1,
        };
        date.append_value(d);
        hour.append_value(hour_of_day(r.hour));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(event_id.finish()),
        Arc::new(merchant.finish()),
        Arc::new(event_type.finish()),
        Arc::new(event_time.finish()),
        Arc::new(amount.finish()),
        Arc::new(customer.finish()),
        Arc::new(ingest.finish()),
        Arc::new(source.finish()),
        Arc::new(payload.finish()),
        Arc::new(date.finish()),
        Arc::new(hour.finish()),
    ];
    RecordBatch::try_new(Table::RawEvents.schema(), columns).context("building a raw_events batch")
}

/// A `quarantine` batch of `rows`, each (the original bytes, why they cannot be
/// used, where they came from, when they arrived in epoch µs, whose day is
/// the partition): the archiver's rejected lines and the batch layer's
/// uncomputable rows alike.
pub(crate) fn quarantine_batch<'a, R: std::fmt::Display, S: std::fmt::Display>(
    rows: impl IntoIterator<Item = (&'a [u8], R, S, i64)>,
) -> Result<RecordBatch> {
    use std::fmt::Write as _;
    let mut payload = BinaryBuilder::new();
    let mut reason = StringBuilder::new();
    let mut source = StringBuilder::new();
    let mut ingest = ts_builder(0);
    let mut date = StringBuilder::new();
    for (p, r, s, t) in rows {
        payload.append_value(p);
        write!(reason, "{r}").ok();
        reason.append_value("");
        write!(source, "{s}").ok();
        source.append_value("");
        ingest.append_value(t);
        date.append_value(date_string(t));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(payload.finish()),
        Arc::new(reason.finish()),
        Arc::new(source.finish()),
        Arc::new(ingest.finish()),
        Arc::new(date.finish()),
    ];
    RecordBatch::try_new(Table::Quarantine.schema(), columns).context("building a quarantine batch")
}
