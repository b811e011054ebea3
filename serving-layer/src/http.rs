//! The HTTP handlers: the metrics endpoint, `/health`, `/ready`, `/openapi.json`,
//! the JSON 404, and the access log around all of them.

use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tally_common::bucket::{hour_floor, now_micros};
use tally_common::calendar::SLOT_MICROS;
use tally_common::query::parse_metrics_request;
use tally_common::speed_view::SpeedReading;
use tally_common::Error;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::merge::{MetricsResponse, Plan};
use crate::AppState;

/// A request the parser refused: 400 with its reason. The parser only refuses
/// with [`Error::Invalid`]; anything else would be a bug, answered 500.
fn invalid(e: Error) -> ApiError {
    match e {
        Error::Invalid(msg) => ApiError::BadRequest(msg),
        other => {
            tracing::error!(error = %other, "request parsing failed");
            ApiError::Internal("an internal error; it has been logged".into())
        }
    }
}

// The parameters are not listed here: `openapi::Generated` fills them in from
// the parser's own rules (`tally_common::query`), so the two cannot drift apart.
/// Time-series metrics of one merchant.
#[utoipa::path(
    get,
    path = "/v1/merchants/{merchant_id}/metrics",
    tag = "metrics",
    responses(
        (status = 200, description = "Every bucket of the range, in order.", body = MetricsResponse),
        (status = 400, description = "Bad range (misaligned, backwards, too long or outside years 1970-9999), unknown metric, unsupported time zone, unknown or repeated query parameter, or malformed merchant id.", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired (`exp`) or not yet valid (`nbf`) token, or a wrong signature; 30 s of leeway.", body = ErrorBody),
        (status = 403, description = "The token is for another merchant.", body = ErrorBody),
        (status = 404, description = "No such route (an empty merchant id).", body = ErrorBody),
        (status = 503, description = "The lake cannot be read right now, or the RS256 signing keys could not be refreshed for too long.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    merchant: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<MetricsResponse>, ApiError> {
    let merchant = authorized_merchant(&state, merchant, &headers).await?;
    let request = parse_metrics_request(&merchant, uri.query()).map_err(invalid)?;
    let mut snapshot = state.inner.batch.snapshot().ok_or_else(|| {
        ApiError::Unavailable("the batch view (lake) is not loaded yet; retry shortly".into())
    })?;
    if snapshot.store_unconfirmed() {
        // the store's state not confirmed lately (a Lambda container thawed:
        // one Redis read confirms it), before the merchant's zone is read from it
        if let Some(s) = refresh_on_request(&state, false).await {
            snapshot = s;
        }
    }
    let calendar = match request.time_zone {
        Some(c) => c,
        None => state
            .inner
            .zones
            .zone(
                state.inner.batch.lake(),
                &merchant,
                snapshot.store_holds_settings(),
            )
            .await
            .map_err(|e| ApiError::lake(&e))?,
    };
    let buckets = request.buckets(&calendar).map_err(invalid)?;
    // every offset since 1972 is a whole number of quarter hours, the grain
    // both views keep; a few zones' older offsets are not (Africa/Monrovia's
    // -00:44:30 until 1972): refused, never answered with misaligned zeros
    if let Some(&(s, _)) = buckets
        .iter()
        .find(|(s, e)| s.rem_euclid(SLOT_MICROS) != 0 || e.rem_euclid(SLOT_MICROS) != 0)
    {
        return Err(ApiError::BadRequest(format!(
            "{} in {} was not on a quarter hour of UTC, the grain tally keeps; \
             ask for this range in another zone",
            calendar.format(s),
            calendar.name()
        )));
    }

    // the newest hour the speed view can hold data for: events may be stamped
    // up to the decoder's allowance ahead of now
    let horizon = hour_floor(now_micros() + tally_common::decode::MAX_FUTURE_MICROS);
    let mut plan = Plan::new(calendar, &buckets, snapshot.watermark(), horizon);
    if snapshot.lake_pending() && snapshot.needs_lake(&plan.ranges) {
        // a process that just started, needing the lake's tables
        if let Some(s) = refresh_on_request(&state, true).await {
            snapshot = s;
            plan = Plan::new(calendar, &buckets, snapshot.watermark(), horizon);
        }
    }

    let batch = snapshot.read(&merchant, &plan.ranges);
    let speed = async {
        if plan.speed_hours.is_empty() {
            return Some(SpeedReading::default());
        }
        let read = state.inner.speed.read(&merchant, &plan.speed_hours, &[]);
        match tokio::time::timeout(state.inner.options.speed_timeout, read).await {
            Ok(Ok(reading)) => Some(reading),
            Ok(Err(e)) => {
                tracing::warn!(merchant = %merchant, error = %e, "speed view read failed; answering partial");
                None
            }
            Err(_) => {
                tracing::warn!(merchant = %merchant, "speed view read timed out; answering partial");
                None
            }
        }
    };
    let (batch, speed) = tokio::join!(batch, speed);
    let rows = batch.map_err(|e| ApiError::lake(&e))?;
    let assembled = plan.assemble(&rows, speed.as_ref());
    Ok(Json(MetricsResponse {
        merchant_id: merchant,
        granularity: request.granularity,
        calendar,
        from: request.from,
        to: request.to,
        batch_watermark: snapshot.watermark(),
        // a speed or mixed bucket left null: the view was unreadable or did not cover it
        partial: assembled.buckets.iter().any(|b| b.values.is_none()),
        metrics: request.metrics,
        totals: assembled.totals,
        buckets: assembled.buckets,
    }))
}

/// A refresh of the batch view on a request's path, bounded by the speed
/// timeout (a failure leaves the lake to answer, or 503); the snapshot after it.
async fn refresh_on_request(
    state: &AppState,
    open_lake: bool,
) -> Option<std::sync::Arc<crate::BatchSnapshot>> {
    let wait = state.inner.options.speed_timeout;
    let refresh = state.inner.batch.refresh_opening(open_lake);
    match tokio::time::timeout(wait, refresh).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "refreshing the batch view failed"),
        Err(_) => tracing::warn!(?wait, "refreshing the batch view took too long"),
    }
    state.inner.batch.snapshot()
}

