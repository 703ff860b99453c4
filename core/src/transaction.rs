//! The transaction one batch applies in: the statements it runs, kept
//! prepared until it ends, and possync's bookkeeping written inside it.

use possync_sdk::{Store, StoreError, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{CachedStatement, Connection, ErrorCode, ToSql, params};

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
    connection: &'c Connection,
    /// By SQL text, in the order first used. A short list is faster to
    /// search than a hash map is to hash into.
    statements: Vec<(Box<str>, CachedStatement<'c>)>,
    committed: bool,
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
    pub(crate) fn begin(connection: &'c Connection) -> rusqlite::Result<Self> {
        connection.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Self {
            connection,
            statements: Vec::with_capacity(KEPT_STATEMENTS),
            committed: false,
        })
    }

    /// Commits; on error the transaction is rolled back.
    pub(crate) fn commit(mut self) -> rusqlite::Result<()> {
        self.statements.clear();
        self.connection.execute_batch("COMMIT")?;
        self.committed = true;
        Ok(())
    }

    /// The statement for `sql`, prepared once per transaction.
    fn statement(&mut self, sql: &str) -> rusqlite::Result<&mut CachedStatement<'c>> {
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
        self.release()
    }

    /// Records `message_id` as applied; false if it was applied before.
    pub(crate) fn record_applied(&mut self, message_id: &str) -> rusqlite::Result<bool> {
        let inserted = self.run(
            "INSERT OR IGNORE INTO possync_applied (message_id, applied_at) VALUES (?1, ?2)",
            params![message_id, unix_now()],
        )?;
        Ok(inserted == 1)
    }

    pub(crate) fn record_quarantined(&mut self, message: &Quarantined) -> rusqlite::Result<()> {
        self.run(
            "INSERT INTO possync_quarantine (received_at, routing_key, message_type, message_id, reason, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                unix_now(),
                message.routing_key,
                message.message_type,
                message.message_id,
                message.reason,
                message.body
            ],
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
            // Statements still running would keep the rollback from finishing.
            self.statements.clear();
            // Fails only when no transaction is open, which is the state we want.
            let _ = self.connection.execute_batch("ROLLBACK");
        }
    }
}

/// [`Store`] over the transaction in progress.
pub(crate) struct SqliteStore<'t, 'c> {
    transaction: &'t mut Transaction<'c>,
}

// SAFETY: a rusqlite `Connection` is `Send` but not `Sync`, so the
// connection must never be used from two threads at once. While a store
// lives it is the only way to the connection: it borrows the transaction,
// which holds the statements, exclusively, and the applier does nothing
// with the database until the handler returns. Sending the store to
// another thread therefore moves every use of the connection with it.
#[allow(unsafe_code)]
unsafe impl Send for SqliteStore<'_, '_> {}

impl std::fmt::Debug for SqliteStore<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

fn to_value(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Integer(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(v) => Value::Text(String::from_utf8_lossy(v).into_owned()),
        ValueRef::Blob(v) => Value::Blob(v.to_vec()),
    }
}

fn store_error(err: rusqlite::Error) -> StoreError {
    let transient = matches!(
        err.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::OutOfMemory
                | ErrorCode::CannotOpen
        )
    );
    if transient {
        StoreError::transient(err.to_string())
    } else {
        StoreError::permanent(err.to_string())
    }
}

impl Store for SqliteStore<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        self.transaction
            .run(sql, rusqlite::params_from_iter(params.iter().map(Param)))
            .map_err(store_error)
    }

    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, StoreError> {
        let statement = self.transaction.statement(sql).map_err(store_error)?;
        let columns = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter().map(Param)))
            .map_err(store_error)?;
        match rows.next().map_err(store_error)? {
            Some(row) => {
                let mut values = Vec::with_capacity(columns);
                for i in 0..columns {
                    values.push(to_value(row.get_ref(i).map_err(store_error)?));
                }
                Ok(Some(values))
            }
            None => Ok(None),
        }
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

    fn count(database: &Database) -> i64 {
        database
            .connection()
            .query_row("SELECT count(*) FROM possync_applied", [], |row| row.get(0))
            .expect("counts")
    }

    #[test]
    fn a_transaction_dropped_without_commit_changes_nothing() {
        let (_dir, database) = database();
        let mut transaction = database.begin().expect("begins");
        assert!(transaction.record_applied("m-1").expect("records"));
        drop(transaction);
        assert_eq!(count(&database), 0);
    }

    #[test]
    fn a_committed_transaction_keeps_its_writes() {
        let (_dir, database) = database();
        let mut transaction = database.begin().expect("begins");
        assert!(transaction.record_applied("m-1").expect("records"));
        assert!(!transaction.record_applied("m-1").expect("records"));
        transaction.commit().expect("commits");
        assert_eq!(count(&database), 1);
    }

    #[test]
    fn a_handler_building_sql_per_message_keeps_working() {
        let (_dir, database) = database();
        let mut transaction = database.begin().expect("begins");
        let mut store = transaction.store();
        for i in 0..(KEPT_STATEMENTS * 3) {
            let sql = format!(
                "INSERT INTO possync_applied (message_id, applied_at) VALUES ('m-{i}', ?1)"
            );
            assert_eq!(
                store.execute(&sql, &[Value::Integer(0)]).expect("inserts"),
                1
            );
            let again = store
                .query_row("SELECT count(*) FROM possync_applied", &[])
                .expect("counts");
            assert_eq!(
                again,
                Some(vec![Value::Integer(i64::try_from(i).expect("small") + 1)])
            );
        }
        assert!(transaction.statements.len() <= KEPT_STATEMENTS);
        transaction.commit().expect("commits");
        assert_eq!(
            count(&database),
            i64::try_from(KEPT_STATEMENTS * 3).expect("small")
        );
    }

    #[test]
    fn a_statement_given_the_wrong_number_of_values_is_refused() {
        let (_dir, database) = database();
        let mut transaction = database.begin().expect("begins");
        let mut store = transaction.store();
        let sql = "INSERT INTO possync_applied (message_id, applied_at) VALUES (?1, ?2)";
        store
            .execute(sql, &["m-1".into(), Value::Integer(0)])
            .expect("inserts");
        let err = store
            .execute(sql, &["m-2".into()])
            .expect_err("one value short");
        assert!(!err.is_transient(), "{err}");
    }
}
