//! The Lambda entry point: one `bootstrap` for every function, the handler picked
//! by name. Each handler lives in its layer and calls the same library code as
//! the command line; here is only the wiring, and the batch function's dispatch
//! between its speed-view check and the batch layer's run
//! ([`tally_batch_layer::run_request`]).

use std::sync::Arc;

use aws_lambda_events::event::kinesis::KinesisEvent;
use lambda_runtime::{service_fn, LambdaEvent};
use tally_common::config::{AuthArgs, BatchArgs, LakeArgs, SpeedArgs};
use tally_stream::RecordSink;

pub async fn run(
    handler: &str,
    lake: LakeArgs,
    speed: SpeedArgs,
    auth: AuthArgs,
    batch: BatchArgs,
) -> anyhow::Result<()> {
    match handler {
        "speed" => {
            // created once per container, reused by every invocation
            let store = tally_speed_layer::SpeedStore::connect(&speed).await?;
            on_kinesis(tally_speed_layer::SpeedSink(store)).await
        }
        "archiver" => {
            let archiver = tally_batch_layer::Archiver::open(&lake.lake()?).await?;
            on_kinesis(tally_batch_layer::ArchiveSink::new(archiver)).await
        }
        "batch" => {
            let lake = lake.lake()?;
            // the Redis speed view, connected on the first every-minute check only:
            // the hourly run never depends on Redis
            let redis: Arc<tokio::sync::OnceCell<tally_speed_layer::SpeedStore>> = Arc::default();
            lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
                let lake = lake.clone();
                let redis = Arc::clone(&redis);
                let speed = speed.clone();
                let batch = batch.clone();
                async move {
                    let p = &event.payload;
                    // EventBridge sends {"speed_rebuild": true} every minute: the speed
                    // layer's check; anything else is the batch layer's run
                    if tally_speed_layer::rebuild::is_scheduled_check(p) {
                        return speed_rebuild(&lake, &redis, &speed).await.map_err(|e| {
                            lambda_runtime::Diagnostic {
                                error_type: "SpeedRebuildError".into(),
                                error_message: e.to_string(),
                            }
                        });
                    }
                    // {"step":"load"}: the serving store, after a publish
                    if p["step"].as_str() == Some("load") {
                        return load_step(&lake, &redis, &speed, p).await.map_err(|e| {
                            lambda_runtime::Diagnostic {
                                error_type: "LoadError".into(),
                                error_message: e.to_string(),
                            }
                        });
                    }
                    // a publish that lost to another run's is `Conflict` to Step
                    // Functions, which plans the run again
                    tally_batch_layer::run_request::handle(&lake, &batch, p)
                        .await
                        .map_err(|e| match e {
                            tally_common::Error::Conflict(m) => lambda_runtime::Diagnostic {
                                error_type: "Conflict".into(),
                                error_message: m,
                            },
                            other => lambda_runtime::Diagnostic {
                                error_type: "BatchError".into(),
                                error_message: other.to_string(),
                            },
                        })
                }
            }))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        }
        "api" => {
            let lake = lake.lake()?;
            let (_trigger, signal) = tally_common::shutdown::channel();
            // no background rebuild in a Lambda container (frozen between
            // invocations): the batch function's every-minute check does it
            let view = crate::serve::speed_store(&lake, &speed, signal, false).await?;
            let state = crate::serve::state(lake, &auth, view).await?;
            tally_serving_layer::run_lambda(state).await?;
            Ok(())
        }
        other => anyhow::bail!(
            "unknown Lambda handler {other:?}: set the function's handler to speed, archiver, batch or api"
        ),
    }
}

/// The batch state machine's Load step: bring the serving store in Redis up to
/// the metric tables' newest versions, at most `"max_dates"` dates (default 40)
/// and starting no date after `"time_budget_secs"` (default 600) per invocation; answers the load's report, whose `complete` tells the state
/// machine whether to load again.
async fn load_step(
    lake: &tally_common::lake::Lake,
    redis: &tokio::sync::OnceCell<tally_speed_layer::SpeedStore>,
    speed: &SpeedArgs,
    payload: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let store = redis
        .get_or_try_init(|| tally_speed_layer::SpeedStore::connect(speed))
        .await?;
    let tally_speed_layer::SpeedStore::Redis(r) = store else {
        anyhow::bail!("the load step needs TALLY_REDIS_URL: the serving store is in Redis");
    };
    let options = tally_serving_layer::LoadOptions {
        // the same window as `tally batch load` (TALLY_SERVING_WINDOW_DAYS), unless the payload says
        window_days: payload["window_days"]
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .or_else(|| {
                std::env::var("TALLY_SERVING_WINDOW_DAYS")
                    .ok()
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(35),
        max_dates: Some(
            payload["max_dates"]
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .unwrap_or(40),
        ),
        // well inside the function's 900 s: a date takes about a minute at
        // 1 M merchants; the state machine loads again while not complete
        time_budget: Some(std::time::Duration::from_secs(
            payload["time_budget_secs"].as_u64().unwrap_or(600),
        )),
        ..Default::default()
    };
    let report = tally_serving_layer::load(lake, &r.serving_store(), &options).await?;
    Ok(serde_json::to_value(report)?)
}

/// Run a function on the Kinesis stream: every event into `sink` (made once
/// per container, reused by every invocation), answered with a partial batch
/// response.
async fn on_kinesis<K: RecordSink + 'static>(sink: K) -> anyhow::Result<()> {
    let sink = Arc::new(sink);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<KinesisEvent>| {
        let sink = Arc::clone(&sink);
        async move {
            Ok::<_, lambda_runtime::Error>(
                tally_stream::kinesis_event::handle(sink.as_ref(), &event.payload).await,
            )
        }
    }))
    .await
    .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
}

/// The batch function's every-minute check ([`tally_speed_layer::rebuild::scheduled_check`]);
/// `redis` is connected on the first check and kept.
async fn speed_rebuild(
    lake: &tally_common::lake::Lake,
    redis: &tokio::sync::OnceCell<tally_speed_layer::SpeedStore>,
    speed: &SpeedArgs,
) -> Result<serde_json::Value, lambda_runtime::Error> {
    let view = redis
        .get_or_try_init(|| tally_speed_layer::SpeedStore::connect(speed))
        .await?;
    let tally_speed_layer::SpeedStore::Redis(store) = view else {
        return Ok(serde_json::json!({"speed_rebuild": "no Redis configured"}));
    };
    Ok(tally_speed_layer::rebuild::scheduled_check(lake, store, speed.rebuild_settle()).await?)
}
