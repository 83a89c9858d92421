//! Constructors for the spans the event store, relay, consumers and saga
//! orchestrator open, so names and attributes stay those of [`crate::names`].
//!
//! Each returns a span that is not yet entered: enter it, or attach it to a
//! future with `tracing::Instrument::instrument`. Constructors that take a
//! parent [`TraceContext`] continue that (remote) trace; without one the span
//! is a child of the current span.
//!
//! ```
//! use tracing::Instrument;
//! use vextrus_telemetry::spans;
//!
//! async fn append() -> u64 { 3 }
//!
//! let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! let version = rt.block_on(append().instrument(spans::event_append("order-42", 3)));
//! assert_eq!(version, 3);
//! ```

use std::fmt::Display;

use tracing::Span;
use vextrus_kernel::TraceContext;

use crate::propagation::{HeaderSource, continue_from_headers, continue_trace};

fn with_parent(span: Span, parent: Option<&TraceContext>) -> Span {
    if let Some(tc) = parent {
        // A span constructed just above has not started, so this cannot fail.
        if let Err(e) = continue_trace(&span, tc) {
            tracing::warn!(error = %e, "cannot continue the stored trace");
        }
    }
    span
}

/// Span [`crate::names::SPAN_EVENT_APPEND`]: one append of `events` events to
/// stream `stream_id`.
pub fn event_append(stream_id: impl Display, events: usize) -> Span {
    tracing::info_span!(
        "vextrus.event.append",
        vextrus.stream.id = %stream_id,
        vextrus.event.count = i64::try_from(events).unwrap_or(i64::MAX),
    )
}

/// Span [`crate::names::SPAN_OUTBOX_PUBLISH`] (kind producer): the relay
/// publishing message `message_id` to `destination`, continuing `parent`
/// (the trace context stored with the message, see
/// [`crate::inject_into_metadata`]). Inside it, write the headers with
/// [`crate::inject_headers`] so consumers become children of this span.
pub fn outbox_publish(
    message_id: impl Display,
    destination: impl Display,
    parent: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        "vextrus.outbox.publish",
        otel.kind = "producer",
        messaging.message.id = %message_id,
        messaging.destination.name = %destination,
    );
    with_parent(span, parent)
}

/// Span [`crate::names::SPAN_MESSAGE_CONSUME`] (kind consumer): handling
/// message `message_id` from `destination`, continuing the trace in its
/// headers. Malformed trace headers are logged and ignored.
pub fn message_consume(
    message_id: impl Display,
    destination: impl Display,
    headers: &(impl HeaderSource + ?Sized),
) -> Span {
    let span = tracing::info_span!(
        "vextrus.message.consume",
        otel.kind = "consumer",
        messaging.message.id = %message_id,
        messaging.destination.name = %destination,
    );
    continue_from_headers(&span, headers);
    span
}

/// Span [`crate::names::SPAN_SAGA_STEP`]: step `step` of saga `saga_id` of
/// type `saga_type`, continuing `parent` when the step runs from a stored
/// saga state (a timer, a resumed orchestrator).
pub fn saga_step(
    saga_id: impl Display,
    saga_type: impl Display,
    step: impl Display,
    parent: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        "vextrus.saga.step",
        vextrus.saga.id = %saga_id,
        "vextrus.saga.type" = %saga_type,
        vextrus.saga.step = %step,
    );
    with_parent(span, parent)
}

/// Span [`crate::names::SPAN_SAGA_COMPENSATION`]: compensating step `step`
/// of saga `saga_id`.
pub fn saga_compensation(
    saga_id: impl Display,
    saga_type: impl Display,
    step: impl Display,
    parent: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        "vextrus.saga.compensate",
        vextrus.saga.id = %saga_id,
        "vextrus.saga.type" = %saga_type,
        vextrus.saga.step = %step,
    );
    with_parent(span, parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn span_names_match_the_constants() {
        // Without a subscriber spans are disabled and have no metadata, so
        // check the names through a collecting subscriber.
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let got = [
                event_append("s", 1),
                outbox_publish("m", "d", None),
                message_consume("m", "d", &Vec::new()),
                saga_step("id", "t", "reserve", None),
                saga_compensation("id", "t", "reserve", None),
            ]
            .map(|s| s.metadata().map(|m| m.name()).unwrap_or_default());
            assert_eq!(
                got,
                [
                    names::SPAN_EVENT_APPEND,
                    names::SPAN_OUTBOX_PUBLISH,
                    names::SPAN_MESSAGE_CONSUME,
                    names::SPAN_SAGA_STEP,
                    names::SPAN_SAGA_COMPENSATION,
                ]
            );
            let saga = saga_step("id", "t", "reserve", None);
            let fields = saga.metadata().unwrap().fields();
            for key in [
                names::ATTR_SAGA_ID,
                names::ATTR_SAGA_TYPE,
                names::ATTR_SAGA_STEP,
            ] {
                assert!(fields.field(key).is_some(), "{key}");
            }
            let publish = outbox_publish("m", "d", None);
            let fields = publish.metadata().unwrap().fields();
            assert!(fields.field(names::ATTR_MESSAGE_ID).is_some());
            assert!(fields.field(names::ATTR_DESTINATION).is_some());
            let append = event_append("s", 2);
            let fields = append.metadata().unwrap().fields();
            assert!(fields.field(names::ATTR_STREAM_ID).is_some());
            assert!(fields.field(names::ATTR_EVENT_COUNT).is_some());
        });
    }
}
