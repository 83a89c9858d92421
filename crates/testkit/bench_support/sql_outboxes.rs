//! The SQL outboxes of the broker crates' relay benches (`vextrus-nats`
//! and `vextrus-kafka`, `benches/relay.rs`), included by both with
//! `#[path]`: a fresh PostgreSQL database per measurement, and a fresh
//! SQLite file (the embedded default's settings: WAL, `synchronous=FULL`).

use std::sync::Mutex;

use sqlx::{Connection, PgConnection};
use uuid::Uuid;
use vextrus_postgres::{PgEventStore, PgOutbox, PgStoreConfig};
use vextrus_sqlite::SqliteOutbox;
use vextrus_testkit::relay_bench::BenchOutbox;

/// Fresh PostgreSQL databases, each with a migrated `PgOutbox`.
pub(crate) struct Postgres {
    pub(crate) admin: String,
    pub(crate) created: Mutex<Vec<String>>,
}

impl Postgres {
    fn url(&self, db: &str) -> String {
        let (base, _) = self.admin.rsplit_once('/').expect("a database URL");
        format!("{base}/{db}")
    }

    pub(crate) async fn drop_all(&self) {
        let names = std::mem::take(&mut *self.created.lock().unwrap());
        let mut conn = PgConnection::connect(&self.admin).await.expect("postgres");
        for name in names {
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .expect("drop database");
        }
    }
}

impl BenchOutbox for Postgres {
    type Store = PgOutbox;

    fn name(&self) -> String {
        "PostgreSQL (PgOutbox)".into()
    }

    async fn fresh(&self) -> PgOutbox {
        let name = format!("vextrus_bench_{}", Uuid::now_v7().simple());
        // The server is shared: when its connection slots are full, wait
        // for one (up to two minutes) rather than abort the run.
        let mut tries = 0;
        let mut conn = loop {
            match PgConnection::connect(&self.admin).await {
                Ok(conn) => break conn,
                Err(e) if tries < 240 => {
                    tries += 1;
                    eprintln!("waiting for PostgreSQL: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => panic!("PostgreSQL is required at {}: {e}", self.admin),
            }
        };
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create database");
        self.created.lock().unwrap().push(name.clone());
        // 12 connections cover the relay's workers, their claims ahead and
        // the latency run's enqueues, and leave the shared server's slots
        // to others.
        let store = PgEventStore::connect_with(
            &self.url(&name),
            PgStoreConfig::default().max_connections(12),
        )
        .await
        .expect("connect");
        store.migrate().await.expect("migrate");
        PgOutbox::new(store)
    }
}

/// Fresh SQLite outboxes, each in its own temporary file (deleted when the
/// store is dropped), with [`vextrus_sqlite::SqliteEventStore::connect`]'s
/// durability: WAL, `synchronous=FULL`, every commit durable.
pub(crate) struct Sqlite;

impl BenchOutbox for Sqlite {
    type Store = SqliteOutbox;

    fn name(&self) -> String {
        "SQLite (SqliteOutbox)".into()
    }

    async fn fresh(&self) -> SqliteOutbox {
        SqliteOutbox::temporary()
            .await
            .expect("a temporary SQLite outbox")
    }
}

impl Postgres {
    /// The admin URL from `VEXTRUS_TEST_PG_URL` (default
    /// `postgres://postgres@127.0.0.1:5432/postgres`).
    pub(crate) fn from_env() -> Self {
        Self {
            admin: std::env::var("VEXTRUS_TEST_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            created: Mutex::default(),
        }
    }
}
