//! Waiting before trying again: reconnects, a stalled batch, a message
//! whose handler failed for now.

use std::time::Duration;

/// Exponential backoff: the first wait, doubling up to a cap.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
}

/// Reconnects wait up to 30 s: a broker restart takes that long.
pub(crate) const RECONNECT: Backoff = Backoff {
    first: Duration::from_millis(250),
    cap: Duration::from_secs(30),
};

/// A batch the database refuses waits up to 5 s between tries, so the
/// stream resumes soon after the lock or the full disk is gone.
pub(crate) const STALLED_BATCH: Backoff = Backoff {
    first: Duration::from_millis(250),
    cap: Duration::from_secs(5),
};

/// A message whose handler failed for now waits 1 s, then 2, 4, 8 ...: with
/// the default five attempts a passing problem has 8 to 15 s to pass
/// before the message is dead-lettered.
pub(crate) const HANDLER_RETRY: Backoff = Backoff {
    first: Duration::from_secs(1),
    cap: Duration::from_secs(30),
};

impl Backoff {
    /// Waits of `first`, doubling up to `cap`.
    pub const fn new(first: Duration, cap: Duration) -> Self {
        Self { first, cap }
    }

    /// The wait before try `attempt + 1`, with jitter (half to all of it)
    /// so a fleet of terminals does not retry in lockstep.
    pub fn delay(self, attempt: u32) -> Duration {
        let first_ms = u64::try_from(self.first.as_millis()).unwrap_or(u64::MAX);
        let cap_ms = u64::try_from(self.cap.as_millis()).unwrap_or(u64::MAX);
        let ceiling_ms = first_ms
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(cap_ms);
        Duration::from_millis(rand::random_range(ceiling_ms / 2..=ceiling_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_the_first_and_stops_at_the_cap() {
        for (attempt, ceiling) in [(1, 250), (2, 500), (3, 1000), (6, 5000), (40, 5000)] {
            let wait = STALLED_BATCH.delay(attempt).as_millis();
            assert!(
                (ceiling / 2..=ceiling).contains(&wait),
                "attempt {attempt}: {wait} ms"
            );
        }
        for (attempt, ceiling) in [(1, 1000), (4, 8000), (9, 30_000)] {
            let wait = HANDLER_RETRY.delay(attempt).as_millis();
            assert!(
                (ceiling / 2..=ceiling).contains(&wait),
                "attempt {attempt}: {wait} ms"
            );
        }
        assert!(RECONNECT.delay(0) <= Duration::from_millis(250));
    }
}
