//! tally's serving layer: the merged query API. Buckets before the batch
//! watermark come from the Delta tables (`metrics_hourly`, `metrics_daily`),
//! later ones from the speed view; the same [`router`] is served by
//! `tally serve` ([`serve`]) and by Lambda behind API Gateway ([`run_lambda`]).
//!
//! The speed view is reached through the [`SpeedView`] trait of `tally-common`,
//! so this crate depends on `tally-common` only; the speed layer's stores
//! implement it and the binary hands one to [`AppState::new`].

pub mod auth;
pub mod batch_view;
pub mod error;
mod http;
pub mod load;
mod lookup;
pub mod merge;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tally_common::lake::Lake;
use tally_common::merchants::MerchantZones;
use tally_common::serving_store::{EmbeddedServingStore, ServingStore};
use tally_common::shutdown::Shutdown;
use tally_common::speed_view::SpeedView;
use tokio::net::TcpListener;

pub use auth::{Auth, Claims};
pub use batch_view::{BatchSnapshot, BatchView};
pub use error::{ApiError, Result, ServingError};
pub use load::{load, LoadOptions, LoadReport};
pub use merge::{Bucket, MetricsResponse, Plan, Source};

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// After shutdown is asked for, how long `/ready` answers 503 before the
    /// listener closes, so a load balancer stops sending traffic first.
    pub drain_delay: Duration,
    /// How long a speed-view read may take before the answer is served `partial`.
    pub speed_timeout: Duration,
    /// How often the serving store's state (or, without one, the batch tables)
    /// is checked for a new version.
    pub refresh_every: Duration,
    /// Where requests read the batch view.
    pub store: StoreChoice,
    /// How long a serving store's state is read after the store last confirmed
    /// it (a store that stops answering leaves requests to the lake after
    /// this). Must stay below the loaders' [`LoadOptions::flip_guard`] (10 s),
    /// the time a load waits after a publish before overwriting slots.
    pub state_max_age: Duration,
    /// UTC dates the embedded serving store keeps ([`LoadOptions::window_days`]).
    pub window_days: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            drain_delay: Duration::from_secs(2),
            speed_timeout: Duration::from_secs(1),
            refresh_every: Duration::from_secs(2),
            store: StoreChoice::Embedded,
            state_max_age: Duration::from_secs(5),
            window_days: LoadOptions::default().window_days,
        }
    }
}

/// Where the serving layer reads the batch view from.
#[derive(Clone, Default)]
pub enum StoreChoice {
    /// A serving store in this process, loaded from the lake by this process
    /// whenever the tables change: what `tally serve` uses without Redis.
    #[default]
    Embedded,
    /// A shared store (Redis) that the batch layer loads after each publish.
    Shared(Arc<dyn ServingStore>),
    /// The lake alone, read per request (for comparisons).
    LakeOnly,
}

impl std::fmt::Debug for StoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreChoice::Embedded => f.write_str("Embedded"),
            StoreChoice::Shared(s) => write!(f, "Shared({})", s.describe()),
            StoreChoice::LakeOnly => f.write_str("LakeOnly"),
        }
    }
}

struct Inner {
    batch: Arc<BatchView>,
    /// The embedded store this process loads itself, when it uses one.
    embedded: Option<(Lake, EmbeddedServingStore, tokio::sync::Mutex<()>)>,
    speed: Arc<dyn SpeedView>,
    /// Merchants' time zones (the `merchants` table), refreshed with the view.
    zones: MerchantZones,
    auth: Auth,
    options: ServeOptions,
    draining: AtomicBool,
}

