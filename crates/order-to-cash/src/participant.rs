//! What every SQL-backed participant has in common: a named store, typed
//! commands and replies, and the one-transaction handler around them.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::AnyConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
use vextrus_core::outbox::{Backoff, OutboxRelay, RelayConfig, RelayHandle};
use vextrus_core::saga::{ReplyOutcome, SagaCommand, SagaReply, compensated_action_key};
use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageId, MessageSource, OutboundMessage, Transport,
};
use vextrus_core::unit_of_work::InboxRecord;
use vextrus_kernel::HasErrorKind;
use vextrus_postgres::{PgEventStore, PgOutbox, PgStoreConfig};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

use crate::db::{self, Backend, Database, Durability, IdempotencyKey};
use crate::error::{Error, Result};
use crate::faults::FaultInjector;

/// A participant of the order-to-cash saga (inventory, payment, shipping,
/// accounting): commands in, replies out, state in its own [`Database`].
///
/// Implementors write [`Participant::apply`] (the state change, given the
/// open transaction); the provided [`Participant::handle`] and
/// [`Participant::handle_in_tx`] wrap it in the idempotency protocol:
///
/// 1. claim the key (`INSERT ... ON CONFLICT DO NOTHING`); a key used before
///    for the same command returns its stored reply and writes nothing, a key
///    used for another command is [`Error::KeyReused`], and a saga action's
///    key that its compensation fenced (below) is [`Error::Fenced`];
/// 2. for a saga compensation's key
///    ([`compensated_action_key`]), fence the compensated action's key: if
///    the action has not run here, it never will (it may still be on its way
///    after the orchestrator timed it out);
/// 3. apply the command;
/// 4. store the reply under the key;
/// 5. commit, all of it in one transaction.
///
/// Business failures (out of stock, declined) are replies, stored like any
/// other, so a redelivered command gets the same answer.
pub trait Participant: Send + Sync {
    /// The participant's name, also its tables' prefix.
    const NAME: &'static str;
    /// What it can be asked to do.
    type Command: Serialize + DeserializeOwned + Send + Sync + std::fmt::Debug;
    /// What it answers.
    type Reply: Serialize + DeserializeOwned + Send + Sync + std::fmt::Debug;

    /// The reason, if `reply` is a business failure (out of stock,
    /// declined, refused): the saga compensates instead of going on.
    fn business_failure(reply: &Self::Reply) -> Option<String>;

    /// The participant's store.
    fn database(&self) -> &Database;

    /// The failure injector it consults.
    fn faults(&self) -> &Arc<FaultInjector>;

    /// Applies `command` inside the caller's transaction and returns the
    /// reply. Does not deal with idempotency (the provided methods do).
    fn apply(
        &self,
        conn: &mut AnyConnection,
        key: &IdempotencyKey,
        command: &Self::Command,
    ) -> impl Future<Output = Result<Self::Reply>> + Send;

    /// Runs `command` under `key` inside a transaction the caller owns (so
    /// that an inbox record and an outgoing reply can share it): claim, apply,
    /// store the reply. Nothing is visible until the caller commits.
    fn handle_in_tx(
        &self,
        conn: &mut AnyConnection,
        key: &IdempotencyKey,
        command: &Self::Command,
    ) -> impl Future<Output = Result<Self::Reply>> + Send {
        async move {
            if let Some(reply) =
                db::claim::<_, Self::Reply>(&mut *conn, Self::NAME, key, command).await?
            {
                return Ok(reply);
            }
            if let Some(action) = compensated_action_key(key.as_str()) {
                db::fence(&mut *conn, Self::NAME, &action).await?;
            }
            let reply = self.apply(&mut *conn, key, command).await?;
            db::store_reply(&mut *conn, Self::NAME, key, &reply).await?;
            Ok(reply)
        }
    }

