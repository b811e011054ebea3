//! The speed store: where the current hours' counters live. [`SpeedStore`] is
//! the one a process uses, Redis ([`crate::RedisStore`]) or the in-process
//! embedded store ([`crate::EmbeddedStore`]), held to one conformance suite. It
//! is the speed layer's write side (applying batches, consumer checkpoints); its
//! read side is [`SpeedView`], the trait the serving layer holds.

use std::sync::Arc;
use std::time::Duration;

use tally_common::config::SpeedArgs;
use tally_common::lake::Lake;
use tally_common::shutdown::Shutdown;
use tally_common::source::Position;
use tally_common::speed_view::{BoxFuture, SpeedReading, SpeedView};
use tally_common::Result;

use crate::aggregate::SpeedBatch;
use crate::feed::RawFeed;
use crate::{EmbeddedStore, RedisStore};

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Merchant-hour updates applied now.
    pub applied: usize,
    /// Updates skipped because the store's mark shows they were applied before.
    pub skipped: usize,
    /// Updates not applied because the store's mark falls inside their records
    /// (index into the batch's updates, and the mark): only the records beyond the
    /// mark may be applied. Happens only when a redelivery is cut differently from
    /// the delivery that half-applied; [`crate::apply_records`] resolves it.
    pub overlaps: Vec<(usize, Position)>,
    /// The store held no view before this batch: it lost its data (or never held
    /// any), so the hours before now are not whole until a rebuild
    /// ([`crate::rebuild`]) fills them from `raw_events`.
    pub view_created: bool,
}

/// Whether a speed store with keys living `ttl_micros` after their first write
/// still holds every event of the hour starting at `hour` at `now` (all epoch
/// µs). An hour's keys are first written no earlier than
/// [`MAX_FUTURE_MICROS`](tally_common::decode::MAX_FUTURE_MICROS) before it starts
/// (no event is accepted sooner); past that plus the TTL they may have expired, e.g. while the batch layer was
/// stalled and the watermark stayed behind.
pub fn hour_alive(hour: i64, now: i64, ttl_micros: i64) -> bool {
    now < hour
        .saturating_sub(tally_common::decode::MAX_FUTURE_MICROS)
        .saturating_add(ttl_micros)
}

/// The state of a Redis speed view (the view key, see [`crate::redis_store`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewState {
    /// Names this life of the view: a new one after every loss.
    pub generation: String,
    /// From when (epoch µs) every event written is in the view.
    pub covered_from: i64,
    /// Whether the hours before `covered_from` were rebuilt from `raw_events`.
    pub rebuilt: bool,
    /// Per source: the position up to which the rebuild, not the consumers, owns
    /// its records ('' when the consumers own them all).
    pub after: Vec<(String, String)>,
}

impl ViewState {
    /// From the view key's fields; None when it has none (no view).
    pub fn from_fields(fields: Vec<(String, String)>) -> Option<Self> {
        let mut v = ViewState::default();
        let mut any = false;
        for (k, val) in fields {
            any = true;
            match k.as_str() {
                "generation" => v.generation = val,
                "covered_from" => v.covered_from = val.parse().unwrap_or(i64::MAX),
                "rebuilt" => v.rebuilt = val == "1",
                _ => {
                    if let Some(src) = k.strip_prefix("after:") {
                        v.after.push((src.to_string(), val));
                    }
                }
            }
        }
        (any && !v.generation.is_empty()).then_some(v)
    }
}

/// How often the embedded store looks for new commits of `raw_events`.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// How often a process holding a Redis speed store checks that it is whole.
pub const REBUILD_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The speed store a process uses: Redis when configured, else the embedded
/// store. Every update carries its source's position; a store applies an update
/// only when it is beyond the mark it holds for that source (Redis: per view;
/// the embedded store: per merchant-hour), and
/// advances the mark in the same atomic step.
#[derive(Clone)]
pub enum SpeedStore {
    /// A Redis server or cluster endpoint.
    Redis(RedisStore),
    /// The in-process store.
    Embedded(Arc<EmbeddedStore>),
}

