//! W3C Trace Context across events and messages.
//!
//! A trace that starts when an order is placed must continue through the
//! event append, the outbox, the broker, every participant, the reply and
//! the orchestrator's next step. Two carriers take it there:
//!
//! * [`EventMetadata::trace_context`]: [`inject_into_metadata`] stores the
//!   current span's context with the event, so a relay publishing it later
//!   (another task, another process) can continue the same trace;
//! * message headers (`traceparent`, `tracestate`): [`inject_headers`] /
//!   [`inject_trace_context`] write them on publish, [`extract_headers`] /
//!   [`continue_from_headers`] read them on consume.
//!
//! Header maps differ per broker, so they are reached through two small
//! traits, [`HeaderSink`] and [`HeaderSource`], implemented here for
//! `HashMap<String, String>`, `Vec<(String, String)>` and
//! [`http::HeaderMap`]. Header names are matched case-insensitively.
//!
//! The context is always W3C Trace Context, whatever global propagator the
//! process installed, because that is what vextrus services speak to each
//! other.
//!
//! ```
//! use std::collections::{BTreeMap, HashMap};
//! use vextrus_kernel::TraceContext;
//! use vextrus_telemetry::{extract_headers, inject_trace_context};
//!
//! let tc = TraceContext::parse(
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//!     Some("vendor=opaque"),
//! )
//! .unwrap();
//! let mut headers: HashMap<String, String> = HashMap::new();
//! inject_trace_context(&tc, &mut headers);
//! assert_eq!(extract_headers(&headers).unwrap(), Some(tc));
//!
//! // No headers: no context, and no error.
//! assert_eq!(extract_headers(&HashMap::new()).unwrap(), None);
//! ```

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};
use vextrus_kernel::{EventMetadata, MetadataError, TraceContext};

use crate::TelemetryError;

/// The W3C `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// Somewhere trace headers can be written: a message's header map.
///
/// ```
/// use vextrus_telemetry::HeaderSink;
///
/// let mut headers: Vec<(String, String)> = vec![("Traceparent".into(), "old".into())];
/// headers.set_header("traceparent", "new");
/// assert_eq!(headers, vec![("traceparent".to_owned(), "new".to_owned())]);
/// ```
pub trait HeaderSink {
    /// Sets header `name` to `value`, replacing any value under the same
    /// name in any letter case.
    fn set_header(&mut self, name: &str, value: &str);
}

/// Somewhere trace headers can be read: a consumed message's header map.
///
/// ```
/// use vextrus_telemetry::HeaderSource;
///
/// let headers: Vec<(String, String)> = vec![("TraceParent".into(), "x".into())];
/// assert_eq!(headers.header("traceparent"), Some("x"));
/// assert_eq!(headers.header("tracestate"), None);
/// ```
pub trait HeaderSource {
    /// The value of header `name` (matched case-insensitively), if present.
    fn header(&self, name: &str) -> Option<&str>;
}

impl<T: HeaderSource + ?Sized> HeaderSource for &T {
    fn header(&self, name: &str) -> Option<&str> {
        (**self).header(name)
    }
}

impl<S: std::hash::BuildHasher> HeaderSink for HashMap<String, String, S> {
    fn set_header(&mut self, name: &str, value: &str) {
        self.retain(|k, _| !k.eq_ignore_ascii_case(name));
        self.insert(name.to_owned(), value.to_owned());
    }
}

impl<S: std::hash::BuildHasher> HeaderSource for HashMap<String, String, S> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str).or_else(|| {
            self.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        })
    }
}

impl HeaderSink for BTreeMap<String, String> {
    fn set_header(&mut self, name: &str, value: &str) {
        self.retain(|k, _| !k.eq_ignore_ascii_case(name));
        self.insert(name.to_owned(), value.to_owned());
    }
}

impl HeaderSource for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str).or_else(|| {
            self.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        })
    }
}

impl HeaderSink for Vec<(String, String)> {
    fn set_header(&mut self, name: &str, value: &str) {
        self.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.push((name.to_owned(), value.to_owned()));
    }
}

impl HeaderSource for Vec<(String, String)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl HeaderSource for [(String, String)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl HeaderSink for http::HeaderMap {
    fn set_header(&mut self, name: &str, value: &str) {
        // Trace headers are ASCII by construction; a name or value that is not
        // a valid HTTP header is skipped rather than panicking.
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            http::header::HeaderValue::from_str(value),
        ) {
            self.insert(name, value);
        }
    }
}

