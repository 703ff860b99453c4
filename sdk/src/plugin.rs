//! Dynamic plugins: a `cdylib` that exports one [`PluginDeclaration`] with
//! [`declare_plugin!`](crate::declare_plugin), loaded by the host from a
//! path named in config.
//!
//! A plugin and its host exchange Rust types (trait objects, `String`,
//! `serde_json::Value`), which is only sound when both were built from the
//! same SDK with the same compiler for the same target. The declaration
//! starts with an [`AbiHeader`] that the host checks before it calls
//! anything in the plugin.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;

use crate::host::Host;
use crate::{Envelope, HandlerError, MessageHandler, Migration, Store, Value};

/// Changes whenever the layout of [`PluginDeclaration`] changes.
pub const ABI_FORMAT_VERSION: u32 = 1;

/// The first bytes of every declaration.
pub const ABI_MAGIC: [u8; 8] = *b"POSSYNC\0";

/// The symbol a plugin exports.
pub const DECLARATION_SYMBOL: &[u8] = b"POSSYNC_PLUGIN\0";

/// A short string stored inline, so the header holds no pointers and can be
/// read before trusting anything else in the library.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct InlineStr {
    bytes: [u8; 120],
}

impl InlineStr {
    /// `text`, cut at 120 bytes.
    pub const fn new(text: &str) -> Self {
        let source = text.as_bytes();
        let mut bytes = [0u8; 120];
        let mut i = 0;
        while i < source.len() && i < bytes.len() {
            bytes[i] = source[i];
            i += 1;
        }
        Self { bytes }
    }

    /// The text (up to the first NUL); invalid UTF-8 shows as `?`.
    pub fn as_str(&self) -> &str {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.bytes.len());
        std::str::from_utf8(&self.bytes[..end]).unwrap_or("?")
    }
}

impl std::fmt::Debug for InlineStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What a plugin was built with. `magic` and `format_version` come first in
/// every format, so a host can always read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct AbiHeader {
    /// [`ABI_MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_FORMAT_VERSION`] of the SDK that built the plugin.
    pub format_version: u32,
    /// Whether panics unwind (they must, to be caught).
    pub panic_unwind: u32,
    /// The SDK's version.
    pub sdk_version: InlineStr,
    /// `rustc --version` of the compiler.
    pub rustc_version: InlineStr,
    /// The target triple.
    pub target: InlineStr,
    /// Sizes of the types that cross the boundary: a cheap guard against
    /// dependencies built with other features on either side.
    pub layout: [u32; 6],
}

const fn size(bytes: usize) -> u32 {
    bytes as u32
}

impl AbiHeader {
    /// The header of this SDK copy, as compiled.
    pub const CURRENT: Self = Self {
        magic: ABI_MAGIC,
        format_version: ABI_FORMAT_VERSION,
        panic_unwind: cfg!(panic = "unwind") as u32,
        sdk_version: InlineStr::new(env!("CARGO_PKG_VERSION")),
        rustc_version: InlineStr::new(env!("POSSYNC_SDK_RUSTC")),
        target: InlineStr::new(env!("POSSYNC_SDK_TARGET")),
        layout: [
            size(size_of::<Envelope>()),
            size(size_of::<serde_json::Value>()),
            size(size_of::<Value>()),
            size(size_of::<HandlerError>()),
            size(size_of::<Registrar>()),
            size(size_of::<Migration>()),
        ],
    };

    /// Why a plugin with this header cannot be loaded by a host with
    /// `expected`, or `None` when it can.
    pub fn mismatch(&self, expected: &AbiHeader) -> Option<String> {
        let mut problems = Vec::new();
        if self.sdk_version != expected.sdk_version {
            problems.push(format!(
                "possync-sdk {} (this possync has {})",
                self.sdk_version.as_str(),
                expected.sdk_version.as_str()
            ));
        }
        if self.rustc_version != expected.rustc_version {
            problems.push(format!(
                "{} (this possync: {})",
                self.rustc_version.as_str(),
                expected.rustc_version.as_str()
            ));
        }
        if self.target != expected.target {
            problems.push(format!(
                "target {} (this possync: {})",
                self.target.as_str(),
                expected.target.as_str()
            ));
        }
        if self.panic_unwind != 1 {
            problems.push("panic = \"abort\" (plugins must unwind)".into());
        }
        if problems.is_empty() && self.layout != expected.layout {
            problems.push(format!(
                "other type layouts {:?} (this possync: {:?}); were its dependencies built with other features?",
                self.layout, expected.layout
            ));
        }
        if problems.is_empty() {
            None
        } else {
            Some(problems.join(", "))
        }
    }
}

/// Registers a plugin's handlers; `false` if registration failed (the
/// reason is in the registrar). Never unwinds.
pub type RegisterFn = extern "C" fn(&mut Registrar) -> bool;

