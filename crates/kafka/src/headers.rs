//! Headers between vextrus messages and Kafka records.
//!
//! A message's headers (CloudEvents binary content mode: `ce_id`,
//! `ce_type`, `ce_source`, `ce_time`, `ce_specversion`, `content-type`, plus
//! `correlation_id`, `causation_id`, `traceparent`, `tracestate`,
//! `schema_version`, ...) travel one to one as Kafka record headers with
//! UTF-8 values. The message id always travels as `ce_id`: it is added when
//! the message's headers lack it, and a `ce_id` that disagrees with the id is
//! refused. The partition key travels as the record key.

use std::collections::BTreeMap;

use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use uuid::Uuid;

use crate::error::{KafkaError, Result};

/// The CloudEvents id header; it carries the message id, the de-duplication
/// key of every consumer's inbox.
pub const CE_ID: &str = "ce_id";

/// The partition-key header. The key itself travels as the record key; the
/// header is kept when the message's headers carry it.
pub const PARTITION_KEY: &str = "partition_key";

/// Header added to a dead-lettered copy of a malformed message: why it was
/// rejected.
pub const DEAD_LETTER_REASON: &str = "vextrus_dead_letter_reason";

/// Header added to a dead-lettered copy of a malformed message: the topic it
/// arrived on.
pub const DEAD_LETTER_TOPIC: &str = "vextrus_original_topic";

/// Header added to a dead-lettered copy of a malformed message: its
/// partition.
pub const DEAD_LETTER_PARTITION: &str = "vextrus_original_partition";

/// Header added to a dead-lettered copy of a malformed message: its offset.
pub const DEAD_LETTER_OFFSET: &str = "vextrus_original_offset";

/// Builds the Kafka headers for a message: `ce_id` = `id`, then every header
/// of the message. Returns the headers and their encoded size (names and
/// values). An empty header name or a `ce_id` that disagrees with the id is
/// [`KafkaError::InvalidHeaders`].
pub(crate) fn to_kafka_headers(
    id: &Uuid,
    headers: &BTreeMap<String, String>,
) -> Result<(OwnedHeaders, usize)> {
    let mut out = OwnedHeaders::new_with_capacity(headers.len() + 1);
    let mut size = 0;
    if let Some(ce_id) = headers.get(CE_ID) {
        let matches = Uuid::parse_str(ce_id).is_ok_and(|parsed| parsed == *id);
        if !matches {
            return Err(KafkaError::InvalidHeaders(format!(
                "header `{CE_ID}` = {ce_id:?} disagrees with the message id {id}"
            )));
        }
    } else {
        let mut buf = Uuid::encode_buffer();
        let id_text: &str = id.hyphenated().encode_lower(&mut buf);
        size += CE_ID.len() + id_text.len();
        out = out.insert(Header {
            key: CE_ID,
            value: Some(id_text),
        });
    }
    for (name, value) in headers {
        if name.is_empty() {
            return Err(KafkaError::InvalidHeaders(
                "a header has an empty name".into(),
            ));
        }
        size += name.len() + value.len();
        out = out.insert(Header {
            key: name.as_str(),
            value: Some(value.as_str()),
        });
    }
    Ok((out, size))
}

/// A received record's id and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodedHeaders {
    pub(crate) id: Uuid,
    pub(crate) headers: BTreeMap<String, String>,
}

/// Reads a received record's headers: every header into a map (the last
/// value when a name repeats) and the id from `ce_id`. No headers, no
/// `ce_id`, an id that is not a UUID, a header without a value, or a name or
/// value that is not UTF-8 is [`KafkaError::InvalidHeaders`].
pub(crate) fn from_kafka_headers(headers: Option<&OwnedHeaders>) -> Result<DecodedHeaders> {
    let Some(headers) = headers else {
        return Err(KafkaError::InvalidHeaders(
            "record has no headers (no ce_id)".into(),
        ));
    };
    let mut map = BTreeMap::new();
    for header in headers.iter() {
        let name = header.key;
        let Some(value) = header.value else {
            return Err(KafkaError::InvalidHeaders(format!(
                "header `{name}` has no value"
            )));
        };
        let value = std::str::from_utf8(value).map_err(|err| {
            KafkaError::InvalidHeaders(format!("value of header `{name}` is not UTF-8: {err}"))
        })?;
        map.insert(name.to_owned(), value.to_owned());
    }
    let Some(ce_id) = map.get(CE_ID) else {
        return Err(KafkaError::InvalidHeaders(format!(
            "record has no `{CE_ID}` header"
        )));
    };
    let id = Uuid::parse_str(ce_id).map_err(|err| {
        KafkaError::InvalidHeaders(format!("`{CE_ID}` = {ce_id:?} is not a UUID: {err}"))
    })?;
    Ok(DecodedHeaders { id, headers: map })
}

