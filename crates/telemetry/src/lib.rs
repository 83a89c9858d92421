//! Telemetry for vextrus services: logs, traces and metrics in one call, and
//! W3C trace context carried through events and messages.
//!
//! * [`init`] / [`try_init`] install a `tracing` subscriber (env filter,
//!   human or JSON logs, OpenTelemetry layer), OTLP/HTTP span export when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and a Prometheus recorder with an
//!   optional `/metrics` endpoint; configure them with [`TelemetryConfig`].
//! * [`propagation`]: [`current_trace_context`], [`inject_into_metadata`],
//!   [`inject_headers`] / [`extract_headers`] over the [`HeaderSink`] /
//!   [`HeaderSource`] traits, and [`continue_trace`] so a consumer's span
//!   becomes a child of the producer's.
//! * [`spans`]: the spans for event append, relay publish, consume, saga
//!   step and compensation, with their attributes.
//! * [`names`]: every metric, label, span and attribute name; [`record`]:
//!   one function per measurement.
//! * [`TimedExt`] / [`timed`]: time any future into a histogram and a span.
//!
//! A trace across an append, the outbox and a consumer:
//!
//! ```
//! use std::collections::HashMap;
//! use tracing::Instrument;
//! use vextrus_kernel::EventMetadata;
//! use vextrus_telemetry::{inject_headers, inject_into_metadata, spans};
//!
//! # async fn demo() {
//! // Deciding service: the event carries the trace.
//! let mut metadata = EventMetadata::new();
//! async { inject_into_metadata(&mut metadata); }
//!     .instrument(spans::event_append("order-42", 1))
//!     .await;
//!
//! // Relay, later: publish inside a span continuing the stored trace.
//! let mut headers: HashMap<String, String> = HashMap::new();
//! let publish = spans::outbox_publish("msg-1", "sales.orders", metadata.trace_context.as_ref());
//! publish.in_scope(|| inject_headers(&mut headers));
//!
//! // Consumer: its span continues the trace from the headers.
//! let consume = spans::message_consume("msg-1", "sales.orders", &headers);
//! async { /* handle the message */ }.instrument(consume).await;
//! # }
//! ```

pub mod config;
pub mod error;
pub mod init;
pub mod names;
pub mod propagation;
pub mod record;
mod runtime;
pub mod spans;
pub mod timing;

pub use config::{LogFormat, TelemetryConfig};
pub use error::TelemetryError;
pub use init::{TelemetryGuard, init, try_init};
pub use propagation::{
    HeaderSink, HeaderSource, context_from, continue_from_headers, continue_trace,
    current_trace_context, extract_headers, extract_headers_lenient, inject_headers,
    inject_into_metadata, inject_trace_context, trace_context_of,
};
pub use record::{BreakerState, Outcome};
pub use timing::{Timed, TimedExt, timed, try_timed};

/// Results of this crate.
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;