/// What a plugin exports under [`DECLARATION_SYMBOL`].
#[derive(Debug)]
#[repr(C)]
pub struct PluginDeclaration {
    /// Checked first.
    pub header: AbiHeader,
    /// The plugin's crate name.
    pub name: InlineStr,
    /// The plugin's crate version.
    pub version: InlineStr,
    /// Called once, after the header was checked.
    pub register: RegisterFn,
}

impl PluginDeclaration {
    /// A declaration with this SDK's header. Use [`declare_plugin!`](crate::declare_plugin).
    pub const fn new(name: &str, version: &str, register: RegisterFn) -> Self {
        Self::with_header(AbiHeader::CURRENT, name, version, register)
    }

    /// A declaration with any header; for testing the host's checks.
    #[doc(hidden)]
    pub const fn with_header(
        header: AbiHeader,
        name: &str,
        version: &str,
        register: RegisterFn,
    ) -> Self {
        Self {
            header,
            name: InlineStr::new(name),
            version: InlineStr::new(version),
            register,
        }
    }
}

/// Handed to a plugin's registration function: its settings from config,
/// and where its handlers go.
#[derive(Debug)]
pub struct Registrar {
    plugin: String,
    settings: serde_json::Value,
    host: Option<Arc<dyn Host>>,
    handlers: Vec<Box<dyn MessageHandler>>,
    failure: Option<String>,
}

impl Registrar {
    /// A registrar for plugin `plugin` with its config `settings`.
    #[doc(hidden)]
    pub fn new(plugin: &str, settings: serde_json::Value) -> Self {
        Self {
            plugin: plugin.to_owned(),
            settings,
            host: crate::host::current(),
            handlers: Vec::new(),
            failure: None,
        }
    }

    /// The name config knows the plugin by.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The plugin's `settings` table from config, decoded. Use
    /// `#[serde(deny_unknown_fields)]` so typos are errors.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.settings)
            .map_err(|err| format!("[plugins.{}.settings] is not valid: {err}", self.plugin))
    }

    /// Adds a handler. Its panics are caught inside the plugin, where they
    /// happen, and reported to the host as [`HandlerError::Panicked`].
    pub fn register(&mut self, handler: impl MessageHandler + 'static) {
        self.handlers.push(Box::new(Guarded(handler)));
    }

    /// The handlers registered; the host takes them after registration.
    #[doc(hidden)]
    pub fn take_handlers(&mut self) -> Vec<Box<dyn MessageHandler>> {
        std::mem::take(&mut self.handlers)
    }

    /// Why registration failed, if it did.
    #[doc(hidden)]
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

/// Runs a plugin's registration function on the plugin's side of the
/// boundary: connects its SDK copy to the host and catches every panic.
#[doc(hidden)]
pub fn run_registration(
    registrar: &mut Registrar,
    register: fn(&mut Registrar) -> Result<(), String>,
) -> bool {
    if let Some(host) = registrar.host.clone() {
        crate::host::install(host);
    }
    match catch_unwind(AssertUnwindSafe(|| register(registrar))) {
        Ok(Ok(())) => true,
        Ok(Err(reason)) => {
            registrar.failure = Some(reason);
            false
        }
        Err(panic) => {
            registrar.failure = Some(format!(
                "panicked during registration: {}",
                panic_message(panic.as_ref())
            ));
            false
        }
    }
}

/// The message a caught panic carried (`panic!("...")`), or `no message`.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// A handler whose panics are caught where they happen: a panic cannot
/// unwind from a plugin's copy of the standard library into the host's.
#[derive(Debug)]
struct Guarded<H>(H);

#[async_trait::async_trait]
impl<H: MessageHandler> MessageHandler for Guarded<H> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn message_types(&self) -> &[&str] {
        self.0.message_types()
    }

    fn description(&self) -> &str {
        self.0.description()
    }

    fn migrations(&self) -> &[Migration] {
        self.0.migrations()
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        CatchUnwind(self.0.handle(envelope, store)).await
    }
}

struct CatchUnwind<F>(F);

impl<F: Future<Output = Result<(), HandlerError>> + Unpin> Future for CatchUnwind<F> {
    type Output = Result<(), HandlerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(HandlerError::Panicked(panic_message(panic.as_ref())))),
        }
    }
}

/// Exports a dynamic plugin's declaration. The argument is a function
/// `fn(&mut Registrar) -> Result<(), String>` that registers the plugin's
/// handlers (and may read its settings).
///
/// ```ignore
/// possync_sdk::declare_plugin!(register);
///
/// fn register(registrar: &mut possync_sdk::Registrar) -> Result<(), String> {
///     registrar.register(MyHandler::default());
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! declare_plugin {
    ($register:path) => {
        #[doc(hidden)]
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub static POSSYNC_PLUGIN: $crate::PluginDeclaration = $crate::PluginDeclaration::new(
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
            __possync_register,
        );

        #[allow(improper_ctypes_definitions)]
        extern "C" fn __possync_register(registrar: &mut $crate::Registrar) -> bool {
            $crate::run_registration(registrar, $register)
        }
    };
}
