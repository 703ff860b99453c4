//! The handlers this process knows, which are enabled, and which handles
//! each message type.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use possync_sdk::{Context, HandlerError, Migration, Settings, Store};

use crate::config::PluginSetting;
use crate::entity::EntityRule;
use crate::plugin_loader::{self, DynamicPlugin, PluginLoadError};

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
    /// A plugin declares its entity in a way the core cannot read.
    #[error("{0}; fix the plugin's payload schema")]
    Entity(String),
    /// A built-in plugin refused to start (its function failed or panicked).
    #[error("built-in plugin {plugin}: {reason}")]
    BuiltIn {
        /// Which one.
        plugin: String,
        /// What it said.
        reason: String,
    },
    /// An enabled plugin library could not be loaded.
    #[error(transparent)]
    Load(Box<PluginLoadError>),
}

/// A plugin as the runtime runs it, wherever it comes from.
#[derive(Debug)]
pub(crate) enum Plugin {
    BuiltIn {
        plugin: possync_sdk::Plugin,
        message_types: Vec<String>,
    },
    Dynamic(DynamicPlugin),
}

impl Plugin {
    pub(crate) fn name(&self) -> &str {
        match self {
            Self::BuiltIn { plugin, .. } => possync_sdk::__host::name(plugin),
            Self::Dynamic(plugin) => plugin.name(),
        }
    }

    fn description(&self) -> &str {
        match self {
            Self::BuiltIn { plugin, .. } => possync_sdk::__host::description(plugin),
            Self::Dynamic(plugin) => plugin.description(),
        }
    }

    fn migrations(&self) -> &[Migration] {
        match self {
            Self::BuiltIn { plugin, .. } => possync_sdk::__host::migrations(plugin),
            Self::Dynamic(plugin) => plugin.migrations(),
        }
    }

    fn exports(&self) -> &[possync_sdk::Export] {
        match self {
            Self::BuiltIn { plugin, .. } => possync_sdk::__host::exports(plugin),
            Self::Dynamic(plugin) => plugin.exports(),
        }
    }

    fn message_types(&self) -> &[String] {
        match self {
            Self::BuiltIn { message_types, .. } => message_types,
            Self::Dynamic(plugin) => plugin.message_types(),
        }
    }

    fn schema(&self, message_type: &str) -> Option<serde_json::Value> {
        match self {
            Self::BuiltIn { plugin, .. } => possync_sdk::__host::schema(plugin, message_type),
            Self::Dynamic(plugin) => plugin.schema(message_type),
        }
    }

    fn check(&self, message_type: &str, payload: &str) -> Result<(), HandlerError> {
        match self {
            Self::BuiltIn { plugin, .. } => {
                contained(|| possync_sdk::__host::check(plugin, message_type, payload))
            }
            Self::Dynamic(plugin) => plugin.check(message_type, payload),
        }
    }

    /// Applies one message; a panic comes back as [`HandlerError::Panicked`].
    pub(crate) fn handle(
        &self,
        payload: &str,
        message: &Context<'_>,
        store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        match self {
            Self::BuiltIn { plugin, .. } => {
                contained(|| possync_sdk::__host::handle(plugin, payload, message, store))
            }
            Self::Dynamic(plugin) => plugin.handle(payload, message, store),
        }
    }
}

/// Runs a built-in plugin's code, turning a panic into an error: a bug in
/// one plugin must not stop the terminal.
fn contained(run: impl FnOnce() -> Result<(), HandlerError>) -> Result<(), HandlerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        Err(HandlerError::Panicked(possync_sdk::__host::panic_message(
            panic.as_ref(),
        )))
    })
}

#[derive(Debug)]
struct Entry {
    plugin: Plugin,
    enabled: bool,
    origin: Origin,
    version: String,
}

/// Where a message type goes.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    /// To this enabled plugin.
    Handler(&'a Plugin),
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
    /// The entity each enabled type changes, as its schema declares.
    entities: BTreeMap<String, EntityRule>,
}

impl Registry {
    /// The handlers compiled into this binary plus the plugin libraries
    /// named in `[plugins]`, each switched on or off as config says.
    ///
    /// An enabled library that cannot be loaded is an error; a disabled one
    /// is listed with the reason and otherwise ignored.
    pub fn from_config(plugins: &BTreeMap<String, PluginSetting>) -> Result<Self, RegistryError> {
        Self::build(plugins, true)
    }

    /// The same plugins, loaded only to describe and check payloads (by a
    /// publisher): each plugin is told, so it need not prepare what only
    /// applying needs (see `possync_sdk::Settings::applies`).
    pub fn for_publishing(
        plugins: &BTreeMap<String, PluginSetting>,
    ) -> Result<Self, RegistryError> {
        Self::build(plugins, false)
    }

