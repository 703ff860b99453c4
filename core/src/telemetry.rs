//! Logging setup for the binary.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `POSSYNC_LOG` (for example `debug` or
/// `possync_core=debug`), else at `default_level`.
pub fn init_logging(default_level: &str) {
    let filter = EnvFilter::try_from_env("POSSYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // A second init (in tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
