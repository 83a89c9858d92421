//! Headers between vextrus messages and NATS messages.
//!
//! A message's headers (CloudEvents binary mode: `ce_id`, `ce_type`,
//! `ce_source`, `ce_time`, `ce_specversion`, `content-type`, plus
//! `correlation_id`, `causation_id`, `traceparent`, `tracestate`,
//! `partition_key`, ...) travel one to one as NATS headers. Two envelope
//! headers travel beside them and are removed again on receipt, so a
//! consumer sees exactly the headers that were sent: `Nats-Msg-Id`, the
//! message id JetStream de-duplicates on, and `Vextrus-Partition-Key`, the
//! message's partition key.

use std::collections::BTreeMap;
use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

use crate::error::{NatsError, Result};

/// The header JetStream de-duplicates on; it carries the message id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// The envelope header carrying the message's partition key.
pub const ENVELOPE_PARTITION_KEY: &str = "Vextrus-Partition-Key";

/// The CloudEvents id header, the fallback source of a received message's id.
pub const CE_ID: &str = "ce_id";

/// The partition-key header of CloudEvents-style messages (the fallback for
/// a received message's partition key).
pub const PARTITION_KEY: &str = "partition_key";

/// Headers added to a dead-lettered copy of a malformed message: why it was
/// rejected.
pub const DEAD_LETTER_REASON: &str = "vextrus_dead_letter_reason";

/// Headers added to a dead-lettered copy of a malformed message: the subject
/// it arrived on.
pub const DEAD_LETTER_SUBJECT: &str = "vextrus_original_subject";

/// Headers added to a dead-lettered copy of a malformed message: its stream
/// sequence.
pub const DEAD_LETTER_SEQUENCE: &str = "vextrus_original_sequence";

/// Builds the NATS header map for a message: `Nats-Msg-Id` = `id`, then every
/// header of the message. A name or value NATS cannot carry is a
/// [`NatsError::InvalidHeaders`], as is a `Nats-Msg-Id` header that disagrees
/// with the message id.
pub(crate) fn to_nats_headers(
    id: &Uuid,
    partition_key: Option<&str>,
    headers: &BTreeMap<String, String>,
) -> Result<HeaderMap> {
    let id = id.to_string();
    let mut map = HeaderMap::new();
    map.insert(NATS_MSG_ID, id.as_str());
    if let Some(key) = partition_key {
        let value = HeaderValue::from_str(key).map_err(|err| {
            NatsError::InvalidHeaders(format!("the partition key cannot travel over NATS: {err}"))
        })?;
        map.insert(ENVELOPE_PARTITION_KEY, value);
    }
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(ENVELOPE_PARTITION_KEY) {
            return Err(NatsError::InvalidHeaders(format!(
                "header `{name}` is reserved for the envelope"
            )));
        }
        if name.eq_ignore_ascii_case(NATS_MSG_ID) {
            if value != &id {
                return Err(NatsError::InvalidHeaders(format!(
                    "header `{name}` = `{value}` disagrees with the message id {id}"
                )));
            }
            continue;
        }
        if name.is_empty() {
            return Err(NatsError::InvalidHeaders("empty header name".into()));
        }
        let header_name = HeaderName::from_str(name).map_err(|err| {
            NatsError::InvalidHeaders(format!(
                "header name {name:?} cannot travel over NATS: {err}"
            ))
        })?;
        let header_value = HeaderValue::from_str(value).map_err(|err| {
            NatsError::InvalidHeaders(format!(
                "value of header `{name}` cannot travel over NATS: {err}"
            ))
        })?;
        map.insert(header_name, header_value);
    }
    Ok(map)
}

/// The size NATS counts against `max_payload`: the payload plus the encoded
/// header block (`NATS/1.0\r\n`, one `name: value\r\n` line per header, `\r\n`).
pub(crate) fn wire_size(headers: &HeaderMap, payload_len: usize) -> usize {
    let mut len = b"NATS/1.0\r\n".len() + b"\r\n".len();
    for (name, values) in headers.iter() {
        for value in values {
            len += AsRef::<str>::as_ref(name).len() + 2 + value.as_str().len() + 2;
        }
    }
    len + payload_len
}

/// A received message's id and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodedHeaders {
    pub(crate) id: Uuid,
    pub(crate) partition_key: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
}

