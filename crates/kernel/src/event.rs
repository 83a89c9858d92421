//! Domain events and the metadata every stored or sent event carries.
//!
//! A [`DomainEvent`] is a fact an aggregate decided: serde-serializable, named by
//! a stable [`DomainEvent::event_type`] and versioned by
//! [`DomainEvent::schema_version`] so that stored events of older shapes can be
//! upcast on read. [`EventMetadata`] is the envelope around it: the event id
//! (UUIDv7, so ids sort by creation time), the correlation id shared by every
//! event of one business transaction, the causation id of the message or event
//! that caused it, the W3C trace context, tenant, actor and occurred-at.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A fact decided by an aggregate.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use vextrus_kernel::DomainEvent;
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Closed,
/// }
///
/// impl DomainEvent for AccountEvent {
///     fn event_type(&self) -> &'static str {
///         match self {
///             AccountEvent::Opened { .. } => "account.opened",
///             AccountEvent::Closed => "account.closed",
///         }
///     }
/// }
///
/// let e = AccountEvent::Opened { owner: "ada".into() };
/// assert_eq!(e.event_type(), "account.opened");
/// assert_eq!(e.schema_version(), 1);
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The stable name of this event's type, such as `"sales.order_placed"`.
    ///
    /// Stored with the event and used to find upcasters and deserializers; it
    /// must never change once events of the type have been stored.
    fn event_type(&self) -> &'static str;

    /// The schema version of this event type's payload (starting at 1).
    fn schema_version(&self) -> u32 {
        1
    }
}

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id as a UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl From<Uuid> for $name {
            fn from(value: Uuid) -> Self {
                Self(value)
            }
        }

        impl FromStr for $name {
            type Err = MetadataError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| MetadataError::InvalidId { field: stringify!($name), value: s.to_owned() })
            }
        }
    };
}

uuid_newtype!(
    /// The unique id of one event (UUIDv7). Re-appending an event with the same
    /// id at the same position is idempotent.
    EventId
);
uuid_newtype!(
    /// Shared by every event and message of one business transaction.
    CorrelationId
);
uuid_newtype!(
    /// The id of the event, command or message that caused this one.
    CausationId
);

/// Errors from building or parsing event metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// An id was not a UUID.
    #[error("{field} is not a valid UUID: {value:?}")]
    InvalidId {
        /// Which id.
        field: &'static str,
        /// The text given.
        value: String,
    },
    /// A `traceparent` header did not follow the W3C Trace Context format.
    #[error(
        "invalid W3C traceparent {0:?}: expected 00-<32 hex>-<16 hex>-<2 hex>, ids not all zero"
    )]
    InvalidTraceparent(String),
    /// A `tracestate` header was too long or held a control character.
    #[error("invalid W3C tracestate: {0}")]
    InvalidTracestate(&'static str),
    /// A tenant or actor name was empty, too long, or held a control character.
    #[error("invalid {field}: {reason}")]
    InvalidName {
        /// `tenant` or `actor`.
        field: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
}

impl crate::HasErrorKind for MetadataError {
    fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Validation
    }
}

/// A W3C Trace Context (`traceparent` and optional `tracestate`), carried in
/// event metadata and message headers so one trace follows a business
/// transaction across services.
///
/// ```
/// use vextrus_kernel::TraceContext;
///
/// let tc = TraceContext::parse(
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
///     Some("vendor=opaque"),
/// )
/// .unwrap();
/// assert_eq!(tc.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(tc.parent_id(), "00f067aa0ba902b7");
/// assert!(tc.sampled());
/// assert!(TraceContext::parse("not-a-traceparent", None).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceContext {
    traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

impl TraceContext {
    /// Maximum length of a `tracestate` value (the W3C limit is 512 characters).
    pub const MAX_TRACESTATE_LEN: usize = 512;

    /// Parses and validates a `traceparent` (version `00`) and optional `tracestate`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, MetadataError> {
        let bad = || MetadataError::InvalidTraceparent(traceparent.chars().take(80).collect());
        let parts: Vec<&str> = traceparent.split('-').collect();
        let [version, trace_id, parent_id, flags] = parts.as_slice() else {
            return Err(bad());
        };
        let is_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if *version != "00"
            || !is_hex(trace_id, 32)
            || !is_hex(parent_id, 16)
            || !is_hex(flags, 2)
            || trace_id.bytes().all(|b| b == b'0')
            || parent_id.bytes().all(|b| b == b'0')
        {
            return Err(bad());
        }
        let tracestate = match tracestate {
            None => None,
            Some("") => None,
            Some(s) if s.len() > Self::MAX_TRACESTATE_LEN => {
                return Err(MetadataError::InvalidTracestate(
                    "longer than 512 characters",
                ));
            }
            Some(s) if s.chars().any(|c| c.is_control()) => {
                return Err(MetadataError::InvalidTracestate(
                    "contains a control character",
                ));
            }
            Some(s) => Some(s.to_owned()),
        };
        Ok(Self {
            traceparent: traceparent.to_owned(),
            tracestate,
        })
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The 16-hex-digit id of the parent span.
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.traceparent[53..55], 16).is_ok_and(|f| f & 1 == 1)
    }
}

