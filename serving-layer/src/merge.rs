//! The merge of the batch and speed views at the watermark W, in the
//! merchant's calendar.
//!
//! A request's buckets are calendar units of a zone ([`Calendar::buckets`]):
//! their boundaries fall on 15-minute UTC slots, the grain both views keep
//! (`metrics_quarter_hourly`, the speed view's slots). A bucket's part before W
//! is covered by the fewest batch rows that tile it exactly: whole UTC days
//! (`metrics_daily`), then whole UTC hours (`metrics_hourly`), then quarter
//! hours; its part from W on by the speed view's slots. Counters add up
//! exactly over those pieces in every zone.
//!
//! Distinct customers: a bucket that is exactly one batch row (a UTC hour or
//! day before W) has the row's exact count; any other bucket, and the range's
//! totals, has the estimate of the union of its pieces' sketches (the batch
//! rows' and the speed slots' are the same format, [`tally_common::sketch`]),
//! with 95% bounds. A bucket holding a speed slot the view cannot vouch for,
//! or any slot when the view could not be read, is unknown (null), never zero.
//!
//! A [`Plan`] says what to read; [`Plan::assemble`] puts the answers together,
//! every bucket of the range present and in order.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use tally_common::bucket::{format_ts, MICROS_PER_DAY, MICROS_PER_HOUR};
use tally_common::calendar::{Calendar, Unit, SLOT_MICROS};
use tally_common::metrics::{BucketRow, Metric, MetricValues, Value};
use tally_common::sketch::{CustomerUnion, DistinctEstimate};
use tally_common::speed_view::SpeedReading;

use crate::batch_view::{MerchantRows, Ranges};

/// Where a bucket's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The batch tables (authoritative).
    Batch,
    /// The speed view.
    Speed,
    /// A bucket straddling the watermark: batch rows before it, speed slots after.
    Mixed,
}

/// One stored piece of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// A `metrics_daily` row (its UTC day).
    Daily(i64),
    /// A `metrics_hourly` row (its UTC hour).
    Hourly(i64),
    /// A `metrics_quarter_hourly` row (its slot).
    Quarter(i64),
    /// A speed-view slot: index into [`Plan::speed_hours`], and the slot of the hour.
    Speed(usize, usize),
}

#[derive(Debug, Clone)]
struct BucketPlan {
    start: i64,
    source: Source,
    pieces: Vec<Piece>,
}

/// What to read for one request, and how to put it together.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The zone of the buckets.
    pub calendar: Calendar,
    /// The batch rows to read.
    pub ranges: Ranges,
    /// UTC hours to read from the speed view.
    pub speed_hours: Vec<i64>,
    buckets: Vec<BucketPlan>,
}

/// One bucket of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Bucket start, epoch µs.
    pub start: i64,
    /// Where the numbers came from.
    pub source: Source,
    /// The stored metrics (derived ones are computed when serialized); None
    /// when its speed part could not be read.
    pub values: Option<MetricValues>,
    /// The 95% bounds of `unique_customers` when it is an estimate.
    pub bounds: Option<(i64, i64)>,
}

/// The fewest batch rows that tile `[s, e)` (both on slot boundaries): whole
/// UTC days, then whole hours, then quarter hours.
fn tile(s: i64, e: i64, out: &mut Vec<Piece>) {
    let mut t = s;
    while t < e {
        if t.rem_euclid(MICROS_PER_DAY) == 0 && t + MICROS_PER_DAY <= e {
            out.push(Piece::Daily(t));
            t += MICROS_PER_DAY;
        } else if t.rem_euclid(MICROS_PER_HOUR) == 0 && t + MICROS_PER_HOUR <= e {
            out.push(Piece::Hourly(t));
            t += MICROS_PER_HOUR;
        } else {
            out.push(Piece::Quarter(t));
            t += SLOT_MICROS;
        }
    }
}

