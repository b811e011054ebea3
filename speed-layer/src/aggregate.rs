//! A batch of records aggregated in memory per (merchant, hour), with each
//! hour split into its four 15-minute slots (the grain every zone's calendar is
//! exact on, [`tally_common::calendar`]), ready to apply to a speed store in
//! one round trip.

use std::collections::{HashMap, HashSet};

use tally_common::bucket::hour_floor;
use tally_common::calendar::SLOT_MICROS;
use tally_common::decode::{decode_record, Rejected};
use tally_common::metrics::Counters;
use tally_common::sketch::CustomerSketch;
use tally_common::source::{Position, Record, SourceId};

/// One merchant-hour's share of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourUpdate {
    /// The merchant.
    pub merchant_id: String,
    /// Start of the hour, epoch µs.
    pub hour: i64,
    /// Sums to add, over the hour.
    pub counters: Counters,
    /// Sums to add per 15-minute slot of the hour (they add up to `counters`).
    pub quarters: [Counters; 4],
    /// Distinct customers seen in this batch, per 15-minute slot.
    pub customers: [Vec<String>; 4],
    /// Highest position of a record contributing to this update: the new mark.
    pub position: Position,
    /// Lowest such position: where a redelivery must start if this update fails.
    pub first_position: Position,
}

impl HourUpdate {
    /// Slot `q`'s customers as a serialized distinct-count sketch
    /// ([`tally_common::sketch`]); None when it has none.
    pub fn sketch(&self, q: usize) -> Option<Vec<u8>> {
        let customers = self.customers.get(q).filter(|c| !c.is_empty())?;
        let mut s = CustomerSketch::new();
        for c in customers {
            s.update(c);
        }
        Some(s.to_bytes())
    }
}

/// The 15-minute slot (0 to 3) of instant `t` within its hour.
pub fn quarter_of(t: i64) -> usize {
    ((t - hour_floor(t)) / SLOT_MICROS).clamp(0, 3) as usize
}

/// A decoded, aggregated batch from one source.
#[derive(Debug, Clone)]
pub struct SpeedBatch {
    /// Where the records came from.
    pub source: SourceId,
    /// One update per merchant-hour, in first-seen order.
    pub updates: Vec<HourUpdate>,
    /// Lines rejected by the decoder, with the position of their record.
    pub rejected: Vec<(Position, Rejected)>,
    /// Events accepted.
    pub accepted: u64,
    /// Records in the batch.
    pub records: u64,
    /// Position of the batch's first record, if any.
    pub first_position: Option<Position>,
    /// Position of the batch's last record, if any.
    pub last_position: Option<Position>,
}

impl SpeedBatch {
    /// Decode and aggregate `records` (in source order) of `source`.
    pub fn build<'a>(
        source: SourceId,
        records: impl IntoIterator<Item = Record<'a>>,
        ingest_time: i64,
    ) -> Self {
        let mut index: HashMap<(String, i64), usize> = HashMap::new();
        let mut updates: Vec<HourUpdate> = Vec::new();
        let mut seen: Vec<[HashSet<String>; 4]> = Vec::new();
        let mut batch = SpeedBatch {
            source,
            updates: Vec::new(),
            rejected: Vec::new(),
            accepted: 0,
            records: 0,
            first_position: None,
            last_position: None,
        };
        for Record { position, data } in records {
            batch.records += 1;
            let decoded = decode_record(data, ingest_time);
            batch.accepted += decoded.events.len() as u64;
            for event in decoded.events {
                let hour = hour_floor(event.ts);
                let key = (event.merchant_id, hour);
                let i = match index.get(&key) {
                    Some(&i) => i,
                    None => {
                        let i = updates.len();
                        updates.push(HourUpdate {
                            merchant_id: key.0.clone(),
                            hour,
                            counters: Counters::default(),
                            quarters: Default::default(),
                            customers: Default::default(),
                            position: position.clone(),
                            first_position: position.clone(),
                        });
                        seen.push(Default::default());
                        index.insert(key, i);
                        i
                    }
                };
                let u = &mut updates[i];
                let q = quarter_of(event.ts);
                u.counters.apply_parts(&event.event_type, event.amount);
                u.quarters[q].apply_parts(&event.event_type, event.amount);
                if u.position != position {
                    u.position = position.clone();
                }
                if let Some(c) = event.customer_id {
                    if !seen[i][q].contains(&c) {
                        seen[i][q].insert(c.clone());
                        u.customers[q].push(c);
                    }
                }
            }
            batch
                .rejected
                .extend(decoded.rejected.into_iter().map(|r| (position.clone(), r)));
            if batch.first_position.is_none() {
                batch.first_position = Some(position.clone());
            }
            batch.last_position = Some(position);
        }
        batch.updates = updates;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::{parse_ts, MICROS_PER_HOUR};
    use tally_common::metrics::Metric;

    #[test]
    fn aggregates_per_merchant_hour_with_marks() {
        let now = parse_ts("2026-11-24T12:00:00Z").unwrap();
        let r1 = br#"{"event_id":"1","merchant_id":"a","type":"order","ts":"2026-11-24T10:01:00Z","amount":5,"customer_id":"x"}
{"event_id":"2","merchant_id":"a","type":"order","ts":"2026-11-24T10:02:00Z","amount":7,"customer_id":"x"}
garbage
{"event_id":"3","merchant_id":"b","type":"page_view","ts":"2026-11-24T11:02:00Z"}"#;
        let r2 = br#"{"event_id":"4","merchant_id":"a","type":"refund","ts":"2026-11-24T10:03:00Z","amount":2,"customer_id":"y"}"#;
        let b = SpeedBatch::build(
            SourceId::file("t"),
            [
                Record::new(Position::from_u64(10), r1),
                Record::new(Position::from_u64(11), r2),
            ],
            now,
        );
        assert_eq!(b.accepted, 4);
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.updates.len(), 2);
        let a = &b.updates[0];
        assert_eq!(
            (a.merchant_id.as_str(), a.hour),
            ("a", parse_ts("2026-11-24T10:00:00Z").unwrap())
        );
        assert_eq!(a.counters.get(Metric::Orders), Some(2));
        assert_eq!(a.counters.get(Metric::GrossSales), Some(12));
        assert_eq!(a.counters.get(Metric::RefundedAmount), Some(2));
        assert_eq!(a.customers[0], ["x", "y"]);
        assert!(a.customers[1..].iter().all(Vec::is_empty));
        assert_eq!(a.quarters[0], a.counters);
        assert_eq!(a.position, Position::from_u64(11));
        assert_eq!(a.first_position, Position::from_u64(10));
        let bb = &b.updates[1];
        assert_eq!(bb.hour - a.hour, MICROS_PER_HOUR);
        assert_eq!(bb.position, Position::from_u64(10));
        assert_eq!(b.first_position, Some(Position::from_u64(10)));
        assert_eq!(b.last_position, Some(Position::from_u64(11)));
    }
}