/// Copies a record's headers as they are (for a dead-letter copy), replacing
/// values that are missing.
pub(crate) fn raw_copy(headers: Option<&OwnedHeaders>) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(headers) = headers {
        for header in headers.iter() {
            out = out.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &Uuid) -> BTreeMap<String, String> {
        [
            ("ce_id", id.to_string().as_str()),
            ("ce_type", "OrderPlaced"),
            ("ce_source", "/sales"),
            ("ce_time", "2026-11-28T02:00:00Z"),
            ("ce_specversion", "1.0"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("correlation_id", "c-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn headers_round_trip() {
        let id = Uuid::now_v7();
        let (headers, size) = to_kafka_headers(&id, &sample(&id)).unwrap();
        assert_eq!(headers.count(), sample(&id).len());
        let expected: usize = sample(&id).iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(size, expected);
        let decoded = from_kafka_headers(Some(&headers)).unwrap();
        assert_eq!(decoded.id, id);
        assert_eq!(decoded.headers, sample(&id));
    }

    #[test]
    fn a_missing_ce_id_is_added_and_a_disagreeing_one_refused() {
        let id = Uuid::now_v7();
        let (headers, _) = to_kafka_headers(&id, &BTreeMap::new()).unwrap();
        assert_eq!(from_kafka_headers(Some(&headers)).unwrap().id, id);

        let other = BTreeMap::from([(CE_ID.to_owned(), Uuid::now_v7().to_string())]);
        assert!(matches!(
            to_kafka_headers(&id, &other),
            Err(KafkaError::InvalidHeaders(_))
        ));
        let garbage = BTreeMap::from([(CE_ID.to_owned(), "x".to_owned())]);
        assert!(matches!(
            to_kafka_headers(&id, &garbage),
            Err(KafkaError::InvalidHeaders(_))
        ));
        let empty_name = BTreeMap::from([(String::new(), "v".to_owned())]);
        assert!(matches!(
            to_kafka_headers(&id, &empty_name),
            Err(KafkaError::InvalidHeaders(_))
        ));
    }

    #[test]
    fn malformed_received_headers_are_typed_errors_not_panics() {
        assert!(matches!(
            from_kafka_headers(None),
            Err(KafkaError::InvalidHeaders(_))
        ));
        let cases: Vec<OwnedHeaders> = vec![
            OwnedHeaders::new(),
            OwnedHeaders::new().insert(Header {
                key: CE_ID,
                value: Some("not-a-uuid"),
            }),
            OwnedHeaders::new().insert(Header {
                key: CE_ID,
                value: None::<&str>,
            }),
            OwnedHeaders::new()
                .insert(Header {
                    key: CE_ID,
                    value: Some(Uuid::now_v7().to_string().as_str()),
                })
                .insert(Header {
                    key: "ce_type",
                    value: Some(&[0xff_u8, 0xfe][..]),
                }),
        ];
        for headers in cases {
            assert!(matches!(
                from_kafka_headers(Some(&headers)),
                Err(KafkaError::InvalidHeaders(_))
            ));
        }
    }

    #[test]
    fn raw_copy_keeps_every_header() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header {
                key: "b",
                value: None::<&str>,
            });
        let copy = raw_copy(Some(&headers));
        assert_eq!(copy.count(), 2);
        assert_eq!(copy.get(1).key, "b");
        assert!(copy.get(1).value.is_none());
    }
}
