//! The handlers this process knows, which are enabled, and which handles
//! each message type.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use possync_sdk::{MessageHandler, Migration};

use crate::config::PluginSetting;
use crate::plugin_loader::{self, PluginLoadError};

/// Where a handler comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into this binary.
    BuiltIn,
    /// Loaded from a plugin library.
    Dynamic(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BuiltIn => f.write_str("built-in"),
            Self::Dynamic(path) => write!(f, "{}", path.display()),
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
    /// Its version.
    pub version: String,
    /// What it does, or why it could not be loaded.
    pub description: String,
}

/// Config names a handler that does not exist, or handlers collide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// `[plugins]` names a built-in handler this binary does not have.
    #[error(
        "[plugins] names {name:?}, but no such plugin is available; available: {available} (a plugin library needs a table with `path`)"
    )]
    UnknownPlugin {
        /// The name in config.
        name: String,
        /// The names that exist.
        available: String,
    },
    /// Two enabled handlers claim the same message type.
    #[error(
        "message type {message_type:?} is handled by both {first:?} and {second:?}; disable one of them in [plugins]"
    )]
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
    /// An enabled plugin library could not be loaded.
    #[error(transparent)]
    Load(Box<PluginLoadError>),
}

#[derive(Debug)]
struct Entry {
    handler: Arc<dyn MessageHandler>,
    enabled: bool,
    origin: Origin,
    version: String,
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
    unloaded: Vec<PluginInfo>,
    /// A plugin handles a few types: finding one by comparing a few
    /// strings is cheaper than hashing its name with SipHash.
    routes: BTreeMap<String, usize>,
}

impl Registry {
    /// The handlers compiled into this binary plus the plugin libraries
    /// named in `[plugins]`, each switched on or off as config says.
    ///
    /// An enabled library that cannot be loaded is an error; a disabled one
    /// is listed with the reason and otherwise ignored.
    pub fn from_config(plugins: &BTreeMap<String, PluginSetting>) -> Result<Self, RegistryError> {
        crate::host::install();
        let version = env!("CARGO_PKG_VERSION");
        let mut entries: Vec<Entry> = possync_sdk::registered_handlers()
            .map(|registration| {
                let handler: Arc<dyn MessageHandler> = Arc::from(registration.make());
                let enabled = match plugins.get(handler.name()) {
                    Some(PluginSetting::Toggle(on)) => *on,
                    _ => true,
                };
                Entry {
                    handler,
                    enabled,
                    origin: Origin::BuiltIn,
                    version: version.into(),
                }
            })
            .collect();
        let built_in: HashSet<String> = entries
            .iter()
            .map(|e| e.handler.name().to_owned())
            .collect();
        let mut unloaded = Vec::new();
        for (name, setting) in plugins {
            match setting {
                PluginSetting::Toggle(_) if built_in.contains(name) => {}
                PluginSetting::Toggle(_) => {
                    let mut available: Vec<&str> = built_in.iter().map(String::as_str).collect();
                    available.sort_unstable();
                    return Err(RegistryError::UnknownPlugin {
                        name: name.clone(),
                        available: available.join(", "),
                    });
                }
                PluginSetting::Dynamic(plugin) => {
                    let settings =
                        serde_json::Value::Object(plugin.settings.clone().into_iter().collect());
                    match plugin_loader::load(name, &plugin.path, settings) {
                        Ok(loaded) => {
                            entries.extend(loaded.handlers.into_iter().map(|handler| Entry {
                                handler,
                                enabled: plugin.enabled,
                                origin: Origin::Dynamic(plugin.path.clone()),
                                version: loaded.version.clone(),
                            }))
                        }
                        Err(err) if plugin.enabled => {
                            return Err(RegistryError::Load(Box::new(err)));
                        }
                        Err(err) => unloaded.push(PluginInfo {
                            name: name.clone(),
                            message_types: Vec::new(),
                            enabled: false,
                            origin: Origin::Dynamic(plugin.path.clone()),
                            version: "-".into(),
                            description: format!("not loaded: {err}"),
                        }),
                    }
                }
            }
        }
        Self::new(entries, unloaded)
    }

    fn new(mut entries: Vec<Entry>, unloaded: Vec<PluginInfo>) -> Result<Self, RegistryError> {
        entries.sort_by(|a, b| a.handler.name().cmp(b.handler.name()));
        for pair in entries.windows(2) {
            if pair[0].handler.name() == pair[1].handler.name() {
                return Err(RegistryError::DuplicateName(
                    pair[0].handler.name().to_owned(),
                ));
            }
        }
        let mut routes = BTreeMap::new();
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
        Ok(Self {
            entries,
            unloaded,
            routes,
        })
    }

    /// Every handler, enabled or not, by name; then disabled plugin
    /// libraries that could not be loaded.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        self.entries
            .iter()
            .map(|e| PluginInfo {
                name: e.handler.name().to_owned(),
                message_types: e
                    .handler
                    .message_types()
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect(),
                enabled: e.enabled,
                origin: e.origin.clone(),
                version: e.version.clone(),
                description: e.handler.description().to_owned(),
            })
            .chain(self.unloaded.iter().cloned())
            .collect()
    }

    /// The migrations of the enabled handlers, each id once, in handler order.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut seen = HashSet::new();
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
