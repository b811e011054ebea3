//! Bearer-token checks: HS256 with a shared secret or RS256 with keys from a JWKS
//! (a file or an http(s) URL), `exp` required, `nbf` honoured, and the claims
//! matched against the merchant of the path. Behind API Gateway the JWT
//! authorizer has validated the token already; the claims are checked again here
//! so the server is safe alone.
//!
//! **Times.** `exp` and `nbf` are RFC 7519 NumericDates: JSON numbers of seconds,
//! fractions allowed. They are checked here, exactly and with 30 s of leeway,
//! rather than by `jsonwebtoken`, which rounds fractions, skips `nbf` unless
//! asked, and ignores an `nbf` it cannot read. A claim that is present but not a
//! number makes the token invalid. `iat` is not read.
//!
//! **Key rotation.** A JWKS is fetched again every `TALLY_JWKS_REFRESH_SECS`
//! (sooner when a URL answers with a shorter `Cache-Control: max-age`), on the
//! first RS256 request after that time, so a key removed from the set stops
//! working within one period. A token naming an unknown `kid` (a key added by a
//! rotation) fetches the set at once, at most once a minute so forged `kid`s
//! cannot hammer the key server. A failed refresh keeps the last good set, logs a
//! warning and is retried within 30 s; if the set cannot be refreshed for
//! [`JWKS_STALE_PERIODS`] periods (an hour by default) RS256 requests get 503
//! until it can, because past that point the server can no longer say that a key
//! was not revoked (and whoever can block the key server must not be able to keep
//! a revoked key alive). HS256 tokens are unaffected.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};
use tally_common::config::AuthArgs;

use crate::error::{ApiError, ServingError};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: f64 = 30.0;
/// A JWKS is fetched again for an unknown `kid` (a key rotation) at most this
/// often, so forged `kid`s cannot hammer the key server.
const JWKS_REFETCH_AFTER: Duration = Duration::from_secs(60);
/// After a failed refresh, the next one is tried this soon (or after one refresh
/// period, if that is shorter).
const JWKS_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The shortest refresh period a server's `Cache-Control: max-age` can set.
const JWKS_MIN_MAX_AGE: Duration = Duration::from_secs(1);
/// How many refresh periods the last good set is used for while it cannot be
/// refreshed; after that RS256 requests are 503 until a refresh succeeds.
pub const JWKS_STALE_PERIODS: u32 = 6;

/// The claims the API looks at, verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The merchant whose metrics the token may read.
    pub merchant_id: Option<String>,
    /// `admin` may read every merchant.
    pub role: Option<String>,
    /// Expiry, seconds since the epoch (required; may have a fraction).
    pub exp: f64,
    /// Not before, seconds since the epoch (may have a fraction).
    pub nbf: Option<f64>,
}

impl Claims {
    /// An HS256 token (RFC 7519) signed with `secret` that lets `merchant`
    /// read its own metrics, or with `None` any merchant's (`role: admin`),
    /// expiring `ttl` from now: what `tally demo` prints for its user.
    /// Errors: [`ServingError::Auth`] when signing fails.
    pub fn hs256_token(
        secret: &str,
        merchant: Option<&str>,
        ttl: Duration,
    ) -> Result<String, ServingError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let exp = (now + ttl).as_secs();
        let claims = match merchant {
            Some(m) => serde_json::json!({"sub": m, "merchant_id": m, "exp": exp}),
            None => serde_json::json!({"sub": "admin", "role": "admin", "exp": exp}),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .map_err(|e| ServingError::Auth(format!("cannot sign a token: {e}")))
    }

    /// Whether the token may read `merchant`'s metrics.
    pub fn may_read(&self, merchant: &str) -> bool {
        self.role.as_deref() == Some("admin") || self.merchant_id.as_deref() == Some(merchant)
    }

