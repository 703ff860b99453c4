//! A test hook for the window no test reaches from outside: after the broker
//! confirmed an outbox row and before the relay marked it published.
//!
//! With `POSSYNC_FAILPOINT_RELAY_ABORT_AFTER=<n>` set, the process aborts
//! (no cleanup, as under SIGKILL) once the broker confirmed the relay's
//! n-th message since start, before those rows are marked. Never set in
//! production.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

fn limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("POSSYNC_FAILPOINT_RELAY_ABORT_AFTER")
            .ok()
            .and_then(|n| n.trim().parse().ok())
    })
}

/// Counts `confirmed` more messages; aborts the process if the hook is set
/// and the count reached it.
pub(crate) fn relay_confirmed(confirmed: usize) {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let Some(limit) = limit() else {
        return;
    };
    let before = COUNT.fetch_add(confirmed as u64, Ordering::SeqCst);
    if before + confirmed as u64 >= limit {
        crate::events::failpoint("relay confirmed, not marked published: aborting");
        std::process::abort();
    }
}
