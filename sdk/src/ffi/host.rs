//! The host's side of the boundary: opening a plugin library, checking its
//! header before anything in it runs, and calling its entry points with
//! the host's store and logging.
//!
//! Every function the plugin calls back (the store's, the sinks', the log)
//! catches the host's panics and never unwinds into the plugin.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use libloading::Library;

use super::version::Mismatch;
use super::{
    Bytes, CheckFn, Declaration, Description, DestroyFn, Effect, FORMAT, HandleFn, Header,
    HostServices, Instance, MAGIC, MessageContext, MessageType, MigrationText, Order, RowSink,
    SYMBOL, SdkVersion, Semver, Sink, Status, StoreApi, collect, read_inline,
};
use crate::log::Level;
use crate::{Context, HandlerError, Store, StoreError, Version};

/// Why a library could not be loaded as a plugin. The loader that calls
/// [`LoadedPlugin::load`] names the plugin and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The system's loader refused the file.
    NotALibrary(String),
    /// The library exports no possync declaration.
    NotAPlugin,
    /// The declaration is of another format.
    Format {
        /// The plugin's.
        found: u32,
        /// This host's.
        expected: u32,
    },
    /// Built for another platform.
    Target {
        /// The plugin's.
        found: String,
        /// This host's.
        expected: String,
    },
    /// Built with an SDK this host does not load.
    Sdk {
        /// The plugin's SDK version.
        found: String,
        /// This host's.
        expected: String,
        /// Of an older or a newer line, a pre-release other than the host's
        /// version, or unreadable.
        mismatch: Mismatch,
        /// This host's line of compatible SDKs, as a Cargo requirement
        /// (`0.3`).
        line: String,
    },
    /// The types that cross are laid out differently.
    Layout {
        /// The plugin's fingerprint.
        found: u64,
        /// This host's.
        expected: u64,
        /// The plugin's SDK version.
        sdk: String,
    },
    /// Built with `panic = "abort"`: its panics could not be contained.
    Aborts,
    /// The plugin's function returned an error.
    Refused(String),
    /// The plugin panicked (caught on its side).
    Panicked {
        /// In which entry point.
        stage: Stage,
        /// The panic's message.
        message: String,
    },
    /// Its description cannot be read.
    Description(String),
}

/// An entry point the host calls while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The plugin's function, building the plugin from its settings.
    Registration,
    /// Describing itself: its name, migrations, message types and schemas.
    Description,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Registration => "during registration",
            Self::Description => {
                "while describing itself (its name, migrations, message types or schemas)"
            }
        })
    }
}

/// The entry points used after loading.
#[derive(Debug, Clone, Copy)]
struct Entry {
    check: CheckFn,
    handle: HandleFn,
    destroy: DestroyFn,
}

/// A plugin instance in a loaded library. Dropping it destroys the
/// instance, then lets the library go (it stays loaded while an effect of
/// the plugin is pending): the threads the plugin started must have ended
/// with its instance.
pub struct LoadedPlugin {
    instance: *mut Instance,
    entry: Entry,
    config_name: Arc<str>,
    description: Description,
    plugin_version: String,
    sdk_version: String,
    library: Arc<Library>,
}

// SAFETY: the instance is a `possync_sdk::Plugin` of the plugin's SDK copy,
// which is `Send + Sync` (the plugin's side asserts it at compile time), and
// the handshake guarantees that copy is a compatible SDK; the entry points
// take it by shared pointer except `destroy`, which takes `&mut self`. The
// other fields are plain data and a `Library`, which is `Send + Sync`.
unsafe impl Send for LoadedPlugin {}
// SAFETY: as for `Send`.
unsafe impl Sync for LoadedPlugin {}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.description.name)
            .field("config_name", &self.config_name)
            .field("version", &self.plugin_version)
            .field("sdk_version", &self.sdk_version)
            .finish_non_exhaustive()
    }
}

/// What the host provides to every plugin.
static SERVICES: HostServices = HostServices { log };

/// The leading fields of every declaration format.
#[repr(C)]
#[derive(Clone, Copy)]
struct Prefix {
    magic: [u8; 8],
    format: u32,
}