    fn build(
        plugins: &BTreeMap<String, PluginSetting>,
        applies: bool,
    ) -> Result<Self, RegistryError> {
        crate::host::install();
        let version = env!("CARGO_PKG_VERSION");
        let mut entries = Vec::new();
        for built_in in possync_sdk::__host::built_in() {
            let plugin = build_built_in(built_in, applies)?;
            let enabled = match plugins.get(possync_sdk::__host::name(&plugin)) {
                Some(PluginSetting::Toggle(on)) => *on,
                _ => true,
            };
            let message_types = possync_sdk::__host::message_types(&plugin)
                .map(str::to_owned)
                .collect();
            entries.push(Entry {
                plugin: Plugin::BuiltIn {
                    plugin,
                    message_types,
                },
                enabled,
                origin: Origin::BuiltIn,
                version: version.into(),
            });
        }
        let built_in: HashSet<String> =
            entries.iter().map(|e| e.plugin.name().to_owned()).collect();
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
                    match plugin_loader::load(name, &plugin.path, settings, applies) {
                        Ok(loaded) => entries.push(Entry {
                            version: loaded.version().to_owned(),
                            plugin: Plugin::Dynamic(loaded),
                            enabled: plugin.enabled,
                            origin: Origin::Dynamic(plugin.path.clone()),
                        }),
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
        entries.sort_by(|a, b| a.plugin.name().cmp(b.plugin.name()));
        for pair in entries.windows(2) {
            if pair[0].plugin.name() == pair[1].plugin.name() {
                return Err(RegistryError::DuplicateName(
                    pair[0].plugin.name().to_owned(),
                ));
            }
        }
        let mut routes = BTreeMap::new();
        for (index, entry) in entries.iter().enumerate() {
            for message_type in entry.plugin.message_types() {
                match routes.get(message_type).map(|&i: &usize| &entries[i]) {
                    Some(other) if other.enabled && entry.enabled => {
                        return Err(RegistryError::Conflict {
                            message_type: message_type.clone(),
                            first: other.plugin.name().to_owned(),
                            second: entry.plugin.name().to_owned(),
                        });
                    }
                    // An enabled handler wins the route over a disabled one.
                    Some(other) if other.enabled => {}
                    _ => {
                        routes.insert(message_type.clone(), index);
                    }
                }
            }
        }
        let mut entities = BTreeMap::new();
        for (message_type, &index) in &routes {
            let entry = &entries[index];
            if !entry.enabled {
                continue;
            }
            if let Some(schema) = entry.plugin.schema(message_type)
                && let Some(rule) = EntityRule::from_schema(message_type, &schema)
                    .map_err(|err| RegistryError::Entity(err.to_string()))?
            {
                entities.insert(message_type.clone(), rule);
            }
        }
        Ok(Self {
            entries,
            unloaded,
            routes,
            entities,
        })
    }

    /// Every handler, enabled or not, by name; then disabled plugin
    /// libraries that could not be loaded.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        self.entries
            .iter()
            .map(|e| PluginInfo {
                name: e.plugin.name().to_owned(),
                message_types: e.plugin.message_types().to_vec(),
                enabled: e.enabled,
                origin: e.origin.clone(),
                version: e.version.clone(),
                description: e.plugin.description().to_owned(),
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
            .flat_map(|e| e.plugin.migrations().iter().copied())
            .filter(|m| seen.insert(m.id))
            .collect()
    }

    pub(crate) fn route(&self, message_type: &str) -> Route<'_> {
        match self.routes.get(message_type).map(|&i| &self.entries[i]) {
            Some(entry) if entry.enabled => Route::Handler(&entry.plugin),
            Some(entry) => Route::Disabled(entry.plugin.name()),
            None => Route::Unknown,
        }
    }

    /// The JSON Schema of a message type's payload, from the enabled plugin
    /// that handles it.
    pub fn schema(&self, message_type: &str) -> Option<serde_json::Value> {
        match self.route(message_type) {
            Route::Handler(plugin) => plugin.schema(message_type),
            _ => None,
        }
    }

    /// The entity a message type changes and how, if its plugin declares it
    /// (see [`EntityRule`]).
    pub fn entity_rule(&self, message_type: &str) -> Option<&EntityRule> {
        self.entities.get(message_type)
    }

    /// The migrations of the enabled plugins that take part in snapshots
    /// (those with a type that replaces an entity), each id once: the
    /// tables a snapshot replaces. Other plugins' tables are left alone.
    pub(crate) fn snapshot_migrations(&self) -> Vec<Migration> {
        let taking_part: HashSet<usize> = self
            .entities
            .iter()
            .filter(|(_, rule)| rule.change == crate::entity::ChangeKind::Replace)
            .filter_map(|(message_type, _)| self.routes.get(message_type).copied())
            .collect();
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .enumerate()
            .filter(|(index, entry)| entry.enabled && taking_part.contains(index))
            .flat_map(|(_, entry)| entry.plugin.migrations().iter().copied())
            .filter(|m| seen.insert(m.id))
            .collect()
    }

    /// How the enabled plugins' tables hold their entities, for checksums:
    /// the first plugin to export a kind of entity, in handler order. A
    /// kind that a switched-off plugin's type changes is left out: the
    /// till holds it otherwise than the backend on purpose.
    pub fn exports(&self) -> Vec<&possync_sdk::Export> {
        let switched_off: HashSet<String> = self
            .routes
            .iter()
            .filter(|&(_, &index)| !self.entries[index].enabled)
            .filter_map(|(message_type, &index)| {
                let schema = self.entries[index].plugin.schema(message_type)?;
                let rule = EntityRule::from_schema(message_type, &schema).ok()??;
                Some(rule.entity)
            })
            .collect();
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .filter(|entry| entry.enabled)
            .flat_map(|entry| entry.plugin.exports())
            .filter(|export| !switched_off.contains(&export.entity))
            .filter(|export| seen.insert(export.entity.as_str()))
            .collect()
    }

    /// Which fields of each kind of entity its checksum covers: those the
    /// enabled plugins export.
    pub fn checksum_spec(&self) -> crate::ChecksumSpec {
        crate::ChecksumSpec::new(
            self.exports()
                .into_iter()
                .map(|export| (export.entity.as_str(), export.fields.as_slice())),
        )
    }

    /// The enabled types that merge into an entity, with their rules: how
    /// a snapshot restores an entity its replacing type refuses.
    pub(crate) fn merging_types(&self) -> Vec<(&str, &EntityRule)> {
        self.entities
            .iter()
            .filter(|(_, rule)| rule.change == crate::entity::ChangeKind::Merge)
            .map(|(message_type, rule)| (message_type.as_str(), rule))
            .collect()
    }

    /// The enabled type that replaces a whole `entity` of this kind, with
    /// its rule: how a snapshot restores one.
    pub(crate) fn restoring_type(&self, entity: &str) -> Option<(&str, &EntityRule)> {
        self.entities
            .iter()
            .find(|(_, rule)| crate::snapshot::replaces(rule, entity))
            .map(|(message_type, rule)| (message_type.as_str(), rule))
    }

    /// Whether `payload` is a valid payload of `message_type` as the enabled
    /// plugin that handles it decodes and checks it: what a terminal would
    /// dead-letter is refused before it is sent.
    pub fn check(&self, message_type: &str, payload: &str) -> Result<(), CheckError> {
        match self.route(message_type) {
            Route::Handler(plugin) => plugin.check(message_type, payload).map_err(|err| {
                CheckError::Invalid(match err {
                    HandlerError::Panicked(message) => format!(
                        "plugin {} panicked checking the payload: {message}",
                        plugin.name()
                    ),
                    err => err.to_string(),
                })
            }),
            Route::Disabled(plugin) => Err(CheckError::Disabled(plugin.to_owned())),
            Route::Unknown => Err(CheckError::Unknown),
        }
    }
}

/// Why a payload is refused before it is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No plugin knows the type.
    #[error("no plugin handles this type; name its plugin library in [plugins]")]
    Unknown,
    /// Its plugin is switched off in config.
    #[error("its plugin {0:?} is disabled in [plugins]")]
    Disabled(String),
    /// The plugin refuses the payload.
    #[error("{0}")]
    Invalid(String),
}

/// Builds a built-in plugin with no settings (built-ins have none).
fn build_built_in(
    built_in: &possync_sdk::__host::BuiltIn,
    applies: bool,
) -> Result<possync_sdk::Plugin, RegistryError> {
    let mut settings = Settings::new("built-in", serde_json::Value::Null);
    if !applies {
        settings = settings.checking_only();
    }
    let make = built_in.plugin_fn();
    let made = std::panic::catch_unwind(|| make(&settings)).unwrap_or_else(|panic| {
        Err(format!(
            "panicked: {}",
            possync_sdk::__host::panic_message(panic.as_ref())
        ))
    });
    made.map_err(|reason| RegistryError::BuiltIn {
        plugin: built_in.origin().to_owned(),
        reason,
    })
}