    /// Whether the token is usable at `now` (seconds since the epoch): before
    /// `exp` and not before `nbf`, each with [`LEEWAY_SECS`] of clock skew.
    pub fn check_times(&self, now: f64) -> Result<(), ApiError> {
        if now >= self.exp + LEEWAY_SECS {
            return Err(ApiError::Unauthorized(
                "the bearer token has expired".into(),
            ));
        }
        if let Some(nbf) = self.nbf {
            if now + LEEWAY_SECS < nbf {
                return Err(ApiError::Unauthorized(
                    "the bearer token is not valid yet (its `nbf` is in the future)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The claims as the token carries them.
#[derive(Deserialize)]
struct TokenClaims {
    #[serde(default)]
    merchant_id: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<f64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<f64>,
}

/// An RFC 7519 NumericDate: any JSON number (integer or not); null is absent.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a NumericDate (a number of seconds since the epoch)")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.is_finite() {
                Ok(Some(v))
            } else {
                Err(E::custom("a NumericDate must be finite"))
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Visitor)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Debug, Clone)]
enum JwksSource {
    File(PathBuf),
    Url(String),
    Inline,
}

impl JwksSource {
    fn refreshes(&self) -> bool {
        !matches!(self, JwksSource::Inline)
    }
}

/// The key set in hand and when to fetch it again.
#[derive(Clone)]
struct KeyState {
    keys: Arc<JwkSet>,
    /// When the set in hand was fetched (the last successful fetch).
    fetched_at: Instant,
    /// When the last fetch was tried, successful or not.
    attempted_at: Instant,
    /// When to fetch again (None: never, an inline set).
    refresh_at: Option<Instant>,
}

struct Jwks {
    source: JwksSource,
    client: reqwest::Client,
    refresh_every: Duration,
    state: RwLock<KeyState>,
    /// One refresh at a time; requests that waited for it use its result.
    refreshing: tokio::sync::Mutex<()>,
}

/// How bearer tokens are verified. Cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    secret: Option<Arc<DecodingKey>>,
    jwks: Option<Arc<Jwks>>,
}

impl std::fmt::Debug for Auth {
    // never the secret or the keys: only what is configured
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("hs256", &self.secret.is_some())
            .field("jwks", &self.jwks.as_ref().map(|j| &j.source))
            .finish()
    }
}

impl Auth {
    /// HS256 tokens signed with `secret`.
    pub fn hs256(secret: &str) -> Self {
        Auth {
            secret: Some(Arc::new(DecodingKey::from_secret(secret.as_bytes()))),
            jwks: None,
        }
    }

