//! The lake handle: where the Delta tables live (a local path or `s3://`), how to
//! reach them, the schema of each table, and the reader of their Delta logs'
//! commits ([`read_commit`]: which files a commit added or removed).
//!
//! Also what every writer of the lake shares: the commit-info keys of tally's
//! commits ([`OPERATION_KEY`] with its entry [`operation`], [`LOGIC_VERSION_KEY`],
//! [`SOURCE_KEY`], [`POSITION_KEY`]), and time as the tables store it, UTC
//! microseconds ([`TIME_ZONE`], [`utc_timestamp`], and [`utc_micros`] for a
//! DataFusion literal).

use std::collections::HashMap;
use std::sync::{Arc, Once};

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::delta_datafusion::DeltaSessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::{StructField, StructType};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

use crate::error::Context as _;
use crate::metric_table::MetricTable;
use crate::{Error, Result};

/// The commit-info key under which every tally commit says what it is
/// (`archive`, `batch quarantine`, `reprocess`, ...), for people reading the log.
pub const OPERATION_KEY: &str = "tally.operation";

/// The commit-info key of the metric logic version a batch commit computed with.
pub const LOGIC_VERSION_KEY: &str = "tally.logic_version";
/// The commit-info key of the source whose mark a commit carries.
pub const SOURCE_KEY: &str = "tally.source";
/// The commit-info key of the position a commit's mark moves its source to.
pub const POSITION_KEY: &str = "tally.position";

/// The time zone of every timestamp column of the lake.
pub const TIME_ZONE: &str = "UTC";

/// The commit-info entry naming a commit's operation ([`OPERATION_KEY`]).
pub fn operation(what: &str) -> (String, serde_json::Value) {
    (OPERATION_KEY.to_string(), serde_json::json!(what))
}

/// A DataFusion literal of the instant `t` (epoch µs) as the tables store
/// time: a microsecond timestamp in UTC.
pub fn utc_micros(t: i64) -> deltalake::datafusion::prelude::Expr {
    deltalake::datafusion::prelude::lit(
        deltalake::datafusion::scalar::ScalarValue::TimestampMicrosecond(
            Some(t),
            Some(TIME_ZONE.into()),
        ),
    )
}

/// Commit metadata of the batch layer's row commits: the id of the run that
/// made them (what `tally batch rollback` undoes as one; what pairs a run's
/// `metrics_daily` commit with its `metrics_hourly` one).
pub const RUN_KEY: &str = "tally.run";

