//! Point lookups: one merchant's rows of a metric table read straight from the
//! table's Parquet files, with no query to plan.
//!
//! A request reads a few dozen rows, so planning a DataFusion query for it (a
//! logical plan, a dozen optimizer passes, a physical plan, a Delta scan over the
//! file list) costs several times the read itself. The metric tables are simple
//! enough to read directly: the Delta snapshot's files (kept here with their
//! partition value), the `date`/`month` partitions of the range, then per file
//! the row groups whose `merchant_id` and time statistics can hold the merchant,
//! then, when the file has a page index, only the pages whose `merchant_id` range
//! holds it (files are sorted by merchant, so that is a page or two). Parquet
//! footers and page indexes are loaded once per file and kept with the file's
//! entry, which carries over from one snapshot to the next; local files are read
//! with `pread` in place, remote ones through the table's object store.
//!
//! A table this reader cannot honour (deletion vectors, or files without the
//! columns by their logical names, as with column mapping) is read with
//! DataFusion instead, so the answer never depends on which path ran.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::error::DataFusionError;
use deltalake::parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
use deltalake::parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::errors::ParquetError;
use deltalake::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use deltalake::parquet::file::page_index::column_index::ColumnIndexMetaData;
use deltalake::parquet::file::statistics::Statistics;
use deltalake::{DeltaTable, ObjectStore, Path};
use futures::future::{try_join_all, BoxFuture, FutureExt as _};
use futures::TryStreamExt as _;
use tally_common::metric_table::{MetricRows, MetricTable, MERCHANT_COLUMN, SKETCH_COLUMN};
use tally_common::metrics::{stored_metric_names, BucketRow};
use tally_common::{Context as _, Error, Result};
use tokio::sync::OnceCell;

/// Rows decoded per batch: a lookup selects a page or two per file.
const BATCH_ROWS: usize = 8192;
/// Footer bytes fetched in the first read of a remote file (most footers fit).
const FOOTER_HINT: usize = 64 * 1024;

/// The files of one table version, ready for point lookups.
pub(crate) struct FileIndex {
    /// The table read: its time column is `hour` or `day`.
    table: MetricTable,
    /// Sorted by partition value.
    files: Vec<Arc<DataFile>>,
}

/// One Parquet file of the table; shared by the snapshots that contain it.
pub(crate) struct DataFile {
    /// Its partition value (`date` or `month`).
    partition: String,
    location: Location,
    size: u64,
    /// Footer, page index and column positions, loaded on first use.
    meta: OnceCell<Option<Arc<FileMeta>>>,
}

/// Where a file's bytes are.
#[derive(Clone)]
enum Location {
    /// On this machine: read with `pread`, no thread hop (page-cache reads take microseconds).
    Local(PathBuf),
    /// In the table's object store (S3).
    Remote {
        store: Arc<dyn ObjectStore>,
        path: Path,
    },
}

/// What a lookup needs of one file, read once.
struct FileMeta {
    arrow: ArrowReaderMetadata,
    /// Leaf positions of `merchant_id` and the time column.
    merchant: usize,
    time: usize,
    /// `merchant_id`, the time column and every metric column the file has.
    projection: ProjectionMask,
}

/// A time range and merchant to look up.
struct Query<'a> {
    merchant: &'a str,
    start: i64,
    end: i64,
}

