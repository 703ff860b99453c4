//! A store's database in the back office: what the store's terminals sent
//! upstream (orders and the other upstream types), applied by the same
//! plugins that apply changes on a terminal, into a SQLite database of the
//! store's own, each message once and in the order the back office
//! recorded them.
//!
//! The back office records every upstream message first, with a cursor
//! that orders them; a store's database is derived from that record. Its
//! cursor is written in the transaction of the writes it covers, so a
//! crash between the two never applies a message twice or skips one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use possync_sdk::{Envelope, Migration};
use rusqlite::OptionalExtension;
use serde_json::value::RawValue;

use crate::applier::{Applier, Limits};
use crate::dispatch::Outcome;
use crate::identity::LicenseKey;
use crate::inbound::Inbound;
use crate::registry::Registry;
use crate::store::{Database, DatabaseError};
use crate::topology::routing_key;

/// Where the cursor of a store's database is kept.
const CURSOR: Migration = Migration::new(
    "possync/upstream-cursor",
    "CREATE TABLE IF NOT EXISTS possync_upstream_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        applied_up_to INTEGER NOT NULL
    );",
);

/// A message a handler keeps failing is quarantined after this many tries.
const MAX_ATTEMPTS: u32 = 5;

/// One message a terminal of the store sent, as the back office recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamEntry<'a> {
    /// Where the back office recorded it: entries apply in this order.
    pub cursor: i64,
    /// The terminal that sent it.
    pub terminal: &'a str,
    /// Its type.
    pub message_type: &'a str,
    /// Its id, unique per terminal.
    pub message_id: &'a str,
    /// When the terminal's POS app wrote it (RFC 3339).
    pub created_at: &'a str,
    /// The payload, as JSON text.
    pub payload: &'a str,
}

/// An entry its plugin will never apply, kept in the store database's
/// `possync_quarantine` with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEntry {
    /// The entry's cursor.
    pub cursor: i64,
    /// Its type.
    pub message_type: String,
    /// Why.
    pub reason: String,
}

/// What one call to [`StoreDatabase::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreApplied {
    /// The type of each entry applied now, in order.
    pub applied: Vec<String>,
    /// Entries that will never apply.
    pub refused: Vec<RefusedEntry>,
    /// A handler asked for its entry to be tried again later: the reason.
    /// That entry and those after it are not applied yet.
    pub waiting: Option<String>,
}

/// The database could not take the entries (locked, full, read-only, or a
/// plugin's storage refused writes): nothing of them applied; try again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreHeld(String);

/// The back office's database of one store, where plugins apply what the
/// store's terminals sent.
#[derive(Debug)]
pub struct StoreDatabase {
    applier: Applier,
    store: LicenseKey,
    applied_up_to: i64,
    path: PathBuf,
}

