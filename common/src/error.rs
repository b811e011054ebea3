//! The shared error type of tally's libraries.

use std::fmt;

/// `Result` with tally's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lower-level error kept as the cause of one of tally's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `": cause"` when there is a cause, for a variant's message.
fn cause(source: &Option<BoxError>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

/// Everything that can go wrong below the command line, each variant saying what
/// was being done so a user can act on it, and keeping the lower-level error
/// it came from as its [`source`](std::error::Error::source). Which variant is
/// which kind of failure matters: the API answers a request it refuses
/// ([`Error::Invalid`]) with 400 and any other error parsing it with 500; a
/// failed read of the lake with 500 when it is [`Error::Internal`] and with 503
/// (retry later) for every other variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or malformed (bad lake URI, bad Redis URL, ...).
    #[error("configuration: {0}")]
    Config(String),
    /// A Delta Lake operation failed (read, commit, optimize, vacuum).
    #[cfg(feature = "lake")]
    #[error("delta lake: {context}: {source}")]
    Delta {
        context: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// A DataFusion query failed.
    #[cfg(feature = "lake")]
    #[error("query: {context}: {source}")]
    Query {
        context: String,
        #[source]
        source: Box<deltalake::datafusion::error::DataFusionError>,
    },
    /// An Arrow conversion failed while building or reading record batches.
    #[cfg(feature = "lake")]
    #[error("arrow: {context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: Box<deltalake::arrow::error::ArrowError>,
    },
    /// The speed store (Redis or the embedded store) failed or answered
    /// something it should not have.
    #[error("speed store: {context}{}", cause(.source))]
    Speed {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The serving store (the batch view loaded for point reads: Redis or the
    /// embedded store) failed or holds something it should not.
    #[error("serving store: {context}{}", cause(.source))]
    ServingStore {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Kinesis, Secrets Manager or another AWS call failed. The context carries
    /// the SDK's whole error chain (its own `Display` is only "service error").
    #[error("aws: {context}")]
    Aws {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A file or an object of the object store could not be read or written.
    #[error("io: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: BoxError,
    },
    /// A service (the lake, Redis) did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A broken invariant: a bug in tally, or a table changed under it in a way
    /// tally never writes. Not the caller's fault and not a passing failure.
    #[error("internal error (please report it): {0}")]
    Internal(String),
    /// Another process holds a lock this operation needs (e.g. a second `tally batch run`).
    #[error("busy: {0}")]
    Busy(String),
    /// Another batch run published since this one was planned: its staged
    /// results are from an older snapshot, so the run must be planned again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller asked for something that is not valid (bad range, unknown metric, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl Error {
    /// An invalid-input error from anything printable.
    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
    /// A configuration error from anything printable.
    pub fn config(msg: impl fmt::Display) -> Self {
        Error::Config(msg.to_string())
    }
    /// A broken invariant ([`Error::Internal`]) from anything printable.
    pub fn internal(msg: impl fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }
    /// A speed-store failure with no lower-level cause.
    pub fn speed(context: impl Into<String>) -> Self {
        Error::Speed {
            context: context.into(),
            source: None,
        }
    }
    /// A speed-store failure caused by `source` (a Redis error, ...).
    pub fn speed_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Speed {
            context: context.into(),
            source: Some(source.into()),
        }
    }
    /// A serving-store failure with no lower-level cause.
    pub fn serving(context: impl Into<String>) -> Self {
        Error::ServingStore {
            context: context.into(),
            source: None,
        }
    }
    /// A serving-store failure caused by `source` (a Redis error, ...).
    pub fn serving_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::ServingStore {
            context: context.into(),
            source: Some(source.into()),
        }
    }
    /// An AWS failure with no lower-level cause.
    pub fn aws(context: impl Into<String>) -> Self {
        Error::Aws {
            context: context.into(),
            source: None,
        }
    }
    /// An AWS failure caused by `source`, an SDK error: the context says what
    /// was being done and the error's whole chain, the source keeps the error.
    pub fn aws_from<E: std::error::Error + Send + Sync + 'static>(what: &str, source: E) -> Self {
        let mut context = what.to_string();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
        while let Some(c) = cause {
            let text = c.to_string();
            if !context.contains(&text) {
                context.push_str(": ");
                context.push_str(&text);
            }
            cause = c.source();
        }
        Error::Aws {
            context,
            source: Some(Box::new(source)),
        }
    }
    /// An I/O failure of a file or an object caused by `source`.
    pub fn io(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Attach "what was being done" to lower-level errors, in the style of DataFusion's `.context()`.
pub trait Context<T> {
    /// Wrap the error with a description of the operation that failed.
    fn context(self, what: impl Into<String>) -> Result<T>;
}

#[cfg(feature = "lake")]
impl<T> Context<T> for std::result::Result<T, deltalake::DeltaTableError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Delta {
            context: what.into(),
            source: Box::new(source),
        })
    }
}

#[cfg(feature = "lake")]
impl<T> Context<T> for std::result::Result<T, deltalake::datafusion::error::DataFusionError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Query {
            context: what.into(),
            source: Box::new(source),
        })
    }
}

#[cfg(feature = "lake")]
impl<T> Context<T> for std::result::Result<T, deltalake::arrow::error::ArrowError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Arrow {
            context: what.into(),
            source: Box::new(source),
        })
    }
}

#[cfg(feature = "lake")]
impl<T> Context<T> for std::result::Result<T, deltalake::ObjectStoreError> {
    /// An object store's failure is the storage's ([`Error::Io`]).
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::io(what, source))
    }
}

#[cfg(feature = "lake")]
impl<T> Context<T> for std::result::Result<T, deltalake::parquet::errors::ParquetError> {
    /// Encoding or decoding Parquet ([`Error::Arrow`]'s kin: data tally handles).
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::io(what, source))
    }
}

impl<T> Context<T> for std::result::Result<T, serde_json::Error> {
    /// JSON tally wrote itself that does not encode or parse: a broken invariant.
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::internal(format!("{}: {e}", what.into())))
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::io(what, source))
    }
}