impl HeaderSource for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Adapts a [`HeaderSink`] to OpenTelemetry's `Injector`.
struct SinkInjector<'a, S: ?Sized>(&'a mut S);

impl<S: HeaderSink + ?Sized> Injector for SinkInjector<'_, S> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set_header(key, &value);
    }
}

/// The OpenTelemetry context of `tc`: a remote parent with its trace id,
/// span id, flags and trace state.
struct TraceContextCarrier<'a>(&'a TraceContext);

impl Extractor for TraceContextCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case(TRACEPARENT) {
            Some(self.0.traceparent())
        } else if key.eq_ignore_ascii_case(TRACESTATE) {
            self.0.tracestate()
        } else {
            None
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The [`TraceContext`] of an OpenTelemetry context, if it holds a valid span.
pub fn trace_context_from_otel(cx: &opentelemetry::Context) -> Option<TraceContext> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut SinkInjector(&mut fields));
    let traceparent = fields.get(TRACEPARENT)?;
    // The SDK writes exactly what W3C (and so the kernel) accepts; a failure
    // here would mean an SDK bug, so it is logged and treated as no context.
    match TraceContext::parse(traceparent, fields.get(TRACESTATE).map(String::as_str)) {
        Ok(tc) => Some(tc),
        Err(e) => {
            tracing::warn!(error = %e, "OpenTelemetry produced a trace context vextrus rejects");
            None
        }
    }
}

/// The OpenTelemetry context whose (remote) parent span is `tc`. Pass it to
/// `OpenTelemetrySpanExt::set_parent`, or use [`continue_trace`].
pub fn context_from(tc: &TraceContext) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&TraceContextCarrier(tc))
}

/// The trace context of `span`, if it is recorded by an OpenTelemetry layer.
pub fn trace_context_of(span: &Span) -> Option<TraceContext> {
    trace_context_from_otel(&span.context())
}

/// The trace context of the current `tracing` span (or, outside any such
/// span, of the current OpenTelemetry context), if there is one.
pub fn current_trace_context() -> Option<TraceContext> {
    trace_context_of(&Span::current())
        .or_else(|| trace_context_from_otel(&opentelemetry::Context::current()))
}

/// Stores the current trace context in `metadata`, so whoever later reads
/// the event (the relay, a projection) continues this trace. Returns whether
/// there was a context to store; without one, `metadata` is left unchanged
/// (keeping, for example, a context inherited through
/// [`EventMetadata::caused_by`]).
pub fn inject_into_metadata(metadata: &mut EventMetadata) -> bool {
    match current_trace_context() {
        Some(tc) => {
            metadata.trace_context = Some(tc);
            true
        }
        None => false,
    }
}

/// Writes `tc` as `traceparent` (and `tracestate`, if any) headers. Use it
/// when the context comes from stored metadata rather than the current span.
pub fn inject_trace_context(tc: &TraceContext, sink: &mut (impl HeaderSink + ?Sized)) {
    sink.set_header(TRACEPARENT, tc.traceparent());
    if let Some(state) = tc.tracestate() {
        sink.set_header(TRACESTATE, state);
    }
}

/// Writes the current span's trace context as headers. Returns whether there
/// was a context to write.
pub fn inject_headers(sink: &mut (impl HeaderSink + ?Sized)) -> bool {
    match current_trace_context() {
        Some(tc) => {
            inject_trace_context(&tc, sink);
            true
        }
        None => false,
    }
}

/// Reads a trace context from headers: `Ok(None)` without a `traceparent`,
/// [`TelemetryError::InvalidTraceContext`] when `traceparent` or
/// `tracestate` is malformed.
pub fn extract_headers(
    source: &(impl HeaderSource + ?Sized),
) -> Result<Option<TraceContext>, TelemetryError> {
    let Some(traceparent) = source.header(TRACEPARENT) else {
        return Ok(None);
    };
    let tracestate = source.header(TRACESTATE).map(str::trim);
    Ok(Some(TraceContext::parse(traceparent.trim(), tracestate)?))
}

/// Reads a trace context from headers, never failing: a malformed
/// `traceparent` is ignored with a warning (the consumer starts a new trace),
/// and a malformed `tracestate` is dropped with a warning while a valid
/// `traceparent` is kept, as the W3C recommendation says.
pub fn extract_headers_lenient(source: &(impl HeaderSource + ?Sized)) -> Option<TraceContext> {
    match extract_headers(source) {
        Ok(tc) => tc,
        Err(TelemetryError::InvalidTraceContext(MetadataError::InvalidTracestate(reason))) => {
            tracing::warn!(reason, "ignoring a malformed tracestate header");
            source
                .header(TRACEPARENT)
                .and_then(|tp| TraceContext::parse(tp.trim(), None).ok())
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed trace context header");
            None
        }
    }
}