impl LoadedPlugin {
    /// Opens the library at `path`, checks its header, and builds the
    /// plugin config knows as `config_name` with `settings`.
    ///
    /// Nothing of the library runs before its header is accepted, except
    /// what the system's loader runs when opening any library (its
    /// initializers).
    pub fn load(
        path: &Path,
        config_name: &str,
        settings: &serde_json::Value,
        applies: bool,
    ) -> Result<Self, LoadError> {
        // SAFETY: opening a library runs its initializers, which possync
        // cannot check. The path is one the operator named in config (never
        // one found by scanning a folder): that is the decision to trust
        // the library, as with any program the operator installs.
        let library =
            unsafe { Library::new(path) }.map_err(|err| LoadError::NotALibrary(err.to_string()))?;
        let declaration = declaration(&library)?;
        let entry = Entry {
            check: declaration.check,
            handle: declaration.handle,
            destroy: declaration.destroy,
        };
        let (create, describe) = (declaration.create, declaration.describe);
        let plugin_version = read_inline(&declaration.plugin_version);
        let sdk_version = read_inline(&declaration.header.sdk_text);
        let library = Arc::new(library);

        let settings = settings.to_string();
        let mut instance: *mut Instance = std::ptr::null_mut();
        let (status, message) = collect(|sink| {
            // SAFETY: the header was accepted, so `create` is the plugin's
            // entry point of this format; the bytes are borrowed for the
            // call, the services are a static, `instance` is writable.
            unsafe {
                create(
                    Bytes::of_str(config_name),
                    Bytes::of_str(&settings),
                    u32::from(applies),
                    &SERVICES,
                    &mut instance,
                    sink,
                )
            }
        });
        match status {
            Status::OK if !instance.is_null() => {}
            Status::PANICKED => {
                return Err(LoadError::Panicked {
                    stage: Stage::Registration,
                    message,
                });
            }
            Status::OK => return Err(LoadError::Refused("it made no plugin".into())),
            _ => return Err(LoadError::Refused(message)),
        }
        // From here on, dropping `plugin` destroys the instance.
        let mut plugin = Self {
            instance,
            entry,
            config_name: config_name.into(),
            description: Description {
                name: String::new(),
                description: String::new(),
                migrations: Vec::new(),
                message_types: Vec::new(),
                exports: Vec::new(),
            },
            plugin_version,
            sdk_version,
            library,
        };
        let (status, json) = collect(|sink| {
            // SAFETY: the instance is live until `destroy`.
            unsafe { describe(plugin.instance, sink) }
        });
        match status {
            Status::OK => {}
            Status::PANICKED => {
                return Err(LoadError::Panicked {
                    stage: Stage::Description,
                    message: json,
                });
            }
            _ => return Err(LoadError::Description(json)),
        }
        plugin.description = serde_json::from_str(&json)
            .map_err(|err| LoadError::Description(format!("{err} in {json:.200}")))?;
        Ok(plugin)
    }

    /// The plugin's own name (config may know it by another).
    pub fn name(&self) -> &str {
        &self.description.name
    }

    /// Its one-line description.
    pub fn description(&self) -> &str {
        &self.description.description
    }

    /// The plugin crate's version.
    pub fn version(&self) -> &str {
        &self.plugin_version
    }

    /// The SDK version it was built with.
    pub fn sdk_version(&self) -> &str {
        &self.sdk_version
    }

    /// Its migrations, in order.
    pub fn migrations(&self) -> &[MigrationText] {
        &self.description.migrations
    }

    /// How its tables hold its entities, for checksums.
    pub fn exports(&self) -> &[crate::Export] {
        &self.description.exports
    }

    /// Its message types, in the order it added them.
    pub fn message_types(&self) -> impl Iterator<Item = &str> {
        self.description
            .message_types
            .iter()
            .map(|message_type| message_type.name.as_str())
    }

    /// The JSON Schema of `message_type`'s payload.
    pub fn schema(&self, message_type: &str) -> Option<&serde_json::Value> {
        self.description
            .message_types
            .iter()
            .find(|known: &&MessageType| known.name == message_type)
            .map(|known| &known.schema)
    }

