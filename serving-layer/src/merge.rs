//! The merge of the batch and speed views at the watermark W.
//!
//! An hour bucket before W comes from `metrics_hourly`, any other from the speed
//! view. A day bucket that ends by W comes from `metrics_daily` (`batch`); one that
//! starts at or after W from the speed view (`speed`, distinct customers as the
//! union estimate of its hours); one that straddles W is `mixed`: its counters
//! are the batch hours before W plus the speed hours from W, and its
//! `unique_customers` is null, because an exact set and a HyperLogLog cannot be
//! merged. A [`Plan`] says what to read; [`Plan::assemble`] puts the answers
//! together, every bucket of the range present and in order.

use std::collections::HashMap;
use std::ops::Range;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use tally_common::bucket::{format_ts, BucketRange, Granularity, MICROS_PER_HOUR};
use tally_common::metrics::{Metric, MetricValues, Value};
use tally_common::speed_view::SpeedReading;

/// Where a bucket's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The batch tables (authoritative).
    Batch,
    /// The speed view.
    Speed,
    /// A day straddling the watermark: batch hours before it, speed hours after.
    Mixed,
}

#[derive(Debug, Clone)]
struct BucketPlan {
    start: i64,
    source: Source,
    /// Indices into [`Plan::speed_hours`] of this bucket's speed hours.
    speed: Range<usize>,
    /// Index into [`Plan::unions`] (speed days only).
    union: Option<usize>,
    /// Hours of `metrics_hourly` in this bucket (mixed days only).
    batch_hours: Range<i64>,
}

/// What to read for one request, and how to put it together.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The requested range.
    pub range: BucketRange,
    /// `metrics_hourly` rows to read: hours in `[start, end)`.
    pub hourly: Option<(i64, i64)>,
    /// `metrics_daily` rows to read: days in `[start, end)`.
    pub daily: Option<(i64, i64)>,
    /// Hours to read from the speed view.
    pub speed_hours: Vec<i64>,
    /// Groups of indices into `speed_hours` whose distinct-customer union is wanted.
    pub unions: Vec<Vec<usize>>,
    buckets: Vec<BucketPlan>,
}

/// One bucket of the answer; `values` None when its speed part could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Bucket start, epoch µs.
    pub start: i64,
    /// Where the numbers came from.
    pub source: Source,
    /// The stored metrics (derived ones are computed when serialized).
    pub values: Option<MetricValues>,
}

fn widen(span: &mut Option<(i64, i64)>, start: i64, end: i64) {
    *span = Some(match *span {
        None => (start, end),
        Some((a, b)) => (a.min(start), b.max(end)),
    });
}

impl Plan {
    /// Plan `range` against the watermark (None: the batch layer never ran, so
    /// everything is speed). Speed hours after `horizon` (the newest hour an event
    /// can be in yet) are known to be empty and not read.
    pub fn new(range: BucketRange, watermark: Option<i64>, horizon: i64) -> Plan {
        let w = watermark.unwrap_or(i64::MIN);
        let mut plan = Plan {
            range,
            hourly: None,
            daily: None,
            speed_hours: Vec::new(),
            unions: Vec::new(),
            buckets: Vec::with_capacity(range.len()),
        };
        let step = range.granularity.micros();
        for start in range.starts() {
            let end = start + step;
            let mut b = BucketPlan {
                start,
                source: Source::Speed,
                speed: 0..0,
                union: None,
                batch_hours: start..start,
            };
            let speed_from = if end <= w {
                b.source = Source::Batch;
                match range.granularity {
                    Granularity::Hour => widen(&mut plan.hourly, start, end),
                    Granularity::Day => widen(&mut plan.daily, start, end),
                }
                end
            } else if start >= w {
                start
            } else {
                // only a day can straddle W: W is hour aligned
                b.source = Source::Mixed;
                b.batch_hours = start..w;
                widen(&mut plan.hourly, start, w);
                w
            };
            let first = plan.speed_hours.len();
            let mut h = speed_from;
            while h < end && h <= horizon {
                plan.speed_hours.push(h);
                h += MICROS_PER_HOUR;
            }
            b.speed = first..plan.speed_hours.len();
            if range.granularity == Granularity::Day
                && b.source == Source::Speed
                && !b.speed.is_empty()
            {
                b.union = Some(plan.unions.len());
                plan.unions.push(b.speed.clone().collect());
            }
            plan.buckets.push(b);
        }
        plan
    }

    /// Whether any bucket needs the speed view.
    pub fn needs_speed(&self) -> bool {
        self.buckets.iter().any(|b| b.source != Source::Batch)
    }