/// Makes `span` a child of the (remote) span `tc`, continuing its trace.
///
/// Call it right after creating the span and before entering it. Without an
/// OpenTelemetry layer (or for a disabled span) there is no trace to
/// continue and this does nothing; a span already entered gives
/// [`TelemetryError::SpanAlreadyStarted`].
pub fn continue_trace(span: &Span, tc: &TraceContext) -> Result<(), TelemetryError> {
    match span.set_parent(context_from(tc)) {
        Ok(()) | Err(SetParentError::LayerNotFound) | Err(SetParentError::SpanDisabled) => Ok(()),
        Err(SetParentError::AlreadyStarted) => Err(TelemetryError::SpanAlreadyStarted),
    }
}

/// Continues the trace carried in a consumed message's headers on `span`,
/// leniently (see [`extract_headers_lenient`]); returns the context continued
/// from, if any. Problems are logged, never returned: a bad header must not
/// stop a message from being handled.
pub fn continue_from_headers(
    span: &Span,
    source: &(impl HeaderSource + ?Sized),
) -> Option<TraceContext> {
    let tc = extract_headers_lenient(source)?;
    if let Err(e) = continue_trace(span, &tc) {
        tracing::warn!(error = %e, "cannot continue the incoming trace");
    }
    Some(tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn context_from_round_trips_through_opentelemetry() {
        let tc = TraceContext::parse(TP, Some("a=1,b=2")).unwrap();
        let cx = context_from(&tc);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), tc.trace_id());
        assert_eq!(sc.span_id().to_string(), tc.parent_id());
        assert_eq!(trace_context_from_otel(&cx), Some(tc));
    }

    #[test]
    fn no_span_means_no_context() {
        assert_eq!(
            trace_context_from_otel(&opentelemetry::Context::new()),
            None
        );
        assert_eq!(current_trace_context(), None);
        let mut md = EventMetadata::new();
        assert!(!inject_into_metadata(&mut md));
        assert_eq!(md.trace_context, None);
        let mut headers: Vec<(String, String)> = Vec::new();
        assert!(!inject_headers(&mut headers));
        assert!(headers.is_empty());
    }

    #[test]
    fn header_maps_match_names_case_insensitively() {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("TRACEPARENT".into(), "old".into());
        map.set_header(TRACEPARENT, TP);
        assert_eq!(map.len(), 1);
        assert_eq!(map.header("TraceParent"), Some(TP));

        let mut http_headers = http::HeaderMap::new();
        let tc = TraceContext::parse(TP, Some("k=v")).unwrap();
        inject_trace_context(&tc, &mut http_headers);
        assert_eq!(http_headers.header("Tracestate"), Some("k=v"));
        assert_eq!(extract_headers(&http_headers).unwrap(), Some(tc));
    }

    #[test]
    fn malformed_headers_are_typed_errors_or_ignored() {
        let bad_parent: Vec<(String, String)> = vec![(TRACEPARENT.into(), "00-zz-yy-01".into())];
        assert!(matches!(
            extract_headers(&bad_parent),
            Err(TelemetryError::InvalidTraceContext(
                MetadataError::InvalidTraceparent(_)
            ))
        ));
        assert_eq!(extract_headers_lenient(&bad_parent), None);

        let bad_state: Vec<(String, String)> = vec![
            (TRACEPARENT.into(), format!(" {TP} ")),
            (TRACESTATE.into(), "x".repeat(600)),
        ];
        assert!(matches!(
            extract_headers(&bad_state),
            Err(TelemetryError::InvalidTraceContext(
                MetadataError::InvalidTracestate(_)
            ))
        ));
        let kept = extract_headers_lenient(&bad_state).unwrap();
        assert_eq!(kept.traceparent(), TP);
        assert_eq!(kept.tracestate(), None);

        // Without an OpenTelemetry layer, continuing is a no-op, not an error.
        let span = tracing::info_span!("consume");
        assert_eq!(
            continue_from_headers(&span, &bad_state).map(|t| t.trace_id().to_owned()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
        assert_eq!(continue_from_headers(&span, &bad_parent), None);
    }
}
