//! Configuration: command-line flags with the `TALLY_*` (and AWS SDK) environment
//! fallbacks of the design, in one place. Libraries receive these values; they
//! never read the environment themselves.
//!
//! A default is a named constant, defined once: in the `common` module that owns
//! the concept when there is one (the grace period, [`crate::watermark`]), else
//! here, where the layer that owns it refers to it (the batch lease, the speed
//! view's TTL and rebuild settle time: `common` cannot see the layers).

use clap::Args;

use crate::lake::Lake;
use crate::watermark::DEFAULT_GRACE_MINUTES;
use crate::Result;

/// Default hours speed-view keys live (`--speed-ttl-hours`): longer than the
/// batch layer's lag.
pub const DEFAULT_SPEED_TTL_HOURS: u64 = 48;
/// Default seconds after a Redis speed view lost its data before it is rebuilt
/// (`--rebuild-settle-secs`): longer than the archiver's lag behind the speed
/// consumers.
pub const DEFAULT_REBUILD_SETTLE_SECS: u64 = 30;
/// Default seconds after which a batch lease not renewed is taken over
/// (`--lease-secs`): a killed run blocks the next one at most this long.
pub const DEFAULT_LEASE_SECS: u64 = 120;

/// Default seconds between fetches of the API's JWKS (`--jwks-refresh-secs`):
/// how long a key removed from the set keeps working at most.
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = 600;

/// Default memory bound of the batch layer's queries (`--memory-limit`), in
/// the units [`parse_bytes`] reads.
pub const DEFAULT_BATCH_MEMORY: &str = "2GiB";

/// A size in bytes from `2GiB`, `512MiB`, `1.5GB` or a plain number of bytes
/// (IEC units are powers of 1024, SI units of 1000), as `bytesize` reads it.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (e.g. 2GiB, 512MiB): {e}"))
}

/// Where the lake is.
#[derive(Debug, Clone, Args)]
pub struct LakeArgs {
    /// The lake: a local directory or s3://bucket/prefix.
    #[arg(long, env = "TALLY_LAKE", default_value = "./tally-data/lake")]
    pub lake: String,
    /// S3 endpoint override (an emulator or a VPC endpoint).
    #[arg(long, env = "AWS_ENDPOINT_URL", hide_env_values = true)]
    pub s3_endpoint: Option<String>,
    /// AWS region of the bucket and stream.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
}

impl LakeArgs {
    /// The lake handle these flags describe.
    pub fn lake(&self) -> Result<Lake> {
        Lake::new(&self.lake, self.s3_endpoint.as_deref(), Some(&self.region))
    }
}

/// Where the speed view is.
#[derive(Debug, Clone, Args)]
pub struct SpeedArgs {
    /// Redis URL of the speed view (redis:// or rediss://); unset: the embedded store.
    #[arg(long, env = "TALLY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// A Secrets Manager secret (ARN or name) holding the Redis AUTH token, used as
    /// the URL's password (ElastiCache with AUTH; the token stays out of the
    /// environment and the code).
    #[arg(long, env = "TALLY_REDIS_AUTH_SECRET_ARN")]
    pub redis_auth_secret_arn: Option<String>,
    /// How long speed-view keys live, in hours (longer than the batch layer's lag).
    #[arg(long, env = "TALLY_SPEED_TTL_HOURS", default_value_t = DEFAULT_SPEED_TTL_HOURS)]
    pub speed_ttl_hours: u64,
    /// Seconds after a Redis speed view lost its data before it is rebuilt from
    /// raw_events: longer than the archiver's lag behind the speed consumers.
    #[arg(
        long,
        env = "TALLY_SPEED_REBUILD_SETTLE_SECS",
        default_value_t = DEFAULT_REBUILD_SETTLE_SECS
    )]
    pub rebuild_settle_secs: u64,
}

impl SpeedArgs {
    /// The embedded speed view with the default TTL and settle time (what `tally
    /// demo` runs on).
    pub fn embedded() -> Self {
        SpeedArgs {
            redis_url: None,
            redis_auth_secret_arn: None,
            speed_ttl_hours: DEFAULT_SPEED_TTL_HOURS,
            rebuild_settle_secs: DEFAULT_REBUILD_SETTLE_SECS,
        }
    }

    /// How long after a loss the rebuild waits before reading raw_events.
    pub fn rebuild_settle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.rebuild_settle_secs)
    }
}

/// The batch layer's timing.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Minutes after an hour's end before it is closed and the batch layer takes it.
    #[arg(long, env = "TALLY_GRACE_MINUTES", default_value_t = DEFAULT_GRACE_MINUTES)]
    pub grace_minutes: i64,
    /// Seconds after which the lease of a batch run that stopped renewing it (a
    /// killed run) is taken over.
    #[arg(long, env = "TALLY_BATCH_LEASE_SECS", default_value_t = DEFAULT_LEASE_SECS)]
    pub lease_secs: u64,
    /// Memory the batch layer's queries may hold (e.g. 2GiB); beyond it they
    /// spill to local disk, so a bigger hour is slower, never killed.
    #[arg(long, env = "TALLY_BATCH_MEMORY", default_value = DEFAULT_BATCH_MEMORY, value_parser = parse_bytes)]
    pub memory_limit: u64,
    /// Directory of the spill files [default: the system's temporary directory;
    /// on Lambda /tmp, its ephemeral storage].
    #[arg(long, env = "TALLY_BATCH_SPILL_DIR")]
    pub spill_dir: Option<std::path::PathBuf>,
}

/// Token verification for the API.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret for bearer tokens.
    #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// RS256 keys: a JWKS file path or URL.
    #[arg(long, env = "TALLY_JWKS")]
    pub jwks: Option<String>,
    /// Seconds between fetches of the JWKS (a URL's `Cache-Control: max-age` may
    /// make it sooner), so a key removed from the set stops working.
    #[arg(
        long,
        env = "TALLY_JWKS_REFRESH_SECS",
        default_value_t = DEFAULT_JWKS_REFRESH_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub jwks_refresh_secs: u64,
}

/// The Kinesis stream.
#[derive(Debug, Clone, Args)]
pub struct KinesisArgs {
    /// Kinesis stream name.
    #[arg(long = "stream", env = "TALLY_KINESIS_STREAM")]
    pub stream: Option<String>,
}
