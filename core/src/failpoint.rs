//! A test hook for the one moment no test can reach from outside: after a
//! batch was committed and before it was acknowledged.
//!
//! With `POSSYNC_FAILPOINT_PAUSE_AFTER_COMMIT=<file>` set, the terminal
//! creates `<file>` after its first committed batch and then freezes, so a
//! test can SIGKILL it in exactly that window. Never set in production.

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
