//! Bearer-token checks: HS256 with a shared secret or RS256 with keys from a JWKS
//! (a file or an http(s) URL), `exp` required, and the claims matched against the
//! merchant of the path. Behind API Gateway the JWT authorizer has validated the
//! token already; the claims are checked again here so the server is safe alone.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tally_common::config::AuthArgs;

use crate::error::{ApiError, ServingError};

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 30;
/// A JWKS fetched by URL is fetched again for an unknown `kid` (a key rotation) at
/// most this often, so forged `kid`s cannot hammer the key server.
const JWKS_REFETCH_AFTER: Duration = Duration::from_secs(60);

/// The claims the API looks at.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// The merchant whose metrics the token may read.
    #[serde(default)]
    pub merchant_id: Option<String>,
    /// `admin` may read every merchant.
    #[serde(default)]
    pub role: Option<String>,
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
}

impl Claims {
    /// Whether the token may read `merchant`'s metrics.
    pub fn may_read(&self, merchant: &str) -> bool {
        self.role.as_deref() == Some("admin") || self.merchant_id.as_deref() == Some(merchant)
    }
}

#[derive(Debug, Clone)]
enum JwksSource {
    File(PathBuf),
    Url(String),
    Inline,
}

struct Jwks {
    source: JwksSource,
    keys: RwLock<Arc<JwkSet>>,
    fetched_at: RwLock<Instant>,
    client: reqwest::Client,
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

    /// RS256 tokens verified with the keys of `set` (no refetching).
    pub fn with_jwk_set(mut self, set: JwkSet) -> Self {
        self.jwks = Some(Arc::new(Jwks {
            source: JwksSource::Inline,
            keys: RwLock::new(Arc::new(set)),
            fetched_at: RwLock::new(Instant::now()),
            client: reqwest::Client::new(),
        }));
        self
    }

    /// Verification as the flags say: an HS256 secret, a JWKS file path or URL, or
    /// both. With neither, every request is refused with 401 (never open by accident).
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
            let keys = fetch(&source, &client).await?;
            auth.jwks = Some(Arc::new(Jwks {
                source,
                keys: RwLock::new(Arc::new(keys)),
                fetched_at: RwLock::new(Instant::now()),
                client,
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
    /// 401 for a missing or invalid token, 403 for another merchant's.
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

    /// Verify a token's signature and expiry and return its claims.
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
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp"]);
        // the audience is API Gateway's authorizer's business; here only who may read what
        validation.validate_aud = false;
        decode::<Claims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                ApiError::Unauthorized(
                    match e.kind() {
                        ErrorKind::ExpiredSignature => "the bearer token has expired",
                        ErrorKind::InvalidSignature => "the bearer token's signature is not valid",
                        ErrorKind::MissingRequiredClaim(_) => "the bearer token has no `exp` claim",
                        _ => "the bearer token is not valid",
                    }
                    .into(),
                )
            })
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

impl Jwks {
    /// The decoding key for `kid` (or the only key when the token names none),
    /// refetching a URL-sourced set once for an unknown `kid`.
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, ApiError> {
        if let Some(key) = self.lookup(kid) {
            return key;
        }
        let stale = self
            .fetched_at
            .read()
            .map(|t| t.elapsed() >= JWKS_REFETCH_AFTER)
            .unwrap_or(true);
        if stale && matches!(self.source, JwksSource::Url(_) | JwksSource::File(_)) {
            match fetch(&self.source, &self.client).await {
                Ok(set) => {
                    if let Ok(mut k) = self.keys.write() {
                        *k = Arc::new(set);
                    }
                    if let Ok(mut t) = self.fetched_at.write() {
                        *t = Instant::now();
                    }
                    if let Some(key) = self.lookup(kid) {
                        return key;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "refreshing the JWKS failed"),
            }
        }
        Err(ApiError::Unauthorized(
            "the bearer token's signing key is not known".into(),
        ))
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Result<DecodingKey, ApiError>> {
        let keys = self.keys.read().ok()?.clone();
        let jwk = match kid {
            Some(kid) => keys.find(kid)?,
            None if keys.keys.len() == 1 => &keys.keys[0],
            None => return None,
        };
        Some(DecodingKey::from_jwk(jwk).map_err(|_| {
            ApiError::Unauthorized("the bearer token's signing key is not usable".into())
        }))
    }
}

async fn fetch(source: &JwksSource, client: &reqwest::Client) -> Result<JwkSet, ServingError> {
    let text = match source {
        JwksSource::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| {
            ServingError::Auth(format!("reading the JWKS file {}: {e}", path.display()))
        })?,
        JwksSource::Url(url) => {
            let response = client
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| ServingError::Auth(format!("fetching the JWKS from {url}: {e}")))?;
            response
                .text()
                .await
                .map_err(|e| ServingError::Auth(format!("reading the JWKS from {url}: {e}")))?
        }
        JwksSource::Inline => {
            return Err(ServingError::Auth(
                "an inline JWKS cannot be refetched".into(),
            ))
        }
    };
    serde_json::from_str(&text)
        .map_err(|e| ServingError::Auth(format!("the JWKS is not a valid key set: {e}")))
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

    #[test]
    fn admins_read_everyone_merchants_only_themselves() {
        let c = |m: Option<&str>, r: Option<&str>| Claims {
            merchant_id: m.map(str::to_string),
            role: r.map(str::to_string),
            exp: 0,
        };
        assert!(c(Some("m1"), None).may_read("m1"));
        assert!(!c(Some("m1"), None).may_read("m2"));
        assert!(!c(None, Some("viewer")).may_read("m2"));
        assert!(c(None, Some("admin")).may_read("m2"));
    }
}
