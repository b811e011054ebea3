//! A batch run requested by an event rather than the command line: the batch
//! Lambda's body. The hourly EventBridge schedule sends its own event (any
//! payload without both `from` and `to`): the hourly run. Step Functions'
//! reprocessing sends `{"from": RFC 3339, "to": RFC 3339}`: a reprocessing run
//! of those hours. The answer is a JSON summary of the run, and the watermark lag
//! goes to CloudWatch as an embedded-metric-format line on stdout (the lag
//! alarm reads it).
//!
//! The same function's every-minute `{"speed_rebuild": true}` check belongs to
//! the speed layer; the binary dispatches it before calling [`handle`].

use serde_json::{json, Value};
use tally_common::bucket::{format_ts, now_micros, parse_ts, MICROS_PER_SECOND};
use tally_common::config::BatchArgs;
use tally_common::lake::Lake;
use tally_common::Result;

use crate::job::{BatchRun, RunReport};

/// What an event asks the batch layer to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRequest {
    /// The hourly run.
    Hourly,
    /// Reprocess the closed hours of `[from, to)` (epoch µs).
    Reprocess {
        /// First hour, inclusive.
        from: i64,
        /// End, exclusive.
        to: i64,
    },
}

impl RunRequest {
    /// The request an event's payload makes.
    ///
    /// Errors ([`tally_common::Error::Invalid`]): `from` or `to` is not an RFC
    /// 3339 time, or the range is not whole hours ([`BatchRun::check_range`],
    /// as on the command line).
    pub fn from_payload(payload: &Value) -> Result<Self> {
        Ok(match (payload["from"].as_str(), payload["to"].as_str()) {
            (Some(from), Some(to)) => {
                let (from, to) = (parse_ts(from)?, parse_ts(to)?);
                BatchRun::check_range(from, to)?;
                RunRequest::Reprocess { from, to }
            }
            _ => RunRequest::Hourly,
        })
    }

    /// The run this request makes over `lake`, configured by `args` (the
    /// function's environment: grace, lease, memory bound).
    pub fn run(self, lake: &Lake, args: &BatchArgs) -> Result<BatchRun> {
        let run = BatchRun::configured(lake, args)?;
        Ok(match self {
            RunRequest::Hourly => run,
            RunRequest::Reprocess { from, to } => run.reprocess(from, to)?,
        })
    }
}

