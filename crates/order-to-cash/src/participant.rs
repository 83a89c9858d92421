//! What every SQL-backed participant has in common: a named store, typed
//! commands and replies, and the one-transaction handler around them.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AnyConnection;

use crate::db::{self, Database, IdempotencyKey};
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
///    used for another command is [`Error::KeyReused`];
/// 2. apply the command;
/// 3. store the reply under the key;
/// 4. commit, all of it in one transaction.
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
