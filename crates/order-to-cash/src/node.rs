//! Running the parts of order-to-cash over a broker: the roles, the brokers
//! and the pieces each role starts.
//!
//! | role | what runs |
//! |---|---|
//! | `orchestrator` | Sales (local steps), the saga workers, the relay of the saga store's outbox (commands) and the reply consumer ([`serve_replies`]) |
//! | `inventory`, `payment`, `shipping`, `accounting` | the participant's serving loop ([`participant::serve`]) and the relay of its own outbox (replies) |
//! | `all` | every role, in one process |
//!
//! A [`Broker`] gives a role its [`Transport`] and its [`MessageSource`]s:
//! [`InProcessBroker`] (one process), [`NatsBroker`] (JetStream; one stream
//! per namespace covering every destination) or [`KafkaBroker`] (one topic
//! per destination). On the real brokers every destination is prefixed by a
//! namespace ([`Namespaced`]), so runs sharing a broker never see each
//! other's messages.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use vextrus_core::outbox::{
    Backoff, DeadLetters, OutboxClaimer, OutboxRelay, RelayConfig, RelayHandle,
};
use vextrus_core::saga::{Orchestrator, ReplyDisposition, SagaError, SagaReply, SagaStore};
use vextrus_core::transport::{
    InProcessSubscription, InProcessTransport, MessageDelivery, MessageSource, OutboundMessage,
    Transport, TransportError,
};

use crate::error::{Error, Result};
use crate::participant::{self, Participant, ReplyOutbox, ServeConfig};
use crate::saga::{ACCOUNTING, INVENTORY, PAYMENT, REPLIES, SHIPPING};

/// Every destination of the order-to-cash system.
pub const DESTINATIONS: [&str; 5] = [INVENTORY, PAYMENT, SHIPPING, ACCOUNTING, REPLIES];

/// The orchestrator's inbox consumer name.
pub const ORCHESTRATOR_CONSUMER: &str = "orchestrator";

/// One part of the system, as `vextrus serve --role` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sales, the saga workers, the command relay and the reply inbox.
    Orchestrator,
    /// The inventory participant and its reply relay.
    Inventory,
    /// The payment participant and its reply relay.
    Payment,
    /// The shipping participant and its reply relay.
    Shipping,
    /// The accounting participant and its reply relay.
    Accounting,
    /// Everything, in one process.
    All,
}

impl Role {
    /// Whether this role runs `part` (`All` runs everything).
    pub fn runs(self, part: Role) -> bool {
        self == Role::All || self == part
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Orchestrator => "orchestrator",
            Role::Inventory => "inventory",
            Role::Payment => "payment",
            Role::Shipping => "shipping",
            Role::Accounting => "accounting",
            Role::All => "all",
        }
    }
}

impl FromStr for Role {
    type Err = Error;

    /// Parses a role name (`sales` is the orchestrator: Sales runs with it).
    ///
    /// ```
    /// use vextrus_order_to_cash::node::Role;
    /// assert_eq!("payment".parse::<Role>().unwrap(), Role::Payment);
    /// assert_eq!("sales".parse::<Role>().unwrap(), Role::Orchestrator);
    /// assert!("billing".parse::<Role>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "orchestrator" | "sales" => Role::Orchestrator,
            "inventory" => Role::Inventory,
            "payment" => Role::Payment,
            "shipping" => Role::Shipping,
            "accounting" => Role::Accounting,
            "all" => Role::All,
            other => {
                return Err(Error::invalid(
                    "role",
                    format!(
                        "{other:?}: expected orchestrator, sales, inventory, payment, shipping, accounting or all"
                    ),
                ));
            }
        })
    }
}

/// Which broker a URL names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerUrl {
    /// In this process (no URL, or `inprocess:`).
    InProcess,
    /// NATS JetStream at this `nats://host:port` URL.
    Nats(String),
    /// Kafka at these bootstrap servers (`kafka://host:port[,host:port]`).
    Kafka(String),
}

