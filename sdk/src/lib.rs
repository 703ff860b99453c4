//! Write message handlers for possync.
//!
//! A handler turns one kind of message (`price_update`, `image_update`, ...)
//! into writes on the terminal's local database. It sees the decoded
//! [`Envelope`] and a [`Store`]; the runtime owns the broker, the SQLite
//! connection, the transaction and the acknowledgement, so a handler is a
//! small, synchronous-looking piece of code that third parties can write
//! without depending on lapin, tokio or SQLite.
//!
//! ```
//! use possync_sdk::{async_trait, Envelope, HandlerError, MessageHandler, Migration, Store};
//!
//! #[derive(Debug, Default)]
//! struct Greeting;
//!
//! const MIGRATIONS: &[Migration] =
//!     &[Migration::new("greeting/1", "CREATE TABLE greetings (id TEXT PRIMARY KEY, text TEXT)")];
//!
//! #[async_trait]
//! impl MessageHandler for Greeting {
//!     fn name(&self) -> &str { "greeting" }
//!     fn message_types(&self) -> &[&str] { &["greeting_update"] }
//!     fn migrations(&self) -> &[Migration] { MIGRATIONS }
//!     async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
//!         #[derive(serde::Deserialize)]
//!         struct Payload { id: String, text: String }
//!         let p: Payload = envelope.payload_as()?;
//!         store.execute(
//!             "INSERT OR REPLACE INTO greetings (id, text) VALUES (?1, ?2)",
//!             &[p.id.into(), p.text.into()],
//!         )?;
//!         Ok(())
//!     }
//! }
//!
//! possync_sdk::register_handler!(Greeting::default);
//! ```

mod envelope;
mod error;
mod handler;
pub mod host;
mod message;
mod migration;
mod plugin;
mod registration;
mod store;

pub use async_trait::async_trait;
pub use envelope::{Envelope, Version};
pub use error::{HandlerError, StoreError};
pub use handler::MessageHandler;
pub use message::WireMessage;
pub use migration::Migration;
pub use plugin::{
    ABI_FORMAT_VERSION, ABI_MAGIC, AbiHeader, DECLARATION_SYMBOL, InlineStr, PluginDeclaration,
    RegisterFn, Registrar, panic_message, run_registration,
};
pub use registration::{HandlerRegistration, registered_handlers};
pub use store::{Effect, Store, Value, is_newer};

/// The SDK's version; dynamic plugins are checked against it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's handler example compiles as written.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
