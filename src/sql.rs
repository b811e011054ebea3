//! `tally sql "SELECT …"`: read-only SQL for analysts over the lake's tables,
//! with time travel. Anything but a query is refused before it is planned.

use clap::{Args, ValueEnum};
use tally_common::config::LakeArgs;
use tally_common::deltalake::arrow::record_batch::RecordBatch;
use tally_common::deltalake::datafusion::prelude::SessionContext;
use tally_common::deltalake::datafusion::sql::sqlparser::ast::Statement;
use tally_common::deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
use tally_common::deltalake::datafusion::sql::sqlparser::parser::Parser;
use tally_common::lake::{register, Lake, Table};

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Arguments of `tally sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query (SELECT, WITH, VALUES, EXPLAIN, SHOW or DESCRIBE).
    pub query: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Read the one table the query names at this Delta version.
    #[arg(long, conflicts_with = "as_of")]
    pub version: Option<u64>,
    /// Read every table as of this time (RFC 3339).
    #[arg(long)]
    pub as_of: Option<String>,
    #[command(flatten)]
    pub lake: LakeArgs,
}

/// Refuse anything that is not a read: one statement, a query or a describe.
pub fn check_read_only(sql: &str) -> anyhow::Result<()> {
    let statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| anyhow::anyhow!("cannot parse the query: {e}"))?;
    if statements.len() != 1 {
        anyhow::bail!("give exactly one statement (got {})", statements.len());
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
            anyhow::bail!(
                "tally sql is read-only: {word} is refused; only queries (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE) run"
            )
        }
    }
}

async fn session(args: &SqlArgs, lake: &Lake) -> anyhow::Result<SessionContext> {
    if let Some(when) = &args.as_of {
        let ctx = SessionContext::new();
        for t in Table::ALL {
            if lake.open(t).await?.is_some() {
                register(&ctx, t.name(), &lake.open_as_of(t, when).await?).await?;
            }
        }
        return Ok(ctx);
    }
    if let Some(v) = args.version {
        let lower = args.query.to_lowercase();
        let named: Vec<Table> = Table::ALL
            .into_iter()
            .filter(|t| lower.contains(t.name()))
            .collect();
        let [table] = named.as_slice() else {
            anyhow::bail!(
                "--version needs a query naming exactly one table (it names {})",
                named.len()
            );
        };
        let ctx = SessionContext::new();
        register(&ctx, table.name(), &lake.open_at_version(*table, v).await?).await?;
        return Ok(ctx);
    }
    Ok(lake.session(&Table::ALL).await?)
}

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    check_read_only(&args.query)?;
    let lake = args.lake.lake()?;
    let ctx = session(&args, &lake).await?;
    let batches = ctx.sql(&args.query).await?.collect().await?;
    print(&batches, args.format)
}

fn print(batches: &[RecordBatch], format: Format) -> anyhow::Result<()> {
    use tally_common::deltalake::arrow::{csv, json, util::pretty};
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Table => println!("{}", pretty::pretty_format_batches(batches)?),
        Format::Csv => {
            let mut w = csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
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
