//! The one backoff formula of vextrus: capped exponential growth with full
//! jitter.
//!
//! After the `n`-th failed attempt (1-based) the cap is
//! `cap_n = min(max_delay, min_delay * factor^(n-1))` and the delay is drawn
//! uniformly from `[0, cap_n]` ("full jitter", as in AWS's "Exponential
//! Backoff and Jitter": it spreads competing callers out best and never waits
//! longer than the cap). Attempt `0` is treated as attempt `1`.
//!
//! Every retry in vextrus uses it: [`RetryPolicy`](crate::RetryPolicy), the
//! outbox relay's and inbox's `Backoff` and the saga engine's `StepRetry`
//! (in `vextrus-core`).

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter.
///
/// ```
/// use std::time::Duration;
/// use vextrus_resilience::ExponentialBackoff;
///
/// let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0);
/// assert_eq!(b.cap(1), Duration::from_millis(100));
/// assert_eq!(b.cap(2), Duration::from_millis(200));
/// assert_eq!(b.cap(4), Duration::from_millis(800));
/// assert_eq!(b.cap(5), Duration::from_secs(1)); // capped
/// for n in 1..10 {
///     assert!(b.delay(n) <= b.cap(n)); // full jitter: uniform in [0, cap]
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    /// The cap after the first failure.
    pub min_delay: Duration,
    /// The largest cap (never below `min_delay`).
    pub max_delay: Duration,
    /// Growth per failure (at least 1; a non-finite factor counts as 1).
    pub factor: f64,
}

impl ExponentialBackoff {
    /// A backoff from `min_delay`, growing by `factor` per failure, capped
    /// at `max_delay`. A factor below 1 or not finite is taken as 1.
    pub fn new(min_delay: Duration, max_delay: Duration, factor: f64) -> Self {
        Self {
            min_delay,
            max_delay,
            factor: if factor.is_finite() {
                factor.max(1.0)
            } else {
                1.0
            },
        }
    }

    /// The cap after the `attempt`-th failure (1-based; 0 counts as 1):
    /// `min(max_delay, min_delay * factor^(attempt-1))`, never below
    /// `min_delay`.
    pub fn cap(&self, attempt: u32) -> Duration {
        backoff_cap(attempt, self.min_delay, self.max_delay, self.factor)
    }

    /// The delay after the `attempt`-th failure: drawn uniformly from
    /// `[0, cap(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        full_jitter(self.cap(attempt))
    }
}

/// The un-jittered cap after the `attempt`-th failure (1-based; 0 counts as
/// 1): `min(max_delay, min_delay * factor^(attempt-1))`, never below
/// `min_delay` (a `max_delay` below `min_delay` yields `min_delay`). A factor
/// below 1 or not finite is taken as 1; overflow saturates at the cap.
///
/// ```
/// use std::time::Duration;
/// use vextrus_resilience::backoff_cap;
///
/// let (min, max) = (Duration::from_millis(10), Duration::from_millis(100));
/// assert_eq!(backoff_cap(0, min, max, 3.0), min);
/// assert_eq!(backoff_cap(3, min, max, 3.0), Duration::from_millis(90));
/// assert_eq!(backoff_cap(u32::MAX, min, max, 3.0), max);
/// ```
pub fn backoff_cap(
    attempt: u32,
    min_delay: Duration,
    max_delay: Duration,
    factor: f64,
) -> Duration {
    let factor = if factor.is_finite() {
        factor.max(1.0)
    } else {
        1.0
    };
    let ceiling = max_delay.max(min_delay);
    let exp = factor.powi(attempt.saturating_sub(1).min(1_024) as i32);
    let secs = min_delay.as_secs_f64() * exp;
    if !secs.is_finite() || secs >= ceiling.as_secs_f64() {
        ceiling
    } else {
        // Exact for whole factors (100 ms * 2^n is 100 ms * 2^n, not a
        // float's neighbour of it).
        let whole = factor.fract() == 0.0 && exp <= u32::MAX as f64;
        let grown = if whole {
            min_delay.checked_mul(exp as u32)
        } else {
            None
        };
        grown
            .unwrap_or_else(|| Duration::from_secs_f64(secs))
            .min(ceiling)
    }
}

/// A delay drawn uniformly from `[0, cap]` (full jitter).
///
/// ```
/// use std::time::Duration;
/// use vextrus_resilience::full_jitter;
///
/// assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
/// assert!(full_jitter(Duration::from_millis(5)) <= Duration::from_millis(5));
/// ```
pub fn full_jitter(cap: Duration) -> Duration {
    let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=cap_nanos))
}

/// The delay before the attempt that follows the `attempt`-th failure
/// (1-based): exponential growth from `min_delay` by `factor`, capped at
/// `max_delay`, with full jitter, i.e.
/// `full_jitter(backoff_cap(attempt, min_delay, max_delay, factor))`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_resilience::delay_for_attempt;
///
/// let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
/// for _ in 0..100 {
///     // 3rd failure: cap 400 ms, delay uniform in [0, 400 ms]
///     assert!(delay_for_attempt(3, min, max, 2.0) <= Duration::from_millis(400));
///     // far out: never past the cap
///     assert!(delay_for_attempt(50, min, max, 2.0) <= max);
/// }
/// ```
pub fn delay_for_attempt(
    attempt: u32,
    min_delay: Duration,
    max_delay: Duration,
    factor: f64,
) -> Duration {
    full_jitter(backoff_cap(attempt, min_delay, max_delay, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_grow_exponentially_then_stop() {
        let b = ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100), 3.0);
        assert_eq!(b.cap(0), Duration::from_millis(10));
        assert_eq!(b.cap(1), Duration::from_millis(10));
        assert_eq!(b.cap(2), Duration::from_millis(30));
        assert_eq!(b.cap(3), Duration::from_millis(90));
        assert_eq!(b.cap(4), Duration::from_millis(100));
        assert_eq!(b.cap(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn fractional_and_nonsense_factors() {
        let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(10), 1.5);
        assert_eq!(b.cap(3), Duration::from_millis(225));
        let flat = ExponentialBackoff::new(Duration::from_millis(7), Duration::from_secs(1), 0.2);
        assert_eq!(flat.factor, 1.0);
        assert_eq!(flat.cap(30), Duration::from_millis(7));
        assert_eq!(
            backoff_cap(
                5,
                Duration::from_millis(7),
                Duration::from_secs(1),
                f64::NAN
            ),
            Duration::from_millis(7)
        );
        // max below min: min wins
        assert_eq!(
            backoff_cap(9, Duration::from_secs(2), Duration::from_secs(1), 2.0),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn jitter_spreads_over_the_whole_cap() {
        let cap = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..2_000).map(|_| full_jitter(cap)).collect();
        assert!(draws.iter().all(|d| *d <= cap));
        let low = draws.iter().filter(|d| **d < cap / 4).count();
        let high = draws.iter().filter(|d| **d > cap * 3 / 4).count();
        // Uniform: about 500 each; additive jitter would give no low ones.
        assert!(low > 300 && high > 300, "low {low}, high {high}");
    }

    #[test]
    fn delay_for_attempt_stays_under_its_cap() {
        let (min, max) = (Duration::from_millis(1), Duration::from_millis(50));
        for n in 0..40 {
            let d = delay_for_attempt(n, min, max, 2.0);
            assert!(d <= backoff_cap(n, min, max, 2.0), "attempt {n}: {d:?}");
        }
    }
}