impl BrokerUrl {
    /// Parses a broker URL; `None` is the in-process broker.
    ///
    /// ```
    /// use vextrus_order_to_cash::node::BrokerUrl;
    /// assert_eq!(BrokerUrl::parse(None).unwrap(), BrokerUrl::InProcess);
    /// assert_eq!(BrokerUrl::parse(Some("kafka://127.0.0.1:9092")).unwrap(), BrokerUrl::Kafka("127.0.0.1:9092".into()));
    /// assert!(matches!(BrokerUrl::parse(Some("nats://127.0.0.1:4222")).unwrap(), BrokerUrl::Nats(_)));
    /// assert!(BrokerUrl::parse(Some("amqp://x")).is_err());
    /// ```
    pub fn parse(url: Option<&str>) -> Result<Self> {
        match url {
            None | Some("inprocess:") | Some("inprocess") => Ok(BrokerUrl::InProcess),
            Some(u) if u.starts_with("nats://") => Ok(BrokerUrl::Nats(u.to_owned())),
            Some(u) if u.starts_with("kafka://") => {
                let brokers = u.trim_start_matches("kafka://").trim_end_matches('/');
                if brokers.is_empty() {
                    return Err(Error::invalid("broker url", "kafka:// names no server"));
                }
                Ok(BrokerUrl::Kafka(brokers.to_owned()))
            }
            Some(other) => Err(Error::invalid(
                "broker url",
                format!("{other:?}: expected nats://host:port or kafka://host:port"),
            )),
        }
    }
}

/// What a role needs from a broker: a transport to publish with, and a
/// source per (destination, consumer).
pub trait Broker: Clone + Send + Sync + 'static {
    /// The transport relays publish with.
    type Transport: Transport + Clone + 'static;
    /// One delivery.
    type Delivery: MessageDelivery + Sync + 'static;
    /// A subscription.
    type Source: MessageSource<Delivery = Self::Delivery> + Sync + 'static;

    /// The transport.
    fn transport(&self) -> Self::Transport;

    /// A durable subscription of `consumer` to `destination`: every message
    /// published there is delivered to one of the consumer's subscriptions,
    /// and redelivered until acknowledged.
    fn subscribe(
        &self,
        destination: &str,
        consumer: &str,
    ) -> impl Future<Output = Result<Self::Source>> + Send;
}

/// The broker of a single process.
#[derive(Debug, Clone, Default)]
pub struct InProcessBroker {
    transport: InProcessTransport,
}

impl InProcessBroker {
    /// A broker with every o2c destination declared.
    pub fn new() -> Self {
        let transport = InProcessTransport::new();
        for d in DESTINATIONS {
            transport.declare(d);
        }
        Self { transport }
    }
}

impl Broker for InProcessBroker {
    type Transport = InProcessTransport;
    type Delivery = <InProcessSubscription as MessageSource>::Delivery;
    type Source = InProcessSubscription;

    fn transport(&self) -> InProcessTransport {
        self.transport.clone()
    }

    async fn subscribe(&self, destination: &str, _consumer: &str) -> Result<InProcessSubscription> {
        Ok(self.transport.subscribe(destination)?)
    }
}

/// A transport that publishes `d` to `{namespace}.{d}`.
#[derive(Debug, Clone)]
pub struct Namespaced<T> {
    inner: T,
    namespace: String,
}

impl<T> Namespaced<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, namespace: impl Into<String>) -> Self {
        Self {
            inner,
            namespace: namespace.into(),
        }
    }

    /// The namespaced name of `destination`.
    pub fn name(&self, destination: &str) -> String {
        format!("{}.{destination}", self.namespace)
    }

    fn rename(&self, message: &OutboundMessage) -> OutboundMessage {
        let mut m = message.clone();
        m.destination = self.name(&message.destination);
        m
    }
}

impl<T: Transport> Transport for Namespaced<T> {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        self.inner.publish(&self.rename(message)).await
    }

    async fn publish_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<(), TransportError>> {
        let renamed: Vec<_> = messages.iter().map(|m| self.rename(m)).collect();
        self.inner.publish_batch(&renamed).await
    }
}

fn transport_error(e: impl std::fmt::Display) -> Error {
    Error::Transport(TransportError::Unavailable(e.to_string()))
}

/// NATS JetStream: one stream `O2C_{namespace}` over `{namespace}.o2c.>`,
/// one durable pull consumer per (destination, consumer).
#[derive(Debug, Clone)]
pub struct NatsBroker {
    transport: Namespaced<vextrus_nats::JetStreamTransport>,
    stream: String,
}

