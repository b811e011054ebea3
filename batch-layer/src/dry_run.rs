//! What a `--dry-run` reports: the merchant-hours a run would change, and the
//! totals of the stored metrics over the range before and after, from the rows
//! it computed and the rows `metrics_hourly` holds now.

use std::collections::{BTreeSet, HashMap};

use deltalake::arrow::array::RecordBatch;
use tally_common::metric_table::{MetricRows, MetricTable};
use tally_common::metrics::STORED_COUNT;
use tally_common::{Context as _, Error, Result};

/// Sums of the stored metrics over a set of rows, in column order
/// ([`tally_common::metrics::stored_metric_names`]).
pub type Totals = [i64; STORED_COUNT];

/// What a `--dry-run` would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunDiff {
    /// Merchant-hours whose stored metrics would change, appear or disappear.
    pub merchant_hours_changed: u64,
    /// Merchant-hours compared.
    pub merchant_hours_compared: u64,
    /// Totals over the range now.
    pub totals_before: Totals,
    /// Totals over the range after the run.
    pub totals_after: Totals,
}

/// A merchant-hour: merchant id and hour start (epoch µs).
type MerchantHour = (String, i64);

impl DryRunDiff {
    /// Add the comparison of some hours' rows as stored (`before`) with the rows
    /// the run computed for them (`after`), both in `metrics_hourly`'s shape.
    pub(crate) fn add(&mut self, before: &[RecordBatch], after: &[RecordBatch]) -> Result<()> {
        let b = by_merchant_hour(before)?;
        let a = by_merchant_hour(after)?;
        let keys: BTreeSet<&MerchantHour> = b.keys().chain(a.keys()).collect();
        for k in keys {
            self.merchant_hours_compared += 1;
            let (x, y) = (b.get(k), a.get(k));
            if x != y {
                self.merchant_hours_changed += 1;
            }
            for j in 0..STORED_COUNT {
                self.totals_before[j] += x.map_or(0, |v| v[j]);
                self.totals_after[j] += y.map_or(0, |v| v[j]);
            }
        }
        Ok(())
    }
}

/// Hourly rows' stored metrics by merchant-hour.
fn by_merchant_hour(batches: &[RecordBatch]) -> Result<HashMap<MerchantHour, Totals>> {
    let mut out = HashMap::new();
    for b in batches {
        let rows = MetricRows::new(b, MetricTable::Hourly.time_column())
            .context("reading metrics_hourly rows")?;
        for i in 0..rows.len() {
            let (Some(m), Some(t)) = (rows.merchant(i), rows.time(i)) else {
                return Err(Error::internal(
                    "a metrics_hourly row without merchant_id or hour",
                ));
            };
            out.insert((m.to_string(), t), rows.stored(i));
        }
    }
    Ok(out)
}

impl std::fmt::Display for DryRunDiff {
    /// `dry run: N of M merchant-hours would change; nothing was written`, then
    /// each stored metric's total before and after.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dry run: {} of {} merchant-hours would change; nothing was written",
            self.merchant_hours_changed, self.merchant_hours_compared
        )?;
        for (i, name) in tally_common::metrics::stored_metric_names().enumerate() {
            write!(
                f,
                "\n  {name:<17} {:>16} -> {:<16}",
                self.totals_before[i], self.totals_after[i]
            )?;
        }
        Ok(())
    }
}