/// The tables of the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Every accepted event: the master dataset.
    RawEvents,
    /// Every rejected line with its reason.
    Quarantine,
    /// Authoritative metrics per merchant and hour.
    MetricsHourly,
    /// Authoritative metrics per merchant and UTC day.
    MetricsDaily,
    /// Authoritative metrics per merchant and 15-minute UTC slot: the grain
    /// every zone's calendar buckets are made of ([`crate::calendar`]).
    MetricsQuarterHourly,
    /// The batch layer's intermediate view: per merchant, UTC hour, customer and quarter hour
    /// (null: events without one), the counters' partial sums of that
    /// customer's deduplicated events. A day's exact distinct customers and
    /// counters are computed from its hours' rows without reading raw_events
    /// again; each hour's rows are replaced whole when the hour is recomputed.
    CustomerHours,
    /// Merchants' settings: one row per merchant that set any (`merchant_id`,
    /// `time_zone`, `updated_at`); a merchant without a row is in UTC.
    Merchants,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 7] = [
        Table::RawEvents,
        Table::Quarantine,
        Table::MetricsHourly,
        Table::MetricsDaily,
        Table::MetricsQuarterHourly,
        Table::CustomerHours,
        Table::Merchants,
    ];

    /// The table's name (its directory under the lake, and its SQL name).
    pub const fn name(self) -> &'static str {
        match self {
            Table::RawEvents => "raw_events",
            Table::Quarantine => "quarantine",
            Table::MetricsHourly => "metrics_hourly",
            Table::MetricsDaily => "metrics_daily",
            Table::MetricsQuarterHourly => "metrics_quarter_hourly",
            Table::CustomerHours => "customer_hours",
            Table::Merchants => "merchants",
        }
    }

    /// The Arrow schema files of the table are written with (partition columns
    /// last); the metric tables' come from [`MetricTable`].
    pub fn schema(self) -> SchemaRef {
        let ts = utc_timestamp;
        let fields = match self {
            Table::RawEvents => vec![
                Field::new("event_id", DataType::Utf8, false),
                Field::new("merchant_id", DataType::Utf8, false),
                Field::new("event_type", DataType::Utf8, false),
                Field::new("event_time", ts(), false),
                Field::new("amount", DataType::Int64, true),
                Field::new("customer_id", DataType::Utf8, true),
                Field::new("ingest_time", ts(), false),
                Field::new("source", DataType::Utf8, false),
                Field::new("payload", DataType::Utf8, false),
                Field::new("event_date", DataType::Utf8, false),
                Field::new("event_hour", DataType::Int32, false),
            ],
            Table::Quarantine => vec![
                Field::new("payload", DataType::Binary, false),
                Field::new("reason", DataType::Utf8, false),
                Field::new("source", DataType::Utf8, false),
                Field::new("ingest_time", ts(), false),
                Field::new("ingest_date", DataType::Utf8, false),
            ],
            Table::MetricsHourly => MetricTable::Hourly.fields(),
            Table::MetricsDaily => MetricTable::Daily.fields(),
            Table::MetricsQuarterHourly => MetricTable::QuarterHourly.fields(),
            Table::CustomerHours => {
                let mut f = vec![
                    Field::new("merchant_id", DataType::Utf8, false),
                    Field::new("hour", ts(), false),
                    Field::new("customer_id", DataType::Utf8, true),
                    // the 15-minute slot of the hour (0 to 3) of these events
                    // (nullable: added to tables of earlier versions)
                    Field::new("quarter", DataType::Int32, true),
                ];
                f.extend(
                    crate::metrics::partial_metric_names()
                        .map(|m| Field::new(m, DataType::Int64, true)),
                );
                f.push(Field::new("date", DataType::Utf8, false));
                f
            }
            Table::Merchants => vec![
                Field::new("merchant_id", DataType::Utf8, false),
                Field::new("time_zone", DataType::Utf8, false),
                Field::new("updated_at", ts(), false),
            ],
        };
        Arc::new(Schema::new(fields))
    }

    /// The partition columns.
    pub fn partition_columns(self) -> &'static [&'static str] {
        const HOURLY: [&str; 1] = [MetricTable::Hourly.partition_column()];
        const DAILY: [&str; 1] = [MetricTable::Daily.partition_column()];
        const QUARTER: [&str; 1] = [MetricTable::QuarterHourly.partition_column()];
        match self {
            Table::RawEvents => &["event_date", "event_hour"],
            Table::Quarantine => &["ingest_date"],
            Table::MetricsHourly => &HOURLY,
            Table::MetricsDaily => &DAILY,
            Table::MetricsQuarterHourly => &QUARTER,
            Table::CustomerHours => &["date"],
            Table::Merchants => &[],
        }
    }
}

/// The type of every time column of the lake: a UTC timestamp in µs.
pub fn utc_timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(TIME_ZONE.into()))
}

/// Where the lake lives and how to reach it.
#[derive(Debug, Clone)]
pub struct Lake {
    root: Url,
    storage_options: HashMap<String, String>,
}

static REGISTER: Once = Once::new();

