//! The boundary between possync and a plugin loaded from a library: a
//! narrow C ABI of possync's own, "bytes in, typed results out".
//!
//! Only the `#[repr(C)]` types of this module and `extern "C"` functions
//! cross. Text and JSON travel as borrowed [`Bytes`], valid for one call;
//! whatever one side hands back, it writes into a [`Sink`] of the other, so
//! memory is always freed by the side that allocated it. Every function one
//! side calls in the other catches its own panics: a panic never unwinds
//! across the boundary.
//!
//! A plugin exports one [`Declaration`] under [`SYMBOL`]. Its [`Header`] is
//! read before anything else: [`MAGIC`], the [`FORMAT`] number, the SDK
//! version it was built with, a fingerprint of the layout of every type
//! below ([`layout::FINGERPRINT`]), the target and whether panics unwind.
//! The host calls nothing in a library whose header it refuses.
//!
//! Changing a type (a field added, removed, moved, renamed or retyped), a
//! signature, a status code, a value kind or the numbering of log levels
//! changes the fingerprint; changing what the JSON of [`Description`]
//! holds, or what a function means, requires a new [`FORMAT`].
//!
//! This module is the only one of possync's crates with `unsafe` code.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};

pub mod guest;
#[cfg(feature = "host")]
pub mod host;
pub mod layout;
pub mod version;

pub use version::{SdkVersion, Semver};

