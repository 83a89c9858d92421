//! What [`crate::init`] sets up, usually read from the environment.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::TelemetryError;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable, coloured when stderr is a terminal (development).
    #[default]
    Human,
    /// One JSON object per line with span context (production, log shippers).
    Json,
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "human" | "pretty" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::InvalidConfig {
                setting: TelemetryConfig::ENV_LOG_FORMAT,
                reason: format!("expected `human` or `json`, got {other:?}"),
            }),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

/// Everything [`crate::init`] needs to set up a service's telemetry.
///
/// Build it in code, or read it from the environment with
/// [`TelemetryConfig::from_env`]:
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `RUST_LOG` | the log/span filter (`tracing_subscriber::EnvFilter` syntax) | `info` |
/// | `VEXTRUS_LOG_FORMAT` | `human` or `json` | `human` |
/// | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL of an OTLP/HTTP receiver; spans go to `<base>/v1/traces` | no export |
/// | `OTEL_SERVICE_NAME` | overrides the service name given in code | |
/// | `VEXTRUS_METRICS_ADDR` | address to serve Prometheus `/metrics` on, such as `0.0.0.0:9464` | not served |
///
/// ```
/// use vextrus_telemetry::{LogFormat, TelemetryConfig};
///
/// let config = TelemetryConfig::new("sales")
///     .with_log_format(LogFormat::Json)
///     .with_env_filter("info,vextrus=debug")
///     .with_otlp_endpoint("http://127.0.0.1:4318")
///     .with_metrics_addr("127.0.0.1:9464".parse().unwrap());
/// assert_eq!(config.service_name(), "sales");
/// assert_eq!(
///     config.otlp_traces_url().as_deref(),
///     Some("http://127.0.0.1:4318/v1/traces")
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    service_name: String,
    log_format: LogFormat,
    env_filter: String,
    otlp_endpoint: Option<String>,
    metrics_addr: Option<SocketAddr>,
    export_timeout: Duration,
}

impl TelemetryConfig {
    /// The filter variable.
    pub const ENV_FILTER: &'static str = "RUST_LOG";
    /// The log-format variable.
    pub const ENV_LOG_FORMAT: &'static str = "VEXTRUS_LOG_FORMAT";
    /// The OTLP base endpoint variable (the OpenTelemetry standard one).
    pub const ENV_OTLP_ENDPOINT: &'static str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// The service-name override variable (the OpenTelemetry standard one).
    pub const ENV_SERVICE_NAME: &'static str = "OTEL_SERVICE_NAME";
    /// The metrics listen-address variable.
    pub const ENV_METRICS_ADDR: &'static str = "VEXTRUS_METRICS_ADDR";
    /// The filter used when none is given.
    pub const DEFAULT_FILTER: &'static str = "info";