impl Lake {
    /// A lake at `uri`: a local directory (created if missing) or `s3://bucket/prefix`.
    /// `s3_endpoint` (e.g. an emulator) and `region` come from the AWS SDK's usual
    /// variables via the configuration layer.
    pub fn new(uri: &str, s3_endpoint: Option<&str>, region: Option<&str>) -> Result<Self> {
        REGISTER.call_once(|| deltalake::aws::register_handlers(None));
        let mut storage_options = HashMap::new();
        let root = if uri.starts_with("s3://") || uri.starts_with("s3a://") {
            let mut u = Url::parse(uri).map_err(|e| Error::config(format!("lake {uri:?}: {e}")))?;
            if !u.path().ends_with('/') {
                let p = format!("{}/", u.path());
                u.set_path(&p);
            }
            if let Some(ep) = s3_endpoint {
                storage_options.insert("AWS_ENDPOINT_URL".to_string(), ep.to_string());
                if ep.starts_with("http://") {
                    storage_options.insert("AWS_ALLOW_HTTP".to_string(), "true".to_string());
                }
                // emulators and MinIO-style endpoints address buckets by path
                storage_options.insert(
                    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST".to_string(),
                    "false".to_string(),
                );
            }
            if let Some(r) = region {
                storage_options.insert("AWS_REGION".to_string(), r.to_string());
            }
            u
        } else if let Some(scheme) = uri.split_once("://").map(|(s, _)| s) {
            if scheme != "file" {
                return Err(Error::config(format!(
                    "lake {uri:?}: only local paths and s3:// are supported"
                )));
            }
            Url::parse(uri).map_err(|e| Error::config(format!("lake {uri:?}: {e}")))?
        } else {
            std::fs::create_dir_all(uri).context(format!("creating the lake directory {uri}"))?;
            let abs = std::fs::canonicalize(uri).context(format!("resolving {uri}"))?;
            Url::from_directory_path(&abs).map_err(|_| {
                Error::config(format!("lake path {} is not absolute", abs.display()))
            })?
        };
        Ok(Lake {
            root,
            storage_options,
        })
    }

    /// One more object-store option (e.g. `AWS_ACCESS_KEY_ID`), over what the
    /// environment provides.
    pub fn with_option(mut self, key: &str, value: &str) -> Self {
        self.storage_options
            .insert(key.to_string(), value.to_string());
        self
    }

    /// The lake's root URL.
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Whether the lake is on the local file system.
    pub fn is_local(&self) -> bool {
        self.root.scheme() == "file"
    }

    /// Storage options for delta-rs (endpoint, region, plain HTTP for emulators).
    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// The URL of a table's directory.
    pub fn table_url(&self, table: Table) -> Url {
        // joining a plain name onto a directory URL cannot fail
        self.root
            .join(&format!("{}/", table.name()))
            .unwrap_or_else(|_| self.root.clone())
    }

    fn builder(&self, table: Table) -> Result<DeltaTableBuilder> {
        Ok(DeltaTableBuilder::from_url(self.table_url(table))
            .context(format!("locating {}", table.name()))?
            .with_storage_options(self.storage_options.clone()))
    }

