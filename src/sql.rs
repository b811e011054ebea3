//! `tally sql "SELECT …"`: read-only SQL for analysts over the lake's tables,
//! with time travel ([`tally_common::analyst`]), printed as a table, CSV or
//! JSON lines.

use clap::{Args, ValueEnum};
use tally_common::analyst::{self, TimeTravel};
use tally_common::config::LakeArgs;
use tally_common::deltalake::arrow::record_batch::RecordBatch;

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

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    analyst::check_read_only(&args.query)?;
    let when = match (args.as_of, args.version) {
        (Some(t), _) => TimeTravel::AsOf(t),
        (None, Some(v)) => TimeTravel::Version(v),
        (None, None) => TimeTravel::Latest,
    };
    let ctx = analyst::session(&args.lake.lake()?, &args.query, &when).await?;
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
