//! The [`Store`] a handler writes through in a test: the open transaction,
//! and what the handler asked to happen after it.

use possync_sdk::__sqlite::{Param, is_store_level, to_value};
use possync_sdk::{Effect, Store, StoreError, Value, Version};
use rusqlite::Connection;

use crate::Stale;

/// One message's view of the database, inside its transaction.
pub(crate) struct TestStore<'t> {
    connection: &'t Connection,
    pub(crate) effects: Effects,
    pub(crate) stale: Vec<Stale>,
    /// A failure of the database itself: the terminal would hold the whole
    /// batch for it, whatever the handler returned.
    pub(crate) fault: Option<String>,
}

impl<'t> TestStore<'t> {
    pub(crate) fn new(connection: &'t Connection) -> Self {
        Self {
            connection,
            effects: Effects::default(),
            stale: Vec::new(),
            fault: None,
        }
    }

    fn failed(&mut self, err: rusqlite::Error) -> StoreError {
        let store_level = is_store_level(&err);
        if !store_level {
            return StoreError::permanent(err.to_string());
        }
        self.fault.get_or_insert_with(|| err.to_string());
        StoreError::transient(err.to_string())
    }

    fn first_row(&self, sql: &str, params: &[Value]) -> rusqlite::Result<Option<Vec<Value>>> {
        let mut statement = self.connection.prepare_cached(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(params.iter().map(Param)))?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        (0..columns)
            .map(|i| row.get_ref(i).map(to_value))
            .collect::<rusqlite::Result<_>>()
            .map(Some)
    }
}

impl Store for TestStore<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        let result = self
            .connection
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(params.iter().map(Param))));
        result.map_err(|err| self.failed(err))
    }

    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, StoreError> {
        self.first_row(sql, params).map_err(|err| self.failed(err))
    }

    fn after_commit(&mut self, effect: Effect) {
        self.effects.after_commit.push(effect);
    }

    fn on_rollback(&mut self, effect: Effect) {
        self.effects.on_rollback.push(effect);
    }

    fn stale(&mut self, id: &str, incoming: Version, stored: i64) {
        self.stale.push(Stale {
            id: id.to_owned(),
            incoming,
            stored,
        });
    }
}

/// What a handler tied to its writes.
#[derive(Default)]
pub(crate) struct Effects {
    after_commit: Vec<Effect>,
    on_rollback: Vec<Effect>,
}

impl Effects {
    /// The writes are committed: run the after-commit effects in order.
    pub(crate) fn committed(self) {
        run_all(self.after_commit);
    }

    /// The writes are rolled back: undo in reverse order.
    pub(crate) fn rolled_back(self) {
        run_all(self.on_rollback.into_iter().rev());
    }
}

/// Runs each effect; a panicking one does not stop the others, as on a
/// terminal.
fn run_all(effects: impl IntoIterator<Item = Effect>) {
    for effect in effects {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(effect)) {
            eprintln!(
                "possync-testkit: an effect panicked: {}",
                possync_sdk::__host::panic_message(panic.as_ref())
            );
        }
    }
}