impl Plan {
    /// Plan `buckets` (`[start, end)` pairs of `calendar`, epoch µs) against the
    /// watermark (None: the batch layer never ran, so everything is speed).
    /// Speed hours after `horizon` (the newest hour an event can be in yet) are
    /// known to be empty and not read.
    pub fn new(
        calendar: Calendar,
        buckets: &[(i64, i64)],
        watermark: Option<i64>,
        horizon: i64,
    ) -> Plan {
        let w = watermark.unwrap_or(i64::MIN);
        let mut plan = Plan {
            calendar,
            ranges: Ranges::default(),
            speed_hours: Vec::new(),
            buckets: Vec::with_capacity(buckets.len()),
        };
        for &(start, end) in buckets {
            let mut b = BucketPlan {
                start,
                source: Source::Speed,
                pieces: Vec::new(),
            };
            let batch_end = end.min(w);
            if start < batch_end {
                tile(start, batch_end, &mut b.pieces);
                let r = &mut plan.ranges;
                for p in &b.pieces {
                    match *p {
                        Piece::Daily(d) => Ranges::add(&mut r.daily, d, d + MICROS_PER_DAY),
                        Piece::Hourly(h) => Ranges::add(&mut r.hourly, h, h + MICROS_PER_HOUR),
                        Piece::Quarter(q) => Ranges::add(&mut r.quarters, q, q + SLOT_MICROS),
                        Piece::Speed(..) => {}
                    }
                }
                b.source = if end <= w {
                    Source::Batch
                } else {
                    Source::Mixed
                };
            }
            // the speed part: W is hour aligned, so it starts on an hour or at `start`
            let mut t = start.max(w);
            while t < end {
                let hour = t - t.rem_euclid(MICROS_PER_HOUR);
                if hour > horizon {
                    break;
                }
                let i = match plan.speed_hours.last() {
                    Some(&h) if h == hour => plan.speed_hours.len() - 1,
                    _ => {
                        plan.speed_hours.push(hour);
                        plan.speed_hours.len() - 1
                    }
                };
                b.pieces
                    .push(Piece::Speed(i, ((t - hour) / SLOT_MICROS) as usize));
                t += SLOT_MICROS;
            }
            plan.buckets.push(b);
        }
        plan
    }

    /// Whether any bucket needs the speed view.
    pub fn needs_speed(&self) -> bool {
        !self.speed_hours.is_empty()
    }

    /// Put the reads together, with the range's totals. `speed` is None when
    /// the speed view could not be read: the speed and mixed buckets are then
    /// null, as are those holding an hour the view does not cover
    /// ([`SpeedReading::not_covered`]).
    pub fn assemble(&self, rows: &MerchantRows, speed: Option<&SpeedReading>) -> Assembled {
        let empty = BucketRow::default();
        let mut total = MetricValues {
            unique_customers: Some(0),
            ..Default::default()
        };
        let mut total_union = CustomerUnion::new();
        let mut total_known = true;
        let mut total_sketchless = false;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            let mut values = MetricValues {
                unique_customers: Some(0),
                ..Default::default()
            };
            let mut union = CustomerUnion::new();
            let mut known = true;
            // a row with customers but no sketch (written before sketches
            // were kept, until reprocessed): a union over it is unknown
            let mut sketchless = false;
            for p in &b.pieces {
                let row = match *p {
                    Piece::Daily(d) => rows.daily.get(&d),
                    Piece::Hourly(h) => rows.hourly.get(&h),
                    Piece::Quarter(q) => rows.quarters.get(&q),
                    Piece::Speed(i, q) => match speed {
                        // a slot the view cannot vouch for makes its bucket unknown, never zero
                        Some(r) if r.covers(i) => r.quarters.get(i).map(|qs| &qs[q]),
                        _ => {
                            known = false;
                            None
                        }
                    },
                }
                .unwrap_or(&empty);
                values.counters.merge(&row.values.counters);
                sketchless |= row.sketch.is_none() && row.values.unique_customers.unwrap_or(0) > 0;
                if let Some(sketch) = &row.sketch {
                    if let Err(e) = union.add_bytes(sketch) {
                        tracing::warn!(error = %e, "a stored sketch does not parse; skipped");
                    }
                }
            }
            let exact = match b.pieces.as_slice() {
                [Piece::Daily(t)] => Some(rows.daily.get(t)),
                [Piece::Hourly(t)] => Some(rows.hourly.get(t)),
                _ => None,
            };
            let mut bounds = None;
            match exact {
                Some(row) => {
                    values.unique_customers =
                        Some(row.and_then(|r| r.values.unique_customers).unwrap_or(0));
                }
                None if sketchless => values.unique_customers = None,
                None => {
                    let (u, bb) = estimate(&union);
                    values.unique_customers = Some(u);
                    bounds = bb;
                }
            }
            total_sketchless |= sketchless;
            if known {
                total.counters.merge(&values.counters);
                total_union.merge(&union);
            } else {
                total_known = false;
            }
            buckets.push(Bucket {
                start: b.start,
                source: b.source,
                values: known.then_some(values),
                bounds: bounds.filter(|_| known),
            });
        }
        let totals = if !total_known {
            Bucket {
                start: self.buckets.first().map_or(0, |b| b.start),
                source: Source::Mixed,
                values: None,
                bounds: None,
            }
        } else if let [only] = buckets.as_slice() {
            only.clone()
        } else {
            let (u, bounds) = estimate(&total_union);
            total.unique_customers = (!total_sketchless).then_some(u);
            let bounds = bounds.filter(|_| !total_sketchless);
            Bucket {
                start: self.buckets.first().map_or(0, |b| b.start),
                source: Source::Mixed,
                values: Some(total),
                bounds,
            }
        };
        Assembled { buckets, totals }
    }
}