impl NatsBroker {
    /// Connects to `url` and creates (or updates) the namespace's stream.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        let stream = format!("O2C_{}", namespace.replace(['.', '-', '*', '>'], "_"));
        let config = vextrus_nats::JetStreamConfig::new(url)
            .with_stream(
                vextrus_nats::StreamSpec::new(stream.clone(), [format!("{namespace}.o2c.>")])
                    .with_max_age(Duration::from_secs(24 * 3600)),
            )
            .with_publish_timeout(Duration::from_secs(10));
        let transport = vextrus_nats::JetStreamTransport::connect(config)
            .await
            .map_err(transport_error)?;
        Ok(Self {
            transport: Namespaced::new(transport, namespace),
            stream,
        })
    }
}

impl Broker for NatsBroker {
    type Transport = Namespaced<vextrus_nats::JetStreamTransport>;
    type Delivery = vextrus_nats::Delivery;
    type Source = vextrus_nats::JetStreamSource;

    fn transport(&self) -> Self::Transport {
        self.transport.clone()
    }

    async fn subscribe(&self, destination: &str, consumer: &str) -> Result<Self::Source> {
        let subject = self.transport.name(destination);
        let durable = format!("{consumer}-{}", destination.replace('.', "_"));
        let spec = vextrus_nats::ConsumerSpec::new(self.stream.clone(), durable)
            .with_filter_subject(subject)
            .with_ack_wait(Duration::from_secs(30))
            .with_max_deliver(10_000)
            .with_max_ack_pending(4_096);
        vextrus_nats::JetStreamSource::with_context(self.transport.inner.jetstream().clone(), spec)
            .await
            .map_err(transport_error)
    }
}

/// Kafka: one topic per namespaced destination (created if missing), one
/// consumer group per (namespace, consumer).
#[derive(Debug, Clone)]
pub struct KafkaBroker {
    transport: Namespaced<vextrus_kafka::KafkaTransport>,
    config: vextrus_kafka::KafkaConfig,
}

impl KafkaBroker {
    /// Connects to `brokers` (`host:port[,host:port]`) and creates the
    /// namespace's topics.
    pub async fn connect(brokers: &str, namespace: &str) -> Result<Self> {
        // One record per producer batch: a consumer that seeks back (a
        // nack) into the middle of a stored batch waits on some
        // Kafka-protocol brokers (see vextrus-kafka's docs).
        let config = vextrus_kafka::KafkaConfig::new(brokers)
            .with_client_id(format!("vextrus-o2c-{namespace}"))
            .with_delivery_timeout(Duration::from_secs(20))
            .with_metadata_timeout(Duration::from_secs(10))
            .with_property("batch.num.messages", "1");
        for d in DESTINATIONS {
            vextrus_kafka::create_topic(&config, &format!("{namespace}.{d}"), 4)
                .await
                .map_err(transport_error)?;
        }
        let transport =
            vextrus_kafka::KafkaTransport::new(config.clone()).map_err(transport_error)?;
        Ok(Self {
            transport: Namespaced::new(transport, namespace),
            config,
        })
    }
}

impl Broker for KafkaBroker {
    type Transport = Namespaced<vextrus_kafka::KafkaTransport>;
    type Delivery = vextrus_kafka::Delivery;
    type Source = vextrus_kafka::KafkaSource;

    fn transport(&self) -> Self::Transport {
        self.transport.clone()
    }

    async fn subscribe(&self, destination: &str, consumer: &str) -> Result<Self::Source> {
        let topic = self.transport.name(destination);
        let group = format!("{}.{consumer}", self.transport.namespace);
        vextrus_kafka::KafkaSource::connect(
            self.config.clone(),
            vextrus_kafka::ConsumerSpec::new(group, [topic]),
        )
        .map_err(transport_error)
    }
}

/// A running participant: its serving loop and, unless another relay of
/// the process publishes its database's outbox, its reply relay.
#[derive(Debug)]
pub struct RunningParticipant {
    serve: JoinHandle<Result<()>>,
    relay: Option<RelayHandle>,
}

impl RunningParticipant {
    /// Stops the serving loop (unacknowledged deliveries come back) and the
    /// relay (after its current batch).
    pub async fn stop(self) -> Result<()> {
        self.serve.abort();
        if let Some(relay) = self.relay {
            relay.shutdown().await?;
        }
        Ok(())
    }
}

