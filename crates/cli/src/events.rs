//! `vextrus events append | read | tail`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;
use vextrus_core::{
    EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition, NewEvent,
    ReadStreamOptions, RecordedEvent, StreamId, Subscription, SubscriptionOptions,
    SubscriptionSource,
};
use vextrus_kernel::{CorrelationId, EventMetadata};

use crate::backend::Store;
use crate::exit::BadInput;

/// `vextrus events ...`
#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, global = true, env = "VEXTRUS_DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Append one event (a JSON object) or several (a JSON array) to a stream, atomically.
    ///
    /// Each event is `{"event_type": "...", "payload": {...}}` with optional
    /// `"schema_version"` (default 1) and `"metadata"` (any of the kernel's
    /// metadata fields: event_id, correlation_id, causation_id, trace_context,
    /// tenant, actor, occurred_at; the rest are filled in). Prints the append
    /// result as one JSON line.
    Append {
        /// The stream, `category-id` (for example `order-42`).
        stream: String,
        /// The events as JSON; read from stdin when absent or `-`.
        events: Option<String>,
        /// `any`, `no-stream`, `exists`, or a version number (0 = no stream).
        #[arg(long, default_value = "any", value_parser = parse_expected_version)]
        expected_version: ExpectedVersion,
    },
    /// Print a stream's events as JSON lines.
    Read {
        /// The stream, `category-id`.
        stream: String,
        /// Start at this version (inclusive).
        #[arg(long)]
        from: Option<u64>,
        /// Print at most this many events.
        #[arg(long)]
        limit: Option<u64>,
        /// Newest first.
        #[arg(long)]
        backwards: bool,
    },
    /// Print the global log as JSON lines, then follow it live.
    Tail {
        /// Start after this position (`commit:position`, as printed in each
        /// event's `position`); default: the beginning.
        #[arg(long, value_parser = parse_position)]
        from: Option<GlobalPosition>,
        /// Only streams of this category.
        #[arg(long, conflicts_with = "prefix")]
        category: Option<String>,
        /// Only streams whose id starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only these event types (repeatable).
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Stop once caught up with the head instead of following live.
        #[arg(long)]
        no_follow: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
        /// Longest wait between polls when no wake-up arrives, in milliseconds.
        #[arg(long, default_value_t = 250)]
        poll_ms: u64,
    },
}

fn parse_expected_version(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "no-stream" | "no_stream" => Ok(ExpectedVersion::NoStream),
        "exists" | "stream-exists" => Ok(ExpectedVersion::StreamExists),
        n => n.parse::<u64>().map(ExpectedVersion::Exact).map_err(|_| {
            format!("expected `any`, `no-stream`, `exists` or a version number, got {n:?}")
        }),
    }
}

fn parse_position(s: &str) -> Result<GlobalPosition, String> {
    s.parse()
        .map_err(|e: vextrus_core::EventStoreError| e.to_string())
}

/// Runs an `events` subcommand.
pub(crate) async fn run(args: EventsArgs) -> Result<()> {
    // Validate what needs no database first, so bad input never waits on a connection.
    match &args.command {
        EventsCommand::Append {
            stream,
            events,
            expected_version,
        } => {
            let stream = StreamId::new(stream.as_str())?;
            let text = match events.as_deref() {
                None | Some("-") => {
                    let mut buf = String::new();
                    tokio::io::stdin()
                        .read_to_string(&mut buf)
                        .await
                        .context("reading events from stdin")?;
                    buf
                }
                Some(s) => s.to_owned(),
            };
            let events = parse_events(&text)?;
            let store = Store::connect(&args.database_url, true).await?;
            let result = crate::backend::with_store!(store, s => s.append_to_stream(&stream, *expected_version, &events).await)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        EventsCommand::Read {
            stream,
            from,
            limit,
            backwards,
        } => {
            let stream = StreamId::new(stream.as_str())?;
            let mut options = if *backwards {
                ReadStreamOptions::backwards()
            } else {
                ReadStreamOptions::forwards()
            };
            if let Some(v) = from {
                options = options.from_version(*v);
            }
            if let Some(n) = limit {
                options = options.limit(*n);
            }
            let store = Store::connect(&args.database_url, true).await?;
            crate::backend::with_store!(store, s => read(s, &stream, options).await)
        }
        EventsCommand::Tail {
            from,
            category,
            prefix,
            event_types,
            no_follow,
            limit,
            poll_ms,
        } => {
            let mut filter = match (category, prefix) {
                (Some(c), _) => EventFilter::category(c.as_str()),
                (None, Some(p)) => EventFilter::prefix(p.as_str()),
                (None, None) => EventFilter::all(),
            };
            filter = filter.with_event_types(event_types.iter().cloned());
            let options = SubscriptionOptions::default()
                .with_filter(filter)
                .with_poll_interval(Duration::from_millis(*poll_ms));
            let from = from.unwrap_or(GlobalPosition::START);
            let store = Store::connect(&args.database_url, true).await?;
            crate::backend::with_store!(store, s => tail(s.clone(), from, options, !*no_follow, *limit).await)
        }
    }
}

/// Parses one event object or an array of them into new events.
fn parse_events(text: &str) -> Result<Vec<NewEvent>> {
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|e| BadInput(format!("events are not valid JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(
                BadInput("events must be a JSON object or an array of objects".into()).into(),
            );
        }
    };
    if items.is_empty() {
        return Err(BadInput("no events given".into()).into());
    }
    // One append is one business step: its events share a correlation id
    // unless the caller gives their own.
    let correlation = CorrelationId::new();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            parse_event(item, correlation).with_context(|| format!("event #{}", i + 1))
        })
        .collect()
}

