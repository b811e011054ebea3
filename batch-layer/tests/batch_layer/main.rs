//! Integration tests of the batch layer crate (one binary: linking is the slow part).

mod archive;
mod compact;
mod job;
mod quarantine;
mod steps;

use tally_common::deltalake::arrow::array::AsArray;
use tally_common::deltalake::arrow::datatypes::Int64Type;
use tally_common::lake::{Lake, Table};
use tally_common::source::{Position, Record};
use tally_testkit::events::TestEvent;

pub const START_MS: i64 = 1_764_000_000_000 / 86_400_000 * 86_400_000; // a UTC midnight, Nov 2025
pub const NOW: i64 = (START_MS + 10 * 3_600_000) * 1000;

/// Records of `per_record` events, each with one bad line and one blank line.
pub fn records(events: &[TestEvent], per_record: usize, first: u64) -> Vec<(Position, Vec<u8>)> {
    events
        .chunks(per_record)
        .enumerate()
        .map(|(i, chunk)| {
            let mut text: String = chunk.iter().map(|e| e.to_line(i % 2 == 0) + "\n").collect();
            text.push_str(&format!(
                "{{\"event_id\":\"bad{i}\",\"merchant_id\":\"m 1\"}}\n\n"
            ));
            (Position::from_u64(first + i as u64), text.into_bytes())
        })
        .collect()
}

pub fn input(recs: &[(Position, Vec<u8>)]) -> Vec<Record<'_>> {
    recs.iter()
        .map(|(p, d)| Record::new(p.clone(), d))
        .collect()
}

/// Run a query whose columns are all BIGINT and flatten the values.
pub async fn query_i64(lake: &Lake, sql: &str) -> Vec<i64> {
    let ctx = lake.session(&Table::ALL).await.unwrap();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            for c in b.columns() {
                out.push(c.as_primitive::<Int64Type>().value(r));
            }
        }
    }
    out
}