    /// Whether `payload` decodes and validates as `message_type`; a panic
    /// comes back as [`HandlerError::Panicked`].
    pub fn check(&self, message_type: &str, payload: &str) -> Result<(), HandlerError> {
        let Some(instance) = self.live() else {
            return Err(gone());
        };
        let (status, message) = collect(|sink| {
            // SAFETY: the instance is live; the bytes are borrowed for the
            // call.
            unsafe {
                (self.entry.check)(
                    instance,
                    Bytes::of_str(message_type),
                    Bytes::of_str(payload),
                    sink,
                )
            }
        });
        status.into_result(message)
    }

    /// Applies one message through `store`; a panic comes back as
    /// [`HandlerError::Panicked`].
    pub fn handle(
        &self,
        payload: &str,
        message: &Context<'_>,
        store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        let Some(instance) = self.live() else {
            return Err(gone());
        };
        let context = MessageContext {
            message_type: Bytes::of_str(message.message_type()),
            license_key: Bytes::of_str(message.license_key()),
            message_id: Bytes::of_option(message.message_id()),
            timestamp: Bytes::of_option(message.timestamp()),
            order: Order::of(message.order()),
        };
        let mut host = HostStore {
            store,
            plugin: &self.config_name,
            library: &self.library,
        };
        let api = StoreApi {
            ctx: std::ptr::from_mut(&mut host).cast(),
            execute,
            query_row,
            after_commit,
            on_rollback,
            stale,
        };
        let (status, text) = collect(|sink| {
            // SAFETY: the instance is live; the context, payload and store
            // are valid for the call, and `host` is not otherwise used
            // until it returns.
            unsafe { (self.entry.handle)(instance, &context, Bytes::of_str(payload), &api, sink) }
        });
        status.into_result(text)
    }

    /// Destroys the instance (its `Drop` runs in the plugin). A panic
    /// there comes back as its message; the instance is gone either way.
    /// Destroying twice does nothing.
    pub fn destroy(&mut self) -> Result<(), String> {
        let instance = std::mem::replace(&mut self.instance, std::ptr::null_mut());
        if instance.is_null() {
            return Ok(());
        }
        let (status, message) = collect(|sink| {
            // SAFETY: the instance is live, and no call uses it after this
            // one (`&mut self`, and the pointer is cleared).
            unsafe { (self.entry.destroy)(instance, sink) }
        });
        if status == Status::OK {
            Ok(())
        } else {
            Err(message)
        }
    }

    fn live(&self) -> Option<*const Instance> {
        (!self.instance.is_null()).then_some(self.instance.cast_const())
    }
}

impl Drop for LoadedPlugin {
    fn drop(&mut self) {
        if let Err(message) = self.destroy() {
            crate::log::log(
                Level::Error,
                &self.config_name,
                &format!("the plugin panicked while being dropped: {message}"),
            );
        }
        // The library goes with the last reference to it, after the
        // instance whose code it holds.
    }
}

fn gone() -> HandlerError {
    HandlerError::permanent("the plugin was destroyed")
}

/// Finds the declaration in `library` and checks its header.
fn declaration(library: &Library) -> Result<&Declaration, LoadError> {
    // SAFETY: looking a symbol up runs nothing; for a static, the symbol's
    // value is its address.
    let address: *const c_void = unsafe { library.get::<*const c_void>(SYMBOL.as_bytes()) }
        .map(|symbol| *symbol)
        .map_err(|_| LoadError::NotAPlugin)?;
    if address.is_null() {
        return Err(LoadError::NotAPlugin);
    }
    // SAFETY: in a possync plugin of any format, `SYMBOL` names a static
    // declaration that begins with `magic` and `format`; reading them runs
    // nothing in the library.
    let prefix = unsafe { address.cast::<Prefix>().read_unaligned() };
    if prefix.magic != MAGIC {
        return Err(LoadError::NotAPlugin);
    }
    if prefix.format != FORMAT {
        return Err(LoadError::Format {
            found: prefix.format,
            expected: FORMAT,
        });
    }
    // SAFETY: the format is this SDK's, whose declaration begins with a
    // `Header` laid out as ours; it lives as long as the library.
    let header = unsafe { &*address.cast::<Header>() };
    check(header)?;
    // SAFETY: the header says the plugin was built with a compatible SDK of
    // this format, whose types are laid out as ours (same fingerprint), so
    // the static is a `Declaration`; the borrow cannot outlive `library`.
    Ok(unsafe { &*address.cast::<Declaration>() })
}

