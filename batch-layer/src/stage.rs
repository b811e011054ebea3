//! A run's staging area: where its plan and the results of its parts wait for
//! the publish step, under `<lake>/_staging/<run id>/` (the lake's own store,
//! so parts computed in other processes, or other Lambda invocations, find
//! them). Names starting with `_` are not Delta tables, and S3's lifecycle
//! rule expires what a run that died left there.
//!
//! Layout: `plan.json` (the [`crate::plan::Plan`]), `items.json` (one payload
//! per item, for Step Functions' distributed Map), and per item `adds/<i>.json`
//! (the `customer_hours` files it wrote, uncommitted) and `hourly/<i>.parquet`
//! or `daily/<i>.parquet` (its share of the metric rows, to be added up).

use std::sync::Arc;

use bytes::Bytes;
use deltalake::arrow::array::RecordBatch;
use deltalake::datafusion::datasource::file_format::parquet::ParquetFormat;
use deltalake::datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::parquet::arrow::ArrowWriter;
use deltalake::{DeltaTableBuilder, ObjectStore, Path};
use futures::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_common::lake::Lake;
use tally_common::{Context as _, Error, Result};
use url::Url;

/// The directory of staging areas under the lake root.
pub const STAGING_DIR: &str = "_staging";

/// One run's staging area.
#[derive(Clone)]
pub struct Staging {
    /// The lake's store, unprefixed (locations it lists are full paths).
    store: Arc<dyn ObjectStore>,
    /// `<lake path>/_staging/<run id>` within `store`.
    prefix: Path,
    run_id: String,
    /// Where the lake's staging directory is, as a URL (for messages).
    root: Url,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging({}{})", self.root, self.run_id)
    }
}

