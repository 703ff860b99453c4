//! The plugin's side of the boundary: the entry points
//! [`export_plugin!`](crate::export_plugin) puts in a library, and the
//! [`Store`] a handler sees, which calls back into the host.
//!
//! Every entry point runs the plugin's code under `catch_unwind`: a panic
//! becomes [`Status::PANICKED`] with its message, and never unwinds into
//! the host.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use super::{
    Bytes, Declaration, Description, Effect, Header, HostServices, Instance, MessageContext,
    MessageType, MigrationText, Order, RowSink, Sink, Status, StoreApi, collect, inline_text,
};
use crate::__host as hosting;
use crate::{Context, HandlerError, Plugin, PluginFn, Settings, Store, StoreError, Version};

/// A plugin function to export; [`export_plugin!`](crate::export_plugin)
/// implements it.
pub trait Export {
    /// The plugin's function.
    const PLUGIN: PluginFn;
}

/// The declaration of a plugin built from `E::PLUGIN` with `header`, for a
/// crate at `plugin_version`.
pub const fn declaration<E: Export>(header: Header, plugin_version: &str) -> Declaration {
    Declaration {
        header,
        plugin_version: inline_text(plugin_version),
        create: create::<E>,
        describe,
        check,
        handle,
        destroy,
    }
}

/// An instance behind an `Instance` pointer.
struct Hosted {
    plugin: Plugin,
}

// The host shares one instance between threads (it checks payloads for
// publishers while a terminal applies messages).
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Plugin>();
};

/// Runs `body`, a panic included, and reports how it went through `message`.
fn contained(message: Sink<'_>, body: impl FnOnce() -> Result<(), HandlerError>) -> Status {
    let result = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        Err(HandlerError::Panicked(hosting::panic_message(
            panic.as_ref(),
        )))
    });
    let (status, text) = Status::of(result);
    if !text.is_empty() {
        message.put(&text);
    }
    status
}

/// The text of `bytes`, which the host sends as UTF-8.
///
/// # Safety
///
/// `bytes` keeps [`Bytes::as_option`]'s contract.
unsafe fn text<'a>(bytes: Bytes, what: &str) -> Result<Option<&'a str>, HandlerError> {
    // SAFETY: the caller keeps the contract.
    unsafe { bytes.as_str() }
        .map_err(|err| HandlerError::permanent(format!("the {what} is not UTF-8: {err}")))
}

/// The instance behind `instance`.
///
/// # Safety
///
/// `instance` came from [`create`] and was not destroyed.
unsafe fn hosted<'a>(instance: *const Instance) -> &'a Hosted {
    // SAFETY: `create` made it with `Box::into_raw` from a `Hosted`, and
    // only `destroy` frees it, after the last call that uses it.
    unsafe { &*instance.cast::<Hosted>() }
}

/// # Safety
///
/// The host passes the arguments [`super::CreateFn`] describes: bytes
/// borrowed for the call, `host` pointing at services that outlive the
/// library, `instance` writable.
unsafe extern "C" fn create<E: Export>(
    name: Bytes,
    settings: Bytes,
    applies: u32,
    host: *const HostServices,
    instance: *mut *mut Instance,
    message: Sink<'_>,
) -> Status {
    contained(message, || {
        // SAFETY: the host's services are a static of the host, which
        // outlives this library.
        if let Some(services) = unsafe { host.as_ref::<'static>() } {
            crate::log::install(Arc::new(Forward(services)));
        }
        // SAFETY: both borrowed for this call.
        let (name, settings) = unsafe {
            (
                text(name, "plugin's name")?.unwrap_or_default(),
                text(settings, "settings")?,
            )
        };
        let values = match settings {
            Some(json) => serde_json::from_str(json)
                .map_err(|err| HandlerError::permanent(format!("settings: {err}")))?,
            None => serde_json::Value::Null,
        };
        let mut settings = Settings::new(name, values);
        if applies == 0 {
            settings = settings.checking_only();
        }
        let plugin = (E::PLUGIN)(&settings).map_err(HandlerError::Permanent)?;
        let made = Box::into_raw(Box::new(Hosted { plugin }));
        // SAFETY: `instance` is writable (the host's local).
        unsafe { instance.write(made.cast()) };
        Ok(())
    })
}

/// # Safety
///
/// `instance` is live (see [`hosted`]).
unsafe extern "C" fn describe(instance: *const Instance, out: Sink<'_>) -> Status {
    contained(out, || {
        // SAFETY: live, by this function's contract.
        let plugin = &unsafe { hosted(instance) }.plugin;
        let description = Description {
            name: hosting::name(plugin).to_owned(),
            description: hosting::description(plugin).to_owned(),
            migrations: hosting::migrations(plugin)
                .iter()
                .map(|migration| MigrationText {
                    id: migration.id.to_owned(),
                    sql: migration.sql.to_owned(),
                })
                .collect(),
            message_types: hosting::message_types(plugin)
                .map(|message_type| MessageType {
                    name: message_type.to_owned(),
                    schema: hosting::schema(plugin, message_type).unwrap_or_default(),
                })
                .collect(),
            exports: hosting::exports(plugin).to_vec(),
        };
        let json = serde_json::to_string(&description)
            .map_err(|err| HandlerError::permanent(format!("description: {err}")))?;
        out.put(&json);
        Ok(())
    })
}