fn validate_name(field: &'static str, value: &str) -> Result<(), MetadataError> {
    if value.trim().is_empty() {
        return Err(MetadataError::InvalidName {
            field,
            reason: "must not be empty",
        });
    }
    if value.len() > 128 {
        return Err(MetadataError::InvalidName {
            field,
            reason: "longer than 128 bytes",
        });
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(MetadataError::InvalidName {
            field,
            reason: "contains a control character",
        });
    }
    Ok(())
}

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name: non-empty, at most 128 bytes, no control characters.
            pub fn new(value: impl Into<String>) -> Result<Self, MetadataError> {
                let value = value.into();
                validate_name($field, &value)?;
                Ok(Self(value))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = MetadataError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = MetadataError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_newtype!(
    /// The tenant (company, legal entity) an event belongs to.
    ///
    /// ```
    /// use vextrus_kernel::TenantId;
    /// assert_eq!(TenantId::new("acme-bd").unwrap().as_str(), "acme-bd");
    /// assert!(TenantId::new("").is_err());
    /// ```
    TenantId,
    "tenant"
);
name_newtype!(
    /// Who caused an event: a user, a service account, a saga.
    ///
    /// ```
    /// use vextrus_kernel::ActorId;
    /// assert!(ActorId::new("user:42").is_ok());
    /// assert!(ActorId::new("bad\nname").is_err());
    /// ```
    ActorId,
    "actor"
);

/// The metadata stored and sent with every event.
///
/// ```
/// use vextrus_kernel::{ActorId, EventMetadata, TenantId};
///
/// let placed = EventMetadata::new()
///     .with_tenant(TenantId::new("acme").unwrap())
///     .with_actor(ActorId::new("user:7").unwrap());
/// // An event caused by `placed` stays in the same business transaction.
/// let reserved = EventMetadata::caused_by(&placed);
/// assert_eq!(reserved.correlation_id, placed.correlation_id);
/// assert_eq!(reserved.causation_id.unwrap().as_uuid(), placed.event_id.as_uuid());
/// assert_ne!(reserved.event_id, placed.event_id);
/// assert_eq!(reserved.tenant, placed.tenant);
///
/// let json = serde_json::to_string(&placed).unwrap();
/// let back: EventMetadata = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, placed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// This event's unique id (UUIDv7).
    pub event_id: EventId,
    /// The business transaction this event belongs to.
    pub correlation_id: CorrelationId,
    /// The event, command or message that caused this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<CausationId>,
    /// The W3C trace context current when the event was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
    /// The tenant the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Who caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<ActorId>,
    /// When the event was decided, by the deciding process's clock. (The store
    /// also records its own database-clock `recorded_at`.)
    pub occurred_at: DateTime<Utc>,
}

impl EventMetadata {
    /// Metadata for an event that starts a new business transaction: a fresh
    /// event id, a fresh correlation id, no causation, occurred now.
    pub fn new() -> Self {
        Self {
            event_id: EventId::new(),
            correlation_id: CorrelationId::new(),
            causation_id: None,
            trace_context: None,
            tenant: None,
            actor: None,
            occurred_at: Utc::now(),
        }
    }

    /// Metadata for an event caused by `cause`: a fresh event id, the same
    /// correlation id, trace context, tenant and actor, and `cause`'s event id
    /// as causation id.
    pub fn caused_by(cause: &EventMetadata) -> Self {
        Self {
            event_id: EventId::new(),
            correlation_id: cause.correlation_id,
            causation_id: Some(CausationId(cause.event_id.0)),
            trace_context: cause.trace_context.clone(),
            tenant: cause.tenant.clone(),
            actor: cause.actor.clone(),
            occurred_at: Utc::now(),
        }
    }

    /// Sets the event id.
    pub fn with_event_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = id;
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: CausationId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the trace context.
    pub fn with_trace_context(mut self, tc: TraceContext) -> Self {
        self.trace_context = Some(tc);
        self
    }

    /// Sets the tenant.
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: ActorId) -> Self {
        self.actor = Some(actor);
        self
    }

    /// Sets occurred-at.
    pub fn with_occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = at;
        self
    }
}

impl Default for EventMetadata {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_rejects_all_zero_ids_and_bad_versions() {
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        let bad_version = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        for tp in [zero_trace, zero_parent, bad_version, upper, "", "00-1-2-3"] {
            assert!(
                matches!(
                    TraceContext::parse(tp, None),
                    Err(MetadataError::InvalidTraceparent(_))
                ),
                "{tp}"
            );
        }
        let long = "a".repeat(513);
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(matches!(
            TraceContext::parse(ok, Some(&long)),
            Err(MetadataError::InvalidTracestate(_))
        ));
        assert!(!TraceContext::parse(ok, None).unwrap().sampled());
    }

    #[test]
    fn names_reject_bad_input_on_deserialize() {
        let r: Result<TenantId, _> = serde_json::from_str("\"\"");
        assert!(r.is_err());
        let long = format!("\"{}\"", "x".repeat(129));
        let r: Result<ActorId, _> = serde_json::from_str(&long);
        assert!(r.is_err());
    }

    #[test]
    fn ids_parse_and_display_round_trip() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        assert!(matches!(
            "nope".parse::<CorrelationId>(),
            Err(MetadataError::InvalidId {
                field: "CorrelationId",
                ..
            })
        ));
        // UUIDv7 ids sort by creation time.
        let later = EventId::new();
        assert!(later > id);
    }
}