    /// A configuration for `service_name`: human logs at `info`, no OTLP
    /// export, no metrics listener.
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            log_format: LogFormat::Human,
            env_filter: Self::DEFAULT_FILTER.to_owned(),
            otlp_endpoint: None,
            metrics_addr: None,
            export_timeout: Duration::from_secs(10),
        }
    }

    /// Reads the configuration from the process environment (see the table
    /// on [`TelemetryConfig`]). Empty variables count as unset.
    pub fn from_env(service_name: impl Into<String>) -> Result<Self, TelemetryError> {
        Self::from_lookup(service_name, |key| std::env::var(key).ok())
    }

    /// Like [`TelemetryConfig::from_env`], reading variables through `lookup`
    /// (for tests and for configuration layered over the environment).
    pub fn from_lookup(
        service_name: impl Into<String>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let mut config = Self::new(service_name);
        if let Some(name) = get(Self::ENV_SERVICE_NAME) {
            config.service_name = name.trim().to_owned();
        }
        if let Some(filter) = get(Self::ENV_FILTER) {
            config.env_filter = filter;
        }
        if let Some(format) = get(Self::ENV_LOG_FORMAT) {
            config.log_format = format.parse()?;
        }
        if let Some(endpoint) = get(Self::ENV_OTLP_ENDPOINT) {
            config.otlp_endpoint = Some(endpoint.trim().to_owned());
        }
        if let Some(addr) = get(Self::ENV_METRICS_ADDR) {
            let parsed = addr
                .trim()
                .parse()
                .map_err(|e| TelemetryError::InvalidConfig {
                    setting: Self::ENV_METRICS_ADDR,
                    reason: format!("{addr:?} is not a socket address: {e}"),
                })?;
            config.metrics_addr = Some(parsed);
        }
        Ok(config)
    }

    /// Sets the log format.
    pub fn with_log_format(mut self, format: LogFormat) -> Self {
        self.log_format = format;
        self
    }

    /// Sets the filter directive (`EnvFilter` syntax, such as `info,sqlx=warn`).
    pub fn with_env_filter(mut self, filter: impl Into<String>) -> Self {
        self.env_filter = filter.into();
        self
    }

    /// Exports spans over OTLP/HTTP (protobuf) to `endpoint`, the receiver's
    /// base URL (`http://collector:4318`); spans are POSTed to `/v1/traces`.
    pub fn with_otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Turns OTLP export off, whatever the environment said.
    pub fn without_otlp(mut self) -> Self {
        self.otlp_endpoint = None;
        self
    }

    /// Serves Prometheus `/metrics` on `addr` (port 0 picks a free port; see
    /// [`crate::TelemetryGuard::metrics_addr`]).
    pub fn with_metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Sets how long one OTLP export request may take (default 10 s).
    pub fn with_export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = timeout;
        self
    }

    /// The service name (OpenTelemetry `service.name`, Prometheus `service` label).
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The log format.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The filter directive.
    pub fn env_filter(&self) -> &str {
        &self.env_filter
    }

    /// The OTLP base endpoint, if export is on.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }

    /// The full URL spans are POSTed to, if export is on.
    pub fn otlp_traces_url(&self) -> Option<String> {
        self.otlp_endpoint
            .as_deref()
            .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
    }

    /// The metrics listen address, if `/metrics` is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The OTLP export timeout.
    pub fn export_timeout(&self) -> Duration {
        self.export_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn empty_environment_gives_defaults() {
        let c = TelemetryConfig::from_lookup("sales", env(&[])).unwrap();
        assert_eq!(c, TelemetryConfig::new("sales"));
        assert_eq!(c.env_filter(), "info");
        assert_eq!(c.log_format(), LogFormat::Human);
        assert_eq!(c.otlp_traces_url(), None);
        assert_eq!(c.metrics_addr(), None);
    }

    #[test]
    fn environment_sets_every_field() {
        let c = TelemetryConfig::from_lookup(
            "sales",
            env(&[
                ("RUST_LOG", "debug,hyper=warn"),
                ("VEXTRUS_LOG_FORMAT", "JSON"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "sales-eu"),
                ("VEXTRUS_METRICS_ADDR", "0.0.0.0:9464"),
            ]),
        )
        .unwrap();
        assert_eq!(c.service_name(), "sales-eu");
        assert_eq!(c.env_filter(), "debug,hyper=warn");
        assert_eq!(c.log_format(), LogFormat::Json);
        assert_eq!(
            c.otlp_traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(c.metrics_addr(), Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(c.clone().without_otlp().otlp_endpoint(), None);
    }

    #[test]
    fn blank_variables_count_as_unset() {
        let c = TelemetryConfig::from_lookup(
            "sales",
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  "), ("RUST_LOG", "")]),
        )
        .unwrap();
        assert_eq!(c.otlp_endpoint(), None);
        assert_eq!(c.env_filter(), "info");
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let err =
            TelemetryConfig::from_lookup("s", env(&[("VEXTRUS_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(matches!(
            err,
            TelemetryError::InvalidConfig {
                setting: "VEXTRUS_LOG_FORMAT",
                ..
            }
        ));
        let err = TelemetryConfig::from_lookup("s", env(&[("VEXTRUS_METRICS_ADDR", "localhost")]))
            .unwrap_err();
        assert!(matches!(
            err,
            TelemetryError::InvalidConfig {
                setting: "VEXTRUS_METRICS_ADDR",
                ..
            }
        ));
        assert_eq!("json".parse::<LogFormat>().unwrap().to_string(), "json");
    }
}
