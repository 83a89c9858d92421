//! `vextrus outbox status | dead-letters | replay | discard`: the operator's
//! view of the transactional outbox.
//!
//! Replay and discard act on dead letters only. An id that is not stored is
//! bad input (exit 4, "no dead letter with id …"); an id that is stored but
//! pending or published is refused as a conflict (exit 3) with its status.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use vextrus_core::outbox::{DeadLetters, OutboxError, OutboxMessage, OutboxStore};
use vextrus_core::transport::MessageId;
use vextrus_postgres::PgOutbox;
use vextrus_sqlite::SqliteOutbox;

use crate::backend::Store;
use crate::exit::BadInput;

/// `vextrus outbox ...`
#[derive(Debug, Args)]
pub(crate) struct OutboxArgs {
    /// `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, global = true, env = "VEXTRUS_DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Backlog (pending), how many of those a relay worker holds (leased),
    /// the oldest pending message's age, dead letters and published rows
    /// not yet removed by retention.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print dead letters as JSON lines, oldest first: id, destination,
    /// partition key, attempts, last error, since when it is dead
    /// (`dead_since`: when its fatal attempt was due; the stores keep no
    /// time of death, the attempt ran at or soon after this) and for how long
    /// at most (`dead_for_ms`, `dead_for`), created-at, headers, and the
    /// payload (UTF-8 text, or base64 when it is not text).
    DeadLetters {
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only dead letters for this destination (topic or subject).
        #[arg(long)]
        destination: Option<String>,
    },
    /// Make dead letters pending again (same message id, attempts reset, due
    /// now); prints how many.
    Replay {
        /// The dead letter's message id (a UUID).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete a dead letter for good (pending and published messages are refused).
    Discard {
        /// The dead letter's message id (a UUID).
        id: String,
    },
}

/// The outbox of one of the SQL backends.
enum Outbox {
    Sqlite(SqliteOutbox),
    Postgres(PgOutbox),
}

/// Runs `$body` with `$o` bound to the concrete outbox.
macro_rules! with_outbox {
    ($outbox:expr, $o:ident => $body:expr) => {
        match &$outbox {
            Outbox::Sqlite($o) => $body,
            Outbox::Postgres($o) => $body,
        }
    };
}

impl Outbox {
    async fn connect(url: &str) -> Result<Self> {
        Ok(match Store::connect(url, true).await? {
            Store::Sqlite(s) => Outbox::Sqlite(SqliteOutbox::new(s)),
            Store::Postgres(s) => Outbox::Postgres(PgOutbox::new(s)),
        })
    }

