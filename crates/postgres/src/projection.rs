//! Snapshots, checkpoints, LISTEN/NOTIFY wake-ups and the projection
//! transaction of [`PgEventStore`].

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Postgres, Transaction};
use tokio::sync::watch;
use vextrus_core::{
    CheckpointStore, GlobalPosition, ProjectionBackend, Result, Snapshot, SnapshotStore, StreamId,
    SubscriptionSource, WakeUps,
};

use crate::error::map_sqlx;
use crate::store::{NOTIFY_CHANNEL, PgEventStore, to_i64, to_u64};

impl SnapshotStore for PgEventStore {
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.save_snapshot_on(&self.pool, snapshot).await
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>> {
        let row: Option<(i64, i32, serde_json::Value)> = sqlx::query_as(
            "SELECT stream_version, snapshot_version, state FROM vextrus_snapshots \
             WHERE stream_id = $1",
        )
        .bind(stream_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(row.map(|(version, snapshot_version, state)| Snapshot {
            stream_id: stream_id.clone(),
            stream_version: to_u64(version),
            snapshot_version: u32::try_from(snapshot_version).unwrap_or(0),
            state,
        }))
    }
}

impl PgEventStore {
    /// Stores a snapshot on any connection: the pool, or a caller's open
    /// transaction (`&mut *tx`) so that it commits with the unit of work.
    pub async fn save_snapshot_on<'c, E>(&self, executor: E, snapshot: &Snapshot) -> Result<()>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        sqlx::query(
            "INSERT INTO vextrus_snapshots (stream_id, stream_version, snapshot_version, state) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_id) DO UPDATE SET stream_version = EXCLUDED.stream_version, \
               snapshot_version = EXCLUDED.snapshot_version, state = EXCLUDED.state, \
               taken_at = now()",
        )
        .bind(snapshot.stream_id.as_str())
        .bind(to_i64(snapshot.stream_version))
        .bind(i32::try_from(snapshot.snapshot_version).unwrap_or(i32::MAX))
        .bind(&snapshot.state)
        .execute(executor)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    /// Stores a named checkpoint on any connection: the pool, or a caller's
    /// open transaction (`&mut *tx`) so that it commits with the writes it
    /// covers.
    pub async fn save_checkpoint_on<'c, E>(
        &self,
        executor: E,
        name: &str,
        position: GlobalPosition,
    ) -> Result<()>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        sqlx::query(
            "INSERT INTO vextrus_checkpoints (name, commit_id, position) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET commit_id = EXCLUDED.commit_id, \
               position = EXCLUDED.position, updated_at = now()",
        )
        .bind(name)
        .bind(to_i64(position.commit))
        .bind(to_i64(position.position))
        .execute(executor)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    /// Loads a named checkpoint on any connection.
    pub async fn load_checkpoint_on<'c, E>(
        &self,
        executor: E,
        name: &str,
    ) -> Result<Option<GlobalPosition>>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT commit_id, position FROM vextrus_checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(executor)
                .await
                .map_err(map_sqlx)?;
        Ok(row.map(|(c, p)| GlobalPosition::new(to_u64(c), to_u64(p))))
    }

    /// The wake-up channel, starting its LISTEN task on first use.
    fn wake_receiver(&self) -> watch::Receiver<u64> {
        self.wake
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0u64);
                tokio::spawn(listen(self.pool.clone(), tx));
                rx
            })
            .clone()
    }
}

/// Listens on [`NOTIFY_CHANNEL`] and bumps `tx` on every notification, and
/// also after every reconnect (a notification may have been lost while
/// disconnected). Ends when every receiver is gone.
async fn listen(pool: sqlx::PgPool, tx: watch::Sender<u64>) {
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|v| *v = v.wrapping_add(1));
    while !tx.is_closed() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(error = %err, "vextrus: LISTEN connection failed; subscribers poll");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::warn!(error = %err, "vextrus: LISTEN failed; subscribers poll");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        bump(&tx);
        loop {
            if tx.is_closed() {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(1), listener.try_recv()).await {
                Err(_idle) => {}
                Ok(Ok(Some(_))) => bump(&tx),
                Ok(Ok(None)) => bump(&tx), // reconnected: something may have been missed
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "vextrus: LISTEN connection lost");
                    bump(&tx);
                    break;
                }
            }
        }
    }
}

impl CheckpointStore for PgEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        self.load_checkpoint_on(&self.pool, name).await
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        self.save_checkpoint_on(&self.pool, name, position).await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM vextrus_checkpoints WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }
}

impl SubscriptionSource for PgEventStore {
    async fn wake_ups(&self) -> Result<WakeUps> {
        Ok(WakeUps::from_watch(self.wake_receiver()))
    }
}

impl ProjectionBackend for PgEventStore {
    /// A plain sqlx transaction: a projection's handler writes its read model
    /// with SQL through it, and the checkpoint commits with those writes.
    type Transaction = Transaction<'static, Postgres>;

    async fn begin_projection(
        &self,
        name: &str,
    ) -> Result<(Self::Transaction, Option<GlobalPosition>)> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        // An advisory lock, not a row lock: it takes no transaction id, so
        // the projection's own transaction does not hold back the global
        // log's horizon until its handler writes.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('vextrus_projection:' || $1, 0))",
        )
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        let checkpoint = self.load_checkpoint_on(&mut *tx, name).await?;
        Ok((tx, checkpoint))
    }

    async fn commit_projection(
        &self,
        mut tx: Self::Transaction,
        name: &str,
        checkpoint: Option<GlobalPosition>,
    ) -> Result<()> {
        match checkpoint {
            Some(p) => self.save_checkpoint_on(&mut *tx, name, p).await?,
            None => {
                sqlx::query("DELETE FROM vextrus_checkpoints WHERE name = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
            }
        }
        tx.commit().await.map_err(map_sqlx)
    }
}