impl FileIndex {
    /// The files of `table`'s loaded version, a metric table of kind `kind`. Entries
    /// of `previous` (the last snapshot's index) are reused for files still present,
    /// so their cached footers survive a refresh. None when the table needs features
    /// this reader does not handle (deletion vectors).
    pub(crate) fn build(
        table: &DeltaTable,
        kind: MetricTable,
        local_root: Option<PathBuf>,
        previous: Option<&FileIndex>,
    ) -> Result<Option<FileIndex>> {
        let state = table.snapshot().context("reading the table's file list")?;
        let reuse: HashMap<String, &Arc<DataFile>> = previous
            .map(|p| p.files.iter().map(|f| (f.location.key(), f)).collect())
            .unwrap_or_default();
        let store = table.log_store().object_store(None);
        let mut files = Vec::new();
        for view in state.log_data().iter() {
            if view.deletion_vector_descriptor().is_some() {
                return Ok(None);
            }
            let partition = view
                .partition_values_map()
                .get(kind.partition_column())
                .cloned()
                .flatten()
                .unwrap_or_default();
            let location = match &local_root {
                Some(root) => {
                    let p = view.path();
                    let path = if p.contains("://") {
                        match url::Url::parse(&p).ok().and_then(|u| u.to_file_path().ok()) {
                            Some(path) => path,
                            None => return Ok(None),
                        }
                    } else {
                        root.join(p.as_ref())
                    };
                    Location::Local(path)
                }
                None => Location::Remote {
                    store: store.clone(),
                    path: view.object_store_path(),
                },
            };
            let size = u64::try_from(view.size()).unwrap_or(0);
            let file = match reuse.get(&location.key()) {
                Some(f) if f.size == size && f.partition == partition => Arc::clone(f),
                _ => Arc::new(DataFile {
                    partition,
                    location,
                    size,
                    meta: OnceCell::new(),
                }),
            };
            files.push(file);
        }
        files.sort_by(|a, b| a.partition.cmp(&b.partition));
        Ok(Some(FileIndex { table: kind, files }))
    }

    /// Files of this index that were not in `previous` (new since the last refresh).
    pub(crate) fn new_files(&self, previous: &FileIndex) -> Vec<Arc<DataFile>> {
        let old: std::collections::HashSet<*const DataFile> =
            previous.files.iter().map(Arc::as_ptr).collect();
        self.files
            .iter()
            .filter(|f| !old.contains(&Arc::as_ptr(f)))
            .cloned()
            .collect()
    }

    /// `merchant`'s rows with `start <= time < end` in the partitions `[first, last]`
    /// (by time), or None when a file cannot be read this way (the caller then asks
    /// DataFusion).
    pub(crate) async fn lookup(
        &self,
        merchant: &str,
        start: i64,
        end: i64,
        first: &str,
        last: &str,
    ) -> Result<Option<HashMap<i64, BucketRow>>> {
        let lo = self.files.partition_point(|f| f.partition.as_str() < first);
        let hi = self.files.partition_point(|f| f.partition.as_str() <= last);
        let q = Query {
            merchant,
            start,
            end,
        };
        let candidates = self.files.get(lo..hi).unwrap_or_default();
        let parts = try_join_all(
            candidates
                .iter()
                .map(|f| f.read(&q, self.table.time_column())),
        )
        .await?;
        let mut out = HashMap::new();
        for part in parts {
            let Some(rows) = part else { return Ok(None) };
            out.extend(rows);
        }
        Ok(Some(out))
    }
}

impl Location {
    fn key(&self) -> String {
        match self {
            Location::Local(p) => p.to_string_lossy().into_owned(),
            Location::Remote { path, .. } => path.to_string(),
        }
    }
}

impl DataFile {
    /// Load the footer and page index now (after a refresh, so the first request
    /// for a new file does not pay for it).
    pub(crate) async fn warm(&self, time_col: &str) -> Result<()> {
        self.meta(time_col).await.map(|_| ())
    }

    async fn meta(&self, time_col: &str) -> Result<Option<Arc<FileMeta>>> {
        self.meta
            .get_or_try_init(|| self.load_meta(time_col))
            .await
            .cloned()
    }

