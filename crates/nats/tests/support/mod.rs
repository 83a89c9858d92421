//! Helpers shared by the integration tests: the server URL, uniquely named
//! streams that are deleted afterwards, a private `nats-server`, and sample
//! messages.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;
use uuid::Uuid;
use vextrus_nats::{JetStreamConfig, StreamSpec};

/// The shared test server (`VEXTRUS_TEST_NATS_URL`, default 127.0.0.1:4222).
pub fn nats_url() -> String {
    std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A unique stream name and subject root for one test.
pub struct TestStream {
    pub name: String,
    pub root: String,
}

impl TestStream {
    pub fn new() -> Self {
        let tag = Uuid::new_v4().simple().to_string();
        TestStream {
            name: format!("VXT_{tag}"),
            root: format!("vxt{tag}"),
        }
    }

    pub fn subject(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.root)
    }

    pub fn spec(&self) -> StreamSpec {
        StreamSpec::new(self.name.clone(), [format!("{}.>", self.root)])
    }

    pub fn config(&self) -> JetStreamConfig {
        JetStreamConfig::new(nats_url()).with_stream(self.spec())
    }
}

/// Runs `body` with a fresh stream and deletes the stream afterwards, also
/// when the body panics (the panic is then resumed).
pub async fn with_stream<F, Fut>(body: F)
where
    F: FnOnce(TestStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let stream = TestStream::new();
    let name = stream.name.clone();
    let outcome = std::panic::AssertUnwindSafe(body(stream))
        .catch_unwind()
        .await;
    delete_stream(&nats_url(), &name).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Deletes a stream (missing is fine).
pub async fn delete_stream(url: &str, name: &str) {
    if let Ok(client) = async_nats::connect(url).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(name).await;
    }
}

/// The CloudEvents binary-mode headers of a sample message.
pub fn cloud_event_headers(id: Uuid, key: &str) -> BTreeMap<String, String> {
    [
        ("ce_id", id.to_string()),
        ("ce_type", "OrderPlaced".to_owned()),
        ("ce_source", "/vextrus/sales".to_owned()),
        ("ce_time", "2026-11-28T02:00:00.123456Z".to_owned()),
        ("ce_specversion", "1.0".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("correlation_id", Uuid::new_v4().to_string()),
        ("causation_id", Uuid::new_v4().to_string()),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("tracestate", "vextrus=1".to_owned()),
        ("schema_version", "2".to_owned()),
        ("partition_key", key.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A `nats-server -js` of the test's own, on its own port and store dir.
pub struct PrivateServer {
    pub port: u16,
    pub store: PathBuf,
    child: Option<Child>,
}

impl PrivateServer {
    /// Starts a server on a free port storing into `store`; waits until it
    /// accepts connections.
    pub fn start(store: &Path) -> Self {
        let mut server = PrivateServer {
            port: free_port(),
            store: store.to_owned(),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let binary = std::env::var("VEXTRUS_NATS_SERVER").unwrap_or_else(|_| {
            if Path::new("/usr/sbin/nats-server").exists() {
                "/usr/sbin/nats-server".into()
            } else {
                "nats-server".into()
            }
        });
        let child = Command::new(binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (set VEXTRUS_NATS_SERVER)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL of the process we started).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}
