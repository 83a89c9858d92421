//! The testkit's transport conformance suite, run on JetStream (the shared
//! server at `VEXTRUS_TEST_NATS_URL`). Every destination gets its own stream,
//! deleted when the case ends.

mod support;

use std::sync::Mutex;

use std::sync::atomic::{AtomicUsize, Ordering};
use support::{delete_stream, nats_url};
use vextrus_nats::{
    ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport, StreamSpec,
};
use vextrus_testkit::transport::{self as suite, TransportBackend};

/// Creates one stream per destination (named after it) and remembers it for
/// [`JetStreamBackend::cleanup`].
#[derive(Default)]
struct JetStreamBackend {
    streams: Mutex<Vec<String>>,
    max_payload: AtomicUsize,
}

impl JetStreamBackend {
    async fn cleanup(&self) {
        let streams = std::mem::take(&mut *self.streams.lock().unwrap());
        for stream in streams {
            delete_stream(&nats_url(), &stream).await;
        }
    }
}

fn stream_name(destination: &str) -> String {
    format!("VXS_{}", destination.replace(['.', '-', '*', '>'], "_"))
}

impl TransportBackend for JetStreamBackend {
    type Transport = JetStreamTransport;
    type Source = JetStreamSource;

    async fn setup(&self, destination: &str) -> (JetStreamTransport, JetStreamSource) {
        let name = stream_name(destination);
        self.streams.lock().unwrap().push(name.clone());
        let config = JetStreamConfig::new(nats_url())
            .with_stream(StreamSpec::new(name.clone(), [destination.to_owned()]));
        let transport = JetStreamTransport::connect(config.clone())
            .await
            .expect("NATS JetStream must be running");
        self.max_payload
            .store(transport.client().max_payload(), Ordering::Relaxed);
        let source = JetStreamSource::connect(config, ConsumerSpec::new(name, "suite"))
            .await
            .expect("consumer");
        (transport, source)
    }

    fn unknown_destination(&self) -> String {
        format!("vx-nowhere-{}", uuid::Uuid::new_v4().simple())
    }

    fn max_message_bytes(&self) -> usize {
        // The server's max_payload, as the connection learnt it in `setup`.
        self.max_payload.load(Ordering::Relaxed)
    }
}

async fn run<F, Fut>(case: F)
where
    F: FnOnce(&'static JetStreamBackend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::FutureExt;
    let backend: &'static JetStreamBackend = Box::leak(Box::default());
    let outcome = std::panic::AssertUnwindSafe(case(backend))
        .catch_unwind()
        .await;
    backend.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn publish_confirm_receive() {
    run(suite::publish_confirm_receive).await;
}

#[tokio::test]
async fn unknown_destination_is_typed() {
    run(suite::unknown_destination_is_typed).await;
}

#[tokio::test]
async fn oversized_message_is_typed() {
    run(suite::oversized_message_is_typed).await;
}

#[tokio::test]
async fn headers_round_trip() {
    run(suite::headers_round_trip).await;
}

#[tokio::test]
async fn nack_redelivers() {
    run(suite::nack_redelivers).await;
}