impl StoreDatabase {
    /// Opens (or creates) `<dir>/<store>.db` and runs the plugins'
    /// migrations, as a terminal does with its own database.
    pub fn open(
        dir: &Path,
        store: &LicenseKey,
        registry: Arc<Registry>,
        max_message_bytes: usize,
    ) -> Result<Self, DatabaseError> {
        let path = dir.join(format!("{store}.db"));
        let mut database = Database::open(&path)?;
        database.migrate(registry.migrations().iter().chain([&CURSOR]))?;
        // A lock held by someone reading the database (a report, a shell)
        // fails the batch soon, to be tried again, instead of waiting unseen.
        database.wait_briefly_for_locks()?;
        let applied_up_to = database
            .connection()
            .query_row(
                "SELECT applied_up_to FROM possync_upstream_cursor WHERE id = 1",
                [],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let limits = Limits {
            max_message_bytes,
            max_attempts: MAX_ATTEMPTS,
            quarantine_max_rows: 100_000,
            quarantine_max_age_secs: 365 * 24 * 3600,
            applied_ids_max_age_secs: 30 * 24 * 3600,
            collapse_min_batch: 0,
            feed_keep: 0,
        };
        Ok(Self {
            applier: Applier::new(
                database,
                registry,
                store.clone(),
                limits,
                crate::feed::channel(),
            ),
            store: store.clone(),
            applied_up_to,
            path,
        })
    }

    /// The cursor of the last entry settled (applied or refused); 0 if none.
    pub fn applied_up_to(&self) -> i64 {
        self.applied_up_to
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies the entries after [`applied_up_to`](Self::applied_up_to), in
    /// order, in one transaction that also moves the cursor past each
    /// entry settled. Entries at or before the cursor were applied before
    /// and are skipped.
    ///
    /// A handler's entry is written as an envelope of the store, whose
    /// message id is `<terminal>/<message id>` (unique in the store) and
    /// whose timestamp is when the POS app wrote it.
    pub fn apply(&mut self, entries: &[UpstreamEntry<'_>]) -> Result<StoreApplied, StoreHeld> {
        let fresh: Vec<&UpstreamEntry<'_>> = entries
            .iter()
            .filter(|entry| entry.cursor > self.applied_up_to)
            .collect();
        if fresh.is_empty() {
            return Ok(StoreApplied::default());
        }
        let batch: Vec<Inbound> = fresh
            .iter()
            .enumerate()
            .map(|(index, entry)| Inbound {
                tag: u64::try_from(index).unwrap_or(u64::MAX),
                routing_key: routing_key(&self.store, entry.message_type),
                body: self.envelope(entry),
                redelivered: false,
                requeued: false,
            })
            .collect();
        let cursors: Vec<i64> = fresh.iter().map(|entry| entry.cursor).collect();
        let record = |transaction: &mut crate::transaction::Transaction<'_>,
                      outcomes: &[Outcome]|
         -> rusqlite::Result<()> {
            if let Some(last) = settled_up_to(&cursors, outcomes) {
                transaction.execute(
                    "INSERT INTO possync_upstream_cursor (id, applied_up_to) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET applied_up_to = excluded.applied_up_to",
                    [last],
                )?;
            }
            Ok(())
        };
        let applied = self
            .applier
            .apply_recording(&batch, &record)
            .map_err(|err| StoreHeld(err.to_string()))?;
        if let Some(last) = settled_up_to(&cursors, &applied.outcomes) {
            self.applied_up_to = last;
        }
        let mut done = StoreApplied::default();
        for (entry, outcome) in fresh.iter().zip(&applied.outcomes) {
            match outcome {
                Outcome::Retry { reason } => {
                    done.waiting = Some(reason.clone());
                    break;
                }
                Outcome::DeadLetter { reason, .. } => done.refused.push(RefusedEntry {
                    cursor: entry.cursor,
                    message_type: entry.message_type.to_owned(),
                    reason: reason.clone(),
                }),
                Outcome::Applied { message_type }
                | Outcome::Collapsed { message_type }
                | Outcome::Stale { message_type, .. } => done.applied.push(message_type.clone()),
                // Switched off in config: settled unapplied, as on a terminal.
                Outcome::Disabled { .. } | Outcome::Duplicate => {}
            }
        }
        Ok(done)
    }

    /// The entry as the envelope its handler is given.
    fn envelope(&self, entry: &UpstreamEntry<'_>) -> Vec<u8> {
        let payload = RawValue::from_string(entry.payload.to_owned()).unwrap_or_else(|_| {
            // Recorded only after its plugin's check, so always JSON; should
            // it not be, the handler's check refuses the text instead.
            RawValue::from_string(serde_json::Value::from(entry.payload).to_string())
                .unwrap_or_else(|_| RawValue::NULL.to_owned())
        });
        let envelope = Envelope::with_raw_payload(entry.message_type, self.store.as_str(), payload)
            .with_message_id(format!("{}/{}", entry.terminal, entry.message_id))
            .with_timestamp(entry.created_at);
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

/// The cursor of the last entry settled, when the outcomes settle any: all
/// of them up to the first to be tried again.
fn settled_up_to(cursors: &[i64], outcomes: &[Outcome]) -> Option<i64> {
    let settled = outcomes
        .iter()
        .take_while(|outcome| outcome.settles_by_ack())
        .count();
    settled.checked_sub(1).map(|last| cursors[last])
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_orders as _;

    fn registry() -> Arc<Registry> {
        Arc::new(Registry::from_config(&Default::default()).expect("the built-in plugins load"))
    }

    fn order(cursor: i64, id: &str) -> (i64, String, String) {
        (
            cursor,
            id.to_owned(),
            serde_json::json!({
                "order_id": id,
                "lines": [{"product_id": "P1", "quantity": 1, "unit_price": 2.5}],
                "total": 2.5
            })
            .to_string(),
        )
    }

    /// The back office records one entry per (terminal, message id): here
    /// each entry's message id is its payload's order id.
    fn entries(payloads: &[(i64, String, String)]) -> Vec<UpstreamEntry<'_>> {
        payloads
            .iter()
            .map(|(cursor, id, payload)| UpstreamEntry {
                cursor: *cursor,
                terminal: "TILL-1",
                message_type: "order",
                message_id: id,
                created_at: "2026-12-02T10:00:00Z",
                payload,
            })
            .collect()
    }

    fn orders(path: &Path) -> Vec<String> {
        let connection = rusqlite::Connection::open(path).expect("opens");
        let mut stmt = connection
            .prepare("SELECT id FROM orders ORDER BY id")
            .expect("prepares");
        stmt.query_map([], |row| row.get(0))
            .expect("reads")
            .collect::<Result<_, _>>()
            .expect("reads")
    }

    #[test]
    fn entries_apply_once_each_through_their_plugin_and_the_cursor_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database =
            StoreDatabase::open(dir.path(), &store, registry(), 1 << 20).expect("opens");
        let first = [order(3, "O-1"), order(7, "O-2")];
        let done = database.apply(&entries(&first)).expect("applies");
        assert_eq!(done.applied, ["order", "order"]);
        assert_eq!(database.applied_up_to(), 7);

        // The same entries again, and one more: only the new one applies.
        let again = [order(3, "O-1"), order(7, "O-2"), order(9, "O-3")];
        let done = database.apply(&entries(&again)).expect("applies");
        assert_eq!(done.applied, ["order"]);
        let path = database.path().to_owned();
        drop(database);

        let mut reopened =
            StoreDatabase::open(dir.path(), &store, registry(), 1 << 20).expect("opens");
        assert_eq!(reopened.applied_up_to(), 9);
        let done = reopened.apply(&entries(&again)).expect("applies");
        assert!(done.applied.is_empty(), "{done:?}");
        assert_eq!(orders(&path), ["O-1", "O-2", "O-3"]);
    }

    #[test]
    fn a_database_that_cannot_take_the_entries_applies_none_of_them_and_moves_no_cursor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database =
            StoreDatabase::open(dir.path(), &store, registry(), 1 << 20).expect("opens");
        let batch = [order(1, "O-1"), order(2, "O-2")];
        let holder = rusqlite::Connection::open(database.path()).expect("opens");
        holder
            .execute_batch("BEGIN EXCLUSIVE")
            .expect("someone holds the database");
        let held = database.apply(&entries(&batch)).expect_err("held");
        assert!(held.to_string().contains("locked"), "{held}");
        assert_eq!(database.applied_up_to(), 0);
        holder.execute_batch("ROLLBACK").expect("lets go");

        let done = database.apply(&entries(&batch)).expect("applies");
        assert_eq!(done.applied, ["order", "order"]);
        assert_eq!(database.applied_up_to(), 2);
    }

    #[test]
    fn an_entry_its_plugin_refuses_is_quarantined_and_the_rest_apply() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database =
            StoreDatabase::open(dir.path(), &store, registry(), 1 << 20).expect("opens");
        let batch = [
            order(1, "O-1"),
            (
                2,
                "O-2".to_owned(),
                serde_json::json!({"order_id": "O-2", "lines": [], "total": 0}).to_string(),
            ),
            order(3, "O-3"),
        ];
        let done = database.apply(&entries(&batch)).expect("applies");
        assert_eq!(done.applied, ["order", "order"]);
        assert_eq!(done.refused.len(), 1, "{done:?}");
        assert_eq!(done.refused[0].cursor, 2);
        assert!(
            done.refused[0].reason.contains("at least one line"),
            "{done:?}"
        );
        assert_eq!(database.applied_up_to(), 3);
        assert_eq!(orders(database.path()), ["O-1", "O-3"]);
    }
}