/// The relay settings of the o2c roles: small batches published at once,
/// short polls (a participant's replies are enqueued through its own SQL
/// connection, so SQLite relays learn of them by polling), many attempts.
pub fn relay_config(name: impl Into<String>) -> RelayConfig {
    let mut c = RelayConfig::new(name);
    c.batch_size = 256;
    c.poll_interval = Duration::from_millis(5);
    c.max_attempts = 1_000;
    c.backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2), 2.0);
    c.lease = Duration::from_secs(30);
    c
}

/// The fallback poll of relays woken by LISTEN/NOTIFY (PostgreSQL): every
/// enqueuer notifies after its commits (coalesced), so the poll only covers
/// a lost notification or a retry's backoff coming due.
pub const LISTENING_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// [`relay_config`] for an outbox whose enqueuers wake its relays
/// (PostgreSQL's `NOTIFY vextrus_outbox`, sent after commits by
/// `PgOutbox` and, for replies enqueued through
/// [`vextrus_postgres::any::enqueue`], by [`participant::serve`]'s
/// [`vextrus_postgres::any::RelayWaker`]): the same, with a
/// [`LISTENING_POLL_INTERVAL`] fallback poll instead of 5 ms, and gauges
/// refreshed every 5 s, so an idle relay costs a few statements a second,
/// not hundreds.
pub fn listening_relay_config(name: impl Into<String>) -> RelayConfig {
    let mut c = relay_config(name);
    c.poll_interval = LISTENING_POLL_INTERVAL;
    c.metrics_interval = Duration::from_secs(5);
    c
}

/// Starts `participant` on `broker`: its serving loop on `destination` and
/// a relay of its reply outbox (`outbox`, opened on the participant's
/// database).
pub async fn start_participant<B, P>(
    broker: &B,
    participant: Arc<P>,
    outbox: &ReplyOutbox,
    destination: &str,
    serve: ServeConfig,
) -> Result<RunningParticipant>
where
    B: Broker,
    P: Participant + 'static,
{
    let mut running =
        start_participant_served_by_shared_relay(broker, participant, destination, serve).await?;
    running.relay = Some(outbox.spawn_relay(
        broker.transport(),
        outbox.relay_config(format!("{}-relay-{}", P::NAME, std::process::id())),
    ));
    Ok(running)
}

/// Starts `participant`'s serving loop on `destination` without a relay of
/// its own: for a process where one relay already publishes the outbox of
/// the participant's database (on PostgreSQL every role may share one
/// database, and so one `vextrus_outbox` table: one relay per database
/// instead of one per role, e.g. the orchestrator's from
/// [`start_orchestrator_with`]). Replies wait there until that relay runs.
pub async fn start_participant_served_by_shared_relay<B, P>(
    broker: &B,
    participant: Arc<P>,
    destination: &str,
    serve: ServeConfig,
) -> Result<RunningParticipant>
where
    B: Broker,
    P: Participant + 'static,
{
    let source = broker.subscribe(destination, P::NAME).await?;
    let serve = tokio::spawn(participant::serve(participant, source, serve));
    Ok(RunningParticipant { serve, relay: None })
}

/// The orchestrator's transport side: the relay of the saga store's outbox
/// (commands to participants) and the reply consumer.
#[derive(Debug)]
pub struct RunningOrchestrator {
    relay: RelayHandle,
    replies: JoinHandle<Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl RunningOrchestrator {
    /// Stops taking replies (those being handled finish; unacknowledged
    /// ones come back) and the relay (after its current batch).
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let replies = self.replies.await;
        self.relay.shutdown().await?;
        match replies {
            Ok(r) => r,
            Err(e) => Err(Error::invalid("reply consumer", e.to_string())),
        }
    }
}

/// How many replies the orchestrator handles at once.
pub const REPLY_CONCURRENCY: usize = 64;

