//! The crate's error type.

use vextrus_kernel::{ErrorKind, HasErrorKind, MetadataError};

/// Everything that can go wrong setting up telemetry or propagating a trace.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_telemetry::{extract_headers, TelemetryError};
///
/// let headers = vec![("traceparent".to_owned(), "garbage".to_owned())];
/// let err = extract_headers(&headers).unwrap_err();
/// assert!(matches!(err, TelemetryError::InvalidTraceContext(_)));
/// assert_eq!(err.kind(), ErrorKind::Validation);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A configuration value (usually from the environment) was not valid.
    #[error("invalid telemetry setting {setting}: {reason}")]
    InvalidConfig {
        /// The setting or environment variable.
        setting: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The log filter directive could not be parsed.
    #[error("invalid log filter {filter:?}: {source}")]
    InvalidFilter {
        /// The directive given.
        filter: String,
        /// The parser's complaint.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A process-wide component (tracing subscriber, metrics recorder) was
    /// already installed; [`crate::init`] refuses to replace it, while
    /// [`crate::try_init`] keeps the existing one.
    #[error("a global {0} is already installed")]
    AlreadyInstalled(&'static str),
    /// The OTLP span exporter could not be built (for example, a malformed endpoint).
    #[error("cannot build the OTLP exporter: {0}")]
    Otlp(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The Prometheus recorder could not be built.
    #[error("cannot build the Prometheus recorder: {0}")]
    Prometheus(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The background telemetry runtime or the metrics listener could not start.
    #[error("cannot start {what}: {source}")]
    Io {
        /// What was being started.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `traceparent`/`tracestate` pair was malformed.
    #[error("invalid trace context: {0}")]
    InvalidTraceContext(#[from] MetadataError),
    /// A span's parent can only be set before the span is first entered.
    #[error("the span has already started; its parent can no longer be set")]
    SpanAlreadyStarted,
}

impl HasErrorKind for TelemetryError {
    fn kind(&self) -> ErrorKind {
        match self {
            TelemetryError::InvalidConfig { .. }
            | TelemetryError::InvalidFilter { .. }
            | TelemetryError::InvalidTraceContext(_)
            | TelemetryError::Otlp(_)
            | TelemetryError::Prometheus(_) => ErrorKind::Validation,
            TelemetryError::AlreadyInstalled(_) => ErrorKind::Conflict,
            TelemetryError::Io { .. } => ErrorKind::Transient,
            TelemetryError::SpanAlreadyStarted => ErrorKind::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(
            TelemetryError::AlreadyInstalled("tracing subscriber").kind(),
            ErrorKind::Conflict
        );
        let io = TelemetryError::Io {
            what: "metrics listener",
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(io.kind(), ErrorKind::Transient);
        assert!(io.to_string().starts_with("cannot start metrics listener"));
        assert_eq!(TelemetryError::SpanAlreadyStarted.kind(), ErrorKind::Fatal);
    }
}
