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
    let wanted = std::env::var("POSSYNC_LOG").unwrap_or_default();
    let filter = if wanted.trim().is_empty() {
        default()
    } else {
        parse_filter(&wanted).unwrap_or_else(|err| {
            eprintln!(
                "POSSYNC_LOG={wanted:?} is not a log filter ({err}); logging at {default_level}. Give a level (debug), targets with levels (possync_core=debug,lapin=info), or both"
            );
            default()
        })
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

/// `POSSYNC_LOG`'s directives, spaces around them allowed. Span and field
/// filters (`target[span]=level`) are refused rather than taken for a
/// target that never matches.
fn parse_filter(wanted: &str) -> Result<Targets, String> {
    if wanted.contains(['[', '{']) {
        return Err("span and field filters are not supported".to_owned());
    }
    let directives: Vec<&str> = wanted.split(',').map(str::trim).collect();
    if directives.iter().any(|directive| directive.is_empty()) {
        return Err("an empty directive".to_owned());
    }
    if directives
        .iter()
        .any(|directive| directive.contains(char::is_whitespace))
    {
        return Err("a space inside a directive".to_owned());
    }
    directives
        .join(",")
        .parse::<Targets>()
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn a_log_filter_takes_levels_and_targets_with_spaces_and_refuses_the_rest() {
        let filter = parse_filter("warn, possync_core=debug ,lapin=off").expect("parses");
        assert!(filter.would_enable("possync_core::consumer", &Level::DEBUG));
        assert!(!filter.would_enable("lapin::io_loop", &Level::ERROR));
        assert!(!filter.would_enable("hyper", &Level::INFO));
        assert!(filter.would_enable("hyper", &Level::WARN));
        for refused in [
            "possync_core[consume]=debug",
            "debug=lapin",
            "debug,,lapin=off",
            ",",
            "possync_core = debug",
        ] {
            assert!(parse_filter(refused).is_err(), "{refused}");
        }
    }
}
