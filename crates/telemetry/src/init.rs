//! One-call setup: [`init`] and [`try_init`], and the [`TelemetryGuard`]
//! that flushes and shuts everything down.

use std::io::IsTerminal as _;
use std::net::SocketAddr;

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;

use crate::runtime::{BackgroundRuntime, OtlpHttpClient, serve_metrics, spawn_upkeep};
use crate::{LogFormat, TelemetryConfig, TelemetryError, names};

/// Histogram buckets (seconds) for every `*_seconds` metric: 0.5 ms to 10 s,
/// dense where appends, publishes and saga steps usually land.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The instrumentation scope name vextrus spans are recorded under.
pub const TRACER_NAME: &str = "vextrus";

/// Sets up telemetry for a service, refusing to replace anything already
/// installed:
///
/// * a global `tracing` subscriber: `EnvFilter` from the config, human or
///   JSON logs on stderr, and an OpenTelemetry layer. The layer is always
///   installed, so spans get W3C trace ids that propagate to downstream
///   services even when this one exports nothing; spans are exported over
///   OTLP/HTTP (protobuf) only when an endpoint is configured;
/// * the global OpenTelemetry tracer provider and the W3C Trace Context
///   propagator;
/// * the Prometheus recorder behind the `metrics` facade, with every metric
///   of [`names::ALL_METRICS`] described, a `service` label, and
///   [`LATENCY_BUCKETS`] for every `*_seconds` histogram; `/metrics` is
///   served when a listen address is configured.
///
/// Keep the returned guard alive for the life of the service: dropping it
/// flushes pending spans and stops the exporter and the metrics listener.
///
/// Fails with [`TelemetryError::AlreadyInstalled`] when a subscriber or
/// recorder is already installed (see [`try_init`] for tests). Configuration
/// errors (filter, listen address, OTLP endpoint) are found before anything
/// global is touched; but process-wide state cannot be uninstalled, so a
/// subscriber installed before the recorder turned out to be taken stays.
///
/// ```
/// use vextrus_telemetry::{init, names, record, Outcome, TelemetryConfig};
///
/// # fn main() -> Result<(), vextrus_telemetry::TelemetryError> {
/// // In a service: `init(TelemetryConfig::from_env("sales")?)?`.
/// let config = TelemetryConfig::new("sales").with_metrics_addr("127.0.0.1:0".parse().unwrap());
/// let telemetry = init(config)?;
/// tracing::info!("sales service started");
///
/// record::event_append(1, std::time::Duration::from_millis(3), Outcome::Ok);
/// assert!(telemetry.metrics_addr().is_some()); // GET http://<addr>/metrics
/// let text = telemetry.render_metrics().unwrap();
/// assert!(text.contains(names::EVENTS_APPENDED_TOTAL));
/// # Ok(())
/// # }
/// ```
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    setup(config, true, None)
}

/// Wraps the Prometheus recorder before it is installed (see
/// [`init_layered`]).
pub type MetricsLayer =
    Box<dyn FnOnce(PrometheusRecorder) -> Box<dyn metrics::Recorder + Send + Sync>>;