/// Declares the function types that cross, and records their text for
/// [`layout::FINGERPRINT`]: a changed signature changes the fingerprint.
macro_rules! signatures {
    ($($(#[$meta:meta])* pub type $name:ident = $sig:ty;)*) => {
        $($(#[$meta])* pub type $name = $sig;)*
        /// The text of every function type that crosses (its white space
        /// is not part of the fingerprint).
        pub(crate) const SIGNATURES: &str = concat!($(stringify!($name = $sig;)),*);
    };
}

/// Declares the numbered constants of a type that cross as numbers (a
/// status, a value's kind) as `$owner`'s associated constants of type
/// `$ty`, and lists each one with its name in `$owner::$list` for
/// [`layout::FINGERPRINT`]: a code added, removed or renumbered changes
/// the fingerprint, and none can be left out of it.
macro_rules! codes {
    ($owner:ident::$list:ident: $ty:ty = [$($(#[$meta:meta])* $name:ident = $value:expr,)*]) => {
        impl $owner {
            $($(#[$meta])* pub const $name: $ty = $value;)*
            /// Every code above with its name, for the layout fingerprint.
            pub(crate) const $list: &'static [(&'static str, $ty)] =
                &[$((stringify!($name), Self::$name)),*];
        }
    };
}

/// The first bytes of every declaration.
pub const MAGIC: [u8; 8] = *b"POSSYNC\0";

/// The declaration's format: what its fields and functions mean. Format 1
/// passed Rust types through `extern "C"` and is no longer read.
pub const FORMAT: u32 = 2;

/// The one symbol a plugin exports: its [`Declaration`].
pub const SYMBOL: &str = "POSSYNC_PLUGIN";

/// Bytes borrowed for the duration of one call: text (always UTF-8), JSON,
/// a blob. A null `ptr` is "none", which differs from empty.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Bytes {
    /// The first byte, or null for none.
    pub ptr: *const u8,
    /// How many bytes.
    pub len: usize,
}

impl Bytes {
    /// No value (an absent message id, say).
    pub const NONE: Self = Self {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// Borrows `bytes` for a call.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Borrows `text` for a call.
    pub fn of_str(text: &str) -> Self {
        Self::of(text.as_bytes())
    }

    /// Borrows `text` for a call, or [`Bytes::NONE`].
    pub fn of_option(text: Option<&str>) -> Self {
        text.map_or(Self::NONE, Self::of_str)
    }

    /// The bytes, or `None` for [`Bytes::NONE`].
    ///
    /// # Safety
    ///
    /// Unless `ptr` is null, `ptr..ptr + len` is readable and unchanged for
    /// `'a`: the caller got these bytes as an argument of the call it is
    /// in, which is what every function of this boundary promises.
    pub unsafe fn as_option<'a>(self) -> Option<&'a [u8]> {
        if self.ptr.is_null() {
            None
        } else {
            // SAFETY: non-null, and readable for `len` bytes during `'a` by
            // this function's contract.
            Some(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
        }
    }

    /// The bytes; none reads as empty.
    ///
    /// # Safety
    ///
    /// As [`Bytes::as_option`].
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        // SAFETY: the caller keeps `as_option`'s contract.
        unsafe { self.as_option() }.unwrap_or_default()
    }

    /// The bytes as text; none reads as `None`, bytes that are not UTF-8
    /// as an error.
    ///
    /// # Safety
    ///
    /// As [`Bytes::as_option`].
    pub unsafe fn as_str<'a>(self) -> Result<Option<&'a str>, std::str::Utf8Error> {
        // SAFETY: the caller keeps `as_option`'s contract.
        unsafe { self.as_option() }
            .map(std::str::from_utf8)
            .transpose()
    }
}

/// What one side hands back to the other: the callee calls `write` with
/// bytes of its own, borrowed for that call, and the caller copies them.
/// Writing several times appends.
///
/// A sink borrows the buffer of the [`collect`] call that made it for
/// `'a`, which ends when that call's callee returns. Its fields are
/// private, so only `collect` makes one: this side's, or the other side's,
/// which hands it over as an argument of the call it makes (every function
/// type of the boundary takes a `Sink<'_>`, so the callee may use it only
/// until it returns). `collect` takes a callee that works for any `'a`, so
/// no sink outlives its call (see `collect`'s examples). A sink is neither
/// `Send` nor `Sync`: it stays on the callee's thread.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Sink<'a> {
    /// The caller's buffer, opaque to the callee.
    ctx: *mut c_void,
    /// Appends `bytes` to the buffer. Never unwinds.
    write: WriteFn,
    /// The buffer `ctx` points at, borrowed for as long as the sink lives.
    buffer: PhantomData<&'a mut Vec<u8>>,
}

impl Sink<'_> {
    /// Writes `text` into the sink.
    pub fn put(self, text: &str) {
        // SAFETY: only `collect` makes a sink (its fields are private to
        // this module), this side's or the other side's (which hands it
        // over as an argument of the call it makes), so `ctx` is the
        // `Vec<u8>` of a `collect` call and `write` is the `append` of the
        // same SDK copy. That call is still running: the sink's lifetime
        // ends when its callee returns, and `collect` accepts only callees
        // that work for any lifetime, so none keeps the sink longer. Until
        // then only its sinks touch the vector, all on this thread (a sink
        // is neither `Send` nor `Sync`), one write at a time. `write`
        // catches its own panics; `text` is borrowed for the call.
        unsafe { (self.write)(self.ctx, Bytes::of_str(text)) }
    }
}

/// Runs `call` with a sink that collects what the callee writes, and
/// returns the call's result with the text written (lossy UTF-8: the other
/// side's text is shown, never trusted).
///
/// ```
/// use possync_sdk::__ffi::collect;
///
/// let (n, text) = collect(|sink| {
///     sink.put("written ");
///     sink.put("twice");
///     2
/// });
/// assert_eq!((n, text.as_str()), (2, "written twice"));
/// ```
///
/// The sink lives only as long as the call: it cannot be returned ...
///
/// ```compile_fail
/// let (sink, _) = possync_sdk::__ffi::collect(|sink| sink);
/// sink.put("into a buffer that is gone");
/// ```
///
/// ... nor kept anywhere that outlives it.
///
/// ```compile_fail
/// let mut kept = None;
/// possync_sdk::__ffi::collect(|sink| kept = Some(sink));
/// kept.unwrap().put("into a buffer that is gone");
/// ```
pub fn collect<R>(call: impl for<'a> FnOnce(Sink<'a>) -> R) -> (R, String) {
    let mut buffer: Vec<u8> = Vec::new();
    let sink = Sink {
        ctx: std::ptr::from_mut(&mut buffer).cast(),
        write: append,
        buffer: PhantomData,
    };
    let result = call(sink);
    (result, String::from_utf8_lossy(&buffer).into_owned())
}

/// The `write` of every sink.
///
/// # Safety
///
/// `ctx` is the buffer of the sink whose `write` this is, and that sink is
/// live (see [`Sink`]); `bytes` is borrowed for the call.
unsafe extern "C" fn append(ctx: *mut c_void, bytes: Bytes) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by this function's contract, `ctx` is the `Vec<u8>` of a
        // `collect` call whose callee is running (see `Sink::put`), touched
        // by nothing else during this write; `bytes` is borrowed for this
        // call.
        let (buffer, bytes) = unsafe { (&mut *ctx.cast::<Vec<u8>>(), bytes.as_slice()) };
        buffer.extend_from_slice(bytes);
    }));
}