/// Starts the orchestrator's relay over `outbox` (where the saga store
/// writes its commands) and its reply consumer: [`REPLIES`] fed to
/// `orchestrator` through [`Orchestrator::handle_reply`], up to
/// [`REPLY_CONCURRENCY`] at once (see [`serve_replies`]). The saga workers
/// themselves run with [`Orchestrator::run`].
pub async fn start_orchestrator<B, S, O>(
    broker: &B,
    orchestrator: Orchestrator<S>,
    outbox: O,
) -> Result<RunningOrchestrator>
where
    B: Broker,
    S: SagaStore + Clone + Send + Sync + 'static,
    O: OutboxClaimer + DeadLetters + Clone + Send + Sync + 'static,
{
    let relay = relay_config(format!("orchestrator-relay-{}", std::process::id()));
    start_orchestrator_with(broker, orchestrator, outbox, relay).await
}

/// [`start_orchestrator`] with the relay's settings given: on PostgreSQL,
/// [`listening_relay_config`] (the saga store's commits notify the relay).
pub async fn start_orchestrator_with<B, S, O>(
    broker: &B,
    orchestrator: Orchestrator<S>,
    outbox: O,
    relay: RelayConfig,
) -> Result<RunningOrchestrator>
where
    B: Broker,
    S: SagaStore + Clone + Send + Sync + 'static,
    O: OutboxClaimer + DeadLetters + Clone + Send + Sync + 'static,
{
    let relay = OutboxRelay::new(outbox.clone(), broker.transport(), relay).spawn();
    let source = broker.subscribe(REPLIES, ORCHESTRATOR_CONSUMER).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let replies = tokio::spawn(serve_replies(
        orchestrator,
        source,
        REPLY_CONCURRENCY,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    Ok(RunningOrchestrator {
        relay,
        replies,
        stop,
    })
}

/// The delay before a reply that could not be handled now (its saga leased
/// by a worker driving it, the database busy) is delivered again: 5 ms,
/// doubling per delivery, at most 500 ms, full jitter.
pub fn reply_redelivery_delay(delivery_attempt: u32) -> Duration {
    Backoff::new(Duration::from_millis(5), Duration::from_millis(500), 2.0).delay(delivery_attempt)
}

/// Feeds the replies of `source` to `orchestrator` until `shutdown`
/// resolves or the source closes, up to `concurrency` at once, each in a
/// consume span continuing the reply's trace.
///
/// No inbox table is needed: the saga store records the reply's message id
/// in the same transaction as the transition it causes, so a redelivered
/// reply is a no-op ([`ReplyDisposition::Duplicate`]), and the
/// acknowledgement follows that commit. A reply that cannot be handled now
/// (its saga leased by a worker driving it, a busy database) is
/// negatively acknowledged and comes back after
/// [`reply_redelivery_delay`]; a payload that is not a saga reply is
/// logged and acknowledged (it can never succeed). Replies are handled
/// concurrently because each costs a few transactions: one at a time, a
/// SQLite saga store spent most of a remote step's latency queued here.
pub async fn serve_replies<S, Src>(
    orchestrator: Orchestrator<S>,
    mut source: Src,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<()>
where
    S: SagaStore + Clone + Send + Sync + 'static,
    Src: MessageSource,
    Src::Delivery: 'static,
{
    let concurrency = concurrency.max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break,
            d = source.next() => match d? {
                Some(d) => d,
                None => break,
            },
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::invalid("replies", "semaphore closed"))?;
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let message = delivery.message();
            let span = vextrus_telemetry::spans::message_consume(
                message.id,
                &message.source,
                &message.headers,
            );
            let handled = tracing::Instrument::instrument(
                async {
                    let reply = SagaReply::from_inbound(message)?;
                    orchestrator.handle_reply(&reply).await
                },
                span,
            )
            .await;
            match handled {
                Ok(
                    ReplyDisposition::Applied
                    | ReplyDisposition::Ignored
                    | ReplyDisposition::Duplicate,
                ) => {
                    let _ = delivery.ack().await;
                }
                Err(SagaError::InvalidMessage(reason)) => {
                    tracing::error!(%reason, "undecodable saga reply dropped");
                    let _ = delivery.ack().await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reply not handled; redelivering");
                    let delay = reply_redelivery_delay(delivery.message().delivery_attempt);
                    let _ = delivery.nack(delay).await;
                }
            }
        });
    }
    // Let the replies being handled finish (their commits are what count).
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        permits.acquire_many(u32::try_from(concurrency).unwrap_or(u32::MAX)),
    )
    .await;
    Ok(())
}