    /// Open a table at its latest version; `None` when it was never created.
    pub async fn open(&self, table: Table) -> Result<Option<DeltaTable>> {
        if self.is_local() {
            let log = self
                .table_url(table)
                .to_file_path()
                .map(|p| p.join("_delta_log"));
            if !log.is_ok_and(|p| p.is_dir()) {
                return Ok(None);
            }
        }
        match self.builder(table)?.load().await {
            Ok(t) => Ok(Some(t)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(e).context(format!("opening {}", table.name())),
        }
    }

    /// Add the columns of `table`'s schema that the opened table `t` lacks (a
    /// lake written by an earlier version: the metric tables' sketch column,
    /// `customer_hours`' quarter), as nullable columns in one metadata commit,
    /// so writers of the new schema can append. Rows written before read as
    /// null there (no sketch: reprocess to fill them). Two writers adding at
    /// once: the loser opens the winner's table.
    async fn add_missing_columns(&self, t: DeltaTable, table: Table) -> Result<DeltaTable> {
        let Ok(snapshot) = t.snapshot() else {
            return Ok(t);
        };
        let have: Vec<String> = snapshot
            .schema()
            .fields()
            .map(|f| f.name().to_string())
            .collect();
        let want: StructType = table
            .schema()
            .as_ref()
            .try_into_kernel()
            .context(format!("schema of {}", table.name()))?;
        let missing: Vec<StructField> = want
            .fields()
            .filter(|f| !have.iter().any(|h| h == f.name()))
            .map(|f| StructField::new(f.name().clone(), f.data_type().clone(), true))
            .collect();
        if missing.is_empty() {
            return Ok(t);
        }
        let names: Vec<String> = missing.iter().map(|f| f.name().clone()).collect();
        tracing::info!(table = table.name(), columns = ?names, "adding columns of this version's schema");
        match t.add_columns().with_fields(missing).await {
            Ok(t) => Ok(t),
            Err(e) => match self.open(table).await? {
                Some(t)
                    if t.snapshot().is_ok_and(|s| {
                        names
                            .iter()
                            .all(|n| s.schema().fields().any(|f| f.name() == n))
                    }) =>
                {
                    Ok(t)
                }
                _ => Err(e).context(format!("adding columns to {}", table.name())),
            },
        }
    }

    /// Open a table at a given version (time travel).
    pub async fn open_at_version(&self, table: Table, version: u64) -> Result<DeltaTable> {
        let mut t = self.builder(table)?.build().context("building table")?;
        t.load_version(version)
            .await
            .context(format!("loading {} at version {version}", table.name()))?;
        Ok(t)
    }

    /// Open a table as of a time (time travel), RFC 3339.
    pub async fn open_as_of(&self, table: Table, when: &str) -> Result<DeltaTable> {
        let mut t = self.builder(table)?.build().context("building table")?;
        let dt = chrono::DateTime::parse_from_rfc3339(when)
            .map_err(|e| Error::invalid(format!("--as-of {when:?}: {e}")))?;
        t.load_with_datetime(dt.with_timezone(&chrono::Utc))
            .await
            .context(format!("loading {} as of {when}", table.name()))?;
        Ok(t)
    }

    /// Open a table, creating it (empty, with its schema and partitioning) when missing.
    /// Two processes creating at once is fine: the loser of the commit race opens
    /// the winner's table.
    pub async fn open_or_create(&self, table: Table) -> Result<DeltaTable> {
        if let Some(t) = self.open(table).await? {
            return self.add_missing_columns(t, table).await;
        }
        if let Ok(dir) = self.table_url(table).to_file_path() {
            std::fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
        }
        let schema: StructType = table
            .schema()
            .as_ref()
            .try_into_kernel()
            .context(format!("schema of {}", table.name()))?;
        let created = DeltaTable::try_from_url_with_storage_options(
            self.table_url(table),
            self.storage_options.clone(),
        )
        .await
        .context(format!("reaching {}", table.name()))?
        .create()
        .with_table_name(table.name())
        .with_columns(schema.fields().cloned())
        .with_partition_columns(table.partition_columns().iter().copied())
        .with_save_mode(SaveMode::Ignore)
        .with_configuration_property(deltalake::TableProperty::CheckpointInterval, Some("20"))
        .await;
        match created {
            Ok(t) => Ok(t),
            // another writer may have created it first: then it opens; if it
            // does not, the creation's own error says why
            Err(e) => match self.open(table).await? {
                Some(t) => Ok(t),
                None => Err(e).context(format!("creating {}", table.name())),
            },
        }
    }
}

impl Lake {
    /// A DataFusion session with the given tables registered under their names
    /// (tables never created are left out), each at its latest version.
    pub async fn session(&self, tables: &[Table]) -> Result<SessionContext> {
        let ctx: SessionContext = DeltaSessionContext::default().into();
        for &t in tables {
            if let Some(table) = self.open(t).await? {
                register(&ctx, t.name(), &table).await?;
            }
        }
        Ok(ctx)
    }
}

/// Register one opened Delta table in a DataFusion session under `name`.
pub async fn register(ctx: &SessionContext, name: &str, table: &DeltaTable) -> Result<()> {
    table
        .update_datafusion_session(&ctx.state())
        .context(format!("registering the object store of {name}"))?;
    let provider = table
        .table_provider()
        .await
        .context(format!("reading {name}"))?;
    ctx.register_table(name, provider)
        .context(format!("registering {name}"))?;
    Ok(())
}

/// One commit of a table's Delta log, as far as tally reads it: its
/// `commitInfo` and its file actions.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// `commitInfo.operation` (`WRITE`, `DELETE`, `OPTIMIZE`, ...), when recorded.
    pub operation: Option<String>,
    /// The whole `commitInfo` object (null when the commit has none): the
    /// metadata a writer added, such as [`OPERATION_KEY`].
    pub info: serde_json::Value,
    /// `commitInfo.readVersion`: the table version the writer read, when recorded.
    pub read_version: Option<u64>,
    /// The files the commit added and removed, in log order.
    pub files: Vec<FileAction>,
}