/// How a call went. A `u32` rather than an enum, so that a value this side
/// does not know is an error to report, not undefined behaviour.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

codes! {
    Status::CODES: Self = [
        /// Done.
        OK = Self(0),
        /// Can never succeed: a payload that does not fit, a plugin function
        /// that refused its settings, bad SQL.
        PERMANENT = Self(1),
        /// May succeed later.
        TRANSIENT = Self(2),
        /// The callee panicked; the panic was caught on its side.
        PANICKED = Self(3),
        /// The terminal's storage outside the database cannot take writes now.
        STORAGE = Self(4),
    ]
}

impl Status {
    /// The status and message that carry `result` across.
    pub fn of(result: Result<(), crate::HandlerError>) -> (Self, String) {
        use crate::HandlerError;
        match result {
            Ok(()) => (Self::OK, String::new()),
            Err(HandlerError::Permanent(message)) => (Self::PERMANENT, message),
            Err(HandlerError::Transient(message)) => (Self::TRANSIENT, message),
            Err(HandlerError::Panicked(message)) => (Self::PANICKED, message),
            Err(HandlerError::Storage(message)) => (Self::STORAGE, message),
        }
    }

    /// The result a status and its message stand for.
    pub fn into_result(self, message: String) -> Result<(), crate::HandlerError> {
        use crate::HandlerError;
        match self {
            Self::OK => Ok(()),
            Self::PERMANENT => Err(HandlerError::Permanent(message)),
            Self::TRANSIENT => Err(HandlerError::Transient(message)),
            Self::PANICKED => Err(HandlerError::Panicked(message)),
            Self::STORAGE => Err(HandlerError::Storage(message)),
            Self(other) => Err(HandlerError::Permanent(format!(
                "unknown status {other} across the plugin boundary: {message}"
            ))),
        }
    }
}

/// A value bound to or read from SQL: [`crate::Value`] as it crosses.
/// `kind` says which of the other fields holds it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Value {
    /// One of [`Value::NULL`] ... [`Value::BLOB`].
    pub kind: u32,
    #[cfg(not(feature = "test-layout-changed"))]
    /// For [`Value::INTEGER`].
    pub integer: i64,
    /// For [`Value::REAL`].
    pub real: f64,
    #[cfg(feature = "test-layout-changed")]
    /// Test-only: the `test-layout-changed` feature moves this field after
    /// `real`, a layout of the same size that the fingerprint must tell apart.
    pub integer: i64,
    /// For [`Value::TEXT`] (UTF-8) and [`Value::BLOB`].
    pub bytes: Bytes,
}

codes! {
    Value::KINDS: u32 = [
        /// SQL NULL.
        NULL = 0,
        /// `integer`.
        INTEGER = 1,
        /// `real`.
        REAL = 2,
        /// `bytes`, UTF-8.
        TEXT = 3,
        /// `bytes`.
        BLOB = 4,
    ]
}

impl Value {
    /// `value`, borrowed for a call.
    pub fn of(value: &crate::Value) -> Self {
        let blank = Self {
            kind: Self::NULL,
            integer: 0,
            real: 0.0,
            bytes: Bytes::NONE,
        };
        match value {
            crate::Value::Null => blank,
            crate::Value::Integer(integer) => Self {
                kind: Self::INTEGER,
                integer: *integer,
                ..blank
            },
            crate::Value::Real(real) => Self {
                kind: Self::REAL,
                real: *real,
                ..blank
            },
            crate::Value::Text(text) => Self {
                kind: Self::TEXT,
                bytes: Bytes::of_str(text),
                ..blank
            },
            crate::Value::Blob(blob) => Self {
                kind: Self::BLOB,
                bytes: Bytes::of(blob),
                ..blank
            },
        }
    }

