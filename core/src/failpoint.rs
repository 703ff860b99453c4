//! Test hooks for the moments no test can reach from outside: after a batch
//! was committed and before it was acknowledged, and after the broker
//! confirmed outbox rows and before they were deleted.
//!
//! With `POSSYNC_FAILPOINT_PAUSE_AFTER_COMMIT=<file>` set, the terminal
//! creates `<file>` after its first committed batch and then freezes; with
//! `POSSYNC_FAILPOINT_PAUSE_AFTER_UPLINK_CONFIRM=<file>`, after the first
//! outbox rows the broker confirmed. A test can SIGKILL it in exactly that
//! window. Never set in production.

use std::path::PathBuf;
use std::sync::OnceLock;

fn marker() -> Option<&'static PathBuf> {
    static MARKER: OnceLock<Option<PathBuf>> = OnceLock::new();
    MARKER
        .get_or_init(|| std::env::var_os("POSSYNC_FAILPOINT_PAUSE_AFTER_COMMIT").map(PathBuf::from))
        .as_ref()
}

/// Freezes forever if the hook is set; returns at once otherwise.
pub(crate) async fn after_commit() {
    if let Some(path) = marker() {
        tracing::warn!(
            event = "failpoint",
            "pausing after commit, before ack (test hook)"
        );
        let _ = std::fs::write(path, b"committed, not acknowledged");
        std::future::pending::<()>().await;
    }
}

/// Freezes the uplink forever if its hook is set; returns at once otherwise.
pub(crate) async fn after_uplink_confirm() {
    static MARKER: OnceLock<Option<PathBuf>> = OnceLock::new();
    let marker = MARKER.get_or_init(|| {
        std::env::var_os("POSSYNC_FAILPOINT_PAUSE_AFTER_UPLINK_CONFIRM").map(PathBuf::from)
    });
    if let Some(path) = marker {
        tracing::warn!(
            event = "failpoint",
            "pausing after the broker confirmed outbox rows, before they are deleted (test hook)"
        );
        let _ = std::fs::write(path, b"confirmed, not deleted");
        std::future::pending::<()>().await;
    }
}
