//! The serving layer's errors: [`ApiError`] is what a caller of the HTTP API sees
//! (a status and a `{"error": {"code", "message"}}` body, never internals), and
//! [`ServingError`] is what stops the server from starting or running.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// An error answered to an API caller. Messages say what to fix; they never carry
/// stack traces, SQL or storage paths (those go to the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: a bad range, an unknown metric, a misaligned time, a malformed merchant id.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or a token that is malformed, expired or wrongly signed.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid token for another merchant.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such route.
    #[error("{0}")]
    NotFound(String),
    /// 503: the lake (the batch view) cannot be read right now.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a broken invariant inside tally (logged with its cause).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The error a failed lake read becomes: the cause is logged, the caller
    /// only learns to retry (or, for a bug, that it is one).
    pub fn lake(cause: &tally_common::Error) -> Self {
        tracing::error!(error = %cause, "batch view read failed");
        Self::from_internal(cause).unwrap_or_else(|| {
            ApiError::Unavailable(
                "the batch view (lake) cannot be read right now; retry shortly".into(),
            )
        })
    }

    /// [`ApiError::Internal`] when `cause` is a broken invariant
    /// ([`tally_common::Error::Internal`]): never a caller's fault to retry or fix.
    pub fn from_internal(cause: &tally_common::Error) -> Option<Self> {
        matches!(cause, tally_common::Error::Internal(_))
            .then(|| ApiError::Internal("an internal error; it has been logged".into()))
    }
}

/// The error body of every non-2xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The code and message of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `unavailable` or `internal`.
    pub code: String,
    /// A human-readable explanation of what to fix.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Why the serving layer could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Token verification is misconfigured (unreadable or malformed JWKS, empty secret).
    #[error("auth configuration: {0}")]
    Auth(String),
    /// The listening socket could not be bound or served.
    #[error("http server on {addr}: {source}")]
    Io {
        /// The address being served.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The Lambda runtime stopped with an error.
    #[error("lambda runtime: {0}")]
    Lambda(String),
    /// The batch view could not be opened (its query runtime could not be built).
    /// A lake not readable yet is not this error: `/ready` answers 503 until it is.
    #[error(transparent)]
    BatchView(tally_common::Error),
}

/// `Result` with [`ServingError`].
pub type Result<T, E = ServingError> = std::result::Result<T, E>;