/// The body of `PUT /v1/merchants/{merchant_id}/settings`, and of its answer.
#[derive(Debug, Clone, serde::Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsBody {
    /// The merchant's IANA time zone (`Asia/Kolkata`, `UTC`): the calendar of
    /// its buckets from now on, over all of its history.
    #[schema(example = "Asia/Kolkata")]
    time_zone: String,
}

/// Change a merchant's settings (the merchant itself, or an admin).
#[utoipa::path(
    put,
    path = "/v1/merchants/{merchant_id}/settings",
    tag = "metrics",
    request_body = SettingsBody,
    responses(
        (status = 200, description = "The settings now in force.", body = SettingsBody),
        (status = 400, description = "Not an IANA time zone name, a malformed body, or a malformed merchant id.", body = ErrorBody),
        (status = 401, description = "Missing, malformed or expired token.", body = ErrorBody),
        (status = 403, description = "The token is for another merchant.", body = ErrorBody),
        (status = 503, description = "The lake cannot be written right now.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_settings(
    State(state): State<AppState>,
    merchant: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<SettingsBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<SettingsBody>, ApiError> {
    let merchant = authorized_merchant(&state, merchant, &headers).await?;
    let Json(body) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be {{\"time_zone\": \"Area/Location\"}}: {}",
            e.body_text()
        ))
    })?;
    let calendar = tally_common::merchants::set_time_zone(
        state.inner.batch.lake(),
        &merchant,
        &body.time_zone,
        now_micros(),
    )
    .await
    .map_err(|e| match e {
        Error::Invalid(msg) => ApiError::BadRequest(msg),
        other => ApiError::lake(&other),
    })?;
    if let Err(e) = state.inner.zones.set(&merchant, calendar).await {
        // the lake has it: the next load copies it into the store
        tracing::warn!(merchant = %merchant, error = %e, "writing the setting to the serving store failed");
    }
    Ok(Json(SettingsBody {
        time_zone: calendar.name().to_string(),
    }))
}

/// The path's merchant, once the bearer token may act for it (the merchant
/// itself or an admin). A path segment that does not decode is a JSON 400 like
/// every other bad request; the token is checked first (401/403).
async fn authorized_merchant(
    state: &AppState,
    merchant: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let claimed = merchant.as_ref().map_or("", |Path(m)| m.as_str());
    state.inner.auth.authorize(authorization, claimed).await?;
    let Path(merchant) = merchant.map_err(|_| {
        ApiError::BadRequest(
            "merchant_id must be 1-64 characters of letters, digits and _ . : -".into(),
        )
    })?;
    Ok(merchant)
}

/// The body of `/health`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HealthBody {
    /// Always `ok`.
    status: &'static str,
}

/// Whether the process is alive (always 200).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is alive.", body = HealthBody)))]
pub(crate) async fn health() -> Json<HealthBody> {
    Json(HealthBody { status: "ok" })
}

/// The body of `/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadyBody {
    /// Whether this instance should get traffic.
    ready: bool,
    /// Whether the lake was readable at the last check.
    lake: bool,
    /// Whether the speed store answered a ping.
    speed: bool,
    /// Whether the instance is shutting down.
    draining: bool,
}

/// Whether this instance should get traffic: the lake and the speed store are
/// reachable and it is not shutting down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic.", body = ReadyBody),
        (status = 503, description = "Not ready: lake or speed store unreachable, or draining.", body = ReadyBody),
    ))]
pub(crate) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadyBody>) {
    let draining = state.is_draining();
    let lake = state.inner.batch.is_healthy();
    let ping = state.inner.speed.ping();
    let speed = matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(()))
    );
    let ready = lake && speed && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(ReadyBody {
            ready,
            lake,
            speed,
            draining,
        }),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of this API.", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> Response {
    Json(crate::openapi::document()).into_response()
}

/// The JSON 404 of every unknown route.
pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound(
        "no such route: use GET /v1/merchants/{merchant_id}/metrics, /health, /ready or /openapi.json"
            .into(),
    )
}

/// One structured log line per request: method, path (never the query string,
/// which is the caller's business), status, latency and merchant.
pub(crate) async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let merchant = path
        .strip_prefix("/v1/merchants/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    tracing::info!(
        target: "tally::access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        merchant,
        "request"
    );
    response
}
