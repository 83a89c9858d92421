//! Failure injection, reproducible from one seed.
//!
//! Every decision is a draw from a SplitMix64 generator seeded with the run's
//! seed mixed with what the decision is about (the order, the participant,
//! the idempotency key, the delivery number). So a decision depends only on
//! the seed and its subject, never on the order in which concurrent sagas
//! happen to ask: the same seed declines the same orders, runs the same
//! SKUs out of stock and crashes the same deliveries on every run.
//!
//! - **Business failures** (per order): a declined payment, stock reported
//!   out, a carrier refusing the shipment. The participant replies with the
//!   failure (and stores that reply under the idempotency key).
//! - **Crashes** (per delivery): the handler fails before commit with
//!   [`crate::Error::InjectedCrash`]; nothing is written and the command is
//!   to be redelivered. Each redelivery of the same key draws again.
//! - **Timeouts** (per key, first delivery only): the handler commits, then
//!   holds its reply for [`FaultConfig::timeout_delay`], past the step's
//!   timeout; the orchestrator retries (getting the stored reply) or
//!   compensates.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// Failure rates, each a probability in `[0, 1]`.
///
/// ```
/// use vextrus_order_to_cash::FaultConfig;
///
/// let quiet = FaultConfig::none();
/// assert_eq!(quiet.decline_rate, 0.0);
/// let default = FaultConfig::default();
/// assert!(default.validate().is_ok());
/// assert!(FaultConfig { crash_rate: 1.5, ..FaultConfig::none() }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaultConfig {
    /// Chance that an order's payment is declined.
    pub decline_rate: f64,
    /// Chance that inventory reports an order's stock as out.
    pub out_of_stock_rate: f64,
    /// Chance that the carrier refuses an order's shipment.
    pub shipping_failure_rate: f64,
    /// Chance that one delivery of a command crashes its handler before commit.
    pub crash_rate: f64,
    /// Chance that a command's first reply is held past the step timeout.
    pub timeout_rate: f64,
    /// How long a delayed reply is held (longer than the saga's step
    /// timeout, so the step times out).
    pub timeout_delay: Duration,
    /// Chance that a generated order is invalid (a line priced in another
    /// currency), so its validation step fails.
    pub invalid_order_rate: f64,
}

impl FaultConfig {
    /// No failures at all.
    pub fn none() -> Self {
        Self {
            decline_rate: 0.0,
            out_of_stock_rate: 0.0,
            shipping_failure_rate: 0.0,
            crash_rate: 0.0,
            timeout_rate: 0.0,
            timeout_delay: Duration::from_millis(2_500),
            invalid_order_rate: 0.0,
        }
    }

    /// Checks that every rate is a probability.
    pub fn validate(&self) -> Result<()> {
        for (field, rate) in [
            ("decline_rate", self.decline_rate),
            ("out_of_stock_rate", self.out_of_stock_rate),
            ("shipping_failure_rate", self.shipping_failure_rate),
            ("crash_rate", self.crash_rate),
            ("timeout_rate", self.timeout_rate),
            ("invalid_order_rate", self.invalid_order_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(Error::invalid(
                    field,
                    format!("{rate} is not within [0, 1]"),
                ));
            }
        }
        Ok(())
    }
}

impl Default for FaultConfig {
    /// 5% declines, 3% out of stock, 3% shipping failures, 2% crashes per
    /// delivery, 1% of replies held for 2.5 s (past the default 2 s step
    /// timeout), 1% invalid orders.
    fn default() -> Self {
        Self {
            decline_rate: 0.05,
            out_of_stock_rate: 0.03,
            shipping_failure_rate: 0.03,
            crash_rate: 0.02,
            timeout_rate: 0.01,
            timeout_delay: Duration::from_millis(2_500),
            invalid_order_rate: 0.01,
        }
    }
}

/// A SplitMix64 step: a small, well-mixed, platform-independent generator.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Decides, from a seed, which commands fail and how.
///
/// ```
/// use vextrus_order_to_cash::{FaultConfig, FaultInjector};
///
/// let config = FaultConfig { decline_rate: 0.5, ..FaultConfig::none() };
/// let a = FaultInjector::new(42, config);
/// let b = FaultInjector::new(42, config);
/// // The same seed makes the same decisions, whatever order they are asked in.
/// let declined: Vec<bool> = (0..100).map(|i| a.declines(&format!("order-{i}"))).collect();
/// let again: Vec<bool> = (0..100).rev().map(|i| b.declines(&format!("order-{i}"))).collect();
/// assert_eq!(declined, again.into_iter().rev().collect::<Vec<_>>());
/// assert!(declined.iter().any(|d| *d) && declined.iter().any(|d| !*d));
/// ```
#[derive(Debug)]
pub struct FaultInjector {
    seed: u64,
    config: FaultConfig,
    deliveries: Mutex<HashMap<(&'static str, String), u32>>,
    forced: BTreeSet<String>,
    crashes: AtomicU64,
    delays: AtomicU64,
}

/// How many faults an injector has injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InjectedCounts {
    /// Handler crashes before commit.
    pub crashes: u64,
    /// Replies held past the step timeout.
    pub delays: u64,
}

impl FaultInjector {
    /// An injector for `seed` with these rates.
    pub fn new(seed: u64, config: FaultConfig) -> Self {
        Self {
            seed,
            config,
            deliveries: Mutex::new(HashMap::new()),
            forced: BTreeSet::new(),
            crashes: AtomicU64::new(0),
            delays: AtomicU64::new(0),
        }
    }

    /// Makes every command of `command_type` (such as `"payment.capture"`,
    /// or `"sales.complete"` for the saga's last local step) fail as a
    /// business failure, whatever the rates say. For tests that fail one
    /// chosen step.
    pub fn force_failure(mut self, command_type: impl Into<String>) -> Self {
        self.forced.insert(command_type.into());
        self
    }

