//! `tally serve`: the serving layer with the configured speed view. With no Redis
//! configured the speed view is in process, rebuilt from `raw_events` newer than
//! the watermark at start and following new commits every two seconds.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tally_common::config::{AuthArgs, LakeArgs, SpeedArgs};
use tally_common::lake::Lake;
use tally_common::shutdown::{self, Shutdown};
use tally_serving_layer::{AppState, Auth, ServeOptions};
use tally_speed_layer::feed::RawFeed;
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

/// How often a process holding a Redis speed view checks that it is rebuilt.
pub const REBUILD_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Connect the speed store; rebuild the embedded one and keep following
/// raw_events, or (with `keep_rebuilt`) keep a Redis one rebuilt after a loss.
pub async fn speed_store(
    lake: &Lake,
    args: &SpeedArgs,
    shutdown: Shutdown,
    keep_rebuilt: bool,
) -> anyhow::Result<SpeedStore> {
    let store = SpeedStore::connect(args).await?;
    if let SpeedStore::Embedded(_) = &store {
        let (feed, n) = RawFeed::start(lake, &store).await?;
        tracing::info!(
            events = n,
            "embedded speed view rebuilt from raw_events newer than the watermark"
        );
        tokio::spawn(feed.follow(store.clone(), Duration::from_secs(2), shutdown));
    } else if let (SpeedStore::Redis(redis), true) = (&store, keep_rebuilt) {
        tokio::spawn(tally_speed_layer::rebuild::keep_rebuilt(
            lake.clone(),
            redis.clone(),
            REBUILD_CHECK_EVERY,
            args.rebuild_settle(),
            shutdown,
        ));
    }
    Ok(store)
}

/// The serving state for `lake`.
pub async fn state(lake: Lake, auth: &AuthArgs, speed: SpeedStore) -> anyhow::Result<AppState> {
    let auth = Auth::from_args(auth).await?;
    Ok(AppState::new(lake, auth, speed, ServeOptions::default()).await?)
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