impl Staging {
    /// The staging area of run `run_id` in `lake`. Errors: [`Error::Config`]
    /// when the lake's store cannot be reached; [`Error::Invalid`] for a run id
    /// that is not a plain name.
    pub fn open(lake: &Lake, run_id: &str) -> Result<Self> {
        if run_id.is_empty()
            || !run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(format!(
                "run id {run_id:?}: letters, digits, '-' and '_' only"
            )));
        }
        let root = lake
            .root()
            .join(&format!("{STAGING_DIR}/{run_id}/"))
            .map_err(|e| Error::config(format!("staging for run {run_id}: {e}")))?;
        if lake.is_local() {
            if let Ok(p) = root.to_file_path() {
                std::fs::create_dir_all(&p)
                    .context(format!("creating the staging directory {}", p.display()))?;
            }
        }
        let store = DeltaTableBuilder::from_url(root.clone())
            .context("locating the staging area")?
            .with_storage_options(lake.storage_options().clone())
            .build_storage()
            .context("opening the staging area")?
            .root_object_store(None);
        let prefix = Path::from_url_path(root.path())
            .map_err(|e| Error::config(format!("staging for run {run_id}: {e}")))?;
        Ok(Staging {
            store,
            prefix,
            run_id: run_id.to_string(),
            root,
        })
    }

    /// The full path of `name` in the lake's store.
    fn path(&self, name: &str) -> Path {
        Path::from(format!("{}/{}", self.prefix, name.trim_start_matches('/')))
    }

    /// Where an object of the area is in an S3 lake: its bucket and key (the
    /// key as stored, not percent-encoded), for Step Functions' item reader;
    /// None for a local lake.
    pub fn s3_location(&self, name: &str) -> Option<(String, String)> {
        let bucket = self
            .root
            .host_str()
            .filter(|_| self.root.scheme().starts_with("s3"))?;
        Some((bucket.to_string(), self.path(name).to_string()))
    }

    /// Store `value` as JSON at `name`.
    pub async fn put_json(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let body = serde_json::to_vec(value).context(format!("encoding {name}"))?;
        self.store
            .put(&self.path(name), Bytes::from(body).into())
            .await
            .context(format!("staging {name}"))?;
        Ok(())
    }

    /// The JSON value at `name`; None when absent. Errors: [`Error::Internal`]
    /// for one that does not parse.
    pub async fn get_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let bytes = match self.store.get(&self.path(name)).await {
            Ok(r) => r.bytes().await.context(format!("reading staged {name}"))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e).context(format!("reading staged {name}")),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("staged {name} of run {}: {e}", self.run_id)))
    }

    /// Store `batches` (of one schema) as one Parquet file at `name`; nothing
    /// when they hold no row.
    pub async fn put_batches(&self, name: &str, batches: &[RecordBatch]) -> Result<()> {
        let Some(first) = batches.iter().find(|b| b.num_rows() > 0) else {
            // an empty result replaces an earlier attempt's
            return self.delete(name).await;
        };
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, first.schema(), None)
            .context(format!("staging {name}"))?;
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            w.write(b).context(format!("staging {name}"))?;
        }
        w.close().context(format!("staging {name}"))?;
        self.store
            .put(&self.path(name), Bytes::from(buf).into())
            .await
            .context(format!("staging {name}"))?;
        Ok(())
    }

    /// Remove the object at `name`, if present.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.delete_path(&self.path(name)).await
    }

    async fn delete_path(&self, path: &Path) -> Result<()> {
        let name = path.as_ref();
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).context(format!("removing staged {name}")),
        }
    }

    /// Register the Parquet files staged under `dir` as table `name` of
    /// `schema` in `ctx`; false when there are none.
    pub async fn register_dir(
        &self,
        ctx: &SessionContext,
        dir: &str,
        name: &str,
        schema: deltalake::arrow::datatypes::SchemaRef,
    ) -> Result<bool> {
        let files: Vec<Path> = self
            .store
            .list(Some(&self.path(dir)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .context(format!("listing staged {dir}"))?;
        if files.is_empty() {
            return Ok(false);
        }
        let url = Url::parse(&format!("tally-staging://{}/", self.run_id.to_lowercase()))
            .map_err(|e| Error::internal(format!("staging URL: {e}")))?;
        ctx.register_object_store(&url, self.store.clone());
        let urls = files
            .iter()
            .map(|p| ListingTableUrl::parse(format!("{url}{p}")))
            .collect::<std::result::Result<Vec<_>, _>>()
            .context(format!("naming staged {dir}"))?;
        register_files(ctx, name, urls, Some(schema)).await?;
        Ok(true)
    }

    /// Remove the whole area (after publishing).
    pub async fn delete_all(&self) -> Result<()> {
        let files: Vec<Path> = self
            .store
            .list(Some(&self.prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .context("listing the staging area")?;
        for f in files {
            self.delete_path(&f).await?;
        }
        // a local store leaves the directories behind
        if let Ok(dir) = self.root.to_file_path() {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }
}

/// Register Parquet files `urls` (their store already registered in `ctx`) as
/// table `name`, with `schema` when given (else read from the files).
pub(crate) async fn register_files(
    ctx: &SessionContext,
    name: &str,
    urls: Vec<ListingTableUrl>,
    schema: Option<deltalake::arrow::datatypes::SchemaRef>,
) -> Result<()> {
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options);
    let config = match schema {
        Some(s) => config.with_schema(s),
        None => config
            .infer_schema(&ctx.state())
            .await
            .context(format!("reading the schema of {name}"))?,
    };
    let table = ListingTable::try_new(config).context(format!("registering {name}"))?;
    let _ = ctx.deregister_table(name);
    ctx.register_table(name, Arc::new(table))
        .context(format!("registering {name}"))?;
    Ok(())
}

/// Register files of the Delta table `table` (paths relative to its root, as
/// in its add actions; committed or not) as table `name` in `ctx`, read as
/// plain Parquet of `file_schema`: a scan that claims no order and needs no
/// snapshot. The lake's store is registered at its root, since the locations
/// it lists are full paths.
pub(crate) async fn register_table_files<'p>(
    ctx: &SessionContext,
    table: &deltalake::DeltaTable,
    name: &str,
    paths: impl Iterator<Item = &'p str>,
    file_schema: deltalake::arrow::datatypes::SchemaRef,
) -> Result<()> {
    let log_store = table.log_store();
    let store_url =
        Url::parse("tally-lake://root/").map_err(|e| Error::internal(format!("lake URL: {e}")))?;
    ctx.register_object_store(&store_url, log_store.root_object_store(None));
    let table_path = log_store
        .config()
        .location()
        .path()
        .trim_matches('/')
        .to_string();
    let urls = paths
        .map(|p| ListingTableUrl::parse(format!("{store_url}{table_path}/{p}")))
        .collect::<std::result::Result<Vec<_>, _>>()
        .context(format!("naming the files of {name}"))?;
    register_files(ctx, name, urls, Some(file_schema)).await
}

/// `schema` without the columns `partitions`: the schema of a table's files.
pub(crate) fn file_schema(
    schema: &deltalake::arrow::datatypes::SchemaRef,
    partitions: &[&str],
) -> deltalake::arrow::datatypes::SchemaRef {
    Arc::new(deltalake::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| !partitions.contains(&f.name().as_str()))
            .cloned()
            .collect::<Vec<_>>(),
    ))
}

/// Remove the staging areas of a local lake older than `retention` (runs
/// killed before they published or discarded; an S3 lake's lifecycle rule
/// expires them there). Best effort.
pub fn expire_local(lake: &Lake, retention: std::time::Duration) {
    let Ok(dir) = lake
        .root()
        .join(&format!("{STAGING_DIR}/"))
        .map(|u| u.to_file_path())
    else {
        return;
    };
    let Ok(dir) = dir else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > retention);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
