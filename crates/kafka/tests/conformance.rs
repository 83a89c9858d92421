//! The transport conformance suite from vextrus-testkit, on Kafka.

mod common;

use common::{config, unique};
use vextrus_kafka::{ConsumerSpec, KafkaSource, KafkaTransport, create_topic};
use vextrus_testkit::transport::{self as suite, TransportBackend};

/// Each setup gets a fresh topic (3 partitions) and a fresh consumer group.
struct Kafka;

impl TransportBackend for Kafka {
    type Transport = KafkaTransport;
    type Source = KafkaSource;

    async fn setup(&self, destination: &str) -> (KafkaTransport, KafkaSource) {
        let config = config();
        create_topic(&config, destination, 3)
            .await
            .unwrap_or_else(|err| panic!("creating topic {destination}: {err}"));
        let transport = KafkaTransport::new(config.clone()).unwrap();
        let source =
            KafkaSource::connect(config, ConsumerSpec::new(unique("suite"), [destination]))
                .unwrap();
        (transport, source)
    }

    fn unknown_destination(&self) -> String {
        unique("never-created")
    }

    fn max_message_bytes(&self) -> usize {
        config().max_message_bytes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_confirm_receive() {
    suite::publish_confirm_receive(&Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destination_is_typed() {
    suite::unknown_destination_is_typed(&Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_typed() {
    suite::oversized_message_is_typed(&Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_round_trip() {
    suite::headers_round_trip(&Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers() {
    suite::nack_redelivers(&Kafka).await;
}