/// Everything a request needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// The state for `lake` and `speed`: loads the batch view once and keeps it
    /// fresh in the background (a lake not readable yet makes `/ready` 503, not an error).
    pub async fn new(
        lake: Lake,
        auth: Auth,
        speed: impl SpeedView + 'static,
        options: ServeOptions,
    ) -> Result<Self> {
        let (store, embedded): (Option<Arc<dyn ServingStore>>, _) = match &options.store {
            StoreChoice::Embedded => {
                let e = EmbeddedServingStore::new();
                (
                    Some(Arc::new(e.clone())),
                    Some((lake.clone(), e, tokio::sync::Mutex::new(()))),
                )
            }
            StoreChoice::Shared(s) => (Some(Arc::clone(s)), None),
            StoreChoice::LakeOnly => (None, None),
        };
        // with a shared store (Redis) zones come from it; otherwise from the table in memory
        let store_for_zones = match &options.store {
            StoreChoice::Shared(s) => Some(Arc::clone(s)),
            _ => None,
        };
        let batch = BatchView::open_with_store(lake, store, options.state_max_age)
            .await
            .map_err(ServingError::BatchView)?;
        let state = AppState {
            inner: Arc::new(Inner {
                batch,
                embedded,
                speed: Arc::new(speed),
                zones: match &store_for_zones {
                    Some(store) => MerchantZones::with_store(Arc::clone(store)),
                    None => MerchantZones::default(),
                },
                auth,
                options,
                draining: AtomicBool::new(false),
            }),
        };
        let weak = Arc::downgrade(&state.inner);
        let every = state.inner.options.refresh_every;
        if !state.inner.zones.has_store() {
            if let Err(e) = state.refresh_zones().await {
                tracing::warn!(error = %e, "reading merchants' settings failed; retrying in the background");
            }
            let weak = Arc::downgrade(&state.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = (AppState { inner }).refresh_zones().await {
                        tracing::warn!(error = %e, "refreshing merchants' settings failed");
                    }
                }
            });
        }
        if state.inner.embedded.is_some() {
            // one background task loads the embedded store and then refreshes
            // the view, from now on: requests read the lake until the first load
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = (AppState { inner }).refresh_batch().await {
                        tracing::warn!(error = %e, "loading the embedded serving store or refreshing the view failed");
                    }
                }
            });
        } else {
            state.inner.batch.spawn_refresher(every);
        }
        Ok(state)
    }

    /// Bring this process's embedded serving store up to the lake's newest
    /// table versions (nothing to do with a shared store or none).
    async fn load_embedded(&self) -> tally_common::Result<LoadReport> {
        let Some((lake, store, lock)) = &self.inner.embedded else {
            return Ok(LoadReport::default());
        };
        let _one = lock.lock().await;
        // the cheap check first: the tables' newest versions against the store's
        if let (Ok(Some((h, d))), Ok(Some(state))) = (
            self.inner.batch.latest_versions().await,
            store.state().await,
        ) {
            if state.hourly_version == Some(h) && (d.is_none() || state.daily_version == d) {
                return Ok(LoadReport::default());
            }
        }
        let options = LoadOptions {
            // readers here see a new state at once: only requests in flight
            // may still read the slots a next load overwrites
            flip_guard: Duration::from_millis(300),
            window_days: self.inner.options.window_days,
            ..LoadOptions::default()
        };
        load(lake, store, &options).await
    }

    /// The batch view.
    /// Read merchants' settings again when the table changed.
    pub async fn refresh_zones(&self) -> tally_common::Result<bool> {
        self.inner.zones.refresh(self.inner.batch.lake()).await
    }

    pub fn batch(&self) -> &Arc<BatchView> {
        &self.inner.batch
    }

    /// Check for a new version of the batch view now (the refresher does it
    /// every [`ServeOptions::refresh_every`]), first loading the embedded
    /// serving store when this process has one; returns whether the view changed.
    pub async fn refresh_batch(&self) -> tally_common::Result<bool> {
        let loaded = self.load_embedded().await?;
        let refreshed = self.inner.batch.refresh().await;
        if refreshed.is_err() && loaded.published {
            // the next load may overwrite what the old state reads
            self.inner.batch.expire_served();
        }
        refreshed
    }

    /// The options in force.
    pub fn options(&self) -> &ServeOptions {
        &self.inner.options
    }

    /// Turn `/ready` false: the first step of a graceful shutdown.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the instance is shutting down.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
}

/// The API: what `tally serve`, the Lambda handler and the tests all run.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(openapi::METRICS_PATH, get(http::metrics))
        .route(
            openapi::SETTINGS_PATH,
            axum::routing::put(http::put_settings),
        )
        .route("/", get(dashboard))
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .route("/openapi.json", get(http::openapi_json))
        .fallback(http::not_found)
        .layer(axum::middleware::from_fn(http::access_log))
        .with_state(state)
}

/// The dashboard: one self-contained page (no external scripts) calling this API
/// with the token the user pastes.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../assets/dashboard.html"))
}

/// Serve the API on `addr` until `shutdown` fires, then drain gracefully.
pub async fn serve(addr: SocketAddr, state: AppState, shutdown: Shutdown) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServingError::Io {
            addr: addr.to_string(),
            source,
        })?;
    serve_listener(listener, state, shutdown).await
}

/// Serve the API on a bound listener until `shutdown` fires. Shutdown goes:
/// `/ready` turns 503, [`ServeOptions::drain_delay`] passes (the load balancer
/// notices and stops sending), the listener closes, in-flight requests finish.
pub async fn serve_listener(
    listener: TcpListener,
    state: AppState,
    mut shutdown: Shutdown,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    tracing::info!(%addr, "serving the API");
    let draining = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.wait().await;
            draining.start_draining();
            let delay = draining.options().drain_delay;
            tracing::info!(
                ?delay,
                "shutting down: /ready is 503 now; closing the listener after the drain delay"
            );
            tokio::time::sleep(delay).await;
            tracing::info!("listener closed; finishing in-flight requests");
        })
        .await
        .map_err(|source| ServingError::Io { addr, source })
}

/// Run the API as a Lambda function behind API Gateway (or an ALB).
pub async fn run_lambda(state: AppState) -> Result<()> {
    lambda_http::run(router(state))
        .await
        .map_err(|e| ServingError::Lambda(e.to_string()))
}
