//! The lake handle: where the Delta tables live (a local path or `s3://`), how to
//! reach them, and the schema of each table.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::delta_datafusion::DeltaSessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::StructType;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

use crate::error::Context as _;
use crate::{Error, Result};

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
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 4] = [
        Table::RawEvents,
        Table::Quarantine,
        Table::MetricsHourly,
        Table::MetricsDaily,
    ];

    /// The table's name (its directory under the lake, and its SQL name).
    pub const fn name(self) -> &'static str {
        match self {
            Table::RawEvents => "raw_events",
            Table::Quarantine => "quarantine",
            Table::MetricsHourly => "metrics_hourly",
            Table::MetricsDaily => "metrics_daily",
        }
    }

    /// The Arrow schema files of the table are written with (partition columns last).
    pub fn schema(self) -> SchemaRef {
        let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let metric_cols = || {
            crate::metrics::stored_metric_names()
                .map(|n| Field::new(n, DataType::Int64, false))
                .collect::<Vec<_>>()
        };
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
            Table::MetricsHourly => {
                let mut f = vec![
                    Field::new("merchant_id", DataType::Utf8, false),
                    Field::new("hour", ts(), false),
                ];
                f.extend(metric_cols());
                f.extend([
                    Field::new("computed_at", ts(), false),
                    Field::new("logic_version", DataType::Int32, false),
                    Field::new("date", DataType::Utf8, false),
                ]);
                f
            }
            Table::MetricsDaily => {
                let mut f = vec![
                    Field::new("merchant_id", DataType::Utf8, false),
                    Field::new("day", ts(), false),
                ];
                f.extend(metric_cols());
                f.extend([
                    Field::new("computed_at", ts(), false),
                    Field::new("logic_version", DataType::Int32, false),
                    Field::new("month", DataType::Utf8, false),
                ]);
                f
            }
        };
        Arc::new(Schema::new(fields))
    }

    /// The partition columns.
    pub fn partition_columns(self) -> &'static [&'static str] {
        match self {
            Table::RawEvents => &["event_date", "event_hour"],
            Table::Quarantine => &["ingest_date"],
            Table::MetricsHourly => &["date"],
            Table::MetricsDaily => &["month"],
        }
    }
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
            return Ok(t);
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
            Err(_) => self
                .open(table)
                .await?
                .ok_or_else(|| Error::config(format!("could not create {}", table.name()))),
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
