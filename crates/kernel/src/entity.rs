//! Entities: things with an identity that outlives their changing state, and
//! the [`Audit`] trail of who created and last changed them, when, and how
//! many times.
//!
//! For an event-sourced aggregate the audit trail is maintained by
//! [`AggregateRoot`](crate::AggregateRoot) from the metadata of the events it
//! applies — `occurred_at` and `actor`, nothing else — so rebuilding an
//! aggregate from its stored history gives exactly the same [`Audit`] as the
//! live one had. An entity that is stored as a plain row calls
//! [`Audit::new`] when it is created and [`Audit::record_change`] on every
//! change instead.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ActorId, EventMetadata};

/// Who created a thing and when, who changed it last and when, and how many
/// changes it has had.
///
/// `version` counts changes, the creation included: it is 1 after creation
/// and goes up by one per change. For an aggregate root it equals the number
/// of events applied, which is also the stream version the event store
/// checks (so a snapshot's audit and version always agree).
///
/// Timestamps are whatever the deciding process's clock said (the
/// `occurred_at` of the event metadata); they are recorded as given, not
/// reordered, so with clock skew between nodes `updated_at` can be earlier
/// than `created_at`. The store's own commit-time clock is kept elsewhere.
///
/// A non-event-sourced entity keeps its audit trail up to date by hand:
///
/// ```
/// use chrono::{TimeZone, Utc};
/// use vextrus_kernel::{ActorId, Audit};
///
/// let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 9, 0, 0).unwrap();
/// let t1 = Utc.with_ymd_and_hms(2025, 1, 2, 9, 0, 0).unwrap();
/// let clerk = ActorId::new("user:clerk").unwrap();
/// let manager = ActorId::new("user:manager").unwrap();
///
/// let mut audit = Audit::new(t0, Some(clerk.clone()));
/// assert_eq!((audit.version, audit.updated_at), (1, t0));
///
/// audit.record_change(t1, Some(manager.clone()));
/// assert_eq!(audit.created_by, Some(clerk));
/// assert_eq!(audit.updated_by, Some(manager));
/// assert_eq!((audit.created_at, audit.updated_at, audit.version), (t0, t1, 2));
///
/// // It serializes (it goes into snapshots and table rows).
/// let json = serde_json::to_string(&audit).unwrap();
/// assert_eq!(serde_json::from_str::<Audit>(&json).unwrap(), audit);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Audit {
    /// When the thing was created.
    pub created_at: DateTime<Utc>,
    /// Who created it, if known.
    #[serde(default)]
    pub created_by: Option<ActorId>,
    /// When it was last changed (the creation counts as a change).
    pub updated_at: DateTime<Utc>,
    /// Who changed it last, if known.
    #[serde(default)]
    pub updated_by: Option<ActorId>,
    /// How many changes it has had, the creation included.
    pub version: u64,
}

impl Audit {
    /// The audit trail of something created at `at` by `by`: created and
    /// updated fields the same, version 1.
    pub fn new(at: DateTime<Utc>, by: Option<ActorId>) -> Self {
        Self {
            created_at: at,
            created_by: by.clone(),
            updated_at: at,
            updated_by: by,
            version: 1,
        }
    }

    /// Records one more change, made at `at` by `by`: sets the updated fields
    /// and adds one to the version.
    pub fn record_change(&mut self, at: DateTime<Utc>, by: Option<ActorId>) {
        self.updated_at = at;
        self.updated_by = by;
        self.version += 1;
    }

    /// Records the event whose metadata is `metadata` on `audit`, creating the
    /// trail if this is the first event.
    pub(crate) fn record_event(audit: &mut Option<Audit>, metadata: &EventMetadata) {
        match audit {
            Some(audit) => audit.record_change(metadata.occurred_at, metadata.actor.clone()),
            None => *audit = Some(Audit::new(metadata.occurred_at, metadata.actor.clone())),
        }
    }
}

/// A thing with an identity: two entities with the same id are the same
/// entity, whatever their state.
///
/// `audit` returns an `Option` because a brand-new aggregate root, before its
/// first event, has not been created yet: it has no creation time or actor to
/// report, and inventing placeholder ones would put false data in snapshots
/// and read models. An entity stored as a row always returns `Some`.
///
/// ```
/// use chrono::Utc;
/// use vextrus_kernel::{ActorId, Audit, Entity};
///
/// /// A customer kept as a plain table row, not event-sourced.
/// struct Customer {
///     id: u64,
///     name: String,
///     audit: Audit,
/// }
///
/// impl Customer {
///     fn rename(&mut self, name: &str, by: ActorId) {
///         self.name = name.to_owned();
///         self.audit.record_change(Utc::now(), Some(by));
///     }
/// }
///
/// impl Entity for Customer {
///     type Id = u64;
///     fn id(&self) -> &u64 {
///         &self.id
///     }
///     fn audit(&self) -> Option<&Audit> {
///         Some(&self.audit)
///     }
/// }
///
/// let creator = ActorId::new("user:1").unwrap();
/// let mut customer =
///     Customer { id: 7, name: "Acme".into(), audit: Audit::new(Utc::now(), Some(creator)) };
/// let before = Customer { id: 7, name: "Other".into(), audit: customer.audit.clone() };
/// customer.rename("Acme Ltd.", ActorId::new("user:2").unwrap());
///
/// assert!(customer.same_identity_as(&before));
/// assert_eq!(customer.audit().unwrap().version, 2);
/// assert_eq!(customer.audit().unwrap().updated_by.as_ref().unwrap().as_str(), "user:2");
/// ```
pub trait Entity {
    /// The type of the entity's identity.
    type Id: PartialEq + fmt::Debug;

    /// The entity's identity.
    fn id(&self) -> &Self::Id;

    /// The entity's audit trail, or `None` if it has not been created yet
    /// (an aggregate root with no events).
    fn audit(&self) -> Option<&Audit>;

    /// Whether `self` and `other` are the same entity (have the same id),
    /// regardless of their state.
    fn same_identity_as(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn record_event_creates_then_updates() {
        let t0 = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        let t1 = Utc.with_ymd_and_hms(2025, 3, 2, 0, 0, 0).unwrap();
        let a = ActorId::new("a").unwrap();
        let first = EventMetadata::new()
            .with_occurred_at(t0)
            .with_actor(a.clone());
        let second = EventMetadata::new().with_occurred_at(t1);

        let mut audit = None;
        Audit::record_event(&mut audit, &first);
        assert_eq!(audit, Some(Audit::new(t0, Some(a.clone()))));
        Audit::record_event(&mut audit, &second);
        let audit = audit.unwrap();
        assert_eq!(audit.created_at, t0);
        assert_eq!(audit.created_by, Some(a));
        assert_eq!(audit.updated_at, t1);
        assert_eq!(audit.updated_by, None);
        assert_eq!(audit.version, 2);
    }

    #[test]
    fn deserialize_tolerates_missing_actors_and_rejects_bad_ones() {
        let json = r#"{"created_at":"2025-01-01T00:00:00Z","updated_at":"2025-01-01T00:00:00Z","version":1}"#;
        let audit: Audit = serde_json::from_str(json).unwrap();
        assert_eq!(audit.created_by, None);
        let bad = r#"{"created_at":"2025-01-01T00:00:00Z","created_by":"","updated_at":"2025-01-01T00:00:00Z","version":1}"#;
        assert!(serde_json::from_str::<Audit>(bad).is_err());
    }
}