    /// A copy of the value; an unknown kind or text that is not UTF-8 is
    /// an error that says so.
    ///
    /// # Safety
    ///
    /// `bytes` keeps [`Bytes::as_option`]'s contract.
    pub unsafe fn to_value(&self) -> Result<crate::Value, String> {
        // SAFETY: the caller keeps the contract for `bytes`.
        let bytes = unsafe { self.bytes.as_slice() };
        Ok(match self.kind {
            Self::NULL => crate::Value::Null,
            Self::INTEGER => crate::Value::Integer(self.integer),
            Self::REAL => crate::Value::Real(self.real),
            Self::TEXT => crate::Value::Text(
                std::str::from_utf8(bytes)
                    .map_err(|err| format!("a text value is not UTF-8: {err}"))?
                    .to_owned(),
            ),
            Self::BLOB => crate::Value::Blob(bytes.to_vec()),
            other => return Err(format!("unknown value kind {other}")),
        })
    }

    /// Copies of `count` values at `values`.
    ///
    /// # Safety
    ///
    /// Unless `count` is 0, `values` points at `count` values readable for
    /// the call, each keeping [`Value::to_value`]'s contract.
    pub unsafe fn to_values(
        values: *const Value,
        count: usize,
    ) -> Result<Vec<crate::Value>, String> {
        if count == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: `count` readable values at `values`, by the contract.
        let values = unsafe { std::slice::from_raw_parts(values, count) };
        values
            .iter()
            // SAFETY: each value keeps the contract.
            .map(|value| unsafe { value.to_value() })
            .collect()
    }
}

/// Where a change stands among the changes to its entity: an optional
/// [`crate::Version`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Order {
    /// Microseconds since the Unix epoch.
    pub micros: i64,
    /// 1 if the message has an order, 0 if not.
    pub present: u32,
    /// 1 if `micros` identifies the change uniquely.
    pub exact: u32,
}

impl Order {
    /// `order` as it crosses.
    pub fn of(order: Option<crate::Version>) -> Self {
        match order {
            Some(version) => Self {
                micros: version.micros,
                present: 1,
                exact: u32::from(version.exact),
            },
            None => Self {
                micros: 0,
                present: 0,
                exact: 0,
            },
        }
    }

    /// The order it stands for.
    pub fn to_version(self) -> Option<crate::Version> {
        (self.present != 0).then_some(crate::Version {
            micros: self.micros,
            exact: self.exact != 0,
        })
    }
}

/// What a handler knows about the message besides its payload: a
/// [`crate::Context`] as it crosses.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MessageContext {
    /// The envelope `type`.
    pub message_type: Bytes,
    /// The store the message is for.
    pub license_key: Bytes,
    /// The publisher's message id, or none.
    pub message_id: Bytes,
    /// The envelope's timestamp, or none.
    pub timestamp: Bytes,
    /// Its order.
    pub order: Order,
}

/// Receives the first row of a query, once, if there is one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RowSink {
    /// The caller's row, opaque to the callee.
    pub ctx: *mut c_void,
    /// Copies `count` columns at `values`. Never unwinds.
    pub row: RowFn,
}

/// An effect of a plugin's (after commit, on rollback), owned by the host
/// once handed over. Exactly one of `run` and `drop` is called, once; both
/// free `data` and catch the effect's panics (reported as
/// [`Status::PANICKED`] with the message written to the sink).
#[repr(C)]
#[derive(Debug)]
pub struct Effect {
    /// The plugin's boxed closure, opaque to the host.
    pub data: *mut c_void,
    /// Runs the effect and frees it.
    pub run: EffectFn,
    /// Frees the effect without running it.
    pub drop: EffectFn,
}

/// The host's [`crate::Store`] for one message, as the plugin calls it.
/// Every function catches the host's panics.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StoreApi {
    /// The host's store, opaque to the plugin.
    pub ctx: *mut c_void,
    /// Runs a statement with `count` parameters at `params`; on
    /// [`Status::OK`] writes the rows changed to `changed`, else the error
    /// to `error` ([`Status::PERMANENT`] or [`Status::TRANSIENT`]).
    pub execute: ExecuteFn,
    /// Runs a query and hands its first row, if any, to `row`.
    pub query_row: QueryRowFn,
    /// Takes an effect to run after the commit.
    pub after_commit: TakeEffectFn,
    /// Takes an effect to run if the message's writes roll back.
    pub on_rollback: TakeEffectFn,
    /// Reports that entity `id` holds a newer change than the message.
    pub stale: StaleFn,
}

