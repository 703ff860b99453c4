//! Logging setup for the binary.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `POSSYNC_LOG` (for example `debug` or
/// `possync_core=debug`), else at `default_level`.
pub fn init_logging(default_level: &str) {
    // lapin logs every connection failure at error level; possync reports
    // each one itself, once, with what to do. POSSYNC_LOG=lapin=debug shows them.
    let filter = EnvFilter::try_from_env("POSSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},lapin=off")));
    // A second init (in tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