/// # Safety
///
/// `instance` is live; the bytes are borrowed for the call.
unsafe extern "C" fn check(
    instance: *const Instance,
    message_type: Bytes,
    payload: Bytes,
    message: Sink<'_>,
) -> Status {
    contained(message, || {
        // SAFETY: by this function's contract.
        let (plugin, message_type, payload) = unsafe {
            (
                &hosted(instance).plugin,
                text(message_type, "message type")?.unwrap_or_default(),
                text(payload, "payload")?.unwrap_or_default(),
            )
        };
        hosting::check(plugin, message_type, payload)
    })
}

/// # Safety
///
/// `instance` is live; `context`, `store` and the bytes are valid for the
/// call.
unsafe extern "C" fn handle(
    instance: *const Instance,
    context: *const MessageContext,
    payload: Bytes,
    store: *const StoreApi,
    message: Sink<'_>,
) -> Status {
    contained(message, || {
        // SAFETY: by this function's contract.
        let (plugin, context, payload, api) = unsafe {
            (
                &hosted(instance).plugin,
                &*context,
                text(payload, "payload")?.unwrap_or_default(),
                &*store,
            )
        };
        // SAFETY: the context's bytes are borrowed for the call too.
        let context = unsafe {
            Context::from_parts(
                text(context.message_type, "message type")?.unwrap_or_default(),
                text(context.license_key, "license key")?.unwrap_or_default(),
                text(context.message_id, "message id")?,
                text(context.timestamp, "timestamp")?,
                context.order.to_version(),
            )
        };
        hosting::handle(plugin, payload, &context, &mut ForeignStore { api })
    })
}

/// # Safety
///
/// `instance` came from [`create`]; the host calls this once, last.
unsafe extern "C" fn destroy(instance: *mut Instance, message: Sink<'_>) -> Status {
    if instance.is_null() {
        return Status::OK;
    }
    // SAFETY: made by `Box::into_raw` in `create`, freed only here, once.
    let hosted = unsafe { Box::from_raw(instance.cast::<Hosted>()) };
    // A panic in the plugin's `Drop` (a captured value's) stops here.
    contained(message, move || {
        drop(hosted);
        Ok(())
    })
}

/// This copy of the SDK's logging, forwarded to the host's.
#[derive(Debug)]
struct Forward(&'static HostServices);

impl crate::log::Host for Forward {
    fn log(&self, level: crate::log::Level, source: &str, message: &str) {
        // SAFETY: the host's `log` never unwinds; the bytes are borrowed for
        // the call.
        unsafe {
            (self.0.log)(level as u32, Bytes::of_str(source), Bytes::of_str(message));
        }
    }
}

/// The host's store for the message being handled.
struct ForeignStore<'a> {
    api: &'a StoreApi,
}

impl Store for ForeignStore<'_> {
    fn execute(&mut self, sql: &str, params: &[crate::Value]) -> Result<usize, StoreError> {
        let params: Vec<super::Value> = params.iter().map(super::Value::of).collect();
        let mut changed = 0u64;
        let (status, error) = collect(|sink| {
            // SAFETY: the host's store is valid while the handler runs;
            // `sql`, `params` and `changed` are borrowed for the call.
            unsafe {
                (self.api.execute)(
                    self.api.ctx,
                    Bytes::of_str(sql),
                    params.as_ptr(),
                    params.len(),
                    &mut changed,
                    sink,
                )
            }
        });
        store_result(status, error)?;
        usize::try_from(changed).map_err(|err| StoreError::permanent(err.to_string()))
    }

    fn query_row(
        &mut self,
        sql: &str,
        params: &[crate::Value],
    ) -> Result<Option<Vec<crate::Value>>, StoreError> {
        let params: Vec<super::Value> = params.iter().map(super::Value::of).collect();
        let mut row: Option<Result<Vec<crate::Value>, String>> = None;
        let sink = RowSink {
            ctx: std::ptr::from_mut(&mut row).cast(),
            row: take_row,
        };
        let (status, error) = collect(|error| {
            // SAFETY: as in `execute`; `row` lives through the call.
            unsafe {
                (self.api.query_row)(
                    self.api.ctx,
                    Bytes::of_str(sql),
                    params.as_ptr(),
                    params.len(),
                    sink,
                    error,
                )
            }
        });
        store_result(status, error)?;
        row.transpose().map_err(StoreError::permanent)
    }

    fn after_commit(&mut self, effect: crate::Effect) {
        // SAFETY: the host's store is valid while the handler runs; it takes
        // the effect and calls exactly one of its functions, once.
        unsafe { (self.api.after_commit)(self.api.ctx, export_effect(effect)) }
    }

    fn on_rollback(&mut self, effect: crate::Effect) {
        // SAFETY: as in `after_commit`.
        unsafe { (self.api.on_rollback)(self.api.ctx, export_effect(effect)) }
    }

    fn stale(&mut self, id: &str, incoming: Version, stored: i64) {
        // SAFETY: the host's store is valid while the handler runs; `id`
        // is borrowed for the call.
        unsafe {
            (self.api.stale)(
                self.api.ctx,
                Bytes::of_str(id),
                Order::of(Some(incoming)),
                stored,
            );
        }
    }
}

