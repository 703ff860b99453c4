//! The transaction one batch applies in: the statements it runs, kept
//! prepared until it ends, and possync's bookkeeping written inside it.

use possync_sdk::__sqlite::{Param, is_store_level, to_value};
use possync_sdk::{Effect, Store, StoreError, Value, Version};
use rusqlite::{CachedStatement, Connection, params};

use crate::effects::Effects;
use crate::store::{ProgressRecord, Quarantined, add_progress, unix_now};

/// How many statements a transaction keeps at hand. A batch runs a few
/// (its handlers' and possync's own); a handler that builds its SQL per
/// message still works, through the connection's cache.
const KEPT_STATEMENTS: usize = 16;

/// An open transaction, rolled back when dropped without
/// [`Transaction::commit`].
///
/// Looking a statement up in rusqlite's cache hashes and copies its SQL on
/// every use; a batch runs the same few statements for every message, so
/// it takes each from the cache once and keeps it until the end.
pub(crate) struct Transaction<'c> {
    /// Shared with the kept statements, but borrowed from an exclusive
    /// borrow: nothing outside this transaction reaches the connection
    /// while it is open.
    connection: &'c Connection,
    /// By SQL text, in the order first used. A short list is faster to
    /// search than a hash map is to hash into.
    statements: Vec<(Box<str>, CachedStatement<'c>)>,
    committed: bool,
    effects: Effects,
    /// Entities the current message found newer than itself.
    stale: Vec<StaleEntity>,
    /// A failure of the database itself that a handler ran into: the batch
    /// cannot commit, whatever the handler made of it.
    fault: Option<rusqlite::Error>,
}

/// An entity that holds a newer change than the message that would change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StaleEntity {
    pub(crate) id: String,
    pub(crate) incoming: Version,
    pub(crate) stored: i64,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("statements", &self.statements.len())
            .finish_non_exhaustive()
    }
}