/// Like [`init`], but the Prometheus recorder is handed to `layer` and what
/// it returns is installed as the global recorder: a recorder that sees
/// every metric and forwards it to Prometheus (so `/metrics` and
/// [`TelemetryGuard::render_metrics`] still work), such as
/// `vextrus_order_to_cash::step_metrics::StepTimings::layer`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
/// use vextrus_telemetry::{TelemetryConfig, init_layered, names, record};
///
/// /// Counts histogram registrations, forwards everything.
/// struct Seen<R> { inner: R, histograms: Arc<AtomicUsize> }
/// impl<R: Recorder> Recorder for Seen<R> {
///     fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) { self.inner.describe_counter(k, u, d) }
///     fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) { self.inner.describe_gauge(k, u, d) }
///     fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) { self.inner.describe_histogram(k, u, d) }
///     fn register_counter(&self, k: &Key, m: &Metadata<'_>) -> Counter { self.inner.register_counter(k, m) }
///     fn register_gauge(&self, k: &Key, m: &Metadata<'_>) -> Gauge { self.inner.register_gauge(k, m) }
///     fn register_histogram(&self, k: &Key, m: &Metadata<'_>) -> Histogram {
///         self.histograms.fetch_add(1, Ordering::SeqCst);
///         self.inner.register_histogram(k, m)
///     }
/// }
///
/// # fn main() -> Result<(), vextrus_telemetry::TelemetryError> {
/// let histograms = Arc::new(AtomicUsize::new(0));
/// let seen = histograms.clone();
/// let telemetry = init_layered(
///     TelemetryConfig::new("demo"),
///     Box::new(move |prometheus| Box::new(Seen { inner: prometheus, histograms: seen })),
/// )?;
/// record::saga_step("o2c", "reserve", std::time::Duration::from_millis(4), record::Outcome::Ok);
/// assert_eq!(histograms.load(Ordering::SeqCst), 1); // the layer saw it ...
/// assert!(telemetry.render_metrics().unwrap().contains(names::SAGA_STEP_SECONDS)); // ... and Prometheus too
/// # Ok(())
/// # }
/// ```
pub fn init_layered(
    config: TelemetryConfig,
    layer: MetricsLayer,
) -> Result<TelemetryGuard, TelemetryError> {
    setup(config, true, Some(layer))
}

/// Like [`init`], but a subscriber or metrics recorder that is already
/// installed is kept rather than reported as an error: the guard then says
/// what it did install ([`TelemetryGuard::installed_subscriber`],
/// [`TelemetryGuard::installed_recorder`]). Meant for tests, where several
/// tests of one binary each ask for telemetry; the first to ask owns it.
pub fn try_init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    setup(config, false, None)
}

fn setup(
    config: TelemetryConfig,
    strict: bool,
    layer: Option<MetricsLayer>,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(config.env_filter()).map_err(|source| {
        TelemetryError::InvalidFilter {
            filter: config.env_filter().to_owned(),
            source,
        }
    })?;

    // Bind first: a bad address should fail before anything global changes.
    let metrics_listener = config
        .metrics_addr()
        .map(|addr| {
            std::net::TcpListener::bind(addr).map_err(|source| TelemetryError::Io {
                what: "the metrics listener",
                source,
            })
        })
        .transpose()?;

    let runtime = BackgroundRuntime::start()?;
    let runtime_handle = runtime.handle().clone();
    let mut guard = TelemetryGuard {
        tracer_provider: None,
        metrics: None,
        metrics_addr: None,
        installed_subscriber: false,
        installed_recorder: false,
        runtime: Some(runtime),
    };

    // Tracing and OpenTelemetry.
    let mut provider = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(config.service_name().to_owned())
            .build(),
    );
    if let Some(url) = config.otlp_traces_url() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpHttpClient::new(
                runtime_handle.clone(),
                config.export_timeout(),
            ))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(config.export_timeout())
            .build()
            .map_err(|e| TelemetryError::Otlp(Box::new(e)))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    guard.tracer_provider = Some(provider.clone());
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(TRACER_NAME));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(log_layer(
            config.log_format(),
            std::io::stderr,
            stderr_wants_colour(),
        ))
        .with(otel_layer);
    match tracing::subscriber::set_global_default(subscriber) {
        Ok(()) => guard.installed_subscriber = true,
        Err(_) if strict => return Err(TelemetryError::AlreadyInstalled("tracing subscriber")),
        Err(_) => {}
    }
    if guard.installed_subscriber {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider);
    }

    // Metrics.
    let builder = PrometheusBuilder::new()
        .add_global_label(names::LABEL_SERVICE, config.service_name())
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .map_err(|e| TelemetryError::Prometheus(Box::new(e)))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let installed: Box<dyn metrics::Recorder + Send + Sync> = match layer {
        Some(layer) => layer(recorder),
        None => Box::new(recorder),
    };
    match metrics::set_global_recorder(installed) {
        Ok(()) => {
            guard.installed_recorder = true;
            names::describe_metrics();
            spawn_upkeep(&runtime_handle, handle.clone());
            if let Some(listener) = metrics_listener {
                guard.metrics_addr =
                    Some(serve_metrics(&runtime_handle, listener, handle.clone())?);
            }
            guard.metrics = Some(handle);
        }
        Err(_) if strict => return Err(TelemetryError::AlreadyInstalled("metrics recorder")),
        Err(_) => {
            if metrics_listener.is_some() {
                tracing::warn!("a metrics recorder is already installed; not serving /metrics");
            }
        }
    }
    Ok(guard)
}