    /// Put the reads together. `speed` is None when the speed view could not be
    /// read: the speed and mixed buckets are then null, as are those holding an
    /// hour the view does not cover ([`SpeedReading::not_covered`]).
    pub fn assemble(
        &self,
        hourly: &HashMap<i64, MetricValues>,
        daily: &HashMap<i64, MetricValues>,
        speed: Option<&SpeedReading>,
    ) -> Vec<Bucket> {
        let nothing = MetricValues {
            unique_customers: Some(0),
            ..MetricValues::default()
        };
        let speed_hour = |r: &SpeedReading, i: usize| r.hours.get(i).copied().unwrap_or(nothing);
        self.buckets
            .iter()
            .map(|b| {
                // a speed hour the view cannot vouch for makes its bucket unknown, never zero
                let speed = speed.filter(|r| b.speed.clone().all(|i| r.covers(i)));
                let values = match b.source {
                    Source::Batch => Some(
                        match self.range.granularity {
                            Granularity::Hour => hourly.get(&b.start),
                            Granularity::Day => daily.get(&b.start),
                        }
                        .copied()
                        .unwrap_or(nothing),
                    ),
                    Source::Speed => speed.map(|r| {
                        let mut v = nothing;
                        for i in b.speed.clone() {
                            let hour = speed_hour(r, i);
                            v.counters.merge(&hour.counters);
                            if self.range.granularity == Granularity::Hour {
                                v.unique_customers = Some(hour.unique_customers.unwrap_or(0));
                            }
                        }
                        if let Some(u) = b.union {
                            v.unique_customers = Some(r.unions.get(u).copied().unwrap_or(0));
                        }
                        v
                    }),
                    Source::Mixed => speed.map(|r| {
                        let mut v = MetricValues::default();
                        let mut h = b.batch_hours.start;
                        while h < b.batch_hours.end {
                            if let Some(row) = hourly.get(&h) {
                                v.counters.merge(&row.counters);
                            }
                            h += MICROS_PER_HOUR;
                        }
                        for i in b.speed.clone() {
                            v.counters.merge(&speed_hour(r, i).counters);
                        }
                        v
                    }),
                };
                Bucket {
                    start: b.start,
                    source: b.source,
                    values,
                }
            })
            .collect()
    }
}

/// The 200 body of the metrics endpoint. Serialized by hand so each bucket holds
/// exactly the requested metrics, in API order, after `start` and `source`.
#[derive(Debug, Clone)]
pub struct MetricsResponse {
    /// The merchant.
    pub merchant_id: String,
    /// The bucket size.
    pub granularity: Granularity,
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
    /// Every bucket of the range, in order.
    pub buckets: Vec<Bucket>,
}

struct BucketsOut<'a>(&'a [Bucket], &'a [Metric]);
struct BucketOut<'a>(&'a Bucket, &'a [Metric]);

impl Serialize for MetricsResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("merchant_id", &self.merchant_id)?;
        m.serialize_entry("granularity", self.granularity.as_str())?;
        m.serialize_entry("from", &format_ts(self.from))?;
        m.serialize_entry("to", &format_ts(self.to))?;
        m.serialize_entry("batch_watermark", &self.batch_watermark.map(format_ts))?;
        m.serialize_entry("partial", &self.partial)?;
        m.serialize_entry("buckets", &BucketsOut(&self.buckets, &self.metrics))?;
        m.end()
    }
}

impl Serialize for BucketsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for b in self.0 {
            seq.serialize_element(&BucketOut(b, self.1))?;
        }
        seq.end()
    }
}

