//! Waiting before trying again: reconnects, a stalled batch, a message
//! whose handler failed for now.

use std::time::Duration;

/// Reconnects wait up to 30 s: a broker restart takes that long.
pub(crate) const RECONNECT: Duration = Duration::from_secs(30);

/// A batch the database refuses waits up to 5 s between tries, so the
/// stream resumes soon after the lock or the full disk is gone.
pub(crate) const STALLED_BATCH: Duration = Duration::from_secs(5);

/// A message whose handler failed transiently waits up to 10 s.
pub(crate) const HANDLER_RETRY: Duration = Duration::from_secs(10);

/// Exponential backoff from 250 ms up to `cap`, with jitter so a fleet of
/// terminals does not retry in lockstep (after a broker restart, say).
pub(crate) fn delay(attempt: u32, cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    let ceiling_ms = 250u64
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(cap_ms);
    Duration::from_millis(rand::random_range(ceiling_ms / 2..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_a_quarter_second_and_stops_at_the_cap() {
        for (attempt, ceiling) in [(1, 250), (2, 500), (3, 1000), (6, 5000), (40, 5000)] {
            let wait = delay(attempt, STALLED_BATCH).as_millis();
            assert!(
                (ceiling / 2..=ceiling).contains(&wait),
                "attempt {attempt}: {wait} ms"
            );
        }
        assert!(delay(0, RECONNECT) <= Duration::from_millis(250));
    }
}
