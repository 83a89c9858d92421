//! Connection, stream and consumer configuration.

use std::time::Duration;

use crate::error::{NatsError, Result};

/// The URL used when none is given: the local server.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// JetStream's own default duplicate window (two minutes).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How a [`JetStreamTransport`](crate::JetStreamTransport) connects and which
/// streams it relies on.
///
/// Built with `new` and `with_*` methods that take and return `self`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_nats::{JetStreamConfig, StreamSpec};
///
/// let config = JetStreamConfig::new("nats://127.0.0.1:4222")
///     .with_stream(
///         StreamSpec::new("ORDERS", ["orders.>"]).with_duplicate_window(Duration::from_secs(600)),
///     )
///     .with_publish_timeout(Duration::from_secs(2));
/// assert_eq!(config.stream_for_subject("orders.placed").unwrap().name(), "ORDERS");
/// assert!(config.stream_for_subject("billing.issued").is_none());
/// ```
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    pub(crate) url: String,
    pub(crate) streams: Vec<StreamSpec>,
    pub(crate) ensure_streams: bool,
    pub(crate) subject_prefix: Option<String>,
    pub(crate) publish_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_ack_inflight: usize,
    pub(crate) max_reconnect_delay: Duration,
    pub(crate) name: Option<String>,
}

impl JetStreamConfig {
    /// A configuration for the server at `url` (`nats://host:port`; several
    /// servers separated by commas), with no streams declared, a 5 s publish
    /// timeout, a 2 s connect timeout and up to 4096 unconfirmed publishes in
    /// flight.
    pub fn new(url: impl Into<String>) -> Self {
        JetStreamConfig {
            url: url.into(),
            streams: Vec::new(),
            ensure_streams: true,
            subject_prefix: None,
            publish_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_ack_inflight: 4096,
            max_reconnect_delay: Duration::from_secs(1),
            name: None,
        }
    }

    /// Declares a stream. When streams are declared, a destination that none
    /// of their subjects covers is an
    /// [`UnknownDestination`](NatsError::UnknownDestination) before anything
    /// is sent; with none declared, the server decides (no stream answers:
    /// also `UnknownDestination`).
    pub fn with_stream(mut self, stream: StreamSpec) -> Self {
        self.streams.push(stream);
        self
    }

    /// Whether [`JetStreamTransport::connect`](crate::JetStreamTransport::connect)
    /// creates missing streams (`true`, the default) or only checks that they
    /// exist with the declared subjects and duplicate window (`false`: for
    /// deployments whose streams an operator owns).
    pub fn with_ensure_streams(mut self, ensure: bool) -> Self {
        self.ensure_streams = ensure;
        self
    }

    /// Prepends `prefix.` to every destination to form the subject
    /// (`prefix = "prod"`: destination `orders.placed` goes to
    /// `prod.orders.placed`).
    pub fn with_subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = Some(prefix.into());
        self
    }

    /// How long a publish may wait for the server's ack (and JetStream API
    /// calls for their answer) before it fails with
    /// [`NatsError::Timeout`].
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long the first connect may take before it fails with
    /// [`NatsError::Unavailable`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many publishes may await their ack at once; `publish_batch`
    /// pipelines at most this many before awaiting their acks.
    pub fn with_max_ack_inflight(mut self, max: usize) -> Self {
        self.max_ack_inflight = max.max(1);
        self
    }

    /// The longest pause between reconnect attempts after the connection is
    /// lost (attempts back off from 10 ms up to this; default 1 s, so a
    /// restarted server is found again quickly).
    pub fn with_max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// The client name the server shows in its connection list.
    pub fn with_client_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The declared streams.
    pub fn streams(&self) -> &[StreamSpec] {
        &self.streams
    }

    /// The publish timeout.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// The subject a destination is published to (the destination itself,
    /// or `prefix.destination`).
    pub fn subject_for(&self, destination: &str) -> String {
        match &self.subject_prefix {
            Some(prefix) => format!("{prefix}.{destination}"),
            None => destination.to_owned(),
        }
    }

    /// The declared stream whose subjects cover `subject`, if any.
    pub fn stream_for_subject(&self, subject: &str) -> Option<&StreamSpec> {
        self.streams
            .iter()
            .find(|stream| stream.subjects.iter().any(|p| subject_matches(p, subject)))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.publish_timeout.is_zero() {
            return Err(NatsError::InvalidConfig(
                "publish timeout must be positive".into(),
            ));
        }
        for stream in &self.streams {
            stream.validate()?;
        }
        Ok(())
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig::new(DEFAULT_URL)
    }
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StreamStorage {
    /// On disk: survives a server restart (the default).
    #[default]
    File,
    /// In memory: lost when the server stops.
    Memory,
}

/// A JetStream stream the transport publishes into: its name, the subjects it
/// stores and its duplicate window.
///
/// The duplicate window makes the server drop a second publish with the same
/// `Nats-Msg-Id` within the window. It is a convenience only: a relay paused
/// longer than the window publishes a true duplicate, so consumers rely on
/// the inbox, not on the window, for exactly-once effects.
///
/// ```
/// use std::time::Duration;
/// use vextrus_nats::{StreamSpec, StreamStorage};
///
/// let spec = StreamSpec::new("BILLING", ["billing.*", "invoices.>"])
///     .with_duplicate_window(Duration::from_secs(300))
///     .with_max_age(Duration::from_secs(7 * 24 * 3600))
///     .with_storage(StreamStorage::File);
/// assert!(spec.covers("invoices.issued.eu"));
/// assert!(!spec.covers("billing.a.b"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub(crate) name: String,
    pub(crate) subjects: Vec<String>,
    pub(crate) duplicate_window: Duration,
    pub(crate) max_age: Duration,
    pub(crate) storage: StreamStorage,
    pub(crate) replicas: usize,
    pub(crate) max_message_size: Option<i32>,
}