impl Serialize for BucketOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let BucketOut(b, metrics) = *self;
        let mut m = s.serialize_map(Some(2 + metrics.len()))?;
        m.serialize_entry("start", &format_ts(b.start))?;
        m.serialize_entry("source", &b.source)?;
        for &metric in metrics {
            let v = b.values.map_or(Value::Null, |v| v.value(metric));
            m.serialize_entry(metric.name(), &v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::bucket::{parse_ts, MICROS_PER_DAY};
    use tally_common::metrics::Counters;

    fn ts(s: &str) -> i64 {
        parse_ts(s).unwrap()
    }

    fn orders(n: i64, unique: Option<i64>) -> MetricValues {
        let mut counters = Counters::default();
        counters.values[0] = n;
        MetricValues {
            counters,
            unique_customers: unique,
        }
    }

    #[test]
    fn hours_split_at_the_watermark() {
        let d = ts("2026-11-24T00:00:00Z");
        let r = BucketRange::new(d, d + 4 * MICROS_PER_HOUR, Granularity::Hour).unwrap();
        let w = d + 2 * MICROS_PER_HOUR;
        let plan = Plan::new(r, Some(w), i64::MAX);
        assert_eq!(plan.hourly, Some((d, w)));
        assert_eq!(plan.daily, None);
        assert_eq!(plan.speed_hours, [w, w + MICROS_PER_HOUR]);
        assert!(plan.unions.is_empty());
        let hourly = HashMap::from([(d, orders(3, Some(2)))]);
        let speed = SpeedReading {
            hours: vec![orders(1, Some(1)), orders(0, Some(0))],
            unions: vec![],
            not_covered: vec![],
        };
        let out = plan.assemble(&hourly, &HashMap::new(), Some(&speed));
        let sources: Vec<_> = out.iter().map(|b| b.source).collect();
        assert_eq!(
            sources,
            [Source::Batch, Source::Batch, Source::Speed, Source::Speed]
        );
        assert_eq!(out[0].values, Some(orders(3, Some(2))));
        assert_eq!(out[1].values, Some(orders(0, Some(0))));
        assert_eq!(out[2].values, Some(orders(1, Some(1))));
        let partial = plan.assemble(&hourly, &HashMap::new(), None);
        assert!(partial[0].values.is_some() && partial[2].values.is_none());
        // an hour the speed view cannot vouch for (it lost its data) is unknown, not zero
        let lost = SpeedReading {
            not_covered: vec![1],
            ..speed.clone()
        };
        let out = plan.assemble(&hourly, &HashMap::new(), Some(&lost));
        assert_eq!(out[2].values, Some(orders(1, Some(1))));
        assert_eq!(out[3].values, None);
    }

    #[test]
    fn days_are_batch_mixed_or_speed() {
        let d = ts("2026-11-22T00:00:00Z");
        let r = BucketRange::new(d, d + 3 * MICROS_PER_DAY, Granularity::Day).unwrap();
        let w = d + MICROS_PER_DAY + 20 * MICROS_PER_HOUR;
        let horizon = d + 2 * MICROS_PER_DAY + 2 * MICROS_PER_HOUR;
        let plan = Plan::new(r, Some(w), horizon);
        assert_eq!(plan.daily, Some((d, d + MICROS_PER_DAY)));
        assert_eq!(plan.hourly, Some((d + MICROS_PER_DAY, w)));
        // 4 hours of the mixed day, then hours 0..=2 of the last day (the rest is future)
        assert_eq!(plan.speed_hours.len(), 4 + 3);
        assert_eq!(plan.unions, vec![vec![4, 5, 6]]);
        let daily = HashMap::from([(d, orders(10, Some(7)))]);
        let hourly = HashMap::from([
            (d + MICROS_PER_DAY, orders(2, Some(1))),
            (w - MICROS_PER_HOUR, orders(3, Some(1))),
        ]);
        let speed = SpeedReading {
            hours: (0..7).map(|_| orders(1, Some(1))).collect(),
            unions: vec![2],
            not_covered: vec![],
        };
        let out = plan.assemble(&hourly, &daily, Some(&speed));
        assert_eq!(out[0].source, Source::Batch);
        assert_eq!(out[0].values, Some(orders(10, Some(7))));
        assert_eq!(out[1].source, Source::Mixed);
        assert_eq!(out[1].values, Some(orders(2 + 3 + 4, None)));
        assert_eq!(out[2].source, Source::Speed);
        // a mixed day with one speed hour not vouched for is unknown as a whole
        let lost = SpeedReading {
            not_covered: vec![0],
            ..speed.clone()
        };
        let partly = plan.assemble(&hourly, &daily, Some(&lost));
        assert_eq!(partly[1].values, None);
        assert!(partly[2].values.is_some());
        assert_eq!(out[2].values, Some(orders(3, Some(2))));
    }

    #[test]
    fn no_watermark_means_all_speed_and_day_aligned_watermarks_never_mix() {
        let d = ts("2026-11-22T00:00:00Z");
        let r = BucketRange::new(d, d + 2 * MICROS_PER_DAY, Granularity::Day).unwrap();
        let plan = Plan::new(r, None, i64::MAX);
        assert!(plan.hourly.is_none() && plan.daily.is_none());
        assert_eq!(plan.speed_hours.len(), 48);
        let plan = Plan::new(r, Some(d + MICROS_PER_DAY), i64::MAX);
        assert_eq!(plan.daily, Some((d, d + MICROS_PER_DAY)));
        assert!(plan.hourly.is_none());
        assert_eq!(plan.speed_hours.len(), 24);
        let plan = Plan::new(r, Some(d + 5 * MICROS_PER_DAY), i64::MAX);
        assert!(!plan.needs_speed());
    }

    #[test]
    fn responses_show_requested_metrics_after_start_and_source() {
        let d = ts("2026-11-24T00:00:00Z");
        let resp = MetricsResponse {
            merchant_id: "m_42".into(),
            granularity: Granularity::Hour,
            from: d,
            to: d + MICROS_PER_HOUR,
            batch_watermark: None,
            partial: true,
            metrics: vec![Metric::Orders, Metric::AvgOrderValue],
            buckets: vec![Bucket {
                start: d,
                source: Source::Speed,
                values: None,
            }],
        };
        let json = serde_json::to_string(&resp).unwrap();
        assert_eq!(
            json,
            r#"{"merchant_id":"m_42","granularity":"hour","from":"2026-11-24T00:00:00Z","to":"2026-11-24T01:00:00Z","batch_watermark":null,"partial":true,"buckets":[{"start":"2026-11-24T00:00:00Z","source":"speed","orders":null,"avg_order_value":null}]}"#
        );
    }
}
