//! The coalescing `NOTIFY` sender shared by the event store's subscriber
//! wake-ups and the outbox's relay wake-ups.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use crate::store::NOTIFY_COALESCE;

/// Sends wake-ups from one background task, started on the first request:
/// each request either starts a send or joins the one already pending, and
/// the task waits [`NOTIFY_COALESCE`] after each send, so requests within it
/// share the next one (a `NOTIFY` is a transaction of its own, and
/// notifying transactions' commits serialize on PostgreSQL's notify lock).
/// Clones share the task.
#[derive(Debug, Clone, Default)]
pub(crate) struct CoalescingNotifier {
    sender: Arc<OnceLock<mpsc::Sender<()>>>,
}

impl CoalescingNotifier {
    /// Requests a wake-up; returns at once. `start` is called once, with
    /// the first request, and gives the send the task repeats; a failed
    /// send is logged at debug level (listeners still poll). Must be
    /// called within a Tokio runtime.
    pub(crate) fn request<S, F, Fut>(&self, start: S)
    where
        S: FnOnce() -> F,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), sqlx::Error>> + Send,
    {
        let sender = self.sender.get_or_init(|| {
            let (tx, mut rx) = mpsc::channel::<()>(1);
            let mut send = start();
            tokio::spawn(async move {
                while rx.recv().await.is_some() {
                    if let Err(err) = send().await {
                        tracing::debug!(error = %err, "vextrus: NOTIFY failed; listeners poll");
                    }
                    tokio::time::sleep(NOTIFY_COALESCE).await;
                }
            });
            tx
        });
        // Full: a wake-up is already pending and covers this request.
        let _ = sender.try_send(());
    }
}

/// The send of a `pg_notify(channel, '')` on `pool` (PostgreSQL's or the
/// `Any` driver's pool), for [`CoalescingNotifier::request`].
pub(crate) fn pg_notify<DB>(
    pool: sqlx::Pool<DB>,
    channel: &'static str,
) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send>>
+ Send
+ 'static
where
    DB: sqlx::Database,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query::<DB>("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&pool)
                .await
                .map(drop)
        })
    }
}