    /// Runs `command` under `key` in its own transaction, with failure
    /// injection: a crash fails the delivery before commit (nothing written),
    /// a timeout holds the reply after commit.
    fn handle(
        &self,
        key: &IdempotencyKey,
        command: &Self::Command,
    ) -> impl Future<Output = Result<Self::Reply>> + Send {
        async move {
            let turn = self.database().write_turn().await;
            let mut tx = self.database().begin().await?;
            let reply = self.handle_in_tx(&mut tx, key, command).await?;
            self.faults().maybe_crash(Self::NAME, key.as_str())?;
            tx.commit().await.map_err(Error::db(Self::NAME))?;
            drop(turn);
            self.faults().delay_reply(Self::NAME, key.as_str()).await;
            Ok(reply)
        }
    }

    /// How many idempotency keys the participant holds.
    fn idempotency_keys(&self) -> impl Future<Output = Result<i64>> + Send {
        async move { db::key_count(self.database(), Self::NAME).await }
    }
}

/// Enqueues `messages` into the standard vextrus outbox of `db` (SQLite's
/// `outbox`, PostgreSQL's `vextrus_outbox`) inside the open transaction
/// `conn`.
pub(crate) async fn enqueue_in_tx(
    db: &Database,
    conn: &mut AnyConnection,
    messages: &[OutboundMessage],
) -> Result<()> {
    match db.backend() {
        Backend::Sqlite => vextrus_sqlite::any::enqueue(conn, messages).await?,
        Backend::Postgres => vextrus_postgres::any::enqueue(conn, messages).await?,
    }
    Ok(())
}

/// Records `(consumer, id)` in the standard vextrus inbox of `db` inside the
/// open transaction `conn`.
pub(crate) async fn record_inbox_in_tx(
    db: &Database,
    conn: &mut AnyConnection,
    consumer: &str,
    id: MessageId,
) -> Result<InboxRecord> {
    Ok(match db.backend() {
        Backend::Sqlite => vextrus_sqlite::any::record_inbox(conn, consumer, id).await?,
        Backend::Postgres => vextrus_postgres::any::record_inbox(conn, consumer, id).await?,
    })
}

/// What [`deliver`] did with one delivered command.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// Handled: the effect, the idempotency record, the inbox entry and the
    /// reply (in the participant's outbox) committed together. Acknowledge.
    Replied(SagaReply),
    /// The inbox already holds this message: a redelivery, nothing written.
    /// Acknowledge.
    Duplicate,
    /// Not a saga command at all (nothing to reply to). Acknowledge and drop.
    Poison(String),
}

/// The reply to `command` given the participant's answer.
fn reply_for<P: Participant>(command: &SagaCommand, reply: &P::Reply) -> SagaReply {
    let outcome = match P::business_failure(reply) {
        Some(reason) => ReplyOutcome::BusinessFailure(reason),
        None => ReplyOutcome::Success(serde_json::to_value(reply).unwrap_or(Value::Null)),
    };
    command.reply(outcome)
}