impl<'c> Transaction<'c> {
    /// Begins a transaction that takes the write lock now, so a busy POS
    /// reader shows up here, not in the middle of a batch.
    pub(crate) fn begin(connection: &'c mut Connection) -> rusqlite::Result<Self> {
        connection.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Self::begun(connection))
    }

    /// The transaction `BEGIN IMMEDIATE` already began on `connection`.
    pub(crate) fn begun(connection: &'c mut Connection) -> Self {
        let connection: &'c Connection = connection;
        Self {
            connection,
            statements: Vec::with_capacity(KEPT_STATEMENTS),
            committed: false,
            effects: Effects::default(),
            stale: Vec::new(),
            fault: None,
        }
    }

    /// Commits, then runs the handlers' after-commit effects. If the commit
    /// fails, dropping the transaction rolls it back.
    pub(crate) fn commit(mut self) -> rusqlite::Result<()> {
        self.statements.clear();
        self.connection.execute_batch("COMMIT")?;
        self.committed = true;
        self.effects.committed();
        Ok(())
    }

    /// The next message begins.
    pub(crate) fn begin_message(&mut self) {
        self.effects.begin_message();
        self.stale.clear();
    }

    /// The entities the current message found newer than itself.
    pub(crate) fn take_stale(&mut self) -> Vec<StaleEntity> {
        std::mem::take(&mut self.stale)
    }

    /// The failure of the database itself that a handler ran into, if any.
    pub(crate) fn take_fault(&mut self) -> Option<rusqlite::Error> {
        self.fault.take()
    }

    /// The statement for `sql`, prepared once per transaction.
    fn statement(&mut self, sql: &str) -> rusqlite::Result<&mut CachedStatement<'c>> {
        // The connection's cache ignores surrounding white space too.
        let sql = sql.trim();
        let index = match self.statements.iter().position(|(kept, _)| **kept == *sql) {
            Some(index) => index,
            None => {
                let statement = self.connection.prepare_cached(sql)?;
                if self.statements.len() == KEPT_STATEMENTS {
                    // The first ones kept are the ones every message runs.
                    self.statements.pop();
                }
                self.statements.push((sql.into(), statement));
                self.statements.len() - 1
            }
        };
        Ok(&mut self.statements[index].1)
    }

    fn run(&mut self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.statement(sql)?.execute(params)
    }

    // A savepoint per message lets a failing handler undo its own writes only.
    pub(crate) fn savepoint(&mut self) -> rusqlite::Result<()> {
        self.run("SAVEPOINT message", []).map(drop)
    }

    pub(crate) fn release(&mut self) -> rusqlite::Result<()> {
        self.run("RELEASE message", []).map(drop)
    }

    pub(crate) fn rollback_to_savepoint(&mut self) -> rusqlite::Result<()> {
        self.run("ROLLBACK TO message", [])?;
        self.effects.roll_back_message();
        self.release()
    }

    /// Runs one of possync's own statements, kept prepared.
    pub(crate) fn execute(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> rusqlite::Result<usize> {
        self.run(sql, params)
    }

    /// The first row of one of possync's own queries, if any, as `read` makes it.
    pub(crate) fn query_optional<T>(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
        read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        use rusqlite::OptionalExtension as _;
        self.statement(sql)?.query_row(params, read).optional()
    }

    /// Every row of one of possync's own queries, as `read` makes each.
    pub(crate) fn query_all<T>(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
        read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>> {
        self.statement(sql)?.query_map(params, read)?.collect()
    }

    /// Records `message_id` as applied; false if it was applied before.
    pub(crate) fn record_applied(&mut self, message_id: &str) -> rusqlite::Result<bool> {
        let inserted = self.run(
            "INSERT OR IGNORE INTO possync_applied (message_id, applied_at) VALUES (?1, ?2)",
            params![message_id, unix_now()],
        )?;
        Ok(inserted == 1)
    }

    /// Keeps a message that can never apply, and forgets the oldest ones
    /// beyond the newest `keep_rows`.
    pub(crate) fn record_quarantined(
        &mut self,
        message: &Quarantined,
        keep_rows: u32,
    ) -> rusqlite::Result<()> {
        self.run(
            "INSERT INTO possync_quarantine (received_at, routing_key, message_type, message_id, reason, body, body_bytes, body_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                unix_now(),
                message.routing_key,
                message.message_type,
                message.message_id,
                message.reason,
                message.body,
                i64::try_from(message.body_bytes).unwrap_or(i64::MAX),
                message.body_sha256
            ],
        )?;
        self.run(
            "DELETE FROM possync_quarantine
             WHERE id <= last_insert_rowid() - ?1 AND requeued_at IS NULL",
            [keep_rows],
        )
        .map(drop)
    }

    /// Counts one more failed try of the message `key`; returns the tries so far.
    pub(crate) fn record_attempt(&mut self, key: &str, error: &str) -> rusqlite::Result<u32> {
        self.statement(
            "INSERT INTO possync_attempts (message_key, attempts, last_error) VALUES (?1, 1, ?2)
             ON CONFLICT (message_key) DO UPDATE SET attempts = attempts + 1, last_error = excluded.last_error
             RETURNING attempts",
        )?
        .query_row(params![key, error], |row| row.get(0))
    }

    pub(crate) fn forget_attempts(&mut self, key: &str) -> rusqlite::Result<()> {
        self.run("DELETE FROM possync_attempts WHERE message_key = ?1", [key])
            .map(drop)
    }

    /// Adds to the counters `possync status` shows, with the batch.
    pub(crate) fn record_progress(&mut self, counts: &ProgressRecord) -> rusqlite::Result<()> {
        add_progress(self.connection, counts)
    }

    /// The handle a handler writes through.
    pub(crate) fn store(&mut self) -> SqliteStore<'_, 'c> {
        SqliteStore { transaction: self }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.committed {
            // Every statement was reset after its use; hand them back first.
            self.statements.clear();
            // Fails only when no transaction is open, which is the state we want.
            let _ = self.connection.execute_batch("ROLLBACK");
            self.effects.rolled_back();
        }
    }
}

/// [`Store`] over the transaction in progress.
pub(crate) struct SqliteStore<'t, 'c> {
    transaction: &'t mut Transaction<'c>,
}

