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

/// Where the cursor of a store's database is kept, with the store and the
/// record it follows: a cursor means something only in its own record.
const CURSOR: Migration = Migration::new(
    "possync/upstream-cursor",
    "CREATE TABLE IF NOT EXISTS possync_upstream_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        applied_up_to INTEGER NOT NULL,
        store TEXT NOT NULL,
        record TEXT NOT NULL
    );",
);

/// The envelope a handler is given carries a few hundred bytes more than
/// the message the backend took.
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

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
    /// The type of each entry that changed nothing because its entity
    /// holds a newer change.
    pub stale: Vec<String>,
    /// Entries of a type not taken upstream, settled unapplied.
    pub skipped: Vec<String>,
    /// A handler asked for its entry to be tried again later: the reason.
    /// That entry and those after it are not applied yet.
    pub waiting: Option<String>,
}

/// A store database that cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// SQLite, a migration or the folder failed.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// The file holds another store's messages.
    #[error(
        "{path} holds the messages of store {found}, not {expected}: on a file system that ignores case, two stores whose keys differ only by case share a file; keep the store databases on one that does not"
    )]
    OtherStore {
        /// The file.
        path: PathBuf,
        /// The store it holds.
        found: String,
        /// The store expected.
        expected: String,
    },
    /// The file follows the record of another backend database, whose
    /// cursors mean nothing in this one.
    #[error(
        "{path} was applied from another backend database (record {found}, this one is {expected}): stop the backend and delete the folder, which rebuilds every store database from this one's record"
    )]
    OtherRecord {
        /// The file.
        path: PathBuf,
        /// The record it follows.
        found: String,
        /// This backend's.
        expected: String,
    },
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
    record: String,
    types: Vec<String>,
    applied_up_to: i64,
    /// The entry a handler asked to try again, which is tried next.
    retrying: Option<i64>,
    path: PathBuf,
}