/// What the host provides to a plugin for as long as it is loaded.
#[repr(C)]
#[derive(Debug)]
pub struct HostServices {
    /// Writes one log line ([`crate::log::Level`] as `u32`) on behalf of
    /// `source`. Never unwinds.
    pub log: LogFn,
}

/// A plugin instance, opaque to the host.
#[repr(C)]
#[derive(Debug)]
pub struct Instance {
    _opaque: [u8; 0],
}

/// Text kept inline in the header, NUL-padded, so that the header holds no
/// pointer and can be read before anything in the library is trusted.
pub type InlineText = [u8; 64];

/// `text` as [`InlineText`], cut at 64 bytes.
pub const fn inline_text(text: &str) -> InlineText {
    inline_parts(text, "")
}

/// `first` then `second` as [`InlineText`], cut at 64 bytes.
pub const fn inline_parts(first: &str, second: &str) -> InlineText {
    let mut out = [0u8; 64];
    let mut at = 0;
    let mut i = 0;
    while i < first.len() && at < out.len() {
        out[at] = first.as_bytes()[i];
        at += 1;
        i += 1;
    }
    i = 0;
    while i < second.len() && at < out.len() {
        out[at] = second.as_bytes()[i];
        at += 1;
        i += 1;
    }
    out
}

/// The text of an [`InlineText`], up to its first NUL.
pub fn read_inline(text: &InlineText) -> String {
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    String::from_utf8_lossy(&text[..end]).into_owned()
}

/// What a plugin was built with. `magic` and `format` lead every format,
/// so a host can always read them; the rest is laid out by `format`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`FORMAT`].
    pub format: u32,
    /// 1 if panics unwind (they must, to be caught), 0 if they abort.
    pub unwinds: u32,
    /// [`layout::FINGERPRINT`] of the SDK that built the plugin.
    pub layout: u64,
    /// The version of that SDK.
    pub sdk: SdkVersion,
    /// The same, as text (with any pre-release part).
    pub sdk_text: InlineText,
    /// `<arch>-<os>` the plugin was built for.
    pub target: InlineText,
}

/// `<arch>-<os>` of this build.
const TARGET: InlineText = inline_parts(
    std::env::consts::ARCH,
    if cfg!(target_os = "linux") {
        "-linux"
    } else if cfg!(target_os = "macos") {
        "-macos"
    } else if cfg!(target_os = "windows") {
        "-windows"
    } else {
        "-other"
    },
);

impl Header {
    /// The header of a plugin built with this copy of the SDK.
    pub const CURRENT: Self = Self {
        magic: MAGIC,
        format: FORMAT,
        unwinds: cfg!(panic = "unwind") as u32,
        layout: layout::FINGERPRINT,
        sdk: SdkVersion::CURRENT,
        sdk_text: inline_text(crate::SDK_VERSION),
        target: TARGET,
    };

    /// Test-only: this header claiming SDK `version` instead, for the
    /// fixtures that check the host refuses incompatible plugins. A real
    /// plugin never uses it.
    #[doc(hidden)]
    pub const fn claiming_sdk(self, version: SdkVersion) -> Self {
        self.claiming_prerelease(version, "")
    }

    /// Test-only: this header claiming the pre-release `pre` of SDK
    /// `version` (`0.3.0-alpha.1` for 0.3.0 and `alpha.1`), for the fixture
    /// that checks the host refuses a pre-release other than its own.
    #[doc(hidden)]
    pub const fn claiming_prerelease(self, version: SdkVersion, pre: &str) -> Self {
        Self {
            sdk: version,
            sdk_text: version.inline(pre),
            ..self
        }
    }

    /// Test-only: this header claiming declaration format `format`, for the
    /// fixture that checks the host refuses a format it does not read.
    #[doc(hidden)]
    pub const fn claiming_format(self, format: u32) -> Self {
        Self { format, ..self }
    }
}

