//! [`Backoff`]: the outbox relay's and the inbox's backoff between attempts
//! of one message, vextrus's one formula
//! ([`vextrus_resilience::backoff`](mod@vextrus_resilience::backoff)).

use std::time::Duration;

use vextrus_resilience::{backoff_cap, delay_for_attempt};

/// Capped exponential backoff with full jitter, the same arithmetic as
/// `vextrus_resilience::RetryPolicy` (both call
/// [`vextrus_resilience::backoff_cap`]): the cap of attempt `n` is
/// `min(max, min_delay * factor^(n-1))` and the delay is drawn uniformly
/// from `[0, cap]`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::outbox::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0);
/// assert_eq!(b.cap(1), Duration::from_millis(100));
/// assert_eq!(b.cap(3), Duration::from_millis(400));
/// assert_eq!(b.cap(10), Duration::from_secs(1));
/// assert!(b.delay(3) <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first cap.
    pub min_delay: Duration,
    /// The largest cap.
    pub max_delay: Duration,
    /// Growth per attempt.
    pub factor: f64,
}

impl Default for Backoff {
    /// 100 ms, doubling, up to 30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30), 2.0)
    }
}

impl Backoff {
    /// A backoff from `min_delay`, growing by `factor`, capped at `max_delay`.
    pub fn new(min_delay: Duration, max_delay: Duration, factor: f64) -> Self {
        Self {
            min_delay,
            max_delay,
            factor: factor.max(1.0),
        }
    }

    /// The cap after the `attempt`-th failure (1-based).
    pub fn cap(&self, attempt: u32) -> Duration {
        backoff_cap(attempt, self.min_delay, self.max_delay, self.factor)
    }

    /// A delay drawn uniformly from `[0, cap(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        delay_for_attempt(attempt, self.min_delay, self.max_delay, self.factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_backoff_is_the_resilience_formula() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 3.0);
        let shared =
            vextrus_resilience::ExponentialBackoff::new(b.min_delay, b.max_delay, b.factor);
        for n in 0..30 {
            assert_eq!(b.cap(n), shared.cap(n), "attempt {n}");
            assert!(b.delay(n) <= b.cap(n));
        }
        assert_eq!(b.cap(3), Duration::from_millis(90));
    }
}