/// Whether this host loads a plugin with `header`: the same target, a
/// compatible SDK, the same layout, and panics that unwind.
fn check(header: &Header) -> Result<(), LoadError> {
    let ours = Header::CURRENT;
    if header.target != ours.target {
        return Err(LoadError::Target {
            found: read_inline(&header.target),
            expected: read_inline(&ours.target),
        });
    }
    let text = read_inline(&header.sdk_text);
    let found = Semver::claimed(header.sdk, &text);
    if let Err(mismatch) = found.and_then(|found| found.loads_in(&Semver::current())) {
        return Err(LoadError::Sdk {
            found: text,
            expected: crate::SDK_VERSION.to_owned(),
            mismatch,
            line: SdkVersion::CURRENT.line(),
        });
    }
    if header.layout != ours.layout {
        return Err(LoadError::Layout {
            found: header.layout,
            expected: ours.layout,
            sdk: read_inline(&header.sdk_text),
        });
    }
    if header.unwinds != 1 {
        return Err(LoadError::Aborts);
    }
    Ok(())
}

/// The host's store while a plugin handles one message.
struct HostStore<'s> {
    store: &'s mut dyn Store,
    plugin: &'s Arc<str>,
    library: &'s Arc<Library>,
}

/// The host store behind a [`StoreApi`]'s `ctx`.
///
/// # Safety
///
/// `ctx` is the `HostStore` of the `handle` call in progress, not otherwise
/// borrowed while the plugin calls back.
unsafe fn host_store<'a>(ctx: *mut c_void) -> &'a mut HostStore<'a> {
    // SAFETY: by this function's contract.
    unsafe { &mut *ctx.cast::<HostStore<'a>>() }
}

/// Runs a store call for the plugin: its error goes to `error`, a panic is
/// caught.
fn store_call(error: Sink<'_>, body: impl FnOnce() -> Result<(), StoreError>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::OK,
        Ok(Err(err)) => {
            error.put(err.message());
            if err.is_transient() {
                Status::TRANSIENT
            } else {
                Status::PERMANENT
            }
        }
        Err(panic) => {
            error.put(&crate::__host::panic_message(panic.as_ref()));
            Status::PANICKED
        }
    }
}

/// The SQL and parameters of a store call.
///
/// # Safety
///
/// As [`super::Value::to_values`], and `sql` keeps [`Bytes::as_option`]'s
/// contract.
unsafe fn statement<'a>(
    sql: Bytes,
    params: *const super::Value,
    count: usize,
) -> Result<(&'a str, Vec<crate::Value>), StoreError> {
    // SAFETY: by this function's contract.
    let (sql, params) = unsafe { (sql.as_str(), super::Value::to_values(params, count)) };
    let sql = sql
        .map_err(|err| StoreError::permanent(format!("the SQL is not UTF-8: {err}")))?
        .unwrap_or_default();
    Ok((sql, params.map_err(StoreError::permanent)?))
}

/// # Safety
///
/// The plugin passes what [`super::ExecuteFn`] describes, during `handle`.
unsafe extern "C" fn execute(
    ctx: *mut c_void,
    sql: Bytes,
    params: *const super::Value,
    count: usize,
    changed: *mut u64,
    error: Sink<'_>,
) -> Status {
    store_call(error, || {
        // SAFETY: by this function's contract.
        let (host, (sql, params)) = unsafe { (host_store(ctx), statement(sql, params, count)?) };
        let rows = host.store.execute(sql, &params)?;
        // SAFETY: `changed` is the plugin's, writable during the call.
        unsafe { changed.write(rows as u64) };
        Ok(())
    })
}

/// # Safety
///
/// The plugin passes what [`super::QueryRowFn`] describes, during `handle`.
unsafe extern "C" fn query_row(
    ctx: *mut c_void,
    sql: Bytes,
    params: *const super::Value,
    count: usize,
    row: RowSink,
    error: Sink<'_>,
) -> Status {
    store_call(error, || {
        // SAFETY: by this function's contract.
        let (host, (sql, params)) = unsafe { (host_store(ctx), statement(sql, params, count)?) };
        if let Some(values) = host.store.query_row(sql, &params)? {
            let values: Vec<super::Value> = values.iter().map(super::Value::of).collect();
            // SAFETY: the plugin's row sink, valid during the call, never
            // unwinds; the values are borrowed for it.
            unsafe { (row.row)(row.ctx, values.as_ptr(), values.len()) };
        }
        Ok(())
    })
}