/// Whether human logs on stderr get ANSI colours: only when stderr is a
/// terminal and `NO_COLOR` is unset or empty (<https://no-color.org>), so
/// that log files and journald get plain text.
fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The log-line layer: human-readable (with colours if `ansi`) or one JSON
/// object per line with the current span, written to `writer`.
fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    }
}

/// Keeps telemetry running; dropping it flushes pending spans, shuts the
/// exporter down and stops the `/metrics` listener.
///
/// (The global subscriber and recorder cannot be uninstalled; after the
/// guard is gone they keep logging and counting, but nothing is exported
/// or served.)
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    metrics: Option<PrometheusHandle>,
    metrics_addr: Option<SocketAddr>,
    installed_subscriber: bool,
    installed_recorder: bool,
    // Dropped last: the exporter's HTTP client runs on it.
    runtime: Option<BackgroundRuntime>,
}

impl TelemetryGuard {
    /// The address `/metrics` is served on (useful with port 0), if served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The current metrics in the Prometheus text format, if this guard
    /// installed the recorder (for services that serve it on their own
    /// HTTP router).
    pub fn render_metrics(&self) -> Option<String> {
        self.metrics.as_ref().map(PrometheusHandle::render)
    }

    /// Whether this guard installed the global `tracing` subscriber.
    pub fn installed_subscriber(&self) -> bool {
        self.installed_subscriber
    }

    /// Whether this guard installed the global metrics recorder.
    pub fn installed_recorder(&self) -> bool {
        self.installed_recorder
    }

    /// Exports every finished span now, waiting for the exporter.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        match &self.tracer_provider {
            Some(p) => p
                .force_flush()
                .map_err(|e| TelemetryError::Otlp(Box::new(e))),
            None => Ok(()),
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(e) = provider.shutdown()
        {
            // The subscriber may be gone or this guard's; stderr is the one
            // place certain to be seen.
            eprintln!("vextrus-telemetry: flushing spans on shutdown failed: {e}");
        }
        drop(self.runtime.take());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `MakeWriter` that appends every log line to one buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    /// Logs one event inside a saga-step span in `format` and returns the
    /// text written.
    fn log_one(format: LogFormat, ansi: bool) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(log_layer(format, buffer.clone(), ansi));
        tracing::subscriber::with_default(subscriber, || {
            let step = tracing::info_span!("vextrus.saga.step", saga = "saga-7");
            step.in_scope(|| tracing::info!(order = "o-42", "reserving stock"));
            tracing::debug!("filtered out at info");
        });
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_the_current_span() {
        let text = log_one(LogFormat::Json, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = lines[0];
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        for part in [
            r#""level":"INFO""#,
            r#""message":"reserving stock""#,
            r#""order":"o-42""#,
            r#""span":{"#,
            r#""name":"vextrus.saga.step""#,
            r#""saga":"saga-7""#,
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
        assert!(!line.contains('\u{1b}'), "no colour codes in JSON: {line}");
    }

    #[test]
    fn human_logs_are_plain_text_coloured_only_when_asked() {
        let plain = log_one(LogFormat::Human, false);
        assert_eq!(plain.lines().count(), 1, "{plain}");
        assert!(!plain.starts_with('{'), "{plain}");
        for part in [
            "INFO",
            "vextrus.saga.step{saga=\"saga-7\"}",
            "reserving stock",
            "order=\"o-42\"",
        ] {
            assert!(plain.contains(part), "{part} not in {plain}");
        }
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        let coloured = log_one(LogFormat::Human, true);
        assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    }
}
