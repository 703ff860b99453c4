//! Test a possync plugin without a broker.
//!
//! A [`TestTerminal`] runs one plugin against a real SQLite file, as a
//! terminal would: it runs the plugin's migrations, applies each envelope in
//! a transaction of its own (committed if the handler returns `Ok`, rolled
//! back if it fails or panics, with the handler's
//! [`after_commit`](possync_sdk::Store::after_commit) and
//! [`on_rollback`](possync_sdk::Store::on_rollback) effects run to match),
//! drops a message id it applied before, and says when a handler found its
//! change stale. What it does not do is the terminal's own work around the
//! handler: the broker, license-key checks, retries and dead-lettering.
//!
//! ```
//! use possync_sdk::{Context, HandlerError, Migration, Payload, Plugin, Settings, Store};
//! use possync_testkit::{Applied, TestTerminal, message};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct TableUpdate { table_id: String, seats: i64 }
//!
//! impl Payload for TableUpdate { const TYPE: &'static str = "table_update"; }
//!
//! fn apply(table: TableUpdate, _: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
//!     store.execute("INSERT OR REPLACE INTO tables (id, seats) VALUES (?1, ?2)",
//!                   &[table.table_id.into(), table.seats.into()])?;
//!     Ok(())
//! }
//!
//! fn plugin(_: &Settings) -> Result<Plugin, String> {
//!     Ok(Plugin::new("tables")
//!         .migrations(&[Migration::new("tables/1", "CREATE TABLE tables (id TEXT PRIMARY KEY, seats INTEGER)")])
//!         .on::<TableUpdate>(apply))
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut till = TestTerminal::new(plugin)?;
//! let update = message(&TableUpdate { table_id: "T1".into(), seats: 4 }).with_message_id("m-1");
//! assert_eq!(till.apply(update.clone())?, Applied::Changed);
//! assert_eq!(till.apply(update)?, Applied::Duplicate);
//! assert_eq!(till.query("SELECT id, seats FROM tables")?, [serde_json::json!(["T1", 4])]);
//! # Ok(())
//! # }
//! ```

mod store;
mod terminal;

/// The plugin guide's examples compile as written.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/writing-a-plugin.md")]
struct GuideExamples;

pub use terminal::{Applied, Error, Stale, TestTerminal};

use possync_sdk::{Envelope, Payload};

/// The store (license key) of the envelopes [`message`] makes.
pub const LICENSE_KEY: &str = "TEST-STORE";

/// The envelope that carries `payload` to the test store, with no id,
/// version or timestamp; add them with
/// [`with_message_id`](Envelope::with_message_id),
/// [`with_version`](Envelope::with_version) and
/// [`with_timestamp`](Envelope::with_timestamp).
///
/// # Panics
///
/// If `payload` cannot be serialized (a map with non-text keys, say): a
/// bug in the test.
pub fn message<T: Payload>(payload: &T) -> Envelope {
    payload
        .to_envelope(LICENSE_KEY)
        .unwrap_or_else(|err| panic!("a {} payload does not serialize: {err}", T::TYPE))
}
