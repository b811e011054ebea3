//! The batch layer's SQL, generated from the metric registry.
//!
//! Both queries deduplicate by (merchant, `event_id`) within an hour, then
//! aggregate in two levels with [`aggregate_sql`] (per customer, then per
//! merchant and bucket). Copies of an event are identical by contract
//! (producers reuse the id on retry); should two copies ever differ, the
//! field-wise minimum is kept, which is deterministic whatever the arrival order
//! (but for copies that differ in `customer_id`: a run split into parts
//! ([`crate::parts`]) splits by customer, so such copies may fall in two parts
//! and count twice; the contract rules them out) and costs a plain hash aggregate (an ordered "first copy" pick was 9x slower
//! in DataFusion and ran out of memory at 10 M rows). The text is built
//! only from values the job computes itself (dates, hours, the registry), never
//! from request input. The same text runs in DuckDB for the benchmark.
//!
//! No time goes through a timestamp function: an hour is its partition's integer
//! epoch microseconds, so no value can overflow DataFusion's nanosecond
//! timestamps (years 1677 to 2262). The job reads raw rows through
//! [`computable_rows`], which leaves out a row the batch layer cannot compute
//! ([`crate::quarantine`] moves such rows out of `raw_events` first).

use deltalake::arrow::array::RecordBatch;
use deltalake::datafusion::prelude::SessionContext;
use tally_common::bucket::{date_string, day_floor, hour_of_day, MICROS_PER_HOUR};
use tally_common::calendar::SLOT_MICROS;
use tally_common::metric_table::SKETCH_COLUMN;
use tally_common::metrics::{aggregate_sql, partial_metric_names};
use tally_common::{Context as _, Result};

use crate::quarantine::computable_row_sql;

/// The rows of `table` on `day` that the batch layer can compute, as a relation
/// to pass for `table` to [`hourly_sql`] and [`daily_sql`].
pub fn computable_rows(table: &str, day: i64) -> String {
    let hour_start = format!("{day} + CAST(event_hour AS BIGINT) * {MICROS_PER_HOUR}");
    format!(
        "(SELECT * FROM {table} WHERE event_date = '{date}' AND {ok}) AS computable",
        date = date_string(day),
        ok = computable_row_sql(&hour_start)
    )
}

/// The deduplicated events of the given hours of one day (hours as epoch µs, all on `day`).
fn dedup_sql(table: &str, day: i64, hours: &[i64]) -> String {
    let list = hours
        .iter()
        .map(|&h| hour_of_day(h).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT merchant_id, event_id, event_hour, \
         MIN(event_type) AS event_type, MIN(amount) AS amount, MIN(customer_id) AS customer_id, \
         MIN(CAST(event_time AS BIGINT)) AS event_micros \
         FROM {table} WHERE event_date = '{date}' AND event_hour IN ({list}) \
         GROUP BY merchant_id, event_id, event_hour",
        date = date_string(day)
    )
}

/// Metrics per merchant and hour for `hours` of `day` (unordered: the job sorts
/// what it writes, [`crate::layout`]).
///
/// An event's `event_hour` partition is the hour of its `event_time` (the
/// archiver puts it there, and [`computable_rows`] holds any other writer to
/// it), so the hour is grouped on that small integer and written as the
/// integer epoch microseconds of its start, which the job casts to the table's
/// timestamp.
pub fn hourly_sql(table: &str, day: i64, hours: &[i64]) -> String {
    let aggs = aggregate_sql();
    format!(
        "SELECT merchant_id, {day} + CAST(event_hour AS BIGINT) * {MICROS_PER_HOUR} AS hour, {fin} FROM (\
         SELECT merchant_id, event_hour, customer_id, {partial} \
         FROM ({dedup}) AS d GROUP BY merchant_id, event_hour, customer_id) AS c \
         GROUP BY merchant_id, event_hour",
        fin = aggs.r#final.join(", "),
        partial = aggs.partial.join(", "),
        dedup = dedup_sql(table, day, hours)
    )
}

