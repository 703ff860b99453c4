//! [`TestTerminal`]: one plugin, one SQLite file, envelopes applied one at
//! a time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use possync_sdk::{Context, Envelope, HandlerError, Plugin, PluginFn, Settings, Version};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::store::TestStore;

/// What the terminal keeps beside the plugins' tables, as far as a test
/// needs it: the migrations that ran and the message ids applied.
const BOOKKEEPING: &str = "
    CREATE TABLE IF NOT EXISTS possync_migrations (
        id         TEXT PRIMARY KEY NOT NULL,
        applied_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS possync_applied (
        message_id TEXT PRIMARY KEY NOT NULL,
        applied_at INTEGER NOT NULL
    ) WITHOUT ROWID;";

/// A plugin running against a SQLite database, as on a terminal, without a
/// broker. See the [crate] documentation for an example.
pub struct TestTerminal {
    plugin: Plugin,
    connection: Connection,
    path: PathBuf,
    /// The temporary folder of a database made for the test, removed with it.
    _folder: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for TestTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestTerminal")
            .field("plugin", &self.plugin)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What applying a message did, when its handler succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The handler ran and its writes are committed.
    Changed,
    /// The handler ran and reported through
    /// [`Store::stale`](possync_sdk::Store::stale) that the database holds
    /// newer changes: the terminal counts the message as stale, not applied.
    Stale(Vec<Stale>),
    /// A message with this id was applied before: the handler did not run.
    Duplicate,
}

/// An entity a message found newer than itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The entity's id, as the handler reported it.
    pub id: String,
    /// The message's order.
    pub incoming: Version,
    /// The version the database holds.
    pub stored: i64,
}

