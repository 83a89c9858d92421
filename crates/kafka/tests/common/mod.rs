//! Helpers shared by the tests that talk to a real Kafka-protocol broker.
//!
//! The broker is `VEXTRUS_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`;
//! `scripts/kafka.sh` starts one). A broker that is down fails the tests;
//! they never skip.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use vextrus_kafka::{ConsumerSpec, KafkaConfig, KafkaSource, create_topic};

/// The brokers the tests use.
pub fn brokers() -> String {
    std::env::var("VEXTRUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A configuration for the test broker, after checking it answers.
pub fn config() -> KafkaConfig {
    let brokers = brokers();
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    let addr = first
        .to_socket_addrs()
        .unwrap_or_else(|err| panic!("cannot resolve Kafka broker {first}: {err}"))
        .next()
        .unwrap_or_else(|| panic!("no address for Kafka broker {first}"));
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap_or_else(|err| {
        panic!(
            "no Kafka broker at {brokers} ({err}); run scripts/kafka.sh or set VEXTRUS_TEST_KAFKA_BROKERS"
        )
    });
    KafkaConfig::new(brokers)
        .with_client_id("vextrus-kafka-tests")
        .with_delivery_timeout(Duration::from_secs(20))
        .with_metadata_timeout(Duration::from_secs(10))
}

/// A topic name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Creates a fresh topic with `partitions` partitions and returns its name.
pub async fn topic(prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    create_topic(&config(), &name, partitions)
        .await
        .unwrap_or_else(|err| panic!("creating topic {name}: {err}"));
    name
}

/// A source in a fresh consumer group reading `topic`.
pub fn source(topic: &str) -> KafkaSource {
    KafkaSource::connect(config(), ConsumerSpec::new(unique("group"), [topic])).unwrap()
}

/// Awaits `future`, failing the test after `secs` seconds.
pub async fn within<F: std::future::Future>(secs: u64, what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {secs} s"))
}