impl StoreDatabase {
    /// Opens (or creates) `<dir>/<store>.db` and runs the plugins'
    /// migrations, as a terminal does with its own database. `record` names
    /// the backend database whose cursors it follows; `types` are the
    /// types it applies (others are settled unapplied); `max_message_bytes`
    /// is the largest message the backend takes.
    pub fn open(
        dir: &Path,
        store: &LicenseKey,
        record: &str,
        types: &[String],
        registry: Arc<Registry>,
        max_message_bytes: usize,
    ) -> Result<Self, StoreOpenError> {
        let path = dir.join(format!("{store}.db"));
        let mut database = Database::open(&path)?;
        database.migrate(registry.migrations().iter().chain([&CURSOR]))?;
        // A lock held by someone reading the database (a report, a shell)
        // fails the batch soon, to be tried again, instead of waiting unseen.
        database.wait_briefly_for_locks()?;
        // Derived from the backend's record, with its cursor in each commit.
        database.commit_without_sync()?;
        let kept: Option<(i64, String, String)> = database
            .connection()
            .query_row(
                "SELECT applied_up_to, store, record FROM possync_upstream_cursor WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()
            .map_err(DatabaseError::from)?;
        let applied_up_to = match kept {
            None => 0,
            Some((_, found, _)) if found != store.as_str() => {
                return Err(StoreOpenError::OtherStore {
                    path,
                    found,
                    expected: store.to_string(),
                });
            }
            Some((_, _, found)) if found != record => {
                return Err(StoreOpenError::OtherRecord {
                    path,
                    found,
                    expected: record.to_owned(),
                });
            }
            Some((cursor, _, _)) => cursor,
        };
        let limits = Limits {
            max_message_bytes: max_message_bytes.saturating_add(ENVELOPE_ALLOWANCE),
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
            record: record.to_owned(),
            types: types.to_vec(),
            applied_up_to,
            retrying: None,
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
    /// message id is `<terminal>/<message id>` (unique in the store), whose
    /// timestamp is when the POS app wrote it, and whose version is its
    /// cursor: of two messages about one entity, the one recorded later
    /// wins, whatever the tills' clocks say.
    pub fn apply(&mut self, entries: &[UpstreamEntry<'_>]) -> Result<StoreApplied, StoreHeld> {
        let fresh: Vec<&UpstreamEntry<'_>> = entries
            .iter()
            .filter(|entry| entry.cursor > self.applied_up_to)
            .collect();
        if fresh.is_empty() {
            return Ok(StoreApplied::default());
        }
        let taken: Vec<&UpstreamEntry<'_>> = fresh
            .iter()
            .copied()
            .filter(|entry| self.takes(entry.message_type))
            .collect();
        let batch: Vec<Inbound> = taken
            .iter()
            .enumerate()
            .map(|(index, entry)| Inbound {
                tag: u64::try_from(index).unwrap_or(u64::MAX),
                routing_key: routing_key(&self.store, entry.message_type),
                body: self.envelope(entry),
                // Tried before: once it settles, its tries are forgotten.
                redelivered: self.retrying == Some(entry.cursor),
                requeued: false,
            })
            .collect();
        let fresh_cursors: Vec<i64> = fresh.iter().map(|entry| entry.cursor).collect();
        let taken_cursors: Vec<i64> = taken.iter().map(|entry| entry.cursor).collect();
        let (store, record) = (self.store.as_str(), self.record.as_str());
        let write = |transaction: &mut crate::transaction::Transaction<'_>,
                     outcomes: &[Outcome]|
         -> rusqlite::Result<()> {
            if let Some(last) = settled_up_to(&fresh_cursors, &taken_cursors, outcomes) {
                transaction.execute(
                    "INSERT INTO possync_upstream_cursor (id, applied_up_to, store, record)
                     VALUES (1, ?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET applied_up_to = excluded.applied_up_to",
                    rusqlite::params![last, store, record],
                )?;
            }
            Ok(())
        };
        let applied = self
            .applier
            .apply_recording(&batch, &write)
            .map_err(|err| StoreHeld(err.to_string()))?;
        if let Some(last) = settled_up_to(&fresh_cursors, &taken_cursors, &applied.outcomes) {
            self.applied_up_to = last;
        }
        let mut done = StoreApplied::default();
        self.retrying = None;
        for (entry, outcome) in taken.iter().zip(&applied.outcomes) {
            match outcome {
                Outcome::Retry { reason } => {
                    done.waiting = Some(reason.clone());
                    self.retrying = Some(entry.cursor);
                    break;
                }
                Outcome::DeadLetter { reason, .. } => done.refused.push(RefusedEntry {
                    cursor: entry.cursor,
                    message_type: entry.message_type.to_owned(),
                    reason: reason.clone(),
                }),
                Outcome::Applied { message_type } | Outcome::Collapsed { message_type } => {
                    done.applied.push(message_type.clone());
                }
                Outcome::Stale { message_type, .. } => done.stale.push(message_type.clone()),
                // Switched off in config: settled unapplied, as on a terminal.
                Outcome::Disabled { .. } | Outcome::Duplicate | Outcome::Checkpoint => {}
            }
        }
        done.skipped = fresh
            .iter()
            .filter(|entry| entry.cursor <= self.applied_up_to && !self.takes(entry.message_type))
            .map(|entry| entry.message_type.to_owned())
            .collect();
        Ok(done)
    }

    fn takes(&self, message_type: &str) -> bool {
        self.types.iter().any(|taken| taken == message_type)
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
            .with_timestamp(entry.created_at)
            .with_version(entry.cursor);
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

/// How far the cursor moves: past every fresh entry up to the first one
/// taken that is not settled (tried again later), those not taken
/// included; `None` if it does not move.
fn settled_up_to(fresh: &[i64], taken: &[i64], outcomes: &[Outcome]) -> Option<i64> {
    let settled = outcomes
        .iter()
        .take_while(|outcome| outcome.settles_by_ack())
        .count();
    let last = match taken.get(settled) {
        // Up to the entry before the first unsettled one.
        Some(&waiting) => fresh.iter().take_while(|&&cursor| cursor < waiting).last(),
        None => fresh.last(),
    };
    last.copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_orders as _;

    fn registry() -> Arc<Registry> {
        Arc::new(Registry::from_config(&Default::default()).expect("the built-in plugins load"))
    }

    fn open(dir: &Path, store: &LicenseKey) -> StoreDatabase {
        StoreDatabase::open(
            dir,
            store,
            "record-1",
            &["order".into()],
            registry(),
            1 << 20,
        )
        .expect("opens")
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
        let mut database = open(dir.path(), &store);
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

        let mut reopened = open(dir.path(), &store);
        assert_eq!(reopened.applied_up_to(), 9);
        let done = reopened.apply(&entries(&again)).expect("applies");
        assert!(done.applied.is_empty(), "{done:?}");
        assert_eq!(orders(&path), ["O-1", "O-2", "O-3"]);
    }

    #[test]
    fn a_database_of_another_record_or_store_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database = open(dir.path(), &store);
        database
            .apply(&entries(&[order(1, "O-1")]))
            .expect("applies");
        drop(database);
        let err = StoreDatabase::open(dir.path(), &store, "record-2", &[], registry(), 1 << 20)
            .expect_err("another record");
        assert!(
            matches!(err, StoreOpenError::OtherRecord { .. })
                && err.to_string().contains("delete the folder"),
            "{err}"
        );
        // As a file system that ignores case would show STORE-1's file.
        std::fs::copy(dir.path().join("STORE-1.db"), dir.path().join("store-1.db"))
            .expect("copies");
        let other = LicenseKey::new("store-1").expect("valid");
        let err = StoreDatabase::open(dir.path(), &other, "record-1", &[], registry(), 1 << 20)
            .expect_err("another store");
        assert!(matches!(err, StoreOpenError::OtherStore { .. }), "{err}");
    }

    #[test]
    fn the_order_recorded_later_wins_whatever_the_tills_clocks_say_and_other_types_are_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database = open(dir.path(), &store);
        let first = serde_json::json!({"order_id": "R-1", "lines": [{"product_id": "P1", "quantity": 1, "unit_price": 10.0}], "total": 10.0}).to_string();
        let second = serde_json::json!({"order_id": "R-1", "lines": [{"product_id": "P1", "quantity": 1, "unit_price": 99.0}], "total": 99.0}).to_string();
        let price = serde_json::json!({"product_id": "P1", "new_price": 1.0}).to_string();
        let batch = [
            UpstreamEntry {
                cursor: 1,
                terminal: "till-1",
                message_type: "order",
                message_id: "a",
                created_at: "2026-12-02T10:00:05Z",
                payload: &first,
            },
            UpstreamEntry {
                cursor: 2,
                terminal: "till-1",
                message_type: "price_update",
                message_id: "b",
                created_at: "2026-12-02T10:00:06Z",
                payload: &price,
            },
            UpstreamEntry {
                cursor: 3,
                terminal: "till-2",
                message_type: "order",
                message_id: "a",
                created_at: "2026-12-02T10:00:00Z",
                payload: &second,
            },
        ];
        let done = database.apply(&batch).expect("applies");
        assert_eq!(done.applied, ["order", "order"], "{done:?}");
        assert_eq!(done.skipped, ["price_update"], "{done:?}");
        assert_eq!(database.applied_up_to(), 3);
        let connection = rusqlite::Connection::open(database.path()).expect("opens");
        let total: f64 = connection
            .query_row("SELECT total FROM orders WHERE id = 'R-1'", [], |row| {
                row.get(0)
            })
            .expect("the order");
        assert_eq!(
            total, 99.0,
            "recorded later, though taken earlier by its till's clock"
        );
        let prices: i64 = connection
            .query_row("SELECT count(*) FROM products", [], |row| row.get(0))
            .unwrap_or(0);
        assert_eq!(prices, 0, "a type not taken upstream writes nothing");
    }

    #[test]
    fn a_database_that_cannot_take_the_entries_applies_none_of_them_and_moves_no_cursor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LicenseKey::new("STORE-1").expect("valid");
        let mut database = open(dir.path(), &store);
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
        let mut database = open(dir.path(), &store);
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