/// Whether a [`FileAction`] adds a data file or removes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChange {
    /// An `add` action.
    Added,
    /// A `remove` action.
    Removed,
}

/// An `add` or `remove` action of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAction {
    /// Added or removed.
    pub change: FileChange,
    /// The file's path, relative to the table root or a full URL; None when the
    /// action carries none.
    pub path: Option<String>,
    /// False only when the action says `dataChange: false` (a rewrite such as
    /// compaction: the rows are the same).
    pub data_change: bool,
    /// Partition values by column, as text (a writer that put a number there is
    /// read as its digits); null values are left out.
    pub partition_values: HashMap<String, String>,
    /// `numRecords` of the action's statistics, when present.
    pub num_records: Option<i64>,
}

impl Commit {
    /// Parse the lines of commit `version`'s file. Errors: [`Error::Internal`]
    /// naming the version when a line is not JSON (a log no Delta writer
    /// writes: skipping the line could miss a file it added or removed).
    pub fn parse(version: u64, bytes: &[u8]) -> Result<Commit> {
        let mut commit = Commit::default();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let action: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
                Error::internal(format!(
                    "line {} of Delta log commit {version} is not JSON: {e}",
                    i + 1
                ))
            })?;
            let info = &action["commitInfo"];
            if info.is_object() {
                commit.operation = info["operation"].as_str().map(str::to_string);
                commit.read_version = info["readVersion"].as_u64();
                commit.info = info.clone();
            }
            let (change, file) = match (action.get("add"), action.get("remove")) {
                (Some(f), _) => (FileChange::Added, f),
                (None, Some(f)) => (FileChange::Removed, f),
                (None, None) => continue,
            };
            let partition_values = file["partitionValues"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    Some((k.clone(), v))
                })
                .collect();
            commit.files.push(FileAction {
                change,
                path: file["path"].as_str().map(str::to_string),
                data_change: file["dataChange"].as_bool() != Some(false),
                partition_values,
                num_records: file["stats"]
                    .as_str()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .and_then(|s| s["numRecords"].as_i64()),
            });
        }
        Ok(commit)
    }
}

/// Commit `version` of `table`'s Delta log; None when its file is gone (log
/// cleanup removed it, or it was never written). Errors: the log cannot be
/// read, or the commit does not parse ([`Commit::parse`]).
pub async fn read_commit(table: &DeltaTable, version: u64) -> Result<Option<Commit>> {
    let bytes = table
        .log_store()
        .read_commit_entry(version)
        .await
        .context(format!("reading commit {version} of {}", table_name(table)))?;
    bytes.map(|b| Commit::parse(version, &b)).transpose()
}

