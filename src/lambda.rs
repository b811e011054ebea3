//! The Lambda entry point: one `bootstrap` for every function, the handler picked
//! by name. Each handler converts its event and calls the same library code as
//! the command line.

use std::sync::Arc;

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use lambda_runtime::{service_fn, LambdaEvent};
use tally_common::config::{LakeArgs, SpeedArgs};
use tokio::sync::Mutex;

pub async fn run(handler: &str, lake: LakeArgs, speed: SpeedArgs) -> anyhow::Result<()> {
    match handler {
        "speed" => {
            // created once per container, reused by every invocation
            let store = Arc::new(tally_speed_layer::SpeedView::connect(&speed).await?);
            lambda_runtime::run(service_fn(move |event: LambdaEvent<KinesisEvent>| {
                let store = Arc::clone(&store);
                async move {
                    Ok::<_, lambda_runtime::Error>(
                        tally_speed_layer::lambda::handle(store.as_ref(), event.payload).await,
                    )
                }
            }))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        }
        "archiver" => {
            let archiver = Arc::new(Mutex::new(
                tally_batch_layer::Archiver::open(&lake.lake()?).await?,
            ));
            lambda_runtime::run(service_fn(move |event: LambdaEvent<KinesisEvent>| {
                let archiver = Arc::clone(&archiver);
                async move {
                    let mut a = archiver.lock().await;
                    Ok::<KinesisEventResponse, lambda_runtime::Error>(
                        tally_batch_layer::lambda::handle_kinesis(&mut a, event.payload).await,
                    )
                }
            }))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        }
        other => anyhow::bail!(
            "unknown Lambda handler {other:?}: set the function's handler to speed, archiver, batch or api"
        ),
    }
}