signatures! {
    /// See [`Sink`].
    pub type WriteFn = unsafe extern "C" fn(ctx: *mut c_void, bytes: Bytes);
    /// See [`RowSink`].
    pub type RowFn = unsafe extern "C" fn(ctx: *mut c_void, values: *const Value, count: usize);
    /// See [`Effect`].
    pub type EffectFn = unsafe extern "C" fn(data: *mut c_void, message: Sink<'_>) -> Status;
    /// See [`StoreApi::execute`].
    pub type ExecuteFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        sql: Bytes,
        params: *const Value,
        count: usize,
        changed: *mut u64,
        error: Sink<'_>,
    ) -> Status;
    /// See [`StoreApi::query_row`].
    pub type QueryRowFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        sql: Bytes,
        params: *const Value,
        count: usize,
        row: RowSink,
        error: Sink<'_>,
    ) -> Status;
    /// See [`StoreApi::after_commit`].
    pub type TakeEffectFn = unsafe extern "C" fn(ctx: *mut c_void, effect: Effect);
    /// See [`StoreApi::stale`].
    pub type StaleFn = unsafe extern "C" fn(ctx: *mut c_void, id: Bytes, incoming: Order, stored: i64);
    /// See [`HostServices`].
    pub type LogFn = unsafe extern "C" fn(level: u32, source: Bytes, message: Bytes);
    /// Builds the plugin from its config name and settings (JSON text), and
    /// writes a pointer to the new instance to `instance`; on failure writes
    /// the reason to `message` and returns [`Status::PERMANENT`] (the plugin
    /// function refused) or [`Status::PANICKED`].
    pub type CreateFn = unsafe extern "C" fn(
        name: Bytes,
        settings: Bytes,
        applies: u32,
        host: *const HostServices,
        instance: *mut *mut Instance,
        message: Sink<'_>,
    ) -> Status;
    /// Writes the instance's [`Description`] as JSON to `out`.
    pub type DescribeFn = unsafe extern "C" fn(instance: *const Instance, out: Sink<'_>) -> Status;
    /// Checks that `payload` decodes and validates as `message_type`.
    pub type CheckFn = unsafe extern "C" fn(
        instance: *const Instance,
        message_type: Bytes,
        payload: Bytes,
        message: Sink<'_>,
    ) -> Status;
    /// Applies one message through `store`.
    pub type HandleFn = unsafe extern "C" fn(
        instance: *const Instance,
        context: *const MessageContext,
        payload: Bytes,
        store: *const StoreApi,
        message: Sink<'_>,
    ) -> Status;
    /// Drops the instance; a panic in the plugin's `Drop` is reported as
    /// [`Status::PANICKED`].
    pub type DestroyFn = unsafe extern "C" fn(instance: *mut Instance, message: Sink<'_>) -> Status;
}

/// What a plugin library exports under [`SYMBOL`].
#[repr(C)]
#[derive(Debug)]
pub struct Declaration {
    /// Checked before anything else is read.
    pub header: Header,
    /// The plugin crate's own version, for `possync plugins list`.
    pub plugin_version: InlineText,
    /// See [`CreateFn`].
    pub create: CreateFn,
    /// See [`DescribeFn`].
    pub describe: DescribeFn,
    /// See [`CheckFn`].
    pub check: CheckFn,
    /// See [`HandleFn`].
    pub handle: HandleFn,
    /// See [`DestroyFn`].
    pub destroy: DestroyFn,
}

/// What a plugin says about itself, as JSON through [`DescribeFn`].
///
/// A host reads the descriptions of plugins built with older and newer SDKs
/// of its line: a field added within a line must be optional
/// (`#[serde(default)]`), and one a host does not know is ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Description {
    /// The plugin's own name.
    pub name: String,
    /// Its one-line description.
    pub description: String,
    /// Its migrations, in order.
    pub migrations: Vec<MigrationText>,
    /// Its message types, in the order they were added.
    pub message_types: Vec<MessageType>,
    /// How its tables hold its entities, for checksums.
    #[serde(default)]
    pub exports: Vec<crate::Export>,
}

/// A migration as it crosses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationText {
    /// Its id.
    pub id: String,
    /// Its SQL.
    pub sql: String,
}

/// A message type and the JSON Schema of its payload.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MessageType {
    /// The envelope `type`.
    #[serde(rename = "type")]
    pub name: String,
    /// The payload's JSON Schema.
    pub schema: serde_json::Value,
}
