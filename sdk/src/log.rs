//! What a handler gets from the process it runs in. A dynamic plugin has
//! its own copy of every library it links, so it cannot log through the
//! host's logger directly; it logs through these functions, which the host
//! connects to its own logging when it loads the plugin.

use std::sync::{Arc, OnceLock};

/// How serious a log line is: the level of the terminal's log line.
///
/// ```
/// use possync_sdk::log::{self, Level};
///
/// log::log(Level::Warn, "tables", "table T9 has no seats; showing it closed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something an operator should look at.
    Warn,
    /// Something failed.
    Error,
}

/// Services the host process provides to handlers.
#[doc(hidden)]
pub trait Host: Send + Sync + std::fmt::Debug {
    /// Writes one log line on behalf of `source` (a handler or plugin name).
    fn log(&self, level: Level, source: &str, message: &str);
}

static HOST: OnceLock<Arc<dyn Host>> = OnceLock::new();

/// Connects this copy of the SDK to the host. The runtime calls it; a
/// handler never needs to.
#[doc(hidden)]
pub fn install(host: Arc<dyn Host>) {
    let _ = HOST.set(host);
}

/// Logs `message` through the host, attributed to `source`. Without a host
/// (in a handler's own unit tests) it goes to stderr.
///
/// ```
/// possync_sdk::log::log(possync_sdk::log::Level::Info, "tables", "12 tables loaded");
/// ```
pub fn log(level: Level, source: &str, message: &str) {
    match HOST.get() {
        Some(host) => host.log(level, source, message),
        None => eprintln!("[{level:?}] {source}: {message}"),
    }
}

#[doc(hidden)]
pub fn current() -> Option<Arc<dyn Host>> {
    HOST.get().cloned()
}