    /// Pending messages under a live lease (a relay worker is publishing
    /// them, or holds their lane), judged by the database clock.
    async fn leased(&self) -> Result<u64> {
        Ok(match self {
            Outbox::Sqlite(o) => o.leased().await?,
            Outbox::Postgres(o) => o.leased().await?,
        })
    }
}

/// Parses a message id given on the command line.
fn parse_id(s: &str) -> Result<MessageId> {
    s.trim().parse::<MessageId>().map_err(|_| {
        BadInput(format!(
            "malformed message id {s:?}: expected a UUID such as 01936f0e-7c1a-7000-8000-000000000000"
        ))
        .into()
    })
}

/// Runs an `outbox` subcommand.
pub(crate) async fn run(args: OutboxArgs) -> Result<()> {
    // Validate what needs no database first.
    let id = match &args.command {
        OutboxCommand::Replay { id: Some(id), .. } | OutboxCommand::Discard { id } => {
            Some(parse_id(id)?)
        }
        _ => None,
    };
    let outbox = Outbox::connect(&args.database_url).await?;
    match args.command {
        OutboxCommand::Status { json } => {
            let report = with_outbox!(outbox, o => o.status().await)?;
            let leased = outbox.leased().await?;
            let value = json!({
                "pending": report.pending,
                "leased": leased,
                "oldest_pending_age_ms": report.oldest_pending_age.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "dead": report.dead,
                "published": report.published,
            });
            if json {
                println!("{value}");
            } else {
                print!(
                    "{}",
                    status_table(
                        report.pending,
                        leased,
                        report.oldest_pending_age,
                        report.dead,
                        report.published
                    )
                );
            }
            Ok(())
        }
        OutboxCommand::DeadLetters { limit, destination } => {
            // The store lists oldest first; a destination filter reads them all
            // and keeps the first `limit` that match.
            let fetch = if destination.is_some() {
                usize::MAX
            } else {
                limit
            };
            let rows = with_outbox!(outbox, o => o.dead_letters(fetch).await)?;
            let now = Utc::now();
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for row in rows
                .iter()
                .filter(|r| {
                    destination
                        .as_deref()
                        .is_none_or(|d| r.message.destination == d)
                })
                .take(limit)
            {
                serde_json::to_writer(&mut out, &dead_letter_json(row, now))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            Ok(())
        }
        OutboxCommand::Replay { all: true, .. } => {
            let n = with_outbox!(outbox, o => o.replay_all().await)?;
            println!("{}", json!({ "replayed": n }));
            Ok(())
        }
        OutboxCommand::Replay { .. } => {
            let id = id.expect("parsed above");
            let result = with_outbox!(outbox, o => o.replay(id).await);
            with_outbox!(outbox, o => refused(o, result, "replayed").await)?;
            println!("{}", json!({ "replayed": 1, "id": id.to_string() }));
            Ok(())
        }
        OutboxCommand::Discard { .. } => {
            let id = id.expect("parsed above");
            let result = with_outbox!(outbox, o => o.discard(id).await);
            with_outbox!(outbox, o => refused(o, result, "discarded").await)?;
            println!("{}", json!({ "discarded": 1, "id": id.to_string() }));
            Ok(())
        }
    }
}

/// Turns a replay's or discard's "not found" into bad input and "not dead"
/// into a conflict that names the message's status.
async fn refused<O: OutboxStore>(
    outbox: &O,
    result: Result<(), OutboxError>,
    verb: &str,
) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(OutboxError::NotFound(id)) => {
            Err(BadInput(format!("no dead letter with id {id}")).into())
        }
        Err(e @ OutboxError::NotDead(id)) => {
            let status = match outbox.get(id).await {
                Ok(Some(row)) => row.status.as_str().to_owned(),
                Ok(None) => return Err(BadInput(format!("no dead letter with id {id}")).into()),
                Err(_) => "not dead".to_owned(),
            };
            Err(anyhow::Error::new(e).context(format!(
                "message {id} is {status}, not a dead letter: only dead letters can be {verb}"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// One dead letter as a JSON object, `now` being when it is listed.
///
/// The stores do not record when a message died. It died on its last
/// attempt, and a store leaves `next_attempt_at` as it was when the message
/// dies, so that is when the fatal attempt was due (the message's
/// `created_at` when it died on its first attempt); the relay ran it then or
/// soon after (a poll interval, or a backlog, later). `dead_since` is that
/// instant (also under its older name `last_attempt_due_at`), and
/// `dead_for_ms` / `dead_for` the time since it, an upper bound on how long
/// the message has been dead.
fn dead_letter_json(row: &OutboxMessage, now: DateTime<Utc>) -> Value {
    let m = &row.message;
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (base64(&m.payload), "base64"),
    };
    let dead_for = (now - row.next_attempt_at).to_std().unwrap_or_default();
    json!({
        "id": m.id.to_string(),
        "destination": m.destination,
        "partition_key": m.partition_key,
        "sequence": row.sequence,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "dead_since": row.next_attempt_at,
        "dead_for_ms": u64::try_from(dead_for.as_millis()).unwrap_or(u64::MAX),
        "dead_for": human_duration(dead_for),
        "last_attempt_due_at": row.next_attempt_at,
        "created_at": m.created_at,
        "headers": m.headers,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// The status as a human-readable table.
fn status_table(
    pending: u64,
    leased: u64,
    oldest: Option<Duration>,
    dead: u64,
    published: u64,
) -> String {
    let oldest = oldest.map_or_else(|| "-".to_owned(), human_duration);
    format!(
        "pending (backlog)       {pending}\n\
         leased (in flight)      {leased}\n\
         oldest pending age      {oldest}\n\
         dead letters            {dead}\n\
         published (retained)    {published}\n"
    )
}

/// `1h 02m`, `3m 04s`, `5.2s`, `12ms`.
pub(crate) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 {
        format!("{}d {:02}h", secs / 86_400, secs % 86_400 / 3_600)
    } else if secs >= 3_600 {
        format!("{}h {:02}m", secs / 3_600, secs % 3_600 / 60)
    } else if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else if secs >= 1 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vextrus_core::outbox::OutboxStatus;
    use vextrus_core::transport::OutboundMessage;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x80]), "//4AgA==");
    }

    #[test]
    fn malformed_ids_are_bad_input() {
        let err = parse_id("nope").unwrap_err();
        assert!(err.downcast_ref::<BadInput>().is_some());
        assert!(err.to_string().contains("malformed message id"), "{err}");
        assert!(parse_id("01936f0e-7c1a-7000-8000-000000000000").is_ok());
    }

    #[test]
    fn a_dead_letter_is_dead_since_its_fatal_attempt_was_due() {
        let message = OutboundMessage::new("orders", "k", vec![0xff]);
        let mut row = OutboxMessage::pending(message.clone(), 7);
        row.status = OutboxStatus::Dead;
        row.attempts = 3;
        row.last_error = Some("timeout".into());
        row.next_attempt_at = message.created_at + chrono::Duration::seconds(10);
        let now = row.next_attempt_at + chrono::Duration::milliseconds(184_250);
        let json = dead_letter_json(&row, now);
        let due = serde_json::to_value(row.next_attempt_at).unwrap();
        assert_eq!(json["dead_since"], due);
        assert_eq!(json["last_attempt_due_at"], due);
        assert_eq!(json["dead_for_ms"], 184_250);
        assert_eq!(json["dead_for"], "3m 04s");
        assert_eq!(
            json["created_at"],
            serde_json::to_value(message.created_at).unwrap()
        );
        assert_eq!(
            (json["attempts"].clone(), json["sequence"].clone()),
            (json!(3), json!(7))
        );
        assert_eq!(json["last_error"], "timeout");
        assert_eq!(json["payload_encoding"], "base64");
        // A clock behind the store's: never a negative age.
        let json = dead_letter_json(&row, message.created_at);
        assert_eq!(json["dead_for_ms"], 0);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_duration(Duration::from_millis(12)), "12ms");
        assert_eq!(human_duration(Duration::from_millis(5_200)), "5.2s");
        assert_eq!(human_duration(Duration::from_secs(184)), "3m 04s");
        assert_eq!(human_duration(Duration::from_secs(3_720)), "1h 02m");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1d 01h");
    }
}