impl StreamSpec {
    /// A file-backed, single-replica stream named `name` storing `subjects`
    /// (NATS wildcards `*` and `>` allowed), with JetStream's default
    /// two-minute duplicate window and no age limit.
    pub fn new<I, S>(name: impl Into<String>, subjects: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StreamSpec {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_age: Duration::ZERO,
            storage: StreamStorage::File,
            replicas: 1,
            max_message_size: None,
        }
    }

    /// Sets the duplicate window.
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Drops messages older than `age` (zero: keep them forever).
    pub fn with_max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// Sets the storage.
    pub fn with_storage(mut self, storage: StreamStorage) -> Self {
        self.storage = storage;
        self
    }

    /// Sets the number of replicas (clustered servers only).
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Limits a single message's size in the stream (below the server's
    /// `max_payload`).
    pub fn with_max_message_size(mut self, bytes: i32) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subjects (patterns) the stream stores.
    pub fn subjects(&self) -> &[String] {
        &self.subjects
    }

    /// The duplicate window.
    pub fn duplicate_window(&self) -> Duration {
        self.duplicate_window
    }

    /// Whether one of the stream's subject patterns matches `subject`.
    pub fn covers(&self, subject: &str) -> bool {
        self.subjects.iter().any(|p| subject_matches(p, subject))
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || self
                .name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(NatsError::InvalidConfig(format!(
                "stream name `{}` must be non-empty without whitespace, `.`, `*`, `>`, `/` or `\\`",
                self.name
            )));
        }
        if self.subjects.is_empty() {
            return Err(NatsError::InvalidConfig(format!(
                "stream `{}` declares no subjects",
                self.name
            )));
        }
        for subject in &self.subjects {
            validate_subject(subject, true)?;
        }
        Ok(())
    }
}

/// Checks that `subject` is a valid NATS subject: non-empty tokens separated
/// by `.`, no whitespace; wildcards (`*` as a whole token, `>` as the last
/// token) only when `allow_wildcards`.
pub(crate) fn validate_subject(subject: &str, allow_wildcards: bool) -> Result<()> {
    let invalid = |reason| {
        Err(NatsError::InvalidSubject {
            subject: subject.to_owned(),
            reason,
        })
    };
    if subject.is_empty() {
        return invalid("empty");
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("contains whitespace or a control character");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return invalid("contains an empty token");
        }
        let wildcard = *token == "*" || *token == ">";
        if wildcard && !allow_wildcards {
            return invalid("wildcards are not allowed in a destination");
        }
        if *token == ">" && i + 1 != tokens.len() {
            return invalid("`>` must be the last token");
        }
        if !wildcard && (token.contains('*') || token.contains('>')) {
            return invalid("`*` and `>` must be whole tokens");
        }
    }
    Ok(())
}

/// Whether the NATS subject pattern `pattern` matches the literal `subject`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns_match_like_nats() {
        assert!(subject_matches("orders.>", "orders.placed"));
        assert!(subject_matches("orders.>", "orders.placed.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.placed"));
        assert!(!subject_matches("orders.*", "orders.placed.eu"));
        assert!(subject_matches("*.placed", "orders.placed"));
        assert!(subject_matches("orders.placed", "orders.placed"));
        assert!(!subject_matches("orders.placed", "orders.shipped"));
        assert!(!subject_matches("orders.placed.eu", "orders.placed"));
    }

    #[test]
    fn destinations_must_be_literal_subjects() {
        assert!(validate_subject("orders.placed", false).is_ok());
        for bad in [
            "",
            "orders..placed",
            "orders.*",
            "orders.>",
            "a b",
            "orders.pl*ced",
            ".x",
        ] {
            assert!(
                matches!(
                    validate_subject(bad, false),
                    Err(NatsError::InvalidSubject { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(validate_subject("orders.>", true).is_ok());
        assert!(validate_subject("orders.>.x", true).is_err());
    }

    #[test]
    fn config_validation_rejects_bad_streams() {
        let bad_name = JetStreamConfig::default().with_stream(StreamSpec::new("A.B", ["a.>"]));
        assert!(matches!(
            bad_name.validate(),
            Err(NatsError::InvalidConfig(_))
        ));
        let no_subjects =
            JetStreamConfig::default().with_stream(StreamSpec::new("A", Vec::<String>::new()));
        assert!(matches!(
            no_subjects.validate(),
            Err(NatsError::InvalidConfig(_))
        ));
        let ok = JetStreamConfig::default().with_stream(StreamSpec::new("A", ["a.>"]));
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn prefix_forms_the_subject() {
        let config = JetStreamConfig::default().with_subject_prefix("prod");
        assert_eq!(config.subject_for("orders.placed"), "prod.orders.placed");
        assert_eq!(JetStreamConfig::default().subject_for("x"), "x");
    }
}
