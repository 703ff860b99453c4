//! Loading dynamic plugins: `cdylib`s named in config, checked before
//! anything in them runs, kept loaded while any of their handlers lives.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libloading::Library;
use possync_sdk::{
    ABI_FORMAT_VERSION, ABI_MAGIC, AbiHeader, DECLARATION_SYMBOL, Envelope, HandlerError,
    MessageHandler, Migration, PluginDeclaration, Registrar, Store,
};

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

/// A plugin loaded from a library.
#[derive(Debug)]
pub(crate) struct LoadedPlugin {
    pub(crate) version: String,
    pub(crate) handlers: Vec<Arc<dyn MessageHandler>>,
}

/// Loads the plugin at `path`, known in config as `plugin`, and registers
/// its handlers with `settings`.
pub(crate) fn load(
    plugin: &str,
    path: &Path,
    settings: serde_json::Value,
) -> Result<LoadedPlugin, PluginLoadError> {
    let owned = |p: &Path| p.to_owned();
    if !path.exists() {
        return Err(PluginLoadError::Missing {
            plugin: plugin.into(),
            path: owned(path),
        });
    }
    // SAFETY: loading runs the library's initializers. The path is named by
    // the operator in config (never found by scanning), which is the trust
    // decision; a possync plugin's initializers are Rust's own.
    let library = unsafe { Library::new(path) }.map_err(|err| PluginLoadError::NotALibrary {
        plugin: plugin.into(),
        path: owned(path),
        detail: err.to_string(),
    })?;
    // SAFETY: the symbol, if present, is a `PluginDeclaration` exported by
    // `declare_plugin!`. Only `magic` and `format_version`, which lead every
    // format, are read before they are checked.
    let declaration: &PluginDeclaration = unsafe {
        let symbol = library
            .get::<*const PluginDeclaration>(DECLARATION_SYMBOL)
            .map_err(|_| PluginLoadError::NotAPlugin {
                plugin: plugin.into(),
                path: owned(path),
            })?;
        let pointer: *const PluginDeclaration = *symbol;
        pointer
            .as_ref()
            .ok_or_else(|| PluginLoadError::NotAPlugin {
                plugin: plugin.into(),
                path: owned(path),
            })?
    };
    let ours = AbiHeader::CURRENT;
    let header = &declaration.header;
    if header.magic != ABI_MAGIC {
        return Err(PluginLoadError::NotAPlugin {
            plugin: plugin.into(),
            path: owned(path),
        });
    }
    if header.format_version != ABI_FORMAT_VERSION {
        return Err(PluginLoadError::FormatMismatch {
            plugin: plugin.into(),
            path: owned(path),
            found: header.format_version,
            expected: ABI_FORMAT_VERSION,
            sdk: ours.sdk_version.as_str().into(),
        });
    }
    if let Some(problems) = header.mismatch(&ours) {
        return Err(PluginLoadError::Incompatible {
            plugin: plugin.into(),
            path: owned(path),
            problems,
            expected: format!(
                "possync-sdk {} with {} for {}",
                ours.sdk_version.as_str(),
                ours.rustc_version.as_str(),
                ours.target.as_str()
            ),
        });
    }
    let mut registrar = Registrar::new(plugin, settings);
    // The plugin's side of `register` catches its own panics (a panic cannot
    // cross from its standard library into ours) and never unwinds.
    if !(declaration.register)(&mut registrar) {
        let reason = registrar.failure().unwrap_or("no reason given").to_owned();
        return Err(PluginLoadError::Registration {
            plugin: plugin.into(),
            path: owned(path),
            reason,
        });
    }
    let version = declaration.version.as_str().to_owned();
    let library = Arc::new(library);
    let handlers = registrar
        .take_handlers()
        .into_iter()
        .map(|inner| {
            Arc::new(DynamicHandler {
                inner,
                _library: Arc::clone(&library),
            }) as Arc<dyn MessageHandler>
        })
        .collect();
    Ok(LoadedPlugin { version, handlers })
}

/// A handler from a library, holding the library open: fields drop in
/// order, so the handler (whose code lives in the library) goes first.
#[derive(Debug)]
struct DynamicHandler {
    inner: Box<dyn MessageHandler>,
    _library: Arc<Library>,
}

#[async_trait::async_trait]
impl MessageHandler for DynamicHandler {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn message_types(&self) -> &[&str] {
        self.inner.message_types()
    }

    fn description(&self) -> &str {
        self.inner.description()
    }

    fn migrations(&self) -> &[Migration] {
        self.inner.migrations()
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        self.inner.handle(envelope, store).await
    }
}