impl SpeedStore {
    /// Connect as the configuration says; with `redis_auth_secret_arn`, the
    /// secret's value is the URL's password.
    pub async fn connect(args: &SpeedArgs) -> Result<Self> {
        let ttl = args.speed_ttl_hours * 3600;
        Ok(match &args.redis_url {
            Some(url) => {
                let url = match &args.redis_auth_secret_arn {
                    Some(secret) => with_password(url, &auth_token(secret).await?)?,
                    None => url.clone(),
                };
                SpeedStore::Redis(RedisStore::connect(&url, ttl).await?)
            }
            None => SpeedStore::Embedded(Arc::new(EmbeddedStore::new(ttl))),
        })
    }

    /// Keep this store whole from the lake's `raw_events`, in a background task
    /// until `shutdown`: the embedded store is rebuilt now from the events newer
    /// than the watermark and then follows new commits every [`FOLLOW_EVERY`];
    /// a Redis store is checked every [`REBUILD_CHECK_EVERY`] and rebuilt after
    /// it lost its data ([`crate::rebuild::keep_rebuilt`], waiting `settle` for
    /// the archiver). Errors: the embedded store's first rebuild failing.
    pub async fn keep_whole(
        &self,
        lake: &Lake,
        settle: Duration,
        shutdown: Shutdown,
    ) -> Result<tokio::task::JoinHandle<()>> {
        Ok(match self {
            SpeedStore::Embedded(_) => {
                let (feed, n) = RawFeed::start(lake, self).await?;
                tracing::info!(
                    events = n,
                    "embedded speed view rebuilt from raw_events newer than the watermark"
                );
                tokio::spawn(feed.follow(self.clone(), FOLLOW_EVERY, shutdown))
            }
            SpeedStore::Redis(redis) => tokio::spawn(crate::rebuild::keep_rebuilt(
                lake.clone(),
                redis.clone(),
                REBUILD_CHECK_EVERY,
                settle,
                shutdown,
            )),
        })
    }

    /// A short name for logs and `/ready`.
    pub fn kind(&self) -> &'static str {
        match self {
            SpeedStore::Redis(_) => "redis",
            SpeedStore::Embedded(_) => "embedded",
        }
    }

    /// Apply a batch's updates (atomically per merchant-hour, or per part of
    /// many merchant-hours in Redis, [`crate::redis_store`]).
    pub async fn apply(&self, batch: &SpeedBatch) -> Result<ApplyReport> {
        match self {
            SpeedStore::Redis(s) => s.apply(batch).await,
            SpeedStore::Embedded(s) => s.apply(batch).await,
        }
    }

    /// The stored checkpoint of a consumer (e.g. a shard's last sequence number).
    pub async fn checkpoint(&self, key: &str) -> Result<Option<String>> {
        match self {
            SpeedStore::Redis(s) => s.checkpoint(key).await,
            SpeedStore::Embedded(s) => s.checkpoint(key).await,
        }
    }

    /// Store a consumer's checkpoint.
    pub async fn set_checkpoint(&self, key: &str, value: &str) -> Result<()> {
        match self {
            SpeedStore::Redis(s) => s.set_checkpoint(key, value).await,
            SpeedStore::Embedded(s) => s.set_checkpoint(key, value).await,
        }
    }
}

impl SpeedView for SpeedStore {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>> {
        match self {
            SpeedStore::Redis(s) => s.read(merchant, hours, unions),
            SpeedStore::Embedded(s) => s.read(merchant, hours, unions),
        }
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        match self {
            SpeedStore::Redis(s) => s.ping(),
            SpeedStore::Embedded(s) => s.ping(),
        }
    }
}

/// The Redis AUTH token kept in Secrets Manager as the secret's string.
async fn auth_token(secret: &str) -> Result<String> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_secretsmanager::Client::new(&config);
    let out = client
        .get_secret_value()
        .secret_id(secret)
        .send()
        .await
        .map_err(|e| {
            tally_common::Error::aws_from(
                &format!("cannot read the Redis AUTH token from secret {secret}"),
                e,
            )
        })?;
    out.secret_string.ok_or_else(|| {
        tally_common::Error::config(format!(
            "secret {secret} holds no string (the Redis AUTH token must be the secret's string)"
        ))
    })
}

/// `url` with `password` as its password (percent-encoded as RFC 3986 requires).
fn with_password(url: &str, password: &str) -> Result<String> {
    let mut u = url::Url::parse(url)
        .map_err(|e| tally_common::Error::config(format!("bad Redis URL: {e}")))?;
    u.set_password(Some(password))
        .map_err(|_| tally_common::Error::config("the Redis URL cannot carry a password"))?;
    Ok(u.to_string())
}
