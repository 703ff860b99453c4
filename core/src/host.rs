//! The host services handlers (built in or loaded) log through.

use std::sync::Arc;

use possync_sdk::log::{Host, Level};

#[derive(Debug)]
struct TracingHost;

impl Host for TracingHost {
    fn log(&self, level: Level, source: &str, message: &str) {
        match level {
            Level::Debug => tracing::debug!(event = "plugin_log", plugin = source, "{message}"),
            Level::Info => tracing::info!(event = "plugin_log", plugin = source, "{message}"),
            Level::Warn => tracing::warn!(event = "plugin_log", plugin = source, "{message}"),
            Level::Error => tracing::error!(event = "plugin_log", plugin = source, "{message}"),
        }
    }
}

/// Connects the SDK's logging to this process's `tracing`.
pub(crate) fn install() {
    possync_sdk::log::install(Arc::new(TracingHost));
}