fn parse_event(item: Value, correlation: CorrelationId) -> Result<NewEvent> {
    let Value::Object(mut obj) = item else {
        return Err(BadInput("each event must be a JSON object".into()).into());
    };
    let known = ["event_type", "payload", "schema_version", "metadata"];
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(BadInput(format!("unknown field {k:?}; expected one of {known:?}")).into());
    }
    let event_type = match obj.remove("event_type") {
        Some(Value::String(s)) => s,
        _ => return Err(BadInput("`event_type` (a string) is required".into()).into()),
    };
    let payload = obj
        .remove("payload")
        .ok_or_else(|| BadInput("`payload` is required".into()))?;
    let schema_version = match obj.remove("schema_version") {
        None => 1,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| BadInput("`schema_version` must be a positive integer".into()))?,
    };
    // Start from fresh metadata and let the caller override any field.
    let fresh = EventMetadata::new().with_correlation_id(correlation);
    let mut metadata = match serde_json::to_value(fresh)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    match obj.remove("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(given)) => metadata.extend(given),
        Some(_) => return Err(BadInput("`metadata` must be a JSON object".into()).into()),
    }
    Ok(NewEvent::from_json_parts(
        event_type,
        schema_version,
        payload,
        Value::Object(metadata),
    )?)
}

fn print_event(out: &mut impl Write, event: &RecordedEvent) -> Result<()> {
    serde_json::to_writer(&mut *out, event)?;
    out.write_all(b"\n")?;
    Ok(())
}

async fn read<S: EventReader>(
    store: &S,
    stream: &StreamId,
    options: ReadStreamOptions,
) -> Result<()> {
    let mut events = store.read_stream(stream, options);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Some(event) = events.next().await {
        print_event(&mut out, &event?)?;
    }
    out.flush()?;
    Ok(())
}

async fn tail<S>(
    store: S,
    from: GlobalPosition,
    options: SubscriptionOptions,
    follow: bool,
    limit: Option<u64>,
) -> Result<()>
where
    S: SubscriptionSource + Clone + 'static,
{
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    if !follow {
        // Page through the log up to the head, then stop.
        let mut position = from;
        loop {
            let page = store
                .read_all(position, &options.filter, options.batch_size)
                .await?;
            let mut out = stdout.lock();
            for event in &page.events {
                if limit.is_some_and(|l| printed >= l) {
                    return Ok(());
                }
                print_event(&mut out, event)?;
                printed += 1;
            }
            out.flush()?;
            if page.scanned_to <= position {
                return Ok(());
            }
            position = page.scanned_to;
        }
    }
    let mut events = Subscription::new(store, from, options).into_stream();
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        if limit.is_some_and(|l| printed >= l) {
            return Ok(());
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            next = events.next() => match next {
                None => return Ok(()),
                Some(event) => {
                    let mut out = stdout.lock();
                    print_event(&mut out, &event?)?;
                    out.flush()?;
                    printed += 1;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_or_many_events_with_partial_metadata() {
        let one = parse_events(r#"{"event_type":"order.placed","payload":{"n":1}}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].schema_version, 1);
        assert_eq!(one[0].event_id, one[0].metadata.event_id);

        let many = parse_events(
            r#"[{"event_type":"a.b","payload":1,"schema_version":2,"metadata":{"tenant":"acme"}},
                {"event_type":"a.c","payload":null}]"#,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].schema_version, 2);
        assert_eq!(many[0].metadata.tenant.as_ref().unwrap().as_str(), "acme");
        assert_eq!(
            many[0].metadata.correlation_id,
            many[1].metadata.correlation_id
        );
        assert_ne!(many[0].event_id, many[1].event_id);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for (text, needle) in [
            ("not json", "not valid JSON"),
            ("[]", "no events"),
            ("42", "JSON object"),
            (r#"{"payload":{}}"#, "event_type"),
            (r#"{"event_type":"x"}"#, "payload"),
            (
                r#"{"event_type":"x","payload":{},"extra":1}"#,
                "unknown field",
            ),
            (
                r#"{"event_type":"x","payload":{},"schema_version":-1}"#,
                "schema_version",
            ),
            (
                r#"{"event_type":"x","payload":{},"metadata":{"tenant":""}}"#,
                "metadata",
            ),
            (
                r#"{"event_type":"x","payload":{},"metadata":{"event_id":"nope"}}"#,
                "metadata",
            ),
        ] {
            let err = format!("{:#}", parse_events(text).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn expected_version_flag_parses_every_form() {
        assert_eq!(parse_expected_version("any").unwrap(), ExpectedVersion::Any);
        assert_eq!(
            parse_expected_version("no-stream").unwrap(),
            ExpectedVersion::NoStream
        );
        assert_eq!(
            parse_expected_version("exists").unwrap(),
            ExpectedVersion::StreamExists
        );
        assert_eq!(
            parse_expected_version("7").unwrap(),
            ExpectedVersion::Exact(7)
        );
        assert!(parse_expected_version("-1").is_err());
    }
}