/// What the host's store said, as this side's error.
fn store_result(status: Status, message: String) -> Result<(), StoreError> {
    match status {
        Status::OK => Ok(()),
        Status::TRANSIENT => Err(StoreError::transient(message)),
        Status::PANICKED => Err(StoreError::transient(format!(
            "possync panicked in the store: {message}"
        ))),
        _ => Err(StoreError::permanent(message)),
    }
}

/// # Safety
///
/// `ctx` is the row of the `query_row` call that made the sink; `values`
/// keeps [`super::Value::to_values`]'s contract.
unsafe extern "C" fn take_row(ctx: *mut c_void, values: *const super::Value, count: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by this function's contract; nothing else borrows the row
        // while the host runs the query.
        let (row, values) = unsafe {
            (
                &mut *ctx.cast::<Option<Result<Vec<crate::Value>, String>>>(),
                super::Value::to_values(values, count),
            )
        };
        *row = Some(values);
    }));
}

/// `effect` handed to the host.
fn export_effect(effect: crate::Effect) -> Effect {
    Effect {
        data: Box::into_raw(Box::new(effect)).cast(),
        run: run_effect,
        drop: drop_effect,
    }
}

/// # Safety
///
/// `data` came from [`export_effect`] and neither function ran on it yet.
unsafe extern "C" fn run_effect(data: *mut c_void, message: Sink<'_>) -> Status {
    // SAFETY: made by `Box::into_raw` in `export_effect`, taken back once.
    let effect = unsafe { Box::from_raw(data.cast::<crate::Effect>()) };
    contained(message, move || {
        (*effect)();
        Ok(())
    })
}

/// # Safety
///
/// As [`run_effect`].
unsafe extern "C" fn drop_effect(data: *mut c_void, message: Sink<'_>) -> Status {
    // SAFETY: as in `run_effect`.
    let effect = unsafe { Box::from_raw(data.cast::<crate::Effect>()) };
    contained(message, move || {
        drop(effect);
        Ok(())
    })
}

/// Exports a plugin from a `cdylib` crate, for possync to load from the
/// path in its config (`[plugins.<name>] path = "..."`).
///
/// The argument is the plugin's function, `fn(&Settings) -> Result<Plugin,
/// String>`. The library then carries a header with the SDK version it was
/// built with, which possync checks before it runs anything of the plugin:
/// it loads plugins built with an SDK of its own line (the same 0.x minor,
/// older or newer than its own; a pre-release only if it is possync's very
/// version).
///
/// ```
/// use possync_sdk::{Context, HandlerError, Payload, Plugin, Settings, Store};
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct Ping { id: String }
///
/// impl Payload for Ping { const TYPE: &'static str = "ping"; }
///
/// fn ping(_: Ping, _: &Context, _: &mut dyn Store) -> Result<(), HandlerError> { Ok(()) }
///
/// pub fn plugin(_: &Settings) -> Result<Plugin, String> {
///     Ok(Plugin::new("ping").on::<Ping>(ping))
/// }
///
/// possync_sdk::export_plugin!(plugin);
/// ```
///
/// In `Cargo.toml`, build the crate as a library possync can load:
///
/// ```toml
/// [lib]
/// crate-type = ["cdylib"]
/// ```
///
/// Any thread the plugin starts must have ended when its plugin value is
/// dropped (join it in the `Drop` of a value its handlers hold): possync
/// unloads the library after destroying the instance, and code of it that
/// still runs then crashes the process.
///
/// A crate exports one plugin. To link a plugin into a binary instead, use
/// [`register_builtin!`](crate::register_builtin).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:path) => {
        $crate::__export_declaration!($plugin, $crate::__ffi::Header::CURRENT);
    };
}

/// [`export_plugin!`] with a header of the caller's. Test-only: possync's
/// loader tests export headers that claim another SDK or format with it.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_declaration {
    ($plugin:path, $header:expr) => {
        const _: () = {
            struct Exported;

            impl $crate::__ffi::guest::Export for Exported {
                const PLUGIN: $crate::PluginFn = $plugin;
            }

            // The name is `possync_sdk::__ffi::SYMBOL`.
            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            static POSSYNC_PLUGIN: $crate::__ffi::Declaration =
                $crate::__ffi::guest::declaration::<Exported>($header, env!("CARGO_PKG_VERSION"));
        };
    };
}
