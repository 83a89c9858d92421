//! Topic administration.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::{KafkaConfig, validate_topic};
use crate::error::{KafkaError, Result, classify};

/// Creates `topic` with `partitions` partitions (replication factor 1 on a
/// one-broker cluster; the cluster's default otherwise). A topic that
/// already exists is not an error.
///
/// ```no_run
/// # async fn demo() -> Result<(), vextrus_kafka::KafkaError> {
/// use vextrus_kafka::{KafkaConfig, create_topic};
///
/// create_topic(&KafkaConfig::new("127.0.0.1:9092"), "orders", 6).await?;
/// # Ok(()) }
/// ```
pub async fn create_topic(config: &KafkaConfig, topic: &str, partitions: i32) -> Result<()> {
    config.validate()?;
    validate_topic(topic)?;
    if partitions < 1 {
        return Err(KafkaError::InvalidConfig(format!(
            "a topic needs at least one partition, not {partitions}"
        )));
    }
    let mut client_config = rdkafka::ClientConfig::new();
    client_config.set("bootstrap.servers", config.brokers());
    let admin: AdminClient<DefaultClientContext> = client_config.create().map_err(|err| {
        KafkaError::InvalidConfig(format!("cannot create the admin client: {err}"))
    })?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new()
        .operation_timeout(Some(config.metadata_timeout()))
        .request_timeout(Some(config.metadata_timeout()));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(|err| KafkaError::Unavailable {
            reason: format!("creating topic `{topic}` failed: {err}"),
            source: Some(Box::new(err)),
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(match classify(code) {
                    crate::error::Class::Timeout | crate::error::Class::Unavailable => {
                        KafkaError::Unavailable {
                            reason: format!("creating topic `{name}`: {code}"),
                            source: None,
                        }
                    }
                    _ => KafkaError::Rejected {
                        reason: format!("creating topic `{name}`: {code}"),
                        source: None,
                    },
                });
            }
        }
    }
    Ok(())
}