/// Handle one batch Lambda event: run what it asks, print the watermark lag
/// metric, and answer with the run's summary ([`summary`]).
///
/// The steps of Step Functions' batch state machine come with `"step"`:
/// - `{"step":"plan"[,"from","to"][,"parts":N]}`: plan the hourly run (or the
///   reprocessing of `[from, to)`; N parts per hour and day instead of the
///   number the row counts give) and stage it; answers `{"run_id",
///   "hour_items":{"bucket","key"},"hour_item_count","day_items":{...},
///   "day_item_count","item_count"}` (the two waves' payloads, for two
///   distributed Maps' item readers, the day items after every hour item;
///   `item_count` 0 when there is nothing to compute, and then the watermark
///   lag is printed here and `compact_days` lists the days left uncompacted);
/// - `{"step":"part","run_id","item"}`: compute one item; answers `{"run_id",
///   "item","rows"}`;
/// - `{"step":"publish","run_id"}`: publish; answers the summary with
///   `compact_days` (`YYYY-MM-DD`); fails with [`tally_common::Error::Conflict`]
///   when another run published since the plan;
/// - `{"step":"compact","day":"YYYY-MM-DD"}`: compact that day's raw partitions
///   and its `metrics_hourly` partition.
///
/// Without `"step"` the whole run happens in this invocation, as before.
/// Errors: [`tally_common::Error::Invalid`] for a malformed step payload.
pub async fn handle(lake: &Lake, args: &BatchArgs, payload: &Value) -> Result<Value> {
    let memory = crate::memory::MemoryBound {
        limit: args.memory_limit,
        spill_dir: args.spill_dir.clone(),
    };
    let run_id = || -> Result<String> {
        payload["run_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| tally_common::Error::invalid("the step needs a \"run_id\""))
    };
    match payload["step"].as_str() {
        None => {}
        Some("plan") => {
            let mut run = RunRequest::from_payload(payload)?.run(lake, args)?;
            // `"parts": N` fixes the parts of every hour and day (default: from
            // the Delta log's row counts)
            if let Some(n) = payload["parts"].as_u64() {
                run = run.parts(crate::parts::Parts {
                    count: Some(u32::try_from(n).unwrap_or(crate::parts::MAX_PARTS)),
                    jobs: 1,
                });
            }
            return Ok(match run.plan().await? {
                crate::job::Planned::Nothing(report) => {
                    println!("{}", watermark_lag_metric(&report, now_micros()));
                    // days left uncompacted (a run killed after its publish)
                    // still go to the Compact Map
                    json!({"run_id": null, "item_count": 0, "compact_days": dates(&report.compact_days)})
                }
                crate::job::Planned::Plan(plan) => {
                    let staging = crate::stage::Staging::open(lake, &plan.run_id)?;
                    let (hours, days) = plan.waves();
                    let location = |name: &str| {
                        staging
                            .s3_location(name)
                            .map(|(bucket, key)| json!({"bucket": bucket, "key": key}))
                    };
                    json!({
                        "run_id": plan.run_id,
                        "hour_items": location(crate::job::HOUR_ITEMS_NAME),
                        "hour_item_count": hours.len(),
                        "day_items": location(crate::job::DAY_ITEMS_NAME),
                        "day_item_count": days.len(),
                        "item_count": plan.items.len(),
                    })
                }
            });
        }
        Some("part") => {
            let item = payload["item"].as_u64().ok_or_else(|| {
                tally_common::Error::invalid("the part step needs an \"item\" number")
            })?;
            let id = run_id()?;
            let rows = crate::job::compute_item(lake, &memory, &id, item as usize).await?;
            return Ok(json!({"run_id": id, "item": item, "rows": rows}));
        }
        Some("publish") => {
            let report = crate::job::publish_run(
                lake,
                &memory,
                &run_id()?,
                std::time::Duration::from_secs(args.lease_secs),
                std::time::Duration::from_secs(60),
            )
            .await?;
            println!("{}", watermark_lag_metric(&report, now_micros()));
            let mut out = summary(&report);
            out["compact_days"] = dates(&report.compact_days);
            return Ok(out);
        }
        Some("compact") => {
            let day = payload["day"]
                .as_str()
                .and_then(|d| parse_ts(&format!("{d}T00:00:00Z")).ok())
                .ok_or_else(|| {
                    tally_common::Error::invalid("the compact step needs a \"day\" as YYYY-MM-DD")
                })?;
            // under the lease: a publish meanwhile would make the metric
            // compaction's commit conflict
            let hourly = lake
                .open_or_create(tally_common::lake::Table::MetricsHourly)
                .await?;
            let lease = crate::lease::Lease::acquire(
                &hourly,
                std::time::Duration::from_secs(args.lease_secs),
                std::time::Duration::from_secs(60),
            )
            .await?;
            let result = async {
                let raw = crate::compact::compact_days(lake, &[day].into()).await?;
                let metrics = crate::job::compact_metric_day(lake, day, &memory).await?;
                Ok::<_, tally_common::Error>(json!({"day": payload["day"], "raw_files_removed": raw.files_removed, "metrics_hourly_rewritten": metrics}))
            }
            .await;
            lease.release().await;
            return result;
        }
        Some(other) => {
            return Err(tally_common::Error::invalid(format!(
                "unknown step {other:?}: plan, part, publish or compact"
            )))
        }
    }
    let report = RunRequest::from_payload(payload)?
        .run(lake, args)?
        .execute()
        .await?;
    println!("{}", watermark_lag_metric(&report, now_micros()));
    Ok(summary(&report))
}