/// Reads a received message's headers: the id from `Nats-Msg-Id` (or `ce_id`
/// when that is missing), every other header into a map (the last value
/// when a header repeats). A missing or unparsable id, disagreeing
/// `Nats-Msg-Id` and `ce_id`, or a header that is not valid UTF-8 text is a
/// [`NatsError::InvalidHeaders`].
pub(crate) fn from_nats_headers(map: Option<&HeaderMap>) -> Result<DecodedHeaders> {
    let Some(map) = map else {
        return Err(NatsError::InvalidHeaders(
            "message has no headers (no Nats-Msg-Id or ce_id)".into(),
        ));
    };
    let mut headers = BTreeMap::new();
    let mut msg_id = None;
    let mut partition_key = None;
    for (name, values) in map.iter() {
        let Some(value) = values.last() else { continue };
        let name: &str = name.as_ref();
        if name == NATS_MSG_ID {
            msg_id = Some(value.as_str().to_owned());
        } else if name == ENVELOPE_PARTITION_KEY {
            partition_key = Some(value.as_str().to_owned());
        } else {
            headers.insert(name.to_owned(), value.as_str().to_owned());
        }
    }
    let parse = |header: &str, text: &str| {
        Uuid::parse_str(text).map_err(|err| {
            NatsError::InvalidHeaders(format!("`{header}` = {text:?} is not a UUID: {err}"))
        })
    };
    let id = match (msg_id.as_deref(), headers.get(CE_ID)) {
        (Some(nats), Some(ce)) => {
            let id = parse(NATS_MSG_ID, nats)?;
            if parse(CE_ID, ce)? != id {
                return Err(NatsError::InvalidHeaders(format!(
                    "`{NATS_MSG_ID}` = {nats} and `{CE_ID}` = {ce} disagree"
                )));
            }
            id
        }
        (Some(nats), None) => parse(NATS_MSG_ID, nats)?,
        (None, Some(ce)) => parse(CE_ID, ce)?,
        (None, None) => {
            return Err(NatsError::InvalidHeaders(
                "message has neither a Nats-Msg-Id nor a ce_id header".into(),
            ));
        }
    };
    let partition_key = partition_key.or_else(|| headers.get(PARTITION_KEY).cloned());
    Ok(DecodedHeaders {
        id,
        partition_key,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, String> {
        [
            ("ce_id", "0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e"),
            ("ce_type", "OrderPlaced"),
            ("ce_source", "/sales"),
            ("ce_time", "2026-11-28T02:00:00Z"),
            ("ce_specversion", "1.0"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("partition_key", "order-42"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn headers_round_trip_and_carry_the_id_as_nats_msg_id() {
        let id = Uuid::parse_str("0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e").unwrap();
        let map = to_nats_headers(&id, Some("envelope-key"), &sample()).unwrap();
        assert_eq!(map.get(NATS_MSG_ID).unwrap().as_str(), id.to_string());
        let decoded = from_nats_headers(Some(&map)).unwrap();
        assert_eq!(decoded.id, id);
        assert_eq!(decoded.headers, sample(), "envelope headers are removed");
        assert_eq!(decoded.partition_key.as_deref(), Some("envelope-key"));
        // Without the envelope header the partition_key header is the fallback.
        let map = to_nats_headers(&id, None, &sample()).unwrap();
        let decoded = from_nats_headers(Some(&map)).unwrap();
        assert_eq!(decoded.partition_key.as_deref(), Some("order-42"));
    }

    #[test]
    fn untravelable_headers_are_typed_errors_not_panics() {
        let id = Uuid::new_v4();
        for (name, value) in [
            ("bad:name", "v"),
            ("", "v"),
            ("ok", "line\r\nbreak"),
            ("tab\tname", "v"),
        ] {
            let headers = BTreeMap::from([(name.to_owned(), value.to_owned())]);
            assert!(
                matches!(
                    to_nats_headers(&id, None, &headers),
                    Err(NatsError::InvalidHeaders(_))
                ),
                "{name:?}: {value:?}"
            );
        }
        let conflicting = BTreeMap::from([(NATS_MSG_ID.to_owned(), Uuid::new_v4().to_string())]);
        assert!(matches!(
            to_nats_headers(&id, None, &conflicting),
            Err(NatsError::InvalidHeaders(_))
        ));
        assert!(matches!(
            to_nats_headers(&id, Some("bad\nkey"), &BTreeMap::new()),
            Err(NatsError::InvalidHeaders(_))
        ));
    }

    #[test]
    fn the_id_falls_back_to_ce_id_and_malformed_ids_are_rejected() {
        let mut only_ce = HeaderMap::new();
        only_ce.insert(CE_ID, "0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e");
        assert_eq!(
            from_nats_headers(Some(&only_ce)).unwrap().id.to_string(),
            "0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e"
        );

        let mut bad = HeaderMap::new();
        bad.insert(NATS_MSG_ID, "not-a-uuid");
        assert!(matches!(
            from_nats_headers(Some(&bad)),
            Err(NatsError::InvalidHeaders(_))
        ));

        let mut disagreeing = HeaderMap::new();
        disagreeing.insert(NATS_MSG_ID, Uuid::new_v4().to_string());
        disagreeing.insert(CE_ID, Uuid::new_v4().to_string());
        assert!(matches!(
            from_nats_headers(Some(&disagreeing)),
            Err(NatsError::InvalidHeaders(_))
        ));

        assert!(matches!(
            from_nats_headers(None),
            Err(NatsError::InvalidHeaders(_))
        ));
        assert!(matches!(
            from_nats_headers(Some(&HeaderMap::new())),
            Err(NatsError::InvalidHeaders(_))
        ));
    }

    #[test]
    fn wire_size_counts_payload_and_header_block() {
        let mut map = HeaderMap::new();
        map.insert("Key", "value");
        // "NATS/1.0\r\n" (10) + "Key: value\r\n" (12) + "\r\n" (2) + payload 5
        assert_eq!(wire_size(&map, 5), 29);
    }
}
