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
//! A trace across an append, the outbox and a consumer (under a scoped
//! subscriber with the same OpenTelemetry layer [`init`] installs, minus
//! export):
//!
//! ```
//! use std::collections::HashMap;
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//! use vextrus_kernel::EventMetadata;
//! use vextrus_telemetry::{current_trace_context, inject_headers, inject_into_metadata, spans};
//!
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("doc")));
//! tracing::subscriber::with_default(subscriber, || {
//!     // Deciding service: the appended event carries the trace.
//!     let mut metadata = EventMetadata::new();
//!     spans::event_append("order-42", 1).in_scope(|| inject_into_metadata(&mut metadata));
//!     let stored = metadata.trace_context.clone().expect("inside a span");
//!
//!     // Relay, later: publish inside a span continuing the stored trace.
//!     let mut headers: HashMap<String, String> = HashMap::new();
//!     spans::outbox_publish("msg-1", "sales.orders", Some(&stored))
//!         .in_scope(|| inject_headers(&mut headers));
//!
//!     // Consumer: its span continues the trace from the headers.
//!     let consume = spans::message_consume("msg-1", "sales.orders", &headers);
//!     let seen = consume.in_scope(current_trace_context).unwrap();
//!     assert_eq!(seen.trace_id(), stored.trace_id());
//!     assert_ne!(seen.parent_id(), stored.parent_id());
//! });
//! ```

#[cfg(feature = "export")]
mod config;
mod error;
#[cfg(feature = "export")]
mod init;
pub mod names;
pub mod propagation;
pub mod record;
#[cfg(feature = "export")]
mod runtime;
pub mod spans;
mod timing;

#[cfg(feature = "export")]
pub use config::{LogFormat, TelemetryConfig};
pub use error::TelemetryError;
#[cfg(feature = "export")]
pub use init::{
    LATENCY_BUCKETS, MetricsLayer, TRACER_NAME, TelemetryGuard, init, init_layered, try_init,
};
pub use propagation::{
    HeaderSink, HeaderSource, context_from, continue_from_headers, continue_trace,
    current_trace_context, extract_headers, extract_headers_lenient, inject_headers,
    inject_into_metadata, inject_trace_context, trace_context_of,
};
pub use record::Outcome;
pub use timing::{Timed, TimedExt, timed, try_timed};

/// Results of this crate.
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;
