//! `tally serve`: the serving layer with the configured speed view. With no Redis
//! configured the speed view is in process, rebuilt from `raw_events` newer than
//! the watermark at start and following new commits every two seconds.

use std::net::SocketAddr;

use clap::Args;
use tally_common::config::{AuthArgs, LakeArgs, SpeedArgs};
use tally_common::lake::Lake;
use tally_common::shutdown::{self, Shutdown};
use tally_serving_layer::{AppState, Auth, ServeOptions, StoreChoice};
use tally_speed_layer::SpeedStore;

/// Arguments of `tally serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub lake: LakeArgs,
    #[command(flatten)]
    pub speed: SpeedArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Connect the speed store and keep it whole in the background
/// ([`SpeedStore::keep_whole`]); without `keep_rebuilt` (a Lambda container,
/// frozen between invocations) a Redis store is left to the batch function's
/// every-minute check.
pub async fn speed_store(
    lake: &Lake,
    args: &SpeedArgs,
    shutdown: Shutdown,
    keep_rebuilt: bool,
) -> anyhow::Result<SpeedStore> {
    let store = SpeedStore::connect(args).await?;
    if keep_rebuilt || matches!(store, SpeedStore::Embedded(_)) {
        store
            .keep_whole(lake, args.rebuild_settle(), shutdown)
            .await?;
    }
    Ok(store)
}

/// The serving state for `lake`. With Redis the batch view is read from the
/// serving store on the same server, which the batch layer loads after each
/// publish; with the embedded speed store this process keeps its own serving
/// store, loaded from the lake.
pub async fn state(lake: Lake, auth: &AuthArgs, speed: SpeedStore) -> anyhow::Result<AppState> {
    let auth = Auth::from_args(auth).await?;
    let store = match &speed {
        SpeedStore::Redis(r) => StoreChoice::Shared(std::sync::Arc::new(r.serving_store())),
        SpeedStore::Embedded(_) => StoreChoice::Embedded,
    };
    let options = ServeOptions {
        store,
        ..ServeOptions::default()
    };
    Ok(AppState::new(lake, auth, speed, options).await?)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let lake = args.lake.lake()?;
    let (trigger, signal) = shutdown::channel();
    trigger.fire_on_signals();
    let view = speed_store(&lake, &args.speed, signal.clone(), true).await?;
    let state = state(lake, &args.auth, view).await?;
    tally_serving_layer::serve(args.addr, state, signal).await?;
    Ok(())
}
