//! The small background runtime telemetry I/O runs on, and the two things
//! that run there: the OTLP HTTP client and the `/metrics` server.
//!
//! Both run on a dedicated single-threaded Tokio runtime on its own thread
//! so they work whatever runtime (or none) the service uses, and so that the
//! SDK's batch span processor, which exports from a plain thread with a
//! blocking executor, can still drive an async HTTP client: the client
//! spawns each request onto this runtime and waits on the task's handle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::TelemetryError;

/// Largest response body the OTLP client reads (receivers answer with a
/// small protobuf status).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// How often the Prometheus recorder's histograms are maintained.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A current-thread Tokio runtime on its own thread, stopped on drop.
#[derive(Debug)]
pub(crate) struct BackgroundRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundRuntime {
    pub(crate) fn start() -> Result<Self, TelemetryError> {
        let io = |source| TelemetryError::Io {
            what: "the telemetry runtime",
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vextrus-telemetry".into())
            .spawn(move || {
                runtime.block_on(async {
                    // Either a stop signal or the sender dropping ends the runtime.
                    let _ = stopped.await;
                });
                // Dropping the runtime here cancels the server and upkeep tasks.
            })
            .map_err(io)?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The OTLP exporter's HTTP client: hyper (HTTP/1.1, no TLS) on the
/// background runtime.
#[derive(Debug, Clone)]
pub(crate) struct OtlpHttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: Handle,
    timeout: Duration,
}

impl OtlpHttpClient {
    pub(crate) fn new(runtime: Handle, timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            client,
            runtime,
            timeout,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let (parts, body) = request.into_parts();
                let response = client
                    .request(http::Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, BoxError>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result,
                Err(elapsed) => Err(Box::new(elapsed) as BoxError),
            }
        });
        task.await?
    }
}

/// Serves `GET /metrics` from `handle` on `listener` until the runtime stops,
/// and runs the recorder's upkeep.
pub(crate) fn serve_metrics(
    runtime: &Handle,
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
) -> Result<SocketAddr, TelemetryError> {
    let io = |source| TelemetryError::Io {
        what: "the metrics listener",
        source,
    };
    listener.set_nonblocking(true).map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(io)?
    };
    runtime.spawn(async move {
        loop {
            let Ok((stream, _peer)) = listener.accept().await else {
                // Accept errors (fd exhaustion, aborted handshakes) are
                // transient; back off briefly rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(metrics_response(&req, &handle)) }
                });
                // A client hanging up mid-request is not worth reporting.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Runs the Prometheus recorder's periodic upkeep (histogram maintenance)
/// until the runtime stops.
pub(crate) fn spawn_upkeep(runtime: &Handle, handle: PrometheusHandle) {
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn metrics_response(
    req: &http::Request<Incoming>,
    handle: &PrometheusHandle,
) -> http::Response<Full<Bytes>> {
    let plain = |status: http::StatusCode, body: &'static str| {
        let mut response = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if req.uri().path() != "/metrics" {
        return plain(http::StatusCode::NOT_FOUND, "not found; try /metrics\n");
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut response = plain(http::StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let mut response = http::Response::new(Full::new(Bytes::from(handle.render())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