/// Metrics per merchant for the whole UTC day `day` (exact distinct customers over
/// the day, not a sum of hours), unordered.
pub fn daily_sql(table: &str, day: i64) -> String {
    let hours: Vec<i64> = (0..24).map(|h| day + h * MICROS_PER_HOUR).collect();
    let aggs = aggregate_sql();
    format!(
        "SELECT merchant_id, {fin} FROM (\
         SELECT merchant_id, customer_id, {partial} FROM ({dedup}) AS d \
         GROUP BY merchant_id, customer_id) AS c \
         GROUP BY merchant_id",
        fin = aggs.r#final.join(", "),
        partial = aggs.partial.join(", "),
        dedup = dedup_sql(table, day, &hours)
    )
}

/// The `customer_hours` rows of one UTC hour (epoch µs) from `table` (raw
/// rows, or one part of them): per merchant, customer (null: events without
/// one) and quarter hour of the hour (0 to 3, from the event time) the
/// counters' partial sums of the customer's deduplicated events there.
/// Columns: `merchant_id`, `hour` (the integer epoch µs; the job casts it to
/// the table's timestamp), `customer_id`, `quarter`, the partial sums
/// ([`tally_common::metrics::partial_metric_names`]), `date`.
pub fn customer_hour_sql(table: &str, hour: i64) -> String {
    let aggs = aggregate_sql();
    format!(
        "SELECT merchant_id, CAST({hour} AS BIGINT) AS hour, customer_id, \
         CAST((event_micros - {hour}) / {SLOT_MICROS} AS INT) AS quarter, {partial}, '{date}' AS date \
         FROM ({dedup}) AS d GROUP BY merchant_id, customer_id, CAST((event_micros - {hour}) / {SLOT_MICROS} AS INT)",
        partial = aggs.partial.join(", "),
        dedup = dedup_sql(table, day_floor(hour), &[hour]),
        date = date_string(hour)
    )
}

/// The partial sums of `rows` (a relation of `customer_hours` rows) per
/// merchant, customer and `keys`: each output row is one distinct customer
/// (or the events without one) of its bucket.
fn per_customer(rows: &str, keys: &str) -> String {
    let sums: Vec<String> = partial_metric_names()
        .map(|m| format!("SUM({m}) AS {m}"))
        .collect();
    format!(
        "SELECT merchant_id, {keys}, customer_id, {sums} FROM {rows} GROUP BY merchant_id, {keys}, customer_id",
        sums = sums.join(", ")
    )
}

/// Metrics per merchant and hour from `customer_hours` rows (relation `rows`):
/// the counters add up, distinct customers are exact over the hour, and the
/// hour's sketch ([`tally_common::sketch_sql`]). Columns as the table's, from
/// `merchant_id` to `customers_sketch`.
pub fn hourly_from_customers_sql(rows: &str) -> String {
    format!(
        "SELECT merchant_id, CAST(hour AS BIGINT) AS hour, {fin}, hll_sketch_agg(customer_id) AS {SKETCH_COLUMN} \
         FROM ({per}) AS c GROUP BY merchant_id, hour",
        fin = aggregate_sql().r#final.join(", "),
        per = per_customer(rows, "hour")
    )
}

/// Metrics per merchant and 15-minute slot from `customer_hours` rows
/// (relation `rows`): each row is already one customer of one slot. Columns as
/// the table's, from `merchant_id` to `customers_sketch`.
pub fn quarter_hourly_from_customers_sql(rows: &str) -> String {
    format!(
        "SELECT merchant_id, CAST(hour AS BIGINT) + CAST(quarter AS BIGINT) * {SLOT_MICROS} AS quarter_hour, \
         {fin}, hll_sketch_agg(customer_id) AS {SKETCH_COLUMN} FROM {rows} GROUP BY merchant_id, hour, quarter",
        fin = aggregate_sql().r#final.join(", ")
    )
}