impl std::fmt::Debug for SqliteStore<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore<'_, '_> {
    /// The handler's view of `err`; a failure of the database itself is
    /// also kept for the runtime, which stalls the batch on it.
    fn failed(&mut self, err: rusqlite::Error) -> StoreError {
        if !is_store_level(&err) {
            return StoreError::permanent(err.to_string());
        }
        let seen = StoreError::transient(err.to_string());
        self.transaction.fault.get_or_insert(err);
        seen
    }

    fn first_row(&mut self, sql: &str, params: &[Value]) -> rusqlite::Result<Option<Vec<Value>>> {
        let statement = self.transaction.statement(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(params.iter().map(Param)))?;
        match rows.next()? {
            Some(row) => {
                let mut values = Vec::with_capacity(columns);
                for i in 0..columns {
                    values.push(to_value(row.get_ref(i)?));
                }
                Ok(Some(values))
            }
            None => Ok(None),
        }
    }
}

impl Store for SqliteStore<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        self.transaction
            .run(sql, rusqlite::params_from_iter(params.iter().map(Param)))
            .map_err(|err| self.failed(err))
    }

    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, StoreError> {
        self.first_row(sql, params).map_err(|err| self.failed(err))
    }

    fn after_commit(&mut self, effect: Effect) {
        self.transaction.effects.after_commit(effect);
    }

    fn on_rollback(&mut self, effect: Effect) {
        self.transaction.effects.on_rollback(effect);
    }

    fn stale(&mut self, id: &str, incoming: Version, stored: i64) {
        self.transaction.stale.push(StaleEntity {
            id: id.to_owned(),
            incoming,
            stored,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Database;

    fn database() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = Database::open(&dir.path().join("terminal.db")).expect("opens");
        (dir, database)
    }

    fn applied_ids(database: &Database) -> Vec<String> {
        let mut statement = database
            .connection()
            .prepare("SELECT message_id FROM possync_applied ORDER BY message_id")
            .expect("prepares");
        statement
            .query_map([], |row| row.get(0))
            .expect("queries")
            .collect::<Result<_, _>>()
            .expect("reads")
    }

    const INSERT: &str = "INSERT INTO possync_applied (message_id, applied_at) VALUES (?1, ?2)";
    const READ: &str = "SELECT message_id, applied_at FROM possync_applied WHERE message_id = ?1";

    #[test]
    fn a_transaction_dropped_without_commit_changes_nothing() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        assert!(transaction.record_applied("m-1").expect("records"));
        drop(transaction);
        assert!(applied_ids(&database).is_empty());
    }

    #[test]
    fn a_committed_transaction_keeps_its_writes() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        assert!(transaction.record_applied("m-1").expect("records"));
        assert!(!transaction.record_applied("m-1").expect("records"));
        transaction.commit().expect("commits");
        assert_eq!(applied_ids(&database), ["m-1"]);
    }

    #[test]
    fn rolling_back_to_the_savepoint_undoes_that_message_only() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        for (id, keep) in [("m-1", true), ("m-2", false), ("m-3", true), ("m-4", false)] {
            transaction.savepoint().expect("savepoint");
            transaction.record_applied(id).expect("records");
            if keep {
                transaction.release().expect("releases");
            } else {
                transaction.rollback_to_savepoint().expect("rolls back");
            }
        }
        transaction.commit().expect("commits");
        assert_eq!(applied_ids(&database), ["m-1", "m-3"]);
    }

    #[test]
    fn a_kept_statement_runs_with_the_values_of_each_call() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        let mut store = transaction.store();
        for (id, at) in [("m-1", 10), ("m-2", 20)] {
            store
                .execute(INSERT, &[id.into(), Value::Integer(at)])
                .expect("inserts");
        }
        let short = store.execute(INSERT, &["m-3".into()]);
        assert!(!short.expect_err("one value short").is_transient());
        let long = store.execute(INSERT, &["m-3".into(), Value::Integer(30), Value::Null]);
        assert!(!long.expect_err("one value too many").is_transient());
        for (id, at) in [("m-1", 10), ("m-2", 20)] {
            let row = store.query_row(READ, &[id.into()]).expect("reads");
            assert_eq!(row, Some(vec![id.into(), Value::Integer(at)]));
        }
        assert_eq!(store.query_row(READ, &["m-3".into()]).expect("reads"), None);
    }

    #[test]
    fn a_handler_building_sql_per_message_keeps_working_and_evicts_only_its_own() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        let count = "SELECT count(*) FROM possync_applied";
        let mut store = transaction.store();
        for i in 0..(KEPT_STATEMENTS * 3) {
            let sql = format!(
                "INSERT INTO possync_applied (message_id, applied_at) VALUES ('m-{i:02}', ?1)"
            );
            assert_eq!(
                store.execute(&sql, &[Value::Integer(0)]).expect("inserts"),
                1
            );
            let counted = store.query_row(count, &[]).expect("counts");
            let expected = i64::try_from(i + 1).expect("small");
            assert_eq!(counted, Some(vec![Value::Integer(expected)]));
        }
        assert_eq!(transaction.statements.len(), KEPT_STATEMENTS);
        assert!(
            transaction
                .statements
                .iter()
                .any(|(sql, _)| &**sql == count)
        );
        transaction.commit().expect("commits");
        assert_eq!(applied_ids(&database).len(), KEPT_STATEMENTS * 3);
    }

    #[test]
    fn sql_differing_only_in_surrounding_space_is_one_statement() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        let mut store = transaction.store();
        store
            .execute(INSERT, &["m-1".into(), Value::Integer(0)])
            .expect("inserts");
        store
            .execute(
                &format!("\n    {INSERT}  \n"),
                &["m-2".into(), Value::Integer(0)],
            )
            .expect("inserts");
        assert_eq!(transaction.statements.len(), 1);
    }

    #[test]
    fn the_quarantine_keeps_a_bounded_body_with_the_size_and_hash_of_the_whole() {
        let (_dir, mut database) = database();
        let body = vec![b'x'; crate::store::QUARANTINE_BODY_BYTES * 3];
        let mut transaction = database.begin().expect("begins");
        let message = Quarantined::new("license.K.t", Some("t"), None, "why".into(), &body);
        transaction
            .record_quarantined(&message, 10)
            .expect("records");
        transaction.commit().expect("commits");
        let kept = database.quarantined(10).expect("reads");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].body.len(), crate::store::QUARANTINE_BODY_BYTES);
        assert_eq!(kept[0].body_bytes, body.len() as u64);
        assert_eq!(kept[0].body_sha256.len(), 64, "{}", kept[0].body_sha256);
        let small = Quarantined::new("license.K.t", None, None, "why".into(), b"abc");
        assert_eq!(
            small.body_sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(small.body, b"abc");
        let huge_type = "t€".repeat(100_000);
        let hostile = Quarantined::new(
            &huge_type,
            Some(&huge_type),
            Some(&huge_type),
            format!("unknown message type {huge_type:?}"),
            b"{}",
        );
        for field in [
            &hostile.routing_key,
            hostile.message_type.as_ref().expect("type"),
            hostile.message_id.as_ref().expect("id"),
            &hostile.reason,
        ] {
            assert!(field.len() < 4096, "{} bytes kept", field.len());
            assert!(field.ends_with(" bytes in all)"), "says it was cut");
        }
    }

    #[test]
    fn the_quarantine_forgets_its_oldest_rows_beyond_the_bound() {
        let (_dir, mut database) = database();
        let mut transaction = database.begin().expect("begins");
        for i in 0..7 {
            let message = Quarantined::new("license.K.t", None, None, format!("reason {i}"), b"{}");
            transaction
                .record_quarantined(&message, 3)
                .expect("records");
        }
        transaction.commit().expect("commits");
        let reasons: Vec<String> = database
            .quarantined(100)
            .expect("reads")
            .into_iter()
            .map(|q| q.reason)
            .collect();
        assert_eq!(reasons, ["reason 6", "reason 5", "reason 4"]);
    }
}
