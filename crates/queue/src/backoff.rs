//! Capped exponential backoff with full jitter.

use std::time::Duration;

/// The delay before retry number `attempt` (1-based): a uniformly random point in
/// `[0, min(max, initial × 2^(attempt-1))]`, where `jitter ∈ [0, 1)` is that point.
pub fn delay(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(62);
    let ceiling = initial
        .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

/// [`delay`] with a fresh random jitter.
pub fn jittered(attempt: u32, initial: Duration, max: Duration) -> Duration {
    delay(attempt, initial, max, rand::random::<f64>())
}

/// A retry sequence: the n-th call of [`Backoff::next`] is [`jittered`]`(n)`,
/// never below `floor` (a probe loop must not spin when the jitter draws 0).
/// The one backoff of the engine: batch retries, outage probes, WAL markers.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    attempt: u32,
    initial: Duration,
    max: Duration,
    floor: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, floor: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            initial,
            max,
            floor,
        }
    }

    /// Retries so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The next delay.
    pub fn next(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        jittered(self.attempt, self.initial, self.max).max(self.floor.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_and_jitter_scales_within_the_ceiling() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(60));
        assert_eq!(delay(1, i, m, 1.0), Duration::from_millis(100));
        assert_eq!(delay(2, i, m, 1.0), Duration::from_millis(200));
        assert_eq!(delay(5, i, m, 1.0), Duration::from_millis(1600));
        assert_eq!(delay(30, i, m, 1.0), m);
        assert_eq!(delay(u32::MAX, i, m, 1.0), m);
        assert_eq!(delay(5, i, m, 0.5), Duration::from_millis(800));
        assert_eq!(delay(5, i, m, 0.0), Duration::ZERO);
        for a in 1..40 {
            let d = jittered(a, i, m);
            assert!(
                d <= m && d <= i * 2u32.saturating_pow(a - 1).max(1),
                "attempt {a}: {d:?}"
            );
        }
    }
}