/// Metrics per merchant over the `customer_hours` rows of one UTC day
/// (relation `rows`): each customer's hours merged first, so distinct customers
/// are exact over the day. Columns as [`hourly_from_customers_sql`]'s, `day`
/// for `hour`.
pub fn daily_from_customers_sql(rows: &str) -> String {
    let sums: Vec<String> = partial_metric_names()
        .map(|m| format!("SUM({m}) AS {m}"))
        .collect();
    format!(
        "SELECT merchant_id, {fin}, hll_sketch_agg(customer_id) AS {SKETCH_COLUMN} FROM (SELECT merchant_id, customer_id, {sums} FROM {rows} \
         GROUP BY merchant_id, customer_id) AS c GROUP BY merchant_id",
        fin = aggregate_sql().r#final.join(", "),
        sums = sums.join(", ")
    )
}

/// Run one of these queries in `ctx` and collect its rows.
pub(crate) async fn run_query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    ctx.sql(sql)
        .await
        .context("planning the metrics query")?
        .collect()
        .await
        .context("running the metrics query")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::parse_ts;

    /// Golden text: a change here changes results and needs a logic_version bump.
    #[test]
    fn hourly_sql_golden() {
        let day = parse_ts("2026-11-24T00:00:00Z").unwrap();
        let h = |x: i64| day + x * tally_common::bucket::MICROS_PER_HOUR;
        let sql = hourly_sql("raw_events", day, &[h(3), h(4)]);
        assert!(
            sql.contains("WHERE event_date = '2026-11-24' AND event_hour IN (3, 4)"),
            "{sql}"
        );
        assert!(sql.starts_with("SELECT merchant_id, 1795478400000000 + CAST(event_hour AS BIGINT) * 3600000000 AS hour, CAST(COALESCE(SUM(orders), 0) AS BIGINT) AS orders"), "{sql}");
        // time only as integer microseconds, never through a timestamp function
        assert!(!sql.contains("date_trunc"), "{sql}");
        assert_eq!(
            sql.matches("event_time").count(),
            sql.matches("CAST(event_time AS BIGINT)").count(),
            "{sql}"
        );
        assert!(
            sql.contains("GROUP BY merchant_id, event_hour, customer_id) AS c GROUP BY merchant_id, event_hour"),
            "{sql}"
        );
        assert!(
            sql.contains("MIN(customer_id) AS customer_id, MIN(CAST(event_time AS BIGINT)) AS event_micros FROM raw_events"),
            "{sql}"
        );
        assert!(
            sql.contains("GROUP BY merchant_id, event_id, event_hour)"),
            "{sql}"
        );
        let d = daily_sql("raw_events", day);
        assert!(d.contains("event_hour IN (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)"));
        assert!(d.contains("CAST(COUNT(customer_id) AS BIGINT) AS unique_customers"));
        assert!(d.contains("GROUP BY merchant_id, customer_id) AS c GROUP BY merchant_id"));
        let r = computable_rows("raw_events", day);
        assert!(
            r.starts_with("(SELECT * FROM raw_events WHERE event_date = '2026-11-24' AND (merchant_id IS NOT NULL AND event_id IS NOT NULL AND event_type IS NOT NULL AND event_time IS NOT NULL"),
            "{r}"
        );
        assert!(
            r.contains("AND CAST(event_time AS BIGINT) >= (1795478400000000 + CAST(event_hour AS BIGINT) * 3600000000) AND CAST(event_time AS BIGINT) < (1795478400000000 + CAST(event_hour AS BIGINT) * 3600000000) + 3600000000"),
            "{r}"
        );
        assert!(
            r.ends_with(
                "AND (amount IS NULL OR (amount >= 0 AND amount <= 1000000000000)))) AS computable"
            ),
            "{r}"
        );
    }
}
