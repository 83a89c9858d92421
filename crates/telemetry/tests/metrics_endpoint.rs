//! `init` with a metrics address serves Prometheus `/metrics`; a scrape over
//! HTTP shows every metric of `names::ALL_METRICS` with its type, help,
//! labels and latency buckets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{
    Bulkhead, CircuitBreaker, CircuitBreakerConfig, CircuitState, RetryPolicy, SlidingWindow,
    timeout,
};
use vextrus_telemetry::{
    Outcome, TelemetryConfig, TelemetryError, TimedExt, init, names, record, try_init,
};

fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[derive(Debug)]
struct Conflict;
impl HasErrorKind for Conflict {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Conflict
    }
}

#[derive(Debug)]
struct Transient;
impl HasErrorKind for Transient {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Transient
    }
}

#[test]
fn metrics_endpoint_serves_every_vextrus_metric() {
    let guard = init(
        TelemetryConfig::new("metrics-test")
            .with_env_filter("warn")
            .with_metrics_addr("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    assert!(guard.installed_subscriber() && guard.installed_recorder());
    let addr = guard.metrics_addr().unwrap();

    // Record every metric once through the public helpers.
    record::event_append(3, Duration::from_millis(3), Outcome::Ok);
    record::outbox_backlog(7, Duration::from_secs(2));
    record::outbox_publish(Duration::from_millis(2), Outcome::Ok);
    record::outbox_publish(Duration::from_millis(9), Outcome::Error);
    record::outbox_dead_letters(1);
    record::message_consume(Duration::from_millis(1), Outcome::Ok);
    // The relay and the inbox record these themselves (vextrus-core), under
    // the names defined here.
    metrics::histogram!(names::OUTBOX_PUBLISH_LATENCY_SECONDS, names::LABEL_RELAY => "r1")
        .record(0.004);
    metrics::counter!(names::OUTBOX_DEAD_LETTERED_TOTAL, names::LABEL_RELAY => "r1").increment(1);
    metrics::counter!(names::INBOX_MESSAGES_TOTAL,
        names::LABEL_CONSUMER => "c1", names::LABEL_OUTCOME => "processed")
    .increment(2);
    record::sagas("order_to_cash", "running", 4);
    record::saga_step(
        "order_to_cash",
        "reserve_stock",
        Duration::from_millis(12),
        Outcome::Ok,
    );
    record::saga_compensation("order_to_cash", "reserve_stock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // The resilience policies record under the names listed in `names`: a
    // breaker that sees a slow call, then opens and rejects; a retry that
    // gives up; a timeout; a full bulkhead.
    let breaker = CircuitBreaker::new(
        "payments",
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(2)
            .slow_call_duration(Duration::from_millis(1))
            .wait_duration_in_open(Duration::from_secs(3600)),
    );
    let slow = breaker.try_acquire().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    slow.record_failure();
    breaker.try_acquire().unwrap().record_failure();
    assert_eq!(breaker.state(), CircuitState::Open);
    assert!(breaker.try_acquire().is_err());
    let policy = RetryPolicy::new()
        .min_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(1))
        .max_attempts(2);
    let gave_up: Result<(), Transient> = rt.block_on(policy.retry(|| async { Err(Transient) }));
    assert!(gave_up.is_err());
    let late = rt.block_on(async {
        timeout(Duration::from_millis(1), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Transient>(())
        })
        .await
    });
    assert!(late.is_err());
    let bulkhead = Bulkhead::new(1, 0);
    rt.block_on(async {
        let _held = bulkhead.acquire().await.unwrap();
        assert!(bulkhead.acquire().await.is_err(), "a full bulkhead rejects");
    });
    let failed: Result<(), Conflict> =
        rt.block_on(async { Err(Conflict) }.try_timed("inventory.reserve"));
    assert!(failed.is_err());

    let (status, head, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: text/plain; version=0.0.4"));
    for m in names::ALL_METRICS {
        assert!(
            body.contains(&format!("# TYPE {} {}\n", m.name, m.kind.as_str())),
            "{} missing from\n{body}",
            m.name
        );
        assert!(
            body.contains(&format!("# HELP {} {}", m.name, m.help)),
            "help of {}",
            m.name
        );
    }
    assert!(
        body.contains("vextrus_events_appended_total{service=\"metrics-test\"} 3"),
        "{body}"
    );
    assert!(body.contains("vextrus_outbox_backlog{service=\"metrics-test\"} 7"));
    assert!(body.contains("vextrus_outbox_publish_failures_total{service=\"metrics-test\"} 1"));
    assert!(body.contains(
        "vextrus_sagas{service=\"metrics-test\",saga_type=\"order_to_cash\",state=\"running\"} 4"
    ));
    // 1 = open, as vextrus_resilience::CircuitState encodes it.
    assert!(
        body.contains(
            "vextrus_resilience_breaker_state{service=\"metrics-test\",breaker=\"payments\"} 1"
        ),
        "{body}"
    );
    assert!(body.contains(
        "vextrus_resilience_breaker_calls_total{service=\"metrics-test\",breaker=\"payments\",outcome=\"rejected\"} 1"
    ), "{body}");
    assert!(body.contains(
        "vextrus_resilience_retry_give_ups_total{service=\"metrics-test\",reason=\"max_attempts\"} 1"
    ), "{body}");
    // Latency histograms have the documented buckets.
    assert!(body.contains(
        "vextrus_saga_step_seconds_bucket{service=\"metrics-test\",saga_type=\"order_to_cash\",step=\"reserve_stock\",outcome=\"ok\",le=\"0.025\"} 1"
    ), "{body}");
    assert!(body.contains(
        "vextrus_operation_seconds_count{service=\"metrics-test\",operation=\"inventory.reserve\",outcome=\"conflict\"} 1"
    ));
    assert_eq!(
        guard.render_metrics().map(|t| t.contains("vextrus_sagas")),
        Some(true)
    );

    // Anything but GET /metrics is refused.
    assert_eq!(http(addr, "GET", "/").0, 404);
    let (status, head, _) = http(addr, "POST", "/metrics");
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, head"));

    // A second `init` refuses to replace the installed subscriber; `try_init`
    // keeps it and reports what it installed.
    let err = init(TelemetryConfig::new("again")).unwrap_err();
    assert!(matches!(err, TelemetryError::AlreadyInstalled(_)), "{err}");
    let second = try_init(TelemetryConfig::new("again")).unwrap();
    assert!(!second.installed_subscriber());
    assert!(!second.installed_recorder());
    assert_eq!(second.metrics_addr(), None);
    drop(second);
    // The first guard still serves.
    assert_eq!(http(addr, "GET", "/metrics").0, 200);

    // Dropping the guard stops the listener.
    drop(guard);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() || http_fails(addr),
        "the listener still answers after the guard is dropped"
    );
}

/// After shutdown a connection may still be accepted by the kernel backlog
/// on some systems, but no HTTP answer comes back.
fn http_fails(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return true;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n");
    let mut buf = [0u8; 16];
    !matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

#[test]
fn a_taken_metrics_port_is_a_typed_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err =
        try_init(TelemetryConfig::new("clash").with_metrics_addr(taken.local_addr().unwrap()))
            .unwrap_err();
    assert!(
        matches!(
            err,
            TelemetryError::Io {
                what: "the metrics listener",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Transient);
    let err = try_init(TelemetryConfig::new("bad").with_env_filter("info,[")).unwrap_err();
    assert!(matches!(err, TelemetryError::InvalidFilter { .. }), "{err}");
    let err = try_init(TelemetryConfig::new("bad").with_otlp_endpoint("http://bad host:4318"))
        .unwrap_err();
    assert!(matches!(err, TelemetryError::Otlp(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::Validation);
}