/// The table's directory name, for messages.
fn table_name(table: &DeltaTable) -> String {
    let url = table.table_url();
    url.path_segments()
        .and_then(|mut s| s.rfind(|p| !p.is_empty()))
        .unwrap_or(url.as_str())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_become_directory_urls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lake");
        let lake = Lake::new(p.to_str().unwrap(), None, None).unwrap();
        assert!(lake.is_local());
        assert!(lake
            .table_url(Table::RawEvents)
            .as_str()
            .ends_with("/lake/raw_events/"));
        assert!(p.is_dir());
    }

    /// A metric table made by an earlier version (no sketch column) gets the
    /// column when a writer opens it, keeps its rows, and takes new ones.
    #[tokio::test]
    async fn tables_of_an_earlier_version_get_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), None, None).unwrap();
        let t = Table::MetricsHourly;
        let full = t.schema();
        let old_fields: Vec<Field> = full
            .fields()
            .iter()
            .filter(|f| f.name() != crate::metric_table::SKETCH_COLUMN)
            .map(|f| f.as_ref().clone())
            .collect();
        let old = Arc::new(Schema::new(old_fields));
        let kernel: StructType = old.as_ref().try_into_kernel().unwrap();
        std::fs::create_dir_all(lake.table_url(t).to_file_path().unwrap()).unwrap();
        let created =
            DeltaTable::try_from_url_with_storage_options(lake.table_url(t), HashMap::new())
                .await
                .unwrap()
                .create()
                .with_columns(kernel.fields().cloned())
                .with_partition_columns(t.partition_columns().iter().copied())
                .await
                .unwrap();
        assert_eq!(created.version(), Some(0));
        let opened = lake.open_or_create(t).await.unwrap();
        assert_eq!(opened.version(), Some(1), "one metadata commit");
        let names: Vec<String> = opened
            .snapshot()
            .unwrap()
            .schema()
            .fields()
            .map(|f| f.name().to_string())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n == crate::metric_table::SKETCH_COLUMN),
            "{names:?}"
        );
        // opening again adds nothing
        assert_eq!(lake.open_or_create(t).await.unwrap().version(), Some(1));
    }

    #[test]
    fn s3_lakes_carry_endpoint_options() {
        let lake = Lake::new(
            "s3://bucket/prefix",
            Some("http://127.0.0.1:5000"),
            Some("us-east-1"),
        )
        .unwrap();
        assert!(!lake.is_local());
        assert_eq!(
            lake.table_url(Table::MetricsDaily).as_str(),
            "s3://bucket/prefix/metrics_daily/"
        );
        assert_eq!(lake.storage_options()["AWS_ALLOW_HTTP"], "true");
        assert!(Lake::new("gs://x/y", None, None).is_err());
    }

    #[test]
    fn commits_parse_into_file_actions() {
        let log = br#"{"commitInfo":{"operation":"OPTIMIZE","readVersion":4}}
{"add":{"path":"a.parquet","dataChange":false,"partitionValues":{"event_date":"2025-11-24","event_hour":3,"x":null},"stats":"{\"numRecords\":7}"}}
{"remove":{"path":"b.parquet","partitionValues":{"event_date":"2025-11-24","event_hour":"2"}}}
{"txn":{"appId":"x","version":1}}
"#;
        let c = Commit::parse(5, log).unwrap();
        assert_eq!(c.operation.as_deref(), Some("OPTIMIZE"));
        assert_eq!(c.read_version, Some(4));
        assert_eq!(c.files.len(), 2);
        let (a, r) = (&c.files[0], &c.files[1]);
        assert_eq!(
            (a.change, a.path.as_deref(), a.data_change, a.num_records),
            (FileChange::Added, Some("a.parquet"), false, Some(7))
        );
        assert_eq!(a.partition_values["event_hour"], "3");
        assert!(!a.partition_values.contains_key("x"));
        assert_eq!(
            (r.change, r.path.as_deref(), r.data_change, r.num_records),
            (FileChange::Removed, Some("b.parquet"), true, None)
        );
        assert_eq!(r.partition_values["event_hour"], "2");

        // a line that is not JSON fails the commit, never a skipped file
        let e = Commit::parse(5, b"{\"commitInfo\":{}}\nnot json\n").unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(
            e.to_string().contains("line 2 of Delta log commit 5"),
            "{e}"
        );
    }

    #[test]
    fn schemas_end_with_their_partition_columns() {
        for t in Table::ALL {
            let s = t.schema();
            let n = s.fields().len();
            let parts = t.partition_columns();
            for (i, p) in parts.iter().enumerate() {
                assert_eq!(s.field(n - parts.len() + i).name(), p);
            }
        }
    }
}
