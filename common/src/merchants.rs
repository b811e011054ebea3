//! Merchants' settings: the `merchants` Delta table (`merchant_id`,
//! `time_zone`, `updated_at`; one row per merchant that changed a setting, a
//! merchant without one is in UTC), written by `tally merchants set` and
//! `PUT /v1/merchants/{merchant_id}/settings`, read whole by the serving layer
//! ([`MerchantZones`]) and by analysts.
//!
//! A setting is one Delta MERGE on `merchant_id` (update the row, or insert it),
//! so the table keeps one row per merchant; two writers at once conflict and
//! the loser retries on the new version. A time zone applies to every bucket
//! of the merchant's history at once: buckets are made from 15-minute rows
//! when read ([`crate::calendar`]), never stored per zone.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    Array, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, TimestampMicrosecondType};
use deltalake::datafusion::prelude::{col, SessionContext};

use crate::calendar::Calendar;
use crate::decode::is_valid_merchant_id;
use crate::lake::{register, Lake, Table};
use crate::serving_store::ServingStore;
use crate::{Context as _, Error, Result};

/// How many times a setting is retried when another writer committed first.
const ATTEMPTS: u32 = 5;

/// Set `merchant`'s time zone (an IANA name, [`Calendar::parse`]) at
/// `updated_at` (epoch µs). Errors: [`Error::Invalid`] for a bad merchant id or
/// zone; the lake's errors.
pub async fn set_time_zone(
    lake: &Lake,
    merchant: &str,
    zone: &str,
    updated_at: i64,
) -> Result<Calendar> {
    if !is_valid_merchant_id(merchant) {
        return Err(Error::invalid(
            "merchant_id must be 1-64 characters of letters, digits and _ . : -",
        ));
    }
    let calendar = Calendar::parse(zone)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let table = lake.open_or_create(Table::Merchants).await?;
        let batch = RecordBatch::try_new(
            Table::Merchants.schema(),
            vec![
                std::sync::Arc::new(StringArray::from(vec![merchant])),
                std::sync::Arc::new(StringArray::from(vec![calendar.name()])),
                std::sync::Arc::new(
                    TimestampMicrosecondArray::from(vec![updated_at]).with_timezone("UTC"),
                ),
            ],
        )
        .context("shaping a merchants row")?;
        let source = SessionContext::new()
            .read_batch(batch)
            .context("reading a merchants row")?;
        let merged = table
            .merge(source, col("t.merchant_id").eq(col("s.merchant_id")))
            .with_source_alias("s")
            .with_target_alias("t")
            .when_matched_update(|u| {
                u.update("time_zone", col("s.time_zone"))
                    .update("updated_at", col("s.updated_at"))
            })
            .and_then(|m| {
                m.when_not_matched_insert(|i| {
                    i.set("merchant_id", col("s.merchant_id"))
                        .set("time_zone", col("s.time_zone"))
                        .set("updated_at", col("s.updated_at"))
                })
            })
            .context("planning a merchants merge")?
            .await;
        match merged {
            Ok(_) => return Ok(calendar),
            Err(e) if attempt < ATTEMPTS && is_conflict(&e) => {
                tracing::info!(attempt, "a merchants commit lost a race; retrying");
            }
            Err(e) => return Err(e).context("writing merchants"),
        }
    }
}

fn is_conflict(e: &deltalake::DeltaTableError) -> bool {
    matches!(
        e,
        deltalake::DeltaTableError::Transaction { .. }
            | deltalake::DeltaTableError::VersionAlreadyExists(_)
    ) || e.to_string().contains("onflict")
}

/// Every merchant's time zone as the table holds it (the newest row of each
/// merchant: one per merchant, unless a writer outside tally appended more),
/// read whole from `table`. Zones this build's tz database does not know are
/// left out (read as UTC, with a warning).
pub async fn read_settings(
    table: &deltalake::DeltaTable,
) -> Result<HashMap<String, (Calendar, i64)>> {
    let ctx = SessionContext::new();
    register(&ctx, Table::Merchants.name(), table).await?;
    let batches = ctx
        .table(Table::Merchants.name())
        .await
        .context("reading merchants")?
        .select_columns(&["merchant_id", "time_zone", "updated_at"])
        .context("reading merchants")?
        .collect()
        .await
        .context("reading merchants")?;
    let mut latest: HashMap<String, (i64, Calendar)> = HashMap::new();
    for b in &batches {
        let ids =
            deltalake::arrow::compute::cast(b.column(0), &DataType::Utf8).context("merchants")?;
        let zones =
            deltalake::arrow::compute::cast(b.column(1), &DataType::Utf8).context("merchants")?;
        let (ids, zones) = (ids.as_string::<i32>(), zones.as_string::<i32>());
        let at = b.column(2).as_primitive_opt::<TimestampMicrosecondType>();
        for r in 0..b.num_rows() {
            if ids.is_null(r) || zones.is_null(r) {
                continue;
            }
            let Ok(cal) = Calendar::parse(zones.value(r)) else {
                tracing::warn!(
                    merchant = ids.value(r),
                    zone = zones.value(r),
                    "unknown time zone in merchants; using UTC"
                );
                continue;
            };
            let t = at.map_or(0, |a| a.value(r));
            let e = latest.entry(ids.value(r).to_string()).or_insert((t, cal));
            if t >= e.0 {
                *e = (t, cal);
            }
        }
    }
    Ok(latest.into_iter().map(|(m, (t, c))| (m, (c, t))).collect())
}

