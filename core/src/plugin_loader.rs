//! Loading dynamic plugins: `cdylib`s named in config, checked before
//! anything of the plugin runs, kept loaded until their instance is gone.
//!
//! The boundary itself (a C ABI of possync's own, the header and its
//! checks, the calls into the library) is `possync_sdk::__ffi`; see
//! docs/plugin-boundary.md. A library is accepted when its header has
//! possync's magic bytes, the declaration format this possync reads, the
//! same target, an SDK version of this possync's line (the same major; for
//! 0.x the same minor; older or newer within it; a pre-release only if it
//! is this possync's very version), the same layout fingerprint of every
//! type that crosses, and panics that unwind. Only then does its plugin function
//! run, with the plugin's settings; then the plugin describes itself (its
//! name, migrations, message types and their schemas), once.
//!
//! Every call into a plugin catches the plugin's panics on its side: a
//! panic while loading is a load error naming the plugin; one while
//! checking or handling a message is a failed try of that message; one in
//! an effect or in the plugin's `Drop` is logged.

use std::path::{Path, PathBuf};

use possync_sdk::__ffi::host::{LoadError, LoadedPlugin};
use possync_sdk::__ffi::version::Mismatch;
use possync_sdk::__ffi::{SdkVersion, Semver};
use possync_sdk::{Context, HandlerError, Migration, Store};

use crate::events;

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
        "plugin {plugin}: {path} is a library but not a possync plugin (it exports no POSSYNC_PLUGIN); a plugin exports itself with possync_sdk::export_plugin!"
    )]
    NotAPlugin {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
    },
    /// Built with another declaration format.
    #[error(
        "plugin {plugin}: {path} uses plugin format {found}, this possync reads format {expected}; rebuild the plugin against possync-sdk {line}"
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
        /// Our line of compatible SDKs (`0.3`).
        line: String,
    },
    /// Built for another platform.
    #[error(
        "plugin {plugin}: {path} was built for {found}, this possync runs on {expected}; build it for {expected}"
    )]
    Target {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// The plugin's target.
        found: String,
        /// Ours.
        expected: String,
    },
    /// Built with an SDK this possync does not load.
    #[error(
        "plugin {plugin}: {path} was built with possync-sdk {found}, this possync has {expected}: {advice}"
    )]
    Sdk {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// The plugin's SDK version.
        found: String,
        /// Ours.
        expected: String,
        /// What to rebuild.
        advice: String,
    },
    /// The types that cross the boundary are laid out differently.
    #[error(
        "plugin {plugin}: {path} was built with possync-sdk {sdk}, but the types it exchanges with possync are laid out differently (layout fingerprint {found:016x}, this possync's {expected:016x}); rebuild it against possync-sdk {expected_sdk} with the SDK's default features"
    )]
    Layout {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// The plugin's SDK version.
        sdk: String,
        /// The plugin's fingerprint.
        found: u64,
        /// Ours.
        expected: u64,
        /// Our SDK version.
        expected_sdk: String,
    },
    /// Built with `panic = "abort"`.
    #[error(
        "plugin {plugin}: {path} was built with panic = \"abort\", so possync could not contain its panics; remove panic = \"abort\" from its Cargo profile and rebuild it"
    )]
    Aborts {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
    },
    /// The plugin's function returned an error.
    #[error("plugin {plugin} ({path}) failed to register: {reason}")]
    Registration {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// What it said.
        reason: String,
    },
    /// The plugin panicked while loading (its function, or describing
    /// itself); the panic was contained.
    #[error("plugin {plugin} ({path}) panicked {stage}: {message}")]
    Panicked {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// When.
        stage: String,
        /// The panic's message.
        message: String,
    },
    /// The plugin's description of itself cannot be read.
    #[error(
        "plugin {plugin} ({path}) described itself in a form this possync cannot read ({detail}); rebuild it against possync-sdk {line}"
    )]
    Description {
        /// The name in config.
        plugin: String,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
        /// Our line of compatible SDKs.
        line: String,
    },
}

/// A plugin loaded from a library, known by the name config gives it.
#[derive(Debug)]
pub(crate) struct DynamicPlugin {
    name: String,
    loaded: LoadedPlugin,
    migrations: &'static [Migration],
    message_types: Vec<String>,
}

impl DynamicPlugin {
    /// The name config knows it by (`[plugins.<name>]`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The plugin crate's version.
    pub(crate) fn version(&self) -> &str {
        self.loaded.version()
    }

    pub(crate) fn description(&self) -> &str {
        self.loaded.description()
    }

    pub(crate) fn migrations(&self) -> &[Migration] {
        self.migrations
    }

    pub(crate) fn exports(&self) -> &[possync_sdk::Export] {
        self.loaded.exports()
    }

    pub(crate) fn message_types(&self) -> &[String] {
        &self.message_types
    }

