//! Relays naming the same downstream share one circuit breaker through the
//! process-wide registry (one breaker per downstream for every caller);
//! relays with different names, or none, do not.

use vextrus_core::outbox::{InMemoryOutbox, OutboxRelay, RelayConfig};
use vextrus_core::transport::InProcessTransport;
use vextrus_resilience::{BreakerRegistry, CircuitBreakerConfig, CircuitState, SlidingWindow};

fn relay(name: &str, breaker: Option<&str>) -> OutboxRelay<InMemoryOutbox, InProcessTransport> {
    let mut config = RelayConfig::new(name);
    config.breaker = CircuitBreakerConfig::new()
        .sliding_window(SlidingWindow::Count(4))
        .minimum_calls(2)
        .failure_rate_threshold(50.0);
    config.breaker_name = breaker.map(str::to_owned);
    OutboxRelay::new(InMemoryOutbox::new(), InProcessTransport::new(), config)
}

/// Opens `relay`'s breaker by recording failed calls through it.
fn open(relay: &OutboxRelay<InMemoryOutbox, InProcessTransport>) {
    for _ in 0..4 {
        if let Ok(permit) = relay.breaker().try_acquire() {
            permit.record_failure();
        }
    }
    assert_eq!(relay.breaker().state(), CircuitState::Open);
}

#[tokio::test]
async fn relays_naming_one_downstream_share_its_breaker() {
    let (a, b) = (
        relay("orders", Some("nats://shared-test-broker")),
        relay("replies", Some("nats://shared-test-broker")),
    );
    let other = relay("audit", Some("nats://another-test-broker"));
    let own = relay("own", None);
    assert_eq!(a.breaker().name(), "nats://shared-test-broker");
    assert_eq!(own.breaker().name(), "outbox-relay-own");
    open(&a);
    // The other relay of the same downstream refuses too.
    assert_eq!(b.breaker().state(), CircuitState::Open);
    assert!(b.breaker().try_acquire().is_err());
    // Other downstreams, and a relay with a breaker of its own, are not affected.
    assert_eq!(other.breaker().state(), CircuitState::Closed);
    assert_eq!(own.breaker().state(), CircuitState::Closed);
    // It is the registry's breaker, visible to every caller in the process.
    let registered = BreakerRegistry::global()
        .find("nats://shared-test-broker")
        .expect("registered");
    assert_eq!(registered.state(), CircuitState::Open);
    assert!(BreakerRegistry::global().find("outbox-relay-own").is_none());
}