    async fn load_meta(&self, time_col: &str) -> Result<Option<Arc<FileMeta>>> {
        let what = || format!("reading the footer of {}", self.location.key());
        let mut reader = FileReader {
            location: self.location.clone(),
        };
        let metadata = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .with_prefetch_hint(Some(FOOTER_HINT))
            .load_and_finish(&mut reader, self.size)
            .await;
        let metadata = parquet_context(metadata, what)?;
        let arrow = parquet_context(
            ArrowReaderMetadata::try_new(Arc::new(metadata), ArrowReaderOptions::new()),
            what,
        )?;
        let schema = arrow.metadata().file_metadata().schema_descr();
        let leaf = |name: &str| {
            schema
                .columns()
                .iter()
                .position(|c| c.path().string() == name)
        };
        // without these two by name (column mapping renames them) DataFusion reads the table
        let (Some(merchant), Some(time)) = (leaf(MERCHANT_COLUMN), leaf(time_col)) else {
            return Ok(None);
        };
        let mut leaves = vec![merchant, time];
        leaves.extend(stored_metric_names().filter_map(leaf));
        leaves.extend(leaf(SKETCH_COLUMN));
        let projection = ProjectionMask::leaves(schema, leaves);
        Ok(Some(Arc::new(FileMeta {
            arrow,
            merchant,
            time,
            projection,
        })))
    }

    /// This file's rows for `q`; None when the file cannot be read this way.
    async fn read(&self, q: &Query<'_>, time_col: &str) -> Result<Option<Vec<(i64, BucketRow)>>> {
        let Some(meta) = self.meta(time_col).await? else {
            return Ok(None);
        };
        let Some((row_groups, selection)) = meta.select(q) else {
            return Ok(Some(Vec::new()));
        };
        let what = || format!("reading {}", self.location.key());
        let reader = FileReader {
            location: self.location.clone(),
        };
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta.arrow.clone())
            .with_projection(meta.projection.clone())
            .with_row_groups(row_groups)
            .with_row_selection(selection)
            .with_batch_size(BATCH_ROWS)
            .build();
        let batches: Vec<RecordBatch> =
            parquet_context(parquet_context(stream, what)?.try_collect().await, what)?;
        let mut rows = Vec::new();
        for batch in &batches {
            if let Err(e) = matching_rows(batch, q, time_col, &mut rows) {
                return Err(e).context(what());
            }
        }
        Ok(Some(rows))
    }
}

impl FileMeta {
    /// The row groups, and the rows within them, that may hold `q`'s rows; None
    /// when none can.
    fn select(&self, q: &Query<'_>) -> Option<(Vec<usize>, RowSelection)> {
        let md = self.arrow.metadata();
        let m = q.merchant.as_bytes();
        let mut groups = Vec::new();
        let mut selectors = Vec::new();
        for (i, rg) in md.row_groups().iter().enumerate() {
            let rows = usize::try_from(rg.num_rows()).unwrap_or(0);
            if rows == 0
                || !bytes_may_hold(rg.column(self.merchant).statistics(), m)
                || !times_may_overlap(rg.column(self.time).statistics(), q.start, q.end)
            {
                continue;
            }
            match pages_holding(md, i, self.merchant, m, rows) {
                Some(ranges) if ranges.is_empty() => continue,
                Some(ranges) => {
                    let mut at = 0;
                    for r in ranges {
                        if r.start > at {
                            selectors.push(RowSelector::skip(r.start - at));
                        }
                        selectors.push(RowSelector::select(r.end - r.start));
                        at = r.end;
                    }
                    if rows > at {
                        selectors.push(RowSelector::skip(rows - at));
                    }
                }
                None => selectors.push(RowSelector::select(rows)),
            }
            groups.push(i);
        }
        if groups.is_empty() {
            None
        } else {
            Some((groups, RowSelection::from(selectors)))
        }
    }
}

/// Whether a row group whose `merchant_id` statistics are `stats` may hold `m`
/// (truncated statistics stay bounds, so the test stays safe).
fn bytes_may_hold(stats: Option<&Statistics>, m: &[u8]) -> bool {
    let Some(Statistics::ByteArray(s)) = stats else {
        return true;
    };
    let above_min = s.min_opt().is_none_or(|min| min.data() <= m);
    let below_max = s.max_opt().is_none_or(|max| m <= max.data());
    above_min && below_max
}

/// Whether a row group whose time statistics are `stats` may hold a time in `[start, end)`.
fn times_may_overlap(stats: Option<&Statistics>, start: i64, end: i64) -> bool {
    let Some(Statistics::Int64(s)) = stats else {
        return true;
    };
    let starts_before_end = s.min_opt().is_none_or(|&min| min < end);
    let ends_after_start = s.max_opt().is_none_or(|&max| max >= start);
    starts_before_end && ends_after_start
}