/// # Safety
///
/// During `handle`; `effect` is the plugin's, not yet run or dropped.
unsafe extern "C" fn after_commit(ctx: *mut c_void, effect: Effect) {
    // SAFETY: by this function's contract.
    unsafe { take_effect(ctx, effect, |store, effect| store.after_commit(effect)) }
}

/// # Safety
///
/// As [`after_commit`].
unsafe extern "C" fn on_rollback(ctx: *mut c_void, effect: Effect) {
    // SAFETY: by this function's contract.
    unsafe { take_effect(ctx, effect, |store, effect| store.on_rollback(effect)) }
}

/// Hands a plugin's effect to the host's store.
///
/// # Safety
///
/// As [`after_commit`].
unsafe fn take_effect(
    ctx: *mut c_void,
    effect: Effect,
    give: impl FnOnce(&mut dyn Store, crate::Effect),
) {
    // SAFETY: by this function's contract.
    let host = unsafe { host_store(ctx) };
    let effect = ForeignEffect {
        effect: Some(effect),
        plugin: Arc::clone(host.plugin),
        _library: Arc::clone(host.library),
    };
    // If the store panics, the closure and the effect in it are dropped,
    // which frees the effect in the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        give(&mut *host.store, Box::new(move || effect.run()));
    }));
}

/// # Safety
///
/// During `handle`; `id` is borrowed for the call.
unsafe extern "C" fn stale(ctx: *mut c_void, id: Bytes, incoming: Order, stored: i64) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by this function's contract.
        let (host, id) = unsafe { (host_store(ctx), id.as_slice()) };
        let incoming = Version {
            micros: incoming.micros,
            exact: incoming.exact != 0,
        };
        host.store
            .stale(&String::from_utf8_lossy(id), incoming, stored);
    }));
}

/// A plugin's effect held by the host: it keeps the library loaded, and
/// frees the effect in the plugin if it never runs.
struct ForeignEffect {
    effect: Option<Effect>,
    plugin: Arc<str>,
    _library: Arc<Library>,
}

impl ForeignEffect {
    /// Runs the effect. A panic in it, caught in the plugin, goes on here
    /// as a panic of the host's (without the panic hook's report), for the
    /// host to contain as it contains its own effects' panics.
    fn run(mut self) {
        let Some(effect) = self.effect.take() else {
            return;
        };
        let (status, message) = collect(|sink| {
            // SAFETY: the effect is the plugin's and neither ran nor was
            // dropped (`take` above); its library is loaded (`_library`).
            unsafe { (effect.run)(effect.data, sink) }
        });
        if status != Status::OK {
            std::panic::resume_unwind(Box::new(format!("plugin {}: {message}", self.plugin)));
        }
    }
}

impl Drop for ForeignEffect {
    fn drop(&mut self) {
        let Some(effect) = self.effect.take() else {
            return;
        };
        let (status, message) = collect(|sink| {
            // SAFETY: as in `run`.
            unsafe { (effect.drop)(effect.data, sink) }
        });
        if status != Status::OK {
            crate::log::log(
                Level::Error,
                &self.plugin,
                &format!("an effect panicked while being dropped: {message}"),
            );
        }
    }
}

/// # Safety
///
/// The bytes are borrowed for the call.
unsafe extern "C" fn log(level: u32, source: Bytes, message: Bytes) {
    let _ = catch_unwind(|| {
        // A level crosses as `as u32` (the fingerprint covers the numbers);
        // one this side does not know reads as an error.
        let level = [Level::Debug, Level::Info, Level::Warn]
            .into_iter()
            .find(|known| *known as u32 == level)
            .unwrap_or(Level::Error);
        // SAFETY: by this function's contract.
        let (source, message) = unsafe { (source.as_slice(), message.as_slice()) };
        crate::log::log(
            level,
            &String::from_utf8_lossy(source),
            &String::from_utf8_lossy(message),
        );
    });
}
