//! The shared error type of tally's libraries.

use std::fmt;

/// `Result` with tally's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong below the command line, each variant saying what
/// was being done so a user can act on it.
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
    /// The speed store (Redis or the embedded store) failed.
    #[error("speed store: {0}")]
    Speed(String),
    /// Kinesis or another AWS call failed.
    #[error("aws: {0}")]
    Aws(String),
    /// A local file could not be read or written.
    #[error("io: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a lock this operation needs (e.g. a second `tally batch run`).
    #[error("busy: {0}")]
    Busy(String),
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

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what.into(),
            source,
        })
    }
}