/// Copy the `merchants` table into `store` when its version is not
/// `loaded` (the version the store holds); returns the version now held
/// (-1: the lake has no such table, every merchant is in UTC).
pub async fn load_settings(
    lake: &Lake,
    store: &dyn ServingStore,
    loaded: Option<i64>,
) -> Result<Option<i64>> {
    let Some(table) = lake.open(Table::Merchants).await? else {
        return Ok(Some(-1));
    };
    let version = table.version().map(|v| v as i64);
    if version == loaded {
        return Ok(loaded);
    }
    let zones: Vec<(String, String, i64)> = read_settings(&table)
        .await?
        .into_iter()
        .map(|(m, (c, at))| (m, c.name().to_string(), at))
        .collect();
    store.set_zones(&zones).await?;
    Ok(version)
}

/// The merchants' time zones as the serving layer holds them. Without a
/// serving store, the whole table in memory, read again when its version
/// changes ([`MerchantZones::refresh`]). With one (Redis), each merchant's zone
/// from the store, where the batch layer's loads copy the table
/// ([`load_settings`]) and settings write it too, kept a few seconds per
/// merchant: a request reads no object-store bytes. Cheap to clone.
#[derive(Clone, Default)]
pub struct MerchantZones {
    inner: Arc<RwLock<Zones>>,
    store: Option<Arc<dyn ServingStore>>,
}

#[derive(Default)]
struct Zones {
    zones: HashMap<String, Calendar>,
    table: Option<deltalake::DeltaTable>,
    /// With a store: merchants' zones and when they were read.
    cached: HashMap<String, (Calendar, Instant)>,
}

/// How long a zone read from the serving store is used before it is read again.
const CACHED_FOR: Duration = Duration::from_secs(5);
/// Zones kept at most, with a store (the cache is cleared beyond).
const CACHED_AT_MOST: usize = 100_000;

impl MerchantZones {
    /// Zones read from `store` (see the type's docs).
    pub fn with_store(store: Arc<dyn ServingStore>) -> Self {
        MerchantZones {
            inner: Default::default(),
            store: Some(store),
        }
    }

    /// `merchant`'s zone (UTC when it set none). `store_loaded`: whether the
    /// store's state says a load copied the table in; when it did not (a
    /// store that lost its data, or never loaded), or the store cannot be
    /// read, the table is read from the lake instead.
    pub async fn zone(&self, lake: &Lake, merchant: &str, store_loaded: bool) -> Result<Calendar> {
        let Some(store) = self.store.as_ref().filter(|_| store_loaded) else {
            if self.store.is_some() {
                self.refresh(lake).await?;
            }
            return Ok(self.in_memory(merchant));
        };
        if let Some((c, at)) = self
            .inner
            .read()
            .ok()
            .and_then(|z| z.cached.get(merchant).copied())
        {
            if at.elapsed() < CACHED_FOR {
                return Ok(c);
            }
        }
        let calendar = match store.zone(merchant).await {
            Ok(zone) => zone
                .and_then(|z| Calendar::parse(&z).ok())
                .unwrap_or(Calendar::UTC),
            Err(e) => {
                tracing::warn!(error = %e, "reading a merchant's zone from the serving store failed; reading the lake");
                self.refresh(lake).await?;
                self.in_memory(merchant)
            }
        };
        if let Ok(mut z) = self.inner.write() {
            if z.cached.len() >= CACHED_AT_MOST {
                z.cached.clear();
            }
            z.cached
                .insert(merchant.to_string(), (calendar, Instant::now()));
        }
        Ok(calendar)
    }

    fn in_memory(&self, merchant: &str) -> Calendar {
        self.inner
            .read()
            .ok()
            .and_then(|z| z.zones.get(merchant).copied())
            .unwrap_or(Calendar::UTC)
    }

    /// Whether zones come from a serving store (no table to keep in memory).
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Record a setting this process made (and write it to the store).
    pub async fn set(&self, merchant: &str, calendar: Calendar) -> Result<()> {
        if let Some(store) = &self.store {
            let at = crate::bucket::now_micros();
            store
                .set_zones(&[(merchant.to_string(), calendar.name().to_string(), at)])
                .await?;
        }
        if let Ok(mut z) = self.inner.write() {
            z.cached
                .insert(merchant.to_string(), (calendar, Instant::now()));
            z.zones.insert(merchant.to_string(), calendar);
        }
        Ok(())
    }

    /// Read the table again when its version changed; returns whether it did.
    pub async fn refresh(&self, lake: &Lake) -> Result<bool> {
        let known = self.inner.read().ok().and_then(|z| z.table.clone());
        let table = match known {
            Some(mut t) => {
                let latest = t
                    .get_latest_version()
                    .await
                    .context("checking the version of merchants")?;
                if t.version() == Some(latest) {
                    return Ok(false);
                }
                t.update_state().await.context("loading merchants")?;
                t
            }
            None => match lake.open(Table::Merchants).await? {
                Some(t) => t,
                None => return Ok(false),
            },
        };
        let zones = read_settings(&table).await?;
        if let Ok(mut z) = self.inner.write() {
            z.zones = zones.into_iter().map(|(m, (c, _))| (m, c)).collect();
            z.table = Some(table);
        }
        Ok(true)
    }
}
