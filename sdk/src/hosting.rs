//! The host's view of a plugin: what the runtime (and the dynamic-plugin
//! boundary) needs and authors never name.

use crate::plugin::{Plugin, PluginFn};
use crate::{Context, HandlerError, Migration, Store};

/// A plugin compiled into the binary, found at startup. Created by
/// [`register_builtin!`](crate::register_builtin).
#[derive(Debug)]
pub struct BuiltIn {
    make: PluginFn,
    /// The function's path as registered, to name the plugin before it
    /// has a name of its own (when building it fails).
    origin: &'static str,
}

impl BuiltIn {
    /// A registration that builds the plugin with `make`, registered as
    /// `origin`.
    pub const fn new(make: PluginFn, origin: &'static str) -> Self {
        Self { make, origin }
    }

    /// The plugin's function.
    pub fn plugin_fn(&self) -> PluginFn {
        self.make
    }

    /// Where the plugin was registered: its function's path.
    pub fn origin(&self) -> &'static str {
        self.origin
    }
}

inventory::collect!(BuiltIn);

/// Every plugin registered in this binary, in no particular order.
pub fn built_in() -> impl Iterator<Item = &'static BuiltIn> {
    inventory::iter::<BuiltIn>.into_iter()
}

/// The plugin's name.
pub fn name(plugin: &Plugin) -> &str {
    &plugin.name
}

/// Its one-line description.
pub fn description(plugin: &Plugin) -> &str {
    &plugin.description
}

/// Its migrations, in order.
pub fn migrations(plugin: &Plugin) -> &[Migration] {
    &plugin.migrations
}

/// How its tables hold its entities, for checksums.
pub fn exports(plugin: &Plugin) -> &[crate::Export] {
    &plugin.exports
}

/// The message types it handles, in the order they were added.
pub fn message_types(plugin: &Plugin) -> impl Iterator<Item = &'static str> + '_ {
    plugin.routes.iter().map(|route| route.message_type)
}

/// The JSON Schema of `message_type`'s payload.
pub fn schema(plugin: &Plugin, message_type: &str) -> Option<serde_json::Value> {
    route(plugin, message_type).map(|route| (route.schema)())
}

/// Whether `payload` decodes and validates as `message_type`.
pub fn check(plugin: &Plugin, message_type: &str, payload: &str) -> Result<(), HandlerError> {
    match route(plugin, message_type) {
        Some(route) => (route.check)(payload),
        None => Err(unknown(plugin, message_type)),
    }
}

/// Applies one message. Panics are the caller's to contain.
pub fn handle(
    plugin: &Plugin,
    payload: &str,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    match route(plugin, message.message_type()) {
        Some(route) => (route.apply)(payload, message, store),
        None => Err(unknown(plugin, message.message_type())),
    }
}

fn route<'p>(plugin: &'p Plugin, message_type: &str) -> Option<&'p crate::plugin::Route> {
    plugin
        .routes
        .iter()
        .find(|route| route.message_type == message_type)
}

fn unknown(plugin: &Plugin, message_type: &str) -> HandlerError {
    HandlerError::permanent(format!(
        "plugin {} does not handle {message_type:?}",
        plugin.name
    ))
}

/// The message a caught panic carried (`panic!("...")`), or `no message`.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Registers a plugin compiled into the binary. The argument is the
/// plugin's function, `fn(&Settings) -> Result<Plugin, String>`; the crate
/// must be linked into the binary (referenced from it), or the linker may
/// drop the registration.
///
/// ```
/// use possync_sdk::{Plugin, Settings};
///
/// pub fn tables(_: &Settings) -> Result<Plugin, String> {
///     Ok(Plugin::new("tables"))
/// }
/// possync_sdk::register_builtin!(tables);
/// ```
///
/// and in the binary's `main.rs`: `use my_tables_plugin as _;`.
#[macro_export]
macro_rules! register_builtin {
    ($plugin:path) => {
        $crate::__private::inventory::submit! {
            $crate::__host::BuiltIn::new($plugin, concat!(module_path!(), "::", stringify!($plugin)))
        }
    };
}
