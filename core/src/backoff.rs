//! Waiting between reconnect attempts.

use std::time::Duration;

/// Exponential backoff from 250 ms to 30 s, with jitter so a fleet of
/// terminals does not reconnect in lockstep after a broker restart.
pub(crate) fn delay(attempt: u32) -> Duration {
    let ceiling_ms = 250u64.saturating_mul(1 << attempt.min(7)).min(30_000);
    Duration::from_millis(rand::random_range(ceiling_ms / 2..=ceiling_ms))
}
