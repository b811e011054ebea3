//! Read-only SQL for analysts over the lake's tables (`tally sql`): the guard
//! that refuses anything but a query before it is planned, and the DataFusion
//! session with the tables registered, now or as of a time or version (Delta
//! time travel).

use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::sql::sqlparser::ast::Statement;
use deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
use deltalake::datafusion::sql::sqlparser::parser::Parser;

use crate::lake::{register, Lake, Table};
use crate::{Error, Result};

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