/// Handles one delivered saga command in ONE transaction of the
/// participant's database:
///
/// 1. record the inbox entry (consumer [`Participant::NAME`], the command's
///    message id); already there: a redelivery, [`Delivered::Duplicate`],
///    nothing written;
/// 2. run the command under its idempotency key
///    ([`Participant::handle_in_tx`]: effect, key, stored reply);
/// 3. enqueue the [`SagaReply`] to the command's `reply_to` in the
///    participant's own outbox;
/// 4. commit.
///
/// The caller acknowledges the delivery after this returns `Ok`; an `Err`
/// (a busy database, an injected crash before commit) wrote nothing, and the
/// caller asks for redelivery. A crash after commit and before the
/// acknowledgement only causes a redelivery, which step 1 absorbs.
///
/// A command that cannot run (malformed payload, forced failure, an error no
/// retry mends) is answered with a business failure, also through the
/// inbox and the outbox, so the saga compensates instead of waiting.
pub async fn deliver<P: Participant>(
    participant: &P,
    message: &InboundMessage,
) -> Result<Delivered> {
    let (command, reply_to) = match SagaCommand::from_inbound(message) {
        Ok(v) => v,
        Err(e) => return Ok(Delivered::Poison(e.to_string())),
    };
    // An injected slow participant: the reply comes after the step timeout.
    participant
        .faults()
        .delay_reply(P::NAME, &command.idempotency_key)
        .await;
    let db = participant.database();
    let decoded = serde_json::from_value::<P::Command>(command.payload.clone())
        .map_err(|e| format!("malformed {} command: {e}", command.command_type))
        .and_then(|c| {
            IdempotencyKey::new(command.idempotency_key.clone())
                .map(|k| (k, c))
                .map_err(|e| e.to_string())
        });
    let forced = participant.faults().forces(&command.command_type);
    let failure = match decoded {
        Err(e) => Some(e),
        Ok(_) if forced => Some(format!("{} failed (forced)", command.command_type)),
        Ok((key, cmd)) => {
            let turn = db.write_turn().await;
            let mut tx = db.begin().await?;
            if record_inbox_in_tx(db, &mut tx, P::NAME, message.id).await? == InboxRecord::Duplicate
            {
                return Ok(Delivered::Duplicate);
            }
            match participant.handle_in_tx(&mut tx, &key, &cmd).await {
                Ok(reply) => {
                    participant.faults().maybe_crash(P::NAME, key.as_str())?;
                    let reply = reply_for::<P>(&command, &reply);
                    enqueue_in_tx(db, &mut tx, &[reply.to_outbound(&reply_to)?]).await?;
                    tx.commit().await.map_err(Error::db(P::NAME))?;
                    drop(turn);
                    return Ok(Delivered::Replied(reply));
                }
                Err(e) if e.kind().is_retryable() => return Err(e),
                // The transaction may be aborted (PostgreSQL): answer in a
                // fresh one.
                Err(e) => Some(e.to_string()),
            }
        }
    };
    let reason = failure.unwrap_or_default();
    let _turn = db.write_turn().await;
    let mut tx = db.begin().await?;
    if record_inbox_in_tx(db, &mut tx, P::NAME, message.id).await? == InboxRecord::Duplicate {
        return Ok(Delivered::Duplicate);
    }
    let reply = command.reply(ReplyOutcome::BusinessFailure(reason));
    enqueue_in_tx(db, &mut tx, &[reply.to_outbound(&reply_to)?]).await?;
    tx.commit().await.map_err(Error::db(P::NAME))?;
    Ok(Delivered::Replied(reply))
}

/// How [`serve`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// Commands handled at once (each on its own task).
    pub concurrency: usize,
    /// The cap of the redelivery delay after a message's first failed
    /// attempt; it doubles per further failed delivery of the same message.
    pub redeliver_after: Duration,
    /// The largest cap of the redelivery delay.
    pub redeliver_max: Duration,
}

impl Default for ServeConfig {
    /// 64 at once, redelivery after up to 20 ms, doubling per failed
    /// delivery, up to 2 s.
    fn default() -> Self {
        Self {
            concurrency: 64,
            redeliver_after: Duration::from_millis(20),
            redeliver_max: Duration::from_secs(2),
        }
    }
}

impl ServeConfig {
    /// How long a command waits before it is redelivered after its
    /// `delivery_attempt`-th delivery (1-based) wrote nothing: vextrus's one
    /// backoff formula ([`Backoff`], exponential from
    /// [`redeliver_after`](Self::redeliver_after), factor 2, capped at
    /// [`redeliver_max`](Self::redeliver_max), full jitter), so a database
    /// that keeps refusing is not hammered and competing redeliveries
    /// spread out.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vextrus_order_to_cash::participant::ServeConfig;
    ///
    /// let c = ServeConfig::default();
    /// for _ in 0..100 {
    ///     assert!(c.redelivery_delay(1) <= Duration::from_millis(20));
    ///     assert!(c.redelivery_delay(3) <= Duration::from_millis(80));
    ///     assert!(c.redelivery_delay(40) <= Duration::from_secs(2));
    /// }
    /// ```
    pub fn redelivery_delay(&self, delivery_attempt: u32) -> Duration {
        Backoff::new(self.redeliver_after, self.redeliver_max, 2.0).delay(delivery_attempt)
    }
}

