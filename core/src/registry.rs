//! The handlers this process knows, which are enabled, and which handles
//! each message type.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use possync_sdk::{MessageHandler, Migration};

/// Where a handler comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into this binary.
    BuiltIn,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BuiltIn => f.write_str("built-in"),
        }
    }
}

/// One handler as `possync plugins list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name config uses.
    pub name: String,
    /// The message types it handles.
    pub message_types: Vec<String>,
    /// Whether config leaves it on.
    pub enabled: bool,
    /// Where it comes from.
    pub origin: Origin,
    /// What it does.
    pub description: String,
}

/// Config names a handler that does not exist, or two handlers collide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// `[plugins]` names a handler this binary does not have.
    #[error("[plugins] names {name:?}, but no such plugin is available; available: {available}")]
    UnknownPlugin {
        /// The name in config.
        name: String,
        /// The names that exist.
        available: String,
    },
    /// Two enabled handlers claim the same message type.
    #[error("message type {message_type:?} is handled by both {first:?} and {second:?}; disable one of them in [plugins]")]
    Conflict {
        /// The type.
        message_type: String,
        /// One handler.
        first: String,
        /// The other.
        second: String,
    },
    /// Two handlers register under one name.
    #[error("two plugins are named {0:?}")]
    DuplicateName(String),
}

#[derive(Debug)]
struct Entry {
    handler: Arc<dyn MessageHandler>,
    enabled: bool,
    origin: Origin,
}

/// Where a message type goes.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    /// To this enabled handler.
    Handler(&'a Arc<dyn MessageHandler>),
    /// Its handler exists but config turned it off.
    Disabled(&'a str),
    /// No handler knows the type.
    Unknown,
}

/// The handlers of this process.
#[derive(Debug)]
pub struct Registry {
    entries: Vec<Entry>,
    routes: HashMap<String, usize>,
}

impl Registry {
    /// The handlers compiled into this binary, switched on or off by `toggles`
    /// (handlers not named are on).
    pub fn built_in(toggles: &BTreeMap<String, bool>) -> Result<Self, RegistryError> {
        let handlers = possync_sdk::registered_handlers().map(|r| (Arc::from(r.make()), Origin::BuiltIn));
        Self::new(handlers, toggles)
    }

    /// A registry of the given handlers.
    pub fn new(
        handlers: impl IntoIterator<Item = (Arc<dyn MessageHandler>, Origin)>,
        toggles: &BTreeMap<String, bool>,
    ) -> Result<Self, RegistryError> {
        let mut entries: Vec<Entry> = handlers
            .into_iter()
            .map(|(handler, origin)| Entry {
                enabled: toggles.get(handler.name()).copied().unwrap_or(true),
                handler,
                origin,
            })
            .collect();
        entries.sort_by(|a, b| a.handler.name().cmp(b.handler.name()));
        for pair in entries.windows(2) {
            if pair[0].handler.name() == pair[1].handler.name() {
                return Err(RegistryError::DuplicateName(pair[0].handler.name().to_owned()));
            }
        }
        for name in toggles.keys() {
            if !entries.iter().any(|e| e.handler.name() == name) {
                let available: Vec<&str> = entries.iter().map(|e| e.handler.name()).collect();
                return Err(RegistryError::UnknownPlugin { name: name.clone(), available: available.join(", ") });
            }
        }
        let mut routes = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            for message_type in entry.handler.message_types() {
                match routes.get(*message_type).map(|&i: &usize| &entries[i]) {
                    Some(other) if other.enabled && entry.enabled => {
                        return Err(RegistryError::Conflict {
                            message_type: (*message_type).to_owned(),
                            first: other.handler.name().to_owned(),
                            second: entry.handler.name().to_owned(),
                        });
                    }
                    // An enabled handler wins the route over a disabled one.
                    Some(other) if other.enabled => {}
                    _ => {
                        routes.insert((*message_type).to_owned(), index);
                    }
                }
            }
        }
        Ok(Self { entries, routes })
    }

    /// Every handler, enabled or not, by name.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        self.entries
            .iter()
            .map(|e| PluginInfo {
                name: e.handler.name().to_owned(),
                message_types: e.handler.message_types().iter().map(|t| (*t).to_owned()).collect(),
                enabled: e.enabled,
                origin: e.origin.clone(),
                description: e.handler.description().to_owned(),
            })
            .collect()
    }

    /// The migrations of the enabled handlers, each id once, in handler order.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter(|e| e.enabled)
            .flat_map(|e| e.handler.migrations().iter().copied())
            .filter(|m| seen.insert(m.id))
            .collect()
    }

    pub(crate) fn route(&self, message_type: &str) -> Route<'_> {
        match self.routes.get(message_type).map(|&i| &self.entries[i]) {
            Some(entry) if entry.enabled => Route::Handler(&entry.handler),
            Some(entry) => Route::Disabled(entry.handler.name()),
            None => Route::Unknown,
        }
    }
}