    /// RS256 tokens verified with the keys of `set` (never fetched again).
    pub fn with_jwk_set(mut self, set: JwkSet) -> Self {
        let now = Instant::now();
        self.jwks = Some(Arc::new(Jwks {
            source: JwksSource::Inline,
            client: reqwest::Client::new(),
            refresh_every: Duration::MAX,
            state: RwLock::new(KeyState {
                keys: Arc::new(set),
                fetched_at: now,
                attempted_at: now,
                refresh_at: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }));
        self
    }

    /// Verification as the flags say: an HS256 secret, a JWKS file path or URL
    /// (fetched now, so a bad location stops the server from starting, and again
    /// every `jwks_refresh_secs`), or both. With neither, every request is refused
    /// with 401 (never open by accident).
    pub async fn from_args(args: &AuthArgs) -> Result<Self, ServingError> {
        let mut auth = Auth::default();
        if let Some(secret) = &args.jwt_secret {
            if secret.is_empty() {
                return Err(ServingError::Auth(
                    "TALLY_JWT_SECRET is set but empty: set a secret or unset it".into(),
                ));
            }
            auth = Auth::hs256(secret);
        }
        if let Some(location) = &args.jwks {
            let source = if location.starts_with("http://") || location.starts_with("https://") {
                JwksSource::Url(location.clone())
            } else {
                JwksSource::File(PathBuf::from(location))
            };
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| ServingError::Auth(format!("building the JWKS client: {e}")))?;
            let refresh_every = Duration::from_secs(args.jwks_refresh_secs.max(1));
            let (keys, max_age) = fetch(&source, &client).await?;
            let now = Instant::now();
            auth.jwks = Some(Arc::new(Jwks {
                source,
                client,
                refresh_every,
                state: RwLock::new(KeyState {
                    keys: Arc::new(keys),
                    fetched_at: now,
                    attempted_at: now,
                    refresh_at: now.checked_add(period(refresh_every, max_age)),
                }),
                refreshing: tokio::sync::Mutex::new(()),
            }));
        }
        if !auth.is_configured() {
            tracing::warn!(
                "no TALLY_JWT_SECRET and no TALLY_JWKS: every metrics request will be refused"
            );
        }
        Ok(auth)
    }

    /// Whether any verification key is configured.
    pub fn is_configured(&self) -> bool {
        self.secret.is_some() || self.jwks.is_some()
    }

    /// Check an `Authorization` header value and that its token may read `merchant`:
    /// 401 for a missing or invalid token, 403 for another merchant's, 503 when
    /// the signing keys could not be refreshed for too long.
    pub async fn authorize(
        &self,
        header: Option<&str>,
        merchant: &str,
    ) -> Result<Claims, ApiError> {
        let token = bearer(header)?;
        let claims = self.verify(token).await?;
        if claims.may_read(merchant) {
            Ok(claims)
        } else {
            Err(ApiError::Forbidden(format!(
                "this token may not read merchant {merchant:?}"
            )))
        }
    }

    /// Verify a token's signature, `exp` and `nbf`, and return its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let header = decode_header(token)
            .map_err(|_| ApiError::Unauthorized("the bearer token is not a valid JWT".into()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.clone().ok_or_else(|| {
                ApiError::Unauthorized("HS256 tokens are not accepted by this server".into())
            })?,
            Algorithm::RS256 => {
                let jwks = self.jwks.as_ref().ok_or_else(|| {
                    ApiError::Unauthorized("RS256 tokens are not accepted by this server".into())
                })?;
                Arc::new(jwks.key(header.kid.as_deref()).await?)
            }
            other => {
                return Err(ApiError::Unauthorized(format!(
                    "token algorithm {other:?} is not accepted: use HS256 or RS256"
                )))
            }
        };
        let mut validation = Validation::new(header.alg);
        // the times are checked below, exactly (see the module header)
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // the audience is API Gateway's authorizer's business; here only who may read what
        validation.validate_aud = false;
        let claims = decode::<TokenClaims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                ApiError::Unauthorized(
                    match e.kind() {
                        ErrorKind::InvalidSignature => "the bearer token's signature is not valid",
                        ErrorKind::Json(_) => {
                            "the bearer token's claims are malformed (`exp` and `nbf` must be numbers)"
                        }
                        _ => "the bearer token is not valid",
                    }
                    .into(),
                )
            })?
            .claims;
        let claims = Claims {
            merchant_id: claims.merchant_id,
            role: claims.role,
            exp: claims.exp.ok_or_else(|| {
                ApiError::Unauthorized("the bearer token has no `exp` claim".into())
            })?,
            nbf: claims.nbf,
        };
        claims.check_times(now_secs())?;
        Ok(claims)
    }
}

