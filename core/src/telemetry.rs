//! Logging setup for the binary.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs to stderr, filtered by `POSSYNC_LOG` (for example `debug` or
/// `possync_core=debug`), else at `default_level`.
pub fn init_logging(default_level: &str, format: LogFormat) {
    // lapin logs every connection failure at error level; possync reports
    // each one itself, once, with what to do. POSSYNC_LOG=lapin=debug shows them.
    let filter = EnvFilter::try_from_env("POSSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},lapin=off")));
    // A second init (in tests) keeps the first subscriber.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