/// The test terminal could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugin's function returned an error or panicked.
    #[error("the plugin refused to start: {0}")]
    Plugin(String),
    /// A migration of the plugin failed.
    #[error("migration {id} failed: {source}")]
    Migration {
        /// The migration's id.
        id: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The database could not be opened or queried.
    #[error("test database: {0}")]
    Database(#[from] rusqlite::Error),
    /// No temporary folder for the database.
    #[error("cannot create a temporary folder: {0}")]
    Folder(#[from] std::io::Error),
}

impl TestTerminal {
    /// The plugin built by `plugin` without settings, on a new database in
    /// a temporary folder that goes away with the terminal.
    pub fn new(plugin: PluginFn) -> Result<Self, Error> {
        Self::with_settings(plugin, Settings::new("test", serde_json::Value::Null))
    }

    /// The plugin built by `plugin` with `settings` (what config would hold
    /// in `[plugins.<name>.settings]`), on a new database in a temporary
    /// folder.
    pub fn with_settings(plugin: PluginFn, settings: Settings) -> Result<Self, Error> {
        let folder = tempfile::tempdir()?;
        let mut terminal = Self::open(&folder.path().join("terminal.db"), plugin, settings)?;
        terminal._folder = Some(folder);
        Ok(terminal)
    }

    /// The plugin on the database at `path`, created if missing: for
    /// testing migrations on a database an older version left.
    pub fn open(path: &Path, plugin: PluginFn, settings: Settings) -> Result<Self, Error> {
        let plugin = catch_unwind(|| plugin(&settings))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "panicked: {}",
                    possync_sdk::__host::panic_message(panic.as_ref())
                ))
            })
            .map_err(Error::Plugin)?;
        let mut connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.execute_batch(BOOKKEEPING)?;
        migrate(&mut connection, &plugin)?;
        Ok(Self {
            plugin,
            connection,
            path: path.to_owned(),
            _folder: None,
        })
    }

    /// Applies one message as a terminal would, in a transaction of its
    /// own: committed when the handler returns `Ok`, rolled back when it
    /// returns an error or panics (a panic is [`HandlerError::Panicked`]).
    ///
    /// A message whose id was applied before is [`Applied::Duplicate`]; a
    /// failed message's id is not recorded, so it applies when sent again.
    /// A failure of the database itself (locked, full) is
    /// [`HandlerError::Storage`], whatever the handler returned: a terminal
    /// would hold the batch and try it again.
    pub fn apply(&mut self, envelope: Envelope) -> Result<Applied, HandlerError> {
        let storage = |err: rusqlite::Error| HandlerError::storage(format!("database: {err}"));
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(storage)?;
        if let Some(message_id) = &envelope.message_id {
            let recorded = transaction
                .execute(
                    "INSERT OR IGNORE INTO possync_applied (message_id, applied_at) VALUES (?1, unixepoch())",
                    params![message_id],
                )
                .map_err(storage)?;
            if recorded == 0 {
                return Ok(Applied::Duplicate);
            }
        }
        let mut store = TestStore::new(&transaction);
        let handled = catch_unwind(AssertUnwindSafe(|| {
            possync_sdk::__host::handle(
                &self.plugin,
                envelope.payload.get(),
                &Context::of(&envelope),
                &mut store,
            )
        }))
        .unwrap_or_else(|panic| {
            Err(HandlerError::Panicked(possync_sdk::__host::panic_message(
                panic.as_ref(),
            )))
        });
        let TestStore {
            effects,
            stale,
            fault,
            ..
        } = store;
        let handled = match fault {
            Some(reason) => Err(HandlerError::storage(format!("database: {reason}"))),
            None => handled,
        };
        if let Err(err) = handled {
            drop(transaction);
            effects.rolled_back();
            return Err(err);
        }
        if let Err(err) = transaction.commit() {
            effects.rolled_back();
            return Err(storage(err));
        }
        effects.committed();
        Ok(if stale.is_empty() {
            Applied::Changed
        } else {
            Applied::Stale(stale)
        })
    }

    /// Whether the plugin would take `envelope`'s payload: it decodes and
    /// passes [`Payload::validate`](possync_sdk::Payload::validate). A
    /// publisher refuses what this refuses; nothing is written.
    pub fn check(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        possync_sdk::__host::check(&self.plugin, &envelope.message_type, envelope.payload.get())
    }

    /// The rows `sql` selects, each a JSON array of its columns: text as
    /// strings, integers and reals as numbers, NULL as `null`, a blob as an
    /// array of its bytes.
    ///
    /// ```
    /// # use possync_sdk::{Plugin, Settings};
    /// # fn plugin(_: &Settings) -> Result<Plugin, String> { Ok(Plugin::new("none")) }
    /// # let till = possync_testkit::TestTerminal::new(plugin).unwrap();
    /// let rows = till.query("SELECT 'T1', 4, 2.5, NULL").unwrap();
    /// assert_eq!(rows, [serde_json::json!(["T1", 4, 2.5, null])]);
    /// ```
    pub fn query(&self, sql: &str) -> Result<Vec<serde_json::Value>, Error> {
        let mut statement = self.connection.prepare(sql)?;
        let columns = statement.column_count();
        let rows = statement.query_map([], |row| {
            (0..columns)
                .map(|i| row.get_ref(i).map(to_json))
                .collect::<rusqlite::Result<serde_json::Value>>()
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The connection, for what [`query`](Self::query) does not cover
    /// (preparing a database as an older version left it, say).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs each of the plugin's migrations not yet recorded, in order, each in
/// a transaction of its own, as a terminal does at startup.
fn migrate(connection: &mut Connection, plugin: &Plugin) -> Result<(), Error> {
    for migration in possync_sdk::__host::migrations(plugin) {
        let failed = |source| Error::Migration {
            id: migration.id.to_owned(),
            source,
        };
        let transaction = connection.transaction().map_err(failed)?;
        let done = transaction
            .query_row(
                "SELECT 1 FROM possync_migrations WHERE id = ?1",
                [migration.id],
                |_| Ok(()),
            )
            .optional()
            .map_err(failed)?;
        if done.is_some() {
            continue;
        }
        transaction.execute_batch(migration.sql).map_err(failed)?;
        transaction
            .execute(
                "INSERT INTO possync_migrations (id, applied_at) VALUES (?1, unixepoch())",
                [migration.id],
            )
            .map_err(failed)?;
        transaction.commit().map_err(failed)?;
    }
    Ok(())
}

fn to_json(value: ValueRef<'_>) -> serde_json::Value {
    match value {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(v) => v.into(),
        ValueRef::Real(v) => v.into(),
        ValueRef::Text(v) => String::from_utf8_lossy(v).into(),
        ValueRef::Blob(v) => v.to_vec().into(),
    }
}