fn bearer(header: Option<&str>) -> Result<&str, ApiError> {
    let value = header.ok_or_else(|| {
        ApiError::Unauthorized("missing `Authorization: Bearer <token>` header".into())
    })?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <token>`".into(),
        ));
    }
    Ok(token.trim())
}

/// The refresh period: the configured one, or the server's `max-age` when shorter.
fn period(refresh_every: Duration, max_age: Option<Duration>) -> Duration {
    match max_age {
        Some(age) => age.max(JWKS_MIN_MAX_AGE).min(refresh_every),
        None => refresh_every,
    }
}

/// Why a refresh is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// The refresh period is over.
    Scheduled,
    /// A token names a `kid` the set does not have.
    UnknownKid,
}

impl Jwks {
    fn snapshot(&self) -> KeyState {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The decoding key for `kid` (or the only key when the token names none),
    /// from a set no older than its refresh period.
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, ApiError> {
        let mut state = self.snapshot();
        if state.refresh_at.is_some_and(|at| Instant::now() >= at) {
            state = self.refresh(Refresh::Scheduled).await;
        }
        self.check_not_stale(&state)?;
        if let Some(key) = lookup(&state.keys, kid) {
            return key;
        }
        if self.source.refreshes() && state.attempted_at.elapsed() >= JWKS_REFETCH_AFTER {
            state = self.refresh(Refresh::UnknownKid).await;
            if let Some(key) = lookup(&state.keys, kid) {
                return key;
            }
        }
        Err(ApiError::Unauthorized(
            "the bearer token's signing key is not known".into(),
        ))
    }

    /// Past [`JWKS_STALE_PERIODS`] refresh periods without a successful fetch,
    /// the set in hand can no longer be trusted to hold no revoked key.
    fn check_not_stale(&self, state: &KeyState) -> Result<(), ApiError> {
        let limit = self.refresh_every.saturating_mul(JWKS_STALE_PERIODS);
        if self.source.refreshes() && state.fetched_at.elapsed() > limit {
            return Err(ApiError::Unavailable(format!(
                "the token signing keys (JWKS) could not be refreshed for {} s; retry shortly",
                state.fetched_at.elapsed().as_secs()
            )));
        }
        Ok(())
    }

    /// Fetch the set again unless another request did while this one waited.
    /// A failure keeps the set in hand and schedules a retry.
    async fn refresh(&self, why: Refresh) -> KeyState {
        let _one_at_a_time = self.refreshing.lock().await;
        let current = self.snapshot();
        let due = match why {
            Refresh::Scheduled => current.refresh_at.is_some_and(|at| Instant::now() >= at),
            Refresh::UnknownKid => current.attempted_at.elapsed() >= JWKS_REFETCH_AFTER,
        };
        if !due || !self.source.refreshes() {
            return current;
        }
        let result = fetch(&self.source, &self.client).await;
        let now = Instant::now();
        let next = match result {
            Ok((keys, max_age)) => {
                tracing::debug!(keys = keys.keys.len(), ?why, "JWKS refreshed");
                KeyState {
                    keys: Arc::new(keys),
                    fetched_at: now,
                    attempted_at: now,
                    refresh_at: now.checked_add(period(self.refresh_every, max_age)),
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    last_good_age_secs = current.fetched_at.elapsed().as_secs(),
                    "refreshing the JWKS failed; keeping the last good key set"
                );
                KeyState {
                    attempted_at: now,
                    refresh_at: now.checked_add(JWKS_RETRY_AFTER.min(self.refresh_every)),
                    ..current
                }
            }
        };
        match self.state.write() {
            Ok(mut s) => *s = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        next
    }
}

fn lookup(keys: &JwkSet, kid: Option<&str>) -> Option<Result<DecodingKey, ApiError>> {
    let jwk = match kid {
        Some(kid) => keys.find(kid)?,
        None if keys.keys.len() == 1 => &keys.keys[0],
        None => return None,
    };
    Some(
        DecodingKey::from_jwk(jwk).map_err(|_| {
            ApiError::Unauthorized("the bearer token's signing key is not usable".into())
        }),
    )
}

/// The key set at `source`, and the `max-age` its server gave it.
async fn fetch(
    source: &JwksSource,
    client: &reqwest::Client,
) -> Result<(JwkSet, Option<Duration>), ServingError> {
    let (text, max_age) = match source {
        JwksSource::File(path) => (
            tokio::fs::read_to_string(path).await.map_err(|e| {
                ServingError::Auth(format!("reading the JWKS file {}: {e}", path.display()))
            })?,
            None,
        ),
        JwksSource::Url(url) => {
            let response = client
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| ServingError::Auth(format!("fetching the JWKS from {url}: {e}")))?;
            let max_age = response
                .headers()
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(max_age);
            let text = response
                .text()
                .await
                .map_err(|e| ServingError::Auth(format!("reading the JWKS from {url}: {e}")))?;
            (text, max_age)
        }
        JwksSource::Inline => {
            return Err(ServingError::Auth(
                "an inline JWKS cannot be refetched".into(),
            ))
        }
    };
    let set = serde_json::from_str(&text)
        .map_err(|e| ServingError::Auth(format!("the JWKS is not a valid key set: {e}")))?;
    Ok((set, max_age))
}

/// The `max-age` directive of a `Cache-Control` value.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| value.trim().trim_matches('"').parse().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        assert_eq!(bearer(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(Some("bearer  abc ")).unwrap(), "abc");
        assert!(bearer(None).is_err());
        assert!(bearer(Some("Basic abc")).is_err());
        assert!(bearer(Some("Bearer")).is_err());
        assert!(bearer(Some("Bearer ")).is_err());
    }

    fn claims(exp: f64, nbf: Option<f64>) -> Claims {
        Claims {
            merchant_id: Some("m1".into()),
            role: None,
            exp,
            nbf,
        }
    }

    #[test]
    fn admins_read_everyone_merchants_only_themselves() {
        let c = |m: Option<&str>, r: Option<&str>| Claims {
            merchant_id: m.map(str::to_string),
            role: r.map(str::to_string),
            ..claims(0.0, None)
        };
        assert!(c(Some("m1"), None).may_read("m1"));
        assert!(!c(Some("m1"), None).may_read("m2"));
        assert!(!c(None, Some("viewer")).may_read("m2"));
        assert!(c(None, Some("admin")).may_read("m2"));
    }

    #[test]
    fn exp_and_nbf_are_checked_exactly_with_30_s_of_leeway() {
        let exp = 1_798_625_942.5;
        // valid until exp + 30 s, to the fraction
        assert!(claims(exp, None).check_times(exp + 29.9).is_ok());
        assert!(claims(exp, None).check_times(exp + 30.0).is_err());
        assert!(claims(exp, None).check_times(exp - 3600.0).is_ok());
        // not valid before nbf - 30 s
        let nbf = 1_798_622_342.25;
        assert!(claims(exp, Some(nbf)).check_times(nbf - 30.0).is_ok());
        assert!(claims(exp, Some(nbf)).check_times(nbf - 30.5).is_err());
        let e = claims(exp, Some(nbf))
            .check_times(nbf - 3600.0)
            .unwrap_err();
        assert!(e.to_string().contains("nbf"), "{e}");
    }

    #[test]
    fn numeric_dates_are_any_json_number() {
        let parse = |json: &str| serde_json::from_str::<TokenClaims>(json).map(|c| (c.exp, c.nbf));
        assert_eq!(
            parse(r#"{"exp": 1798625942.5}"#).unwrap(),
            (Some(1_798_625_942.5), None)
        );
        assert_eq!(
            parse(r#"{"exp": 1798625942, "nbf": 1.5e9}"#).unwrap(),
            (Some(1_798_625_942.0), Some(1.5e9))
        );
        assert_eq!(
            parse(r#"{"exp": -1, "nbf": null}"#).unwrap(),
            (Some(-1.0), None)
        );
        assert_eq!(parse("{}").unwrap(), (None, None));
        for bad in [
            r#"{"exp": "1798625942"}"#,
            r#"{"exp": 1798625942, "nbf": "tomorrow"}"#,
            r#"{"exp": 1798625942, "nbf": true}"#,
            r#"{"exp": [1]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_control_max_age_shortens_the_refresh_period() {
        let every = Duration::from_secs(600);
        assert_eq!(
            max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            max_age("Max-Age=\"7\", must-revalidate"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=soon"), None);
        assert_eq!(period(every, None), every);
        assert_eq!(
            period(every, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(period(every, Some(Duration::from_secs(86_400))), every);
        assert_eq!(period(every, Some(Duration::ZERO)), JWKS_MIN_MAX_AGE);
    }
}