/// The row ranges of row group `rg` whose pages' `merchant_id` range holds `m`, by
/// the page index; None when the file has no usable page index for the column.
fn pages_holding(
    md: &ParquetMetaData,
    rg: usize,
    col: usize,
    m: &[u8],
    rows: usize,
) -> Option<Vec<Range<usize>>> {
    let ColumnIndexMetaData::BYTE_ARRAY(index) = md.column_index()?.get(rg)?.get(col)? else {
        return None;
    };
    let pages = md.offset_index()?.get(rg)?.get(col)?.page_locations();
    let mut out: Vec<Range<usize>> = Vec::new();
    for (p, page) in pages.iter().enumerate() {
        if index.is_null_page(p) {
            continue;
        }
        let holds = index.min_value(p).is_none_or(|min| min <= m)
            && index.max_value(p).is_none_or(|max| m <= max);
        if !holds {
            continue;
        }
        let start = usize::try_from(page.first_row_index).ok()?;
        let end = match pages.get(p + 1) {
            Some(next) => usize::try_from(next.first_row_index).ok()?,
            None => rows,
        };
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    Some(out)
}

/// Append `batch`'s rows of `q.merchant` with `q.start <= time < q.end` to `out`.
fn matching_rows(
    batch: &RecordBatch,
    q: &Query<'_>,
    time_col: &str,
    out: &mut Vec<(i64, BucketRow)>,
) -> std::result::Result<(), deltalake::arrow::error::ArrowError> {
    let rows = MetricRows::new(batch, time_col)?;
    for r in 0..rows.len() {
        if rows.merchant(r) != Some(q.merchant) {
            continue;
        }
        match rows.time(r) {
            Some(t) if t >= q.start && t < q.end => out.push((t, rows.row(r))),
            _ => {}
        }
    }
    Ok(())
}

/// A Parquet result with what was being done attached (built only on failure).
fn parquet_context<T>(
    r: std::result::Result<T, ParquetError>,
    what: impl FnOnce() -> String,
) -> Result<T> {
    r.map_err(|e| Error::Query {
        context: what(),
        source: Box::new(DataFusionError::from(e)),
    })
}

/// Byte ranges of one file, for the Parquet reader.
struct FileReader {
    location: Location,
}

fn io_error(e: std::io::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

/// Read `ranges` of a local file with `pread`, opening it once.
fn read_local(
    path: &PathBuf,
    ranges: &[Range<u64>],
) -> std::result::Result<Vec<Bytes>, ParquetError> {
    let file = std::fs::File::open(path).map_err(io_error)?;
    ranges
        .iter()
        .map(|r| {
            let len = usize::try_from(r.end.saturating_sub(r.start))
                .map_err(|e| ParquetError::External(Box::new(e)))?;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, r.start).map_err(io_error)?;
            Ok(Bytes::from(buf))
        })
        .collect()
}

impl AsyncFileReader for FileReader {
    fn get_bytes(
        &mut self,
        range: Range<u64>,
    ) -> BoxFuture<'_, deltalake::parquet::errors::Result<Bytes>> {
        self.get_byte_ranges(vec![range])
            .map(|r| {
                r.and_then(|mut v| v.pop().ok_or_else(|| ParquetError::EOF("no bytes".into())))
            })
            .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, deltalake::parquet::errors::Result<Vec<Bytes>>> {
        match &self.location {
            Location::Local(path) => futures::future::ready(read_local(path, &ranges)).boxed(),
            Location::Remote { store, path } => {
                let (store, path) = (Arc::clone(store), path.clone());
                async move {
                    store
                        .get_ranges(&path, &ranges)
                        .await
                        .map_err(|e| ParquetError::External(Box::new(e)))
                }
                .boxed()
            }
        }
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, deltalake::parquet::errors::Result<Arc<ParquetMetaData>>> {
        // the builder is always given the cached metadata
        futures::future::ready(Err(ParquetError::General(
            "point lookups supply the file's metadata".into(),
        )))
        .boxed()
    }
}