/// A union's estimate, and its bounds unless it is surely exact (empty).
fn estimate(u: &CustomerUnion) -> (i64, Option<(i64, i64)>) {
    if u.is_empty() {
        return (0, None);
    }
    let DistinctEstimate {
        estimate,
        lower,
        upper,
    } = u.estimate();
    (estimate, Some((lower, upper)))
}

/// What [`Plan::assemble`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// Every bucket of the range, in order.
    pub buckets: Vec<Bucket>,
    /// The whole range: counters summed, distinct customers of the union.
    pub totals: Bucket,
}

/// The 200 body of the metrics endpoint. Serialized by hand so each bucket holds
/// exactly the requested metrics, in API order, after `start` and `source`.
#[derive(Debug, Clone)]
pub struct MetricsResponse {
    /// The merchant.
    pub merchant_id: String,
    /// The bucket size.
    pub granularity: Unit,
    /// The zone of the buckets.
    pub calendar: Calendar,
    /// Range start (inclusive), epoch µs.
    pub from: i64,
    /// Range end (exclusive), epoch µs.
    pub to: i64,
    /// The watermark used, epoch µs.
    pub batch_watermark: Option<i64>,
    /// Whether the speed view could not be read.
    pub partial: bool,
    /// The metrics to show.
    pub metrics: Vec<Metric>,
    /// Totals over the range.
    pub totals: Bucket,
    /// Every bucket of the range, in order.
    pub buckets: Vec<Bucket>,
}

struct BucketsOut<'a>(&'a [Bucket], &'a [Metric], Calendar);
struct BucketOut<'a>(&'a Bucket, &'a [Metric], Option<Calendar>);

impl Serialize for MetricsResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(9))?;
        m.serialize_entry("merchant_id", &self.merchant_id)?;
        m.serialize_entry("granularity", self.granularity.name())?;
        m.serialize_entry("from", &self.calendar.format(self.from))?;
        m.serialize_entry("to", &self.calendar.format(self.to))?;
        m.serialize_entry("time_zone", self.calendar.name())?;
        m.serialize_entry("batch_watermark", &self.batch_watermark.map(format_ts))?;
        m.serialize_entry("partial", &self.partial)?;
        m.serialize_entry("totals", &BucketOut(&self.totals, &self.metrics, None))?;
        m.serialize_entry(
            "buckets",
            &BucketsOut(&self.buckets, &self.metrics, self.calendar),
        )?;
        m.end()
    }
}

impl Serialize for BucketsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for b in self.0 {
            seq.serialize_element(&BucketOut(b, self.1, Some(self.2)))?;
        }
        seq.end()
    }
}

