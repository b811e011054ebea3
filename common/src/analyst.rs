//! Read-only SQL for analysts over the lake's tables (`tally sql`): the guard
//! that refuses anything but a query before it is planned, and the DataFusion
//! session with the tables registered, now or as of a time or version (Delta
//! time travel).

use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::sql::sqlparser::ast::Statement;
use deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
use deltalake::datafusion::sql::sqlparser::parser::Parser;

use std::sync::Arc;

use deltalake::arrow::array::{Array, AsArray, TimestampMicrosecondArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
use deltalake::datafusion::common::Result as DfResult;
use deltalake::datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::calendar::Calendar;
use crate::lake::{register, Lake, Table};
use crate::{Context as _, Error, Result};

/// Which state of the tables a query reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TimeTravel {
    /// The latest version of every table.
    #[default]
    Latest,
    /// Every table as it was at this instant (RFC 3339).
    AsOf(String),
    /// The one table the query names, at this Delta version.
    Version(u64),
}

/// Refuse anything that is not a read: exactly one statement, a query (SELECT,
/// WITH, VALUES), an EXPLAIN of one, SHOW or DESCRIBE. Errors: [`Error::Invalid`]
/// saying what was refused.
pub fn check_read_only(sql: &str) -> Result<()> {
    let statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| Error::invalid(format!("cannot parse the query: {e}")))?;
    if statements.len() != 1 {
        return Err(Error::invalid(format!(
            "give exactly one statement (got {})",
            statements.len()
        )));
    }
    match &statements[0] {
        Statement::Query(_) => Ok(()),
        Statement::Explain { statement, .. } if matches!(**statement, Statement::Query(_)) => {
            Ok(())
        }
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ExplainTable { .. } => Ok(()),
        other => {
            let kind = other.to_string();
            let word = kind
                .split_whitespace()
                .next()
                .unwrap_or("statement")
                .to_uppercase();
            Err(Error::invalid(format!(
                "tally sql is read-only: {word} is refused; only queries (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE) run"
            )))
        }
    }
}

/// A session for `query` with the lake's tables registered under their names
/// (`raw_events`, `metrics_hourly`, ...) as `when` says. Errors:
/// [`Error::Invalid`] when `when` is a version and the query does not name
/// exactly one table; the lake's errors opening a table.
pub async fn session(lake: &Lake, query: &str, when: &TimeTravel) -> Result<SessionContext> {
    let ctx = tables(lake, query, when).await?;
    crate::sketch_sql::register_sketch_functions(&ctx);
    ctx.register_udf(ScalarUDF::from(LocalTime::new()));
    let quarters = Table::MetricsQuarterHourly.name();
    if ctx.table_exist(quarters).unwrap_or(false) {
        let zone = if ctx.table_exist(Table::Merchants.name()).unwrap_or(false) {
            "COALESCE(m.time_zone, 'UTC')"
        } else {
            "'UTC'"
        };
        let join = if zone == "'UTC'" {
            String::new()
        } else {
            format!(
                " LEFT JOIN {} m ON q.merchant_id = m.merchant_id",
                Table::Merchants.name()
            )
        };
        ctx.sql(&format!(
            "CREATE VIEW {LOCAL_VIEW} AS SELECT q.*, {zone} AS time_zone, \
             local_time(q.quarter_hour, {zone}) AS local_start FROM {quarters} q{join}"
        ))
        .await
        .context("creating the local-time view")?;
    }
    Ok(ctx)
}

/// The analysts' view of `metrics_quarter_hourly` in each merchant's own
/// calendar: every column, plus `time_zone` (the merchant's, UTC when unset)
/// and `local_start` (the quarter hour's start on the merchant's wall clock, a
/// timestamp without zone), so `date_trunc('day', local_start)` is the local
/// day, `date_trunc('month', local_start)` the local month.
pub const LOCAL_VIEW: &str = "metrics_local";

/// `local_time(ts, zone)`: the wall-clock time (timestamp without zone, µs)
/// of UTC instant `ts` in IANA zone `zone`; null for a null input or an
/// unknown zone.
#[derive(Debug, PartialEq, Eq, Hash)]
struct LocalTime {
    signature: Signature,
}

impl LocalTime {
    fn new() -> Self {
        LocalTime {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for LocalTime {
    fn name(&self) -> &str {
        "local_time"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Timestamp(TimeUnit::Microsecond, None))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let ts = cast(
            &args.args[0].to_array(n)?,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let ts = ts.as_primitive::<TimestampMicrosecondType>();
        let zones = cast(&args.args[1].to_array(n)?, &DataType::Utf8)?;
        let zones = zones.as_string::<i32>();
        let mut out = Vec::with_capacity(n);
        let mut last: Option<(String, Option<Calendar>)> = None;
        for r in 0..n {
            if ts.is_null(r) || zones.is_null(r) {
                out.push(None);
                continue;
            }
            let z = zones.value(r);
            let cal = match &last {
                Some((name, cal)) if name == z => *cal,
                _ => {
                    let cal = Calendar::parse(z).ok();
                    last = Some((z.to_string(), cal));
                    cal
                }
            };
            let t = ts.value(r);
            out.push(cal.map(|c| t + i64::from(c.offset_secs(t)) * 1_000_000));
        }
        Ok(ColumnarValue::Array(Arc::new(
            TimestampMicrosecondArray::from(out),
        )))
    }
}

async fn tables(lake: &Lake, query: &str, when: &TimeTravel) -> Result<SessionContext> {
    match when {
        TimeTravel::Latest => lake.session(&Table::ALL).await,
        TimeTravel::AsOf(instant) => {
            let ctx = SessionContext::new();
            for t in Table::ALL {
                if lake.open(t).await?.is_some() {
                    register(&ctx, t.name(), &lake.open_as_of(t, instant).await?).await?;
                }
            }
            Ok(ctx)
        }
        TimeTravel::Version(v) => {
            let lower = query.to_lowercase();
            let named: Vec<Table> = Table::ALL
                .into_iter()
                .filter(|t| lower.contains(t.name()))
                .collect();
            let [table] = named.as_slice() else {
                return Err(Error::invalid(format!(
                    "--version needs a query naming exactly one table (it names {})",
                    named.len()
                )));
            };
            let ctx = SessionContext::new();
            register(&ctx, table.name(), &lake.open_at_version(*table, *v).await?).await?;
            Ok(ctx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_read_only;

    #[test]
    fn only_queries_pass() {
        for ok in [
            "SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "EXPLAIN SELECT * FROM raw_events",
            "select merchant_id from metrics_hourly where orders > 3",
        ] {
            assert!(check_read_only(ok).is_ok(), "{ok}");
        }
        for bad in [
            "DROP TABLE raw_events",
            "INSERT INTO raw_events VALUES (1)",
            "COPY raw_events TO '/tmp/x.csv'",
            "DELETE FROM metrics_hourly",
            "CREATE TABLE t AS SELECT 1",
            "SELECT 1; DROP TABLE raw_events",
            "UPDATE metrics_daily SET orders = 0",
        ] {
            let err = check_read_only(bad).unwrap_err().to_string();
            assert!(
                err.contains("read-only") || err.contains("exactly one"),
                "{bad}: {err}"
            );
        }
    }
}
