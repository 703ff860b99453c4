//! Logging setup for the binary.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs to stderr, filtered by `POSSYNC_LOG` (a level, targets with
/// levels, or both: `debug`, `possync_core=debug,lapin=info`), else at
/// `default_level`. A `POSSYNC_LOG` that does not parse is said on stderr
/// and the default used.
pub fn init_logging(default_level: &str, format: LogFormat) {
    // lapin logs every connection failure at error level; possync reports
    // each one itself, once, with what to do. POSSYNC_LOG=lapin=debug shows them.
    let default = || {
        format!("{default_level},lapin=off")
            .parse::<Targets>()
            .unwrap_or_default()
    };
    // Targets, not EnvFilter: the same syntax for levels and targets,
    // without a regex engine in every till's memory.
    let filter = match std::env::var("POSSYNC_LOG") {
        Ok(wanted) => wanted.parse::<Targets>().unwrap_or_else(|err| {
            eprintln!(
                "POSSYNC_LOG={wanted:?} is not a log filter ({err}); logging at {default_level}. Give a level (debug), targets with levels (possync_core=debug,lapin=info), or both"
            );
            default()
        }),
        Err(_) => default(),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
}
