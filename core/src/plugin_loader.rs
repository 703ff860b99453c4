//! Loading dynamic plugins: `cdylib`s named in config, checked before
//! anything in them runs, kept loaded while any of their handlers lives.

use std::path::{Path, PathBuf};

use possync_sdk::{Context, HandlerError, Migration, Store};

/// A dynamic plugin that could not be loaded. Each message says which
/// plugin, what is wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginLoadError {
    /// The file does not exist.
    #[error(
        "plugin {plugin}: no file at {path}; build it (cargo build --release -p <crate>) or fix [plugins.{plugin}] path"
    )]
    Missing {
        /// The name in config.
        plugin: String,
        /// The path in config.
        path: PathBuf,
    },
    /// The file is not a loadable library.
    #[error(
        "plugin {plugin}: {path} is not a loadable library ({detail}); point [plugins.{plugin}] path at the plugin's .so/.dylib/.dll"
    )]
    NotALibrary {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// The loader's message.
        detail: String,
    },
    /// The library does not export a possync declaration.
    #[error(
        "plugin {plugin}: {path} is a library but not a possync plugin (it exports no POSSYNC_PLUGIN); plugins declare themselves with possync_sdk::declare_plugin!"
    )]
    NotAPlugin {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
    },
    /// Built with another declaration format.
    #[error(
        "plugin {plugin}: {path} uses plugin format {found}, this possync reads format {expected}; rebuild the plugin against possync-sdk {sdk}"
    )]
    FormatMismatch {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// The plugin's format.
        found: u32,
        /// Ours.
        expected: u32,
        /// Our SDK version.
        sdk: String,
    },
    /// Built with another SDK, compiler or target.
    #[error("plugin {plugin}: {path} was built with {problems}; rebuild it against {expected}")]
    Incompatible {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// What differs.
        problems: String,
        /// What this possync was built with.
        expected: String,
    },
    /// The plugin's registration reported an error or panicked.
    #[error("plugin {plugin} ({path}) failed to register: {reason}")]
    Registration {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// What it said.
        reason: String,
    },
}

/// A plugin loaded from a library. (Interface for the boundary rewrite.)
#[derive(Debug)]
pub(crate) struct DynamicPlugin {
    name: String,
    version: String,
    message_types: Vec<String>,
}

impl DynamicPlugin {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn description(&self) -> &str {
        ""
    }

    pub(crate) fn migrations(&self) -> &[Migration] {
        &[]
    }

    pub(crate) fn message_types(&self) -> &[String] {
        &self.message_types
    }

    pub(crate) fn schema(&self, _message_type: &str) -> Option<serde_json::Value> {
        None
    }

    pub(crate) fn check(&self, _message_type: &str, _payload: &str) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("not yet"))
    }

    pub(crate) fn handle(
        &self,
        _payload: &str,
        _message: &Context<'_>,
        _store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("not yet"))
    }
}

/// Loads the plugin at `path`, known in config as `plugin`, with `settings`.
pub(crate) fn load(
    plugin: &str,
    path: &Path,
    _settings: serde_json::Value,
) -> Result<DynamicPlugin, PluginLoadError> {
    Err(PluginLoadError::NotAPlugin {
        plugin: plugin.into(),
        path: path.to_owned(),
    })
}