impl Serialize for BucketOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let BucketOut(b, metrics, calendar) = *self;
        let mut m = s.serialize_map(None)?;
        if let Some(c) = calendar {
            m.serialize_entry("start", &c.format(b.start))?;
            m.serialize_entry("source", &b.source)?;
        }
        for &metric in metrics {
            let v = b.values.map_or(Value::Null, |v| v.value(metric));
            m.serialize_entry(metric.name(), &v)?;
            if metric == Metric::UniqueCustomers {
                m.serialize_entry("unique_customers_bounds", &b.bounds.map(|(l, u)| [l, u]))?;
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::parse_ts;
    use tally_common::metrics::Counters;
    use tally_common::sketch::CustomerSketch;

    fn ts(s: &str) -> i64 {
        parse_ts(s).unwrap()
    }

    fn row(orders: i64, customers: &[&str]) -> BucketRow {
        let mut counters = Counters::default();
        counters.values[0] = orders;
        let mut s = CustomerSketch::new();
        for c in customers {
            s.update(c);
        }
        BucketRow {
            values: MetricValues {
                counters,
                unique_customers: Some(customers.len() as i64),
            },
            sketch: (!customers.is_empty()).then(|| s.to_bytes().into()),
        }
    }

    #[test]
    fn a_utc_day_before_the_watermark_is_its_daily_row_and_exact() {
        let d = ts("2026-11-24T00:00:00Z");
        let buckets = Calendar::UTC
            .buckets(Unit::Day, d, d + 2 * MICROS_PER_DAY, 10)
            .unwrap();
        let w = d + MICROS_PER_DAY + 2 * MICROS_PER_HOUR;
        let plan = Plan::new(Calendar::UTC, &buckets, Some(w), w + MICROS_PER_HOUR);
        assert_eq!(plan.ranges.daily, [(d, d + MICROS_PER_DAY)]);
        assert_eq!(plan.ranges.hourly, [(d + MICROS_PER_DAY, w)]);
        assert!(plan.ranges.quarters.is_empty());
        assert_eq!(plan.speed_hours, [w, w + MICROS_PER_HOUR]);
        let mut rows = MerchantRows::default();
        rows.daily.insert(d, row(10, &["a", "b"]));
        rows.hourly.insert(d + MICROS_PER_DAY, row(1, &["a"]));
        let mut speed = SpeedReading::default();
        for _ in 0..2 {
            speed.hours.push(MetricValues::default());
            let mut q: [BucketRow; 4] = Default::default();
            q[1] = row(2, &["c"]);
            speed.quarters.push(q);
        }
        let out = plan.assemble(&rows, Some(&speed));
        assert_eq!(out.buckets[0].source, Source::Batch);
        assert_eq!(out.buckets[0].values.unwrap().unique_customers, Some(2));
        assert_eq!(out.buckets[0].bounds, None);
        let mixed = &out.buckets[1];
        assert_eq!(mixed.source, Source::Mixed);
        // one batch hour and two speed slots: counters add, customers union
        assert_eq!(mixed.values.unwrap().counters.values[0], 1 + 2 + 2);
        assert_eq!(mixed.values.unwrap().unique_customers, Some(2));
        assert!(mixed.bounds.is_some());
        assert_eq!(out.totals.values.unwrap().counters.values[0], 15);
        assert_eq!(out.totals.values.unwrap().unique_customers, Some(3));
        // the speed view unreadable: the mixed day and the totals are unknown
        let partial = plan.assemble(&rows, None);
        assert!(partial.buckets[0].values.is_some());
        assert_eq!(partial.buckets[1].values, None);
        assert_eq!(partial.totals.values, None);
    }

    #[test]
    fn rows_with_customers_but_no_sketch_make_a_union_unknown_not_zero() {
        let d = ts("2026-11-24T00:00:00Z");
        let buckets = Calendar::UTC
            .buckets(
                Unit::Week,
                ts("2026-11-23T00:00:00Z"),
                ts("2026-11-30T00:00:00Z"),
                9,
            )
            .unwrap();
        let plan = Plan::new(
            Calendar::UTC,
            &buckets,
            Some(d + 7 * MICROS_PER_DAY),
            i64::MAX,
        );
        let mut rows = MerchantRows::default();
        let mut old = row(5, &["a", "b"]);
        old.sketch = None; // written before sketches were kept
        rows.daily.insert(d, old);
        let out = plan.assemble(&rows, None);
        let v = out.buckets[0].values.unwrap();
        assert_eq!(v.counters.values[0], 5);
        assert_eq!((v.unique_customers, out.buckets[0].bounds), (None, None));
    }

    #[test]
    fn a_kathmandu_day_is_tiled_by_quarter_hours_hours_and_never_split() {
        let cal = Calendar::parse("Asia/Kathmandu").unwrap();
        // local midnight of 2026-11-24 is 18:15 UTC the day before
        let from = ts("2026-11-23T18:15:00Z");
        let buckets = cal
            .buckets(Unit::Day, from, from + MICROS_PER_DAY, 2)
            .unwrap();
        let plan = Plan::new(cal, &buckets, Some(ts("2026-11-30T00:00:00Z")), i64::MAX);
        let p = &plan.buckets[0].pieces;
        let quarters = p.iter().filter(|x| matches!(x, Piece::Quarter(_))).count();
        let hours = p.iter().filter(|x| matches!(x, Piece::Hourly(_))).count();
        assert_eq!((quarters, hours, p.len()), (4, 23, 27));
        assert!(plan.ranges.daily.is_empty());
        assert!(plan.speed_hours.is_empty());
        // a year of Kathmandu months reads hours only around its boundaries
        let to = ts("2026-11-30T18:15:00Z");
        let from = ts("2025-11-30T18:15:00Z");
        let months = cal.buckets(Unit::Month, from, to, 120).unwrap();
        let plan = Plan::new(cal, &months, Some(to), i64::MAX);
        let hours: i64 = plan
            .ranges
            .hourly
            .iter()
            .map(|(a, b)| (b - a) / MICROS_PER_HOUR)
            .sum();
        // two spans per boundary (the hour holding it is in quarter hours)
        assert_eq!(plan.ranges.hourly.len(), 24, "{:?}", plan.ranges.hourly);
        assert_eq!(hours, 12 * 23, "{:?}", plan.ranges.hourly);
    }
}
