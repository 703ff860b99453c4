//! Write message handlers for possync.
//!
//! A plugin adds message types to possync without touching its core. Each
//! type is a [`Payload`] (a struct that names its wire `type` once) and a
//! handler: a plain function of that payload, the message's [`Context`]
//! and the terminal's [`Store`]. The runtime owns the broker, the SQLite
//! connection, the transaction, deduplication and acknowledgement; a handler
//! only writes rows.
//!
//! ```
//! use possync_sdk::{Context, HandlerError, Migration, Payload, Plugin, Settings, Store};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct GreetingUpdate { id: String, text: String }
//!
//! impl Payload for GreetingUpdate { const TYPE: &'static str = "greeting_update"; }
//!
//! fn apply(greeting: GreetingUpdate, _: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
//!     store.execute("INSERT OR REPLACE INTO greetings (id, text) VALUES (?1, ?2)",
//!                   &[greeting.id.into(), greeting.text.into()])?;
//!     Ok(())
//! }
//!
//! pub fn plugin(_: &Settings) -> Result<Plugin, String> {
//!     Ok(Plugin::new("greetings")
//!         .migrations(&[Migration::new("greetings/1", "CREATE TABLE greetings (id TEXT PRIMARY KEY, text TEXT)")])
//!         .on::<GreetingUpdate>(apply))
//! }
//!
//! possync_sdk::export_plugin!(plugin);
//! ```
//!
//! A plugin is built as a `cdylib` and named in the terminal's config
//! (`[plugins.greetings] path = "..."`), or linked into a binary of your own
//! with [`register_builtin!`]. Test it without a broker with the
//! `possync-testkit` crate.

mod context;
mod envelope;
mod error;
mod export;
pub mod ids;
pub mod log;
mod migration;
mod payload;
mod plugin;
mod store;
mod versioned;

pub use context::Context;
pub use envelope::{Envelope, Version};
pub use error::{HandlerError, StoreError};
pub use export::Export;
pub use migration::Migration;
pub use payload::Payload;
pub use plugin::{Plugin, PluginFn, Settings};
pub use store::{Effect, Store, Value};
pub use versioned::{Decision, TOMBSTONES, Versioned};

/// The SDK's version: a dynamic plugin records the one it was built with,
/// and a host loads it only if its own is of the same line (the same major
/// version; for 0.x the same minor), older or newer, and, if either is a
/// pre-release, exactly the same.
///
/// ```
/// assert!(possync_sdk::SDK_VERSION.starts_with("0."));
/// ```
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's handler example compiles as written.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;

#[doc(hidden)]
#[path = "hosting.rs"]
pub mod __host;

/// The boundary with dynamic plugins: the C ABI [`export_plugin!`] exports
/// and possync's loader reads. Authors never name it.
#[doc(hidden)]
#[path = "ffi/mod.rs"]
pub mod __ffi;

/// The store over SQLite, as the runtimes that give handlers one share it.
#[cfg(feature = "sqlite")]
#[doc(hidden)]
#[path = "sqlite.rs"]
pub mod __sqlite;

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