/// Serves `participant` from `source` (an in-process subscription, a
/// JetStream pull consumer, a Kafka consumer group) until the source closes:
/// each delivery goes through [`deliver`] on its own task (at most
/// `config.concurrency` at once) and is acknowledged after its commit, or
/// negatively acknowledged (redelivered after
/// [`ServeConfig::redelivery_delay`]) when nothing was committed. The replies wait in the participant's outbox
/// for its relay ([`vextrus_core::outbox::OutboxRelay`]); on PostgreSQL,
/// `serve` wakes the relays after each commit that enqueued a reply (one
/// coalesced `NOTIFY vextrus_outbox` through
/// [`vextrus_postgres::any::RelayWaker`], not one inside every
/// transaction), and relays also poll.
///
/// ```
/// use std::sync::Arc;
/// use serde_json::json;
/// use vextrus_core::saga::{SagaCommand, SagaId, StepKind};
/// use vextrus_core::transport::{InProcessTransport, Transport};
/// use vextrus_order_to_cash::participant::{ReplyOutbox, ServeConfig, serve};
/// use vextrus_order_to_cash::shipping::Shipping;
/// use vextrus_order_to_cash::{Database, FaultInjector};
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let db = Database::temporary().await.unwrap();
/// let shipping = Arc::new(Shipping::new(db.clone(), Arc::new(FaultInjector::disabled())));
/// shipping.migrate().await.unwrap();
/// let outbox = ReplyOutbox::open(&db).await.unwrap();
///
/// let broker = InProcessTransport::new();
/// broker.declare("o2c.shipping");
/// let cmd = SagaCommand {
///     message_id: uuid::Uuid::now_v7(), saga_id: SagaId::new(), saga_type: "order_to_cash".into(),
///     step: 3, step_name: "create_shipment".into(), kind: StepKind::Action, attempt: 1,
///     idempotency_key: "saga:1:3:action".into(), destination: "o2c.shipping".into(),
///     command_type: "shipping.create".into(),
///     payload: json!({"command": "create", "order_id": "order-1", "items": [{"sku": "SKU-0001", "quantity": 1}]}),
/// };
/// let wire = cmd.to_outbound("o2c.replies").unwrap();
/// broker.publish(&wire).await.unwrap();
/// broker.publish(&wire).await.unwrap(); // a redelivery
/// let source = broker.subscribe("o2c.shipping").unwrap();
/// let served = tokio::spawn(serve(shipping.clone(), source, ServeConfig::default()));
/// tokio::time::sleep(std::time::Duration::from_millis(500)).await;
/// served.abort();
/// // one shipment, one reply waiting in shipping's outbox
/// assert_eq!(shipping.shipments().await.unwrap().len(), 1);
/// assert_eq!(outbox.pending().await.unwrap(), 1);
/// # });
/// ```
pub async fn serve<P, S>(participant: Arc<P>, mut source: S, config: ServeConfig) -> Result<()>
where
    P: Participant + 'static,
    S: MessageSource,
    S::Delivery: 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    // PostgreSQL: the reply's enqueue sends no NOTIFY inside the
    // transaction (that would serialize the participants' commits); one
    // coalesced wake-up after commits tells the relays instead.
    let waker = match participant.database().backend() {
        Backend::Postgres => Some(vextrus_postgres::any::RelayWaker::new(
            participant.database().pool().clone(),
        )),
        Backend::Sqlite => None,
    };
    while let Some(delivery) = source.next().await? {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::invalid("serve", "semaphore closed"))?;
        let participant = participant.clone();
        let waker = waker.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The participant's work and the reply it enqueues continue the
            // trace the command carries (the saga step's span).
            let message = delivery.message();
            let span = vextrus_telemetry::spans::message_consume(
                message.id,
                &message.source,
                &message.headers,
            );
            let delivered =
                tracing::Instrument::instrument(deliver(&*participant, message), span).await;
            match delivered {
                Ok(Delivered::Replied(_)) => {
                    if let Some(waker) = &waker {
                        waker.wake();
                    }
                    let _ = delivery.ack().await;
                }
                Ok(Delivered::Duplicate) => {
                    let _ = delivery.ack().await;
                }
                Ok(Delivered::Poison(reason)) => {
                    tracing::error!(participant = P::NAME, %reason, "undecodable saga command dropped");
                    let _ = delivery.ack().await;
                }
                Err(e) => {
                    tracing::debug!(participant = P::NAME, error = %e, "command not handled; redelivering");
                    let delay = config.redelivery_delay(delivery.message().delivery_attempt);
                    let _ = delivery.nack(delay).await;
                }
            }
        });
    }
    Ok(())
}