    pub(crate) fn schema(&self, message_type: &str) -> Option<serde_json::Value> {
        self.loaded.schema(message_type).cloned()
    }

    /// Checks a payload in the plugin; a panic comes back as
    /// [`HandlerError::Panicked`].
    pub(crate) fn check(&self, message_type: &str, payload: &str) -> Result<(), HandlerError> {
        self.loaded.check(message_type, payload)
    }

    /// Applies a message in the plugin; a panic comes back as
    /// [`HandlerError::Panicked`].
    pub(crate) fn handle(
        &self,
        payload: &str,
        message: &Context<'_>,
        store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        self.loaded.handle(payload, message, store)
    }
}

impl Drop for DynamicPlugin {
    /// Destroys the instance in the plugin before its library may unload.
    fn drop(&mut self) {
        if let Err(message) = self.loaded.destroy() {
            events::plugin_drop_panicked(&self.name, &message);
        }
    }
}

/// Loads the plugin at `path`, known in config as `plugin`, with `settings`.
pub(crate) fn load(
    plugin: &str,
    path: &Path,
    settings: serde_json::Value,
    applies: bool,
) -> Result<DynamicPlugin, PluginLoadError> {
    if !path.exists() {
        return Err(PluginLoadError::Missing {
            plugin: plugin.into(),
            path: path.to_owned(),
        });
    }
    let loaded = LoadedPlugin::load(path, plugin, &settings, applies)
        .map_err(|err| load_error(plugin, path, err))?;
    if loaded.name() != plugin {
        events::plugin_renamed(plugin, loaded.name(), &path.display().to_string());
    }
    let migrations = loaded
        .migrations()
        .iter()
        .map(|migration| Migration::new(leak(&migration.id), leak(&migration.sql)))
        .collect::<Vec<_>>();
    let message_types = loaded.message_types().map(str::to_owned).collect();
    Ok(DynamicPlugin {
        name: plugin.to_owned(),
        migrations: migrations.leak(),
        message_types,
        loaded,
    })
}

/// `text` for the life of the process.
///
/// The registry hands out migrations as `&'static str`, as built-in plugins
/// declare them in their code; a dynamic plugin's arrive as text when it is
/// loaded. They are leaked once per load: a process loads its plugins once
/// (at a terminal's start, for `possync plugins list`, for `possync
/// doctor`), and they are a few kilobytes of SQL.
fn leak(text: &str) -> &'static str {
    Box::leak(text.into())
}

fn load_error(plugin: &str, path: &Path, err: LoadError) -> PluginLoadError {
    let (plugin, path) = (plugin.to_owned(), path.to_owned());
    let ours = SdkVersion::CURRENT;
    match err {
        LoadError::NotALibrary(detail) => PluginLoadError::NotALibrary {
            plugin,
            path,
            detail,
        },
        LoadError::NotAPlugin => PluginLoadError::NotAPlugin { plugin, path },
        LoadError::Format { found, expected } => PluginLoadError::FormatMismatch {
            plugin,
            path,
            found,
            expected,
            line: ours.line(),
        },
        LoadError::Target { found, expected } => PluginLoadError::Target {
            plugin,
            path,
            found,
            expected,
        },
        LoadError::Sdk {
            found,
            expected,
            mismatch,
            line,
        } => {
            let advice = match mismatch {
                Mismatch::Older | Mismatch::Unreadable => {
                    format!("rebuild it against possync-sdk {line}")
                }
                Mismatch::Newer => format!(
                    "rebuild it against possync-sdk {line}, or upgrade possync to one whose possync-sdk is {}",
                    Semver::parse(&found).map_or(found.clone(), |found| found.numbers.line())
                ),
                Mismatch::PreRelease if Semver::current().is_prerelease() => format!(
                    "this possync's possync-sdk is a pre-release, which loads only plugins built with that very version; rebuild it against possync-sdk ={expected}"
                ),
                Mismatch::PreRelease => format!(
                    "a plugin built with a pre-release of possync-sdk loads only in a possync with that very version; rebuild it against a release of possync-sdk {line}"
                ),
            };
            PluginLoadError::Sdk {
                plugin,
                path,
                found,
                expected,
                advice,
            }
        }
        LoadError::Layout {
            found,
            expected,
            sdk,
        } => PluginLoadError::Layout {
            plugin,
            path,
            sdk,
            found,
            expected,
            expected_sdk: possync_sdk::SDK_VERSION.to_owned(),
        },
        LoadError::Aborts => PluginLoadError::Aborts { plugin, path },
        LoadError::Refused(reason) => PluginLoadError::Registration {
            plugin,
            path,
            reason,
        },
        LoadError::Panicked { stage, message } => PluginLoadError::Panicked {
            plugin,
            path,
            stage: stage.to_string(),
            message,
        },
        LoadError::Description(detail) => PluginLoadError::Description {
            plugin,
            path,
            detail,
            line: ours.line(),
        },
    }
}