    /// Whether commands of `command_type` are forced to fail.
    pub fn forces(&self, command_type: &str) -> bool {
        self.forced.contains(command_type)
    }

    /// Whether the generated order `order_id` should be invalid.
    pub fn invalid_order(&self, order_id: &str) -> bool {
        self.hit(self.config.invalid_order_rate, &["invalid_order", order_id])
    }

    /// How many crashes and delays were injected so far.
    pub fn injected(&self) -> InjectedCounts {
        InjectedCounts {
            crashes: self.crashes.load(Ordering::Relaxed),
            delays: self.delays.load(Ordering::Relaxed),
        }
    }

    /// An injector that never injects anything.
    pub fn disabled() -> Self {
        Self::new(0, FaultConfig::none())
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The rates.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// A number in `[0, 1)` drawn from the seed and `subject`.
    pub fn draw(&self, subject: &[&str]) -> f64 {
        let mut state = self.seed;
        for part in subject {
            for b in part.bytes() {
                state ^= u64::from(b);
                state = splitmix64(&mut state);
            }
            state ^= 0xff;
            state = splitmix64(&mut state);
        }
        // 53 random bits make an exactly representable fraction.
        (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn hit(&self, rate: f64, subject: &[&str]) -> bool {
        rate > 0.0 && self.draw(subject) < rate
    }

    /// Whether the payment of `order_id` is declined.
    pub fn declines(&self, order_id: &str) -> bool {
        self.hit(self.config.decline_rate, &["decline", order_id])
    }

    /// Whether inventory reports the stock of `order_id` as out.
    pub fn out_of_stock(&self, order_id: &str) -> bool {
        self.hit(self.config.out_of_stock_rate, &["out_of_stock", order_id])
    }

    /// Whether the carrier refuses the shipment of `order_id`.
    pub fn shipping_fails(&self, order_id: &str) -> bool {
        self.hit(
            self.config.shipping_failure_rate,
            &["shipping_failure", order_id],
        )
    }

    /// Counts one delivery of `key` to `participant` and returns its number
    /// (1 for the first).
    fn delivery(&self, participant: &'static str, key: &str) -> u32 {
        let mut map = self
            .deliveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry((participant, key.to_owned())).or_insert(0);
        *n += 1;
        *n
    }

    /// Called by a handler after its writes and before its commit: fails
    /// this delivery with [`Error::InjectedCrash`] if the draw says so.
    pub fn maybe_crash(&self, participant: &'static str, key: &str) -> Result<()> {
        if self.config.crash_rate <= 0.0 {
            return Ok(());
        }
        let n = self.delivery(participant, key).to_string();
        if self.hit(self.config.crash_rate, &["crash", participant, key, &n]) {
            tracing::debug!(participant, key, delivery = %n, "injected crash");
            self.crashes.fetch_add(1, Ordering::Relaxed);
            return Err(Error::InjectedCrash {
                participant,
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    /// How long to hold the reply to `key` after commit: the configured
    /// delay for the drawn keys, on their first reply only.
    pub fn reply_delay(&self, participant: &'static str, key: &str) -> Option<Duration> {
        if self.config.timeout_rate <= 0.0 {
            return None;
        }
        let first = {
            let mut map = self
                .deliveries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = map
                .entry((participant, format!("{key}#reply")))
                .or_insert(0);
            *n += 1;
            *n == 1
        };
        (first && self.hit(self.config.timeout_rate, &["timeout", participant, key]))
            .then_some(self.config.timeout_delay)
    }

    /// Sleeps for [`FaultInjector::reply_delay`], if any.
    pub async fn delay_reply(&self, participant: &'static str, key: &str) {
        if let Some(delay) = self.reply_delay(participant, key) {
            tracing::debug!(participant, key, ?delay, "injected reply delay");
            self.delays.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self::disabled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_roughly_honoured() {
        let f = FaultInjector::new(
            7,
            FaultConfig {
                decline_rate: 0.1,
                ..FaultConfig::none()
            },
        );
        let hits = (0..10_000).filter(|i| f.declines(&format!("o{i}"))).count();
        assert!(
            (800..1200).contains(&hits),
            "{hits} declines of 10000 at 10%"
        );
    }

    #[test]
    fn seeds_differ_and_zero_rates_never_fire() {
        let a = FaultInjector::new(1, FaultConfig::default());
        let b = FaultInjector::new(2, FaultConfig::default());
        assert_ne!(a.draw(&["x"]), b.draw(&["x"]));
        assert_ne!(a.draw(&["ab", "c"]), a.draw(&["a", "bc"]));
        let none = FaultInjector::disabled();
        assert!((0..1000).all(|i| !none.declines(&i.to_string())));
        assert!((0..1000).all(|i| none.maybe_crash("p", &i.to_string()).is_ok()));
        assert!((0..1000).all(|i| none.reply_delay("p", &i.to_string()).is_none()));
    }

    #[test]
    fn crashes_are_per_delivery_and_delays_only_on_the_first_reply() {
        let f = FaultInjector::new(
            3,
            FaultConfig {
                crash_rate: 0.5,
                timeout_rate: 1.0,
                ..FaultConfig::none()
            },
        );
        // With a 50% crash rate some key crashes on delivery 1 and not on a later one.
        let recovers = (0..50).any(|i| {
            let key = format!("k{i}");
            f.maybe_crash("p", &key).is_err() && (0..10).any(|_| f.maybe_crash("p", &key).is_ok())
        });
        assert!(recovers);
        assert!(f.reply_delay("p", "k").is_some());
        assert!(f.reply_delay("p", "k").is_none());
    }
}