/// Days (epoch µs) as a JSON array of `YYYY-MM-DD`.
fn dates(days: &[i64]) -> Value {
    json!(days
        .iter()
        .map(|&d| tally_common::bucket::date_string(d))
        .collect::<Vec<_>>())
}

/// The JSON answer: hours, days and rows written, the raw version processed and
/// the watermark after the run (RFC 3339, null before the first run).
pub fn summary(r: &RunReport) -> Value {
    json!({
        "hours": r.hours, "days": r.days, "hourly_rows": r.hourly_rows,
        "daily_rows": r.daily_rows, "raw_version": r.raw_version,
        "watermark": r.watermark_after.map(format_ts),
    })
}

/// The CloudWatch embedded-metric-format record of `BatchWatermarkLagSeconds`:
/// whole seconds from the watermark after the run to `now` (epoch µs), 0 when
/// there is no watermark yet.
pub fn watermark_lag_metric(r: &RunReport, now: i64) -> Value {
    let lag = r.watermark_after.map(|w| (now - w) / MICROS_PER_SECOND);
    json!({
        "_aws": {"Timestamp": chrono::Utc::now().timestamp_millis(),
                 "CloudWatchMetrics": [{"Namespace": "Tally", "Dimensions": [[]],
                 "Metrics": [{"Name": "BatchWatermarkLagSeconds", "Unit": "Seconds"}]}]},
        "BatchWatermarkLagSeconds": lag.unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_with_a_range_reprocess_and_others_run_hourly() {
        let from = parse_ts("2026-11-24T00:00:00Z").unwrap();
        let to = parse_ts("2026-11-25T00:00:00Z").unwrap();
        assert_eq!(
            RunRequest::from_payload(
                &json!({"from": "2026-11-24T00:00:00Z", "to": "2026-11-25T00:00:00Z"})
            )
            .unwrap(),
            RunRequest::Reprocess { from, to }
        );
        for hourly in [
            json!({"source": "aws.events", "detail-type": "Scheduled Event"}),
            json!({"from": "2026-11-24T00:00:00Z"}),
            json!(null),
        ] {
            assert_eq!(
                RunRequest::from_payload(&hourly).unwrap(),
                RunRequest::Hourly
            );
        }
        assert!(RunRequest::from_payload(&json!({"from": "yesterday", "to": "today"})).is_err());
    }

    #[test]
    fn a_range_that_is_not_whole_hours_is_refused_as_on_the_command_line() {
        for (from, to, why) in [
            (
                "2026-11-24T00:30:00Z",
                "2026-11-25T00:00:00Z",
                "`from` 2026-11-24T00:30:00Z is not aligned",
            ),
            (
                "2026-11-24T00:00:00Z",
                "2026-11-24T05:00:01Z",
                "`to` 2026-11-24T05:00:01Z is not aligned",
            ),
            (
                "2026-11-25T00:00:00Z",
                "2026-11-24T00:00:00Z",
                "`to` must be after `from`",
            ),
            (
                "2026-11-24T00:00:00Z",
                "2026-11-24T00:00:00Z",
                "`to` must be after `from`",
            ),
        ] {
            let e = RunRequest::from_payload(&json!({"from": from, "to": to})).unwrap_err();
            assert!(
                matches!(e, tally_common::Error::Invalid(_)),
                "{from}..{to}: {e}"
            );
            assert!(e.to_string().contains(why), "{from}..{to}: {e}");
        }
    }

    #[test]
    fn the_lag_metric_is_whole_seconds_behind_now() {
        let report = RunReport {
            watermark_after: Some(10 * MICROS_PER_SECOND),
            ..RunReport::default()
        };
        let m = watermark_lag_metric(&report, 100 * MICROS_PER_SECOND + 5);
        assert_eq!(m["BatchWatermarkLagSeconds"], 90);
        assert_eq!(
            m["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "BatchWatermarkLagSeconds"
        );
        let none = watermark_lag_metric(&RunReport::default(), 0);
        assert_eq!(none["BatchWatermarkLagSeconds"], 0);
        assert_eq!(summary(&RunReport::default())["watermark"], Value::Null);
    }
}