/// A participant's replies waiting to be published: the standard vextrus
/// outbox of its own database, opened natively ([`SqliteOutbox`] on the
/// same SQLite file, [`PgOutbox`] on the same PostgreSQL database) so an
/// [`OutboxRelay`] can claim and publish what [`deliver`] enqueued.
#[derive(Debug, Clone)]
pub enum ReplyOutbox {
    /// On SQLite.
    Sqlite(SqliteOutbox),
    /// On PostgreSQL.
    Postgres(PgOutbox),
}

impl ReplyOutbox {
    /// The pool size of a PostgreSQL reply outbox (its relay's connections).
    pub const PG_POOL_SIZE: u32 = 4;

    /// The relay settings for this outbox: [`crate::node::relay_config`]
    /// on SQLite (replies enqueued through the participant's own
    /// connections are found by polling), [`crate::node::listening_relay_config`]
    /// on PostgreSQL ([`serve`] wakes the relay after commits with a
    /// coalesced NOTIFY).
    pub fn relay_config(&self, name: impl Into<String>) -> RelayConfig {
        match self {
            ReplyOutbox::Sqlite(_) => crate::node::relay_config(name),
            ReplyOutbox::Postgres(_) => crate::node::listening_relay_config(name),
        }
    }

    /// Opens the outbox of `db`'s database and applies the standard vextrus
    /// migrations there (event store, outbox and inbox tables: SQLite's
    /// `vextrus_sqlite::migrate::MIGRATIONS`, PostgreSQL's
    /// `vextrus_postgres::MIGRATIONS`); harmless when already applied.
    pub async fn open(db: &Database) -> Result<Self> {
        let outbox = match db.backend() {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(db.url())
                    .map_err(|e| Error::invalid("database url", e.to_string()))?;
                let synchronous = match db.durability() {
                    Durability::Full => SqliteSynchronous::Full,
                    Durability::Normal => SqliteSynchronous::Normal,
                };
                let store = SqliteEventStore::connect_with(
                    SqliteEventStore::tune(options).synchronous(synchronous),
                    4,
                )
                .await
                .map_err(|e| Error::Outbox(e.into()))?;
                ReplyOutbox::Sqlite(SqliteOutbox::new(store))
            }
            Backend::Postgres => {
                // A relay needs a few connections (a claim, the next claim,
                // marking published, a NOTIFY); four participants with 32
                // each would take most of a default server's 100 slots.
                let store = PgEventStore::connect_with(
                    db.url(),
                    PgStoreConfig::default().max_connections(Self::PG_POOL_SIZE),
                )
                .await
                .map_err(|e| Error::Outbox(e.into()))?;
                ReplyOutbox::Postgres(PgOutbox::new(store))
            }
        };
        match &outbox {
            ReplyOutbox::Sqlite(o) => o.migrate().await?,
            ReplyOutbox::Postgres(o) => o.migrate().await?,
        };
        Ok(outbox)
    }

    /// Starts a relay publishing this outbox's messages to `transport`
    /// (`config.name` names its workers); stop it with
    /// [`RelayHandle::shutdown`].
    pub fn spawn_relay<T>(&self, transport: T, config: RelayConfig) -> RelayHandle
    where
        T: Transport + 'static,
    {
        match self {
            ReplyOutbox::Sqlite(o) => OutboxRelay::new(o.clone(), transport, config).spawn(),
            ReplyOutbox::Postgres(o) => OutboxRelay::new(o.clone(), transport, config).spawn(),
        }
    }

    /// Messages not yet published (pending), for tests and reports.
    pub async fn pending(&self) -> Result<usize> {
        let rows = match self {
            ReplyOutbox::Sqlite(o) => o.rows().await?,
            ReplyOutbox::Postgres(o) => o.rows().await?,
        };
        Ok(rows
            .iter()
            .filter(|r| r.status == vextrus_core::outbox::OutboxStatus::Pending)
            .count())
    }
}
