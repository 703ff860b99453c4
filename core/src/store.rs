//! The terminal's SQLite database: the plugins' tables plus possync's own
//! bookkeeping (migrations run, message ids applied, quarantined messages).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use possync_sdk::Migration;
use rusqlite::{Connection, OptionalExtension, params};

use crate::sequence::{READ_STATE, SyncState, state_from_row};
use crate::status::State;
use crate::transaction::Transaction;

const BOOKKEEPING: &str = "
    CREATE TABLE IF NOT EXISTS possync_migrations (
        id         TEXT PRIMARY KEY NOT NULL,
        applied_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS possync_applied (
        message_id TEXT PRIMARY KEY NOT NULL,
        applied_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS possync_applied_at ON possync_applied (applied_at);
    CREATE TABLE IF NOT EXISTS possync_attempts (
        message_key TEXT PRIMARY KEY NOT NULL,
        attempts    INTEGER NOT NULL,
        last_error  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS possync_status (
        id                INTEGER PRIMARY KEY CHECK (id = 1),
        license_key       TEXT NOT NULL,
        terminal_id       TEXT NOT NULL,
        state             TEXT NOT NULL,
        since_ms          INTEGER NOT NULL,
        reason            TEXT,
        broker            TEXT,
        pid               INTEGER,
        applied_total     INTEGER NOT NULL DEFAULT 0,
        quarantined_total INTEGER NOT NULL DEFAULT 0,
        last_applied_ms   INTEGER,
        last_message_type TEXT
    );
    CREATE TABLE IF NOT EXISTS possync_quarantine (
        id           INTEGER PRIMARY KEY,
        received_at  INTEGER NOT NULL,
        routing_key  TEXT NOT NULL,
        message_type TEXT,
        message_id   TEXT,
        reason       TEXT NOT NULL,
        body         BLOB NOT NULL
    );";

/// Changes to possync's own tables, run like the plugins' migrations.
const BOOKKEEPING_MIGRATIONS: &[Migration] = &[
    Migration::new(
        "possync/quarantine-digest",
        "ALTER TABLE possync_quarantine ADD COLUMN body_bytes INTEGER;
     ALTER TABLE possync_quarantine ADD COLUMN body_sha256 TEXT;
     CREATE INDEX IF NOT EXISTS possync_quarantine_received ON possync_quarantine (received_at);",
    ),
    Migration::new(
        "possync/stale-total",
        "ALTER TABLE possync_status ADD COLUMN stale_total INTEGER NOT NULL DEFAULT 0;",
    ),
    crate::sequence::MIGRATION,
    crate::sequence::MIGRATION_ABOVE,
    Migration::new(
        "possync/collapsed-total",
        "ALTER TABLE possync_status ADD COLUMN collapsed_total INTEGER NOT NULL DEFAULT 0;",
    ),
    crate::feed::MIGRATION,
    crate::feed::MIGRATION_STATE,
    crate::uplink::MIGRATION,
    crate::quarantine::MIGRATION,
    crate::gap::MIGRATION,
    crate::verify::MIGRATION,
    crate::verify::MIGRATION_SETTLED,
];

/// How much of a quarantined message's words (routing key, type, id) and
/// of its reason is kept and logged: they may quote hostile input.
const QUARANTINE_FIELD_CHARS: usize = 256;
const QUARANTINE_REASON_CHARS: usize = 1024;

/// `text`, cut after `chars` characters with a mark that says so.
fn bounded(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}... ({} bytes in all)", &text[..end], text.len()),
    }
}

/// How long a batch waits for another program's lock before the terminal
/// says Stalled: longer than a POS app's own short writes.
const BATCH_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How much of a quarantined body is kept: enough to read what went wrong,
/// not enough for a flood of large messages to fill the disk.
pub(crate) const QUARANTINE_BODY_BYTES: usize = 64 * 1024;

/// A database that could not be opened or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// SQLite refused to open the file.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A plugin's migration failed; the database is unchanged by it.
    #[error("migration {id} failed: {source}")]
    Migration {
        /// The migration id.
        id: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// Any other database failure.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// A message that will never apply, kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    /// The routing key it arrived with (these words and the reason are cut
    /// after a few hundred characters).
    pub routing_key: String,
    /// The envelope `type`, if the envelope could be read.
    pub message_type: Option<String>,
    /// The envelope `message_id`, if any.
    pub message_id: Option<String>,
    /// Why it cannot apply.
    pub reason: String,
    /// The body as received, cut after its first 64 KiB.
    pub body: Vec<u8>,
    /// The size of the whole body as received.
    pub body_bytes: u64,
    /// The SHA-256 of the whole body (hex), to match it with the copy in
    /// the dead-letter queue. Empty for rows kept before it was recorded.
    pub body_sha256: String,
}

impl Quarantined {
    /// A message to keep: the first part of `body` and a digest of all of it.
    pub(crate) fn new(
        routing_key: &str,
        message_type: Option<&str>,
        message_id: Option<&str>,
        reason: String,
        body: &[u8],
    ) -> Self {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(body);
        Self {
            routing_key: bounded(routing_key, QUARANTINE_FIELD_CHARS),
            message_type: message_type.map(|t| bounded(t, QUARANTINE_FIELD_CHARS)),
            message_id: message_id.map(|id| bounded(id, QUARANTINE_FIELD_CHARS)),
            // A reason may quote the input (a type, a decoding error).
            reason: bounded(&reason, QUARANTINE_REASON_CHARS),
            body: body[..body.len().min(QUARANTINE_BODY_BYTES)].to_vec(),
            body_bytes: body.len() as u64,
            body_sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// A state change, as stored for `possync status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateRecord {
    pub(crate) license_key: String,
    pub(crate) terminal_id: String,
    pub(crate) state: State,
    /// When it began; now for a state that does not say.
    pub(crate) since_ms: i64,
    pub(crate) broker: Option<String>,
}

/// A terminal's status as its database holds it, for `possync status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStatus {
    /// The store.
    pub license_key: String,
    /// The terminal.
    pub terminal_id: String,
    /// Its state, with the reason for an Offline or Stalled one.
    pub state: State,
    /// Milliseconds since the epoch when that state began.
    pub since_ms: i64,
    /// The broker (password redacted).
    pub broker: Option<String>,
    /// The process that wrote it.
    pub pid: Option<i64>,
    /// Messages applied, all time.
    pub applied_total: i64,
    /// Messages dead-lettered, all time.
    pub quarantined_total: i64,
    /// Messages that changed nothing because their entity held a newer
    /// change, all time.
    pub stale_total: i64,
    /// When the last message was applied (ms since the epoch).
    pub last_applied_ms: Option<i64>,
    /// The type of the last message applied.
    pub last_message_type: Option<String>,
    /// Rows in `possync_quarantine`.
    pub quarantine_rows: i64,
    /// Messages settled unapplied because a later change of the same batch
    /// overwrote them (backlog collapse), all time; counted in
    /// `applied_total` too.
    pub collapsed_total: i64,
    /// How far the terminal is in sync with its store's sequence.
    pub sync: SyncState,
}

/// The terminal's database.
#[derive(Debug)]
pub struct Database {
    connection: Connection,
    path: PathBuf,
}

impl Database {
    /// Opens (or creates) the database at `path` and prepares possync's tables.
    pub fn open(path: &Path) -> Result<Self, DatabaseError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| DatabaseError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(err)),
            })?;
        }
        let connection = Connection::open(path).map_err(|source| DatabaseError::Open {
            path: path.to_owned(),
            source,
        })?;
        connection.busy_handler(Some(wait_for_lock_patiently))?;
        // WAL lets the POS app read while we write. synchronous=FULL because
        // the broker ack follows the commit: with NORMAL the last commits may
        // vanish on power loss after their messages were acked, which is a
        // lost change. The cost is one fsync per batch, not per message.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.set_prepared_statement_cache_capacity(128);
        connection.execute_batch(BOOKKEEPING)?;
        let mut database = Self {
            connection,
            path: path.to_owned(),
        };
        database.migrate(BOOKKEEPING_MIGRATIONS)?;
        Ok(database)
    }

    /// From now on a lock held longer than a POS app's own short writes
    /// fails the batch at once, which the terminal shows (Stalled) and
    /// retries, instead of waiting inside SQLite unseen.
    pub(crate) fn wait_briefly_for_locks(&self) -> Result<(), DatabaseError> {
        Ok(self.connection.busy_timeout(BATCH_LOCK_WAIT)?)
    }

    /// Commits without waiting for the disk (`synchronous = NORMAL`), for a
    /// database derived from a durable record that says how far it is in
    /// the same transaction: a power cut loses the last commits together
    /// with that mark, and they are applied again.
    pub(crate) fn commit_without_sync(&self) -> Result<(), DatabaseError> {
        Ok(self
            .connection
            .pragma_update(None, "synchronous", "NORMAL")?)
    }

    /// Opens an existing database read-only, to look at it while a terminal may run.
    pub fn open_read_only(path: &Path) -> Result<Self, DatabaseError> {
        let connection =
            Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
                |source| DatabaseError::Open {
                    path: path.to_owned(),
                    source,
                },
            )?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            connection,
            path: path.to_owned(),
        })
    }

    /// Runs each migration not yet recorded, in order, each in its own
    /// transaction. Returns the ids that ran now.
    pub fn migrate<'a>(
        &mut self,
        migrations: impl IntoIterator<Item = &'a Migration>,
    ) -> Result<Vec<String>, DatabaseError> {
        let mut ran = Vec::new();
        for migration in migrations {
            let done: Option<i64> = self
                .connection
                .query_row(
                    "SELECT 1 FROM possync_migrations WHERE id = ?1",
                    [migration.id],
                    |row| row.get(0),
                )
                .optional()?;
            if done.is_some() {
                continue;
            }
            let failed = |source| DatabaseError::Migration {
                id: migration.id.to_owned(),
                source,
            };
            let tx = self.connection.transaction().map_err(failed)?;
            tx.execute_batch(migration.sql).map_err(failed)?;
            tx.execute(
                "INSERT INTO possync_migrations (id, applied_at) VALUES (?1, ?2)",
                params![migration.id, unix_now()],
            )
            .map_err(failed)?;
            tx.commit().map_err(failed)?;
            ran.push(migration.id.to_owned());
        }
        Ok(ran)
    }

    /// Forgets applied message ids, and the marks of publishers not heard
    /// from, older than `max_age_secs`: the broker cannot redeliver a
    /// message older than its queue's lifetime.
    pub fn prune_applied(&mut self, max_age_secs: i64) -> Result<usize, DatabaseError> {
        let before = unix_now() - max_age_secs;
        let ids = self.connection.execute(
            "DELETE FROM possync_applied WHERE applied_at < ?1",
            [before],
        )?;
        let publishers = self.connection.execute(
            "DELETE FROM possync_publishers WHERE applied_at < ?1",
            [before],
        )?;
        Ok(ids + publishers)
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records `gap` in `license_key`'s sync state unless a gap that only
    /// a snapshot closes is open there already; returns the sync state as
    /// it is then.
    pub(crate) fn record_gap(
        &mut self,
        license_key: &str,
        gap: &crate::gap::Gap,
    ) -> Result<SyncState, DatabaseError> {
        let (cause, low, high, since) = crate::gap::to_columns(Some(gap));
        self.connection.execute(
            "INSERT INTO possync_sequence (license_key, gap_cause, gap_low, gap_high, gap_since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (license_key) DO UPDATE SET gap_cause = excluded.gap_cause,
                 gap_low = excluded.gap_low, gap_high = excluded.gap_high,
                 gap_since_ms = excluded.gap_since_ms
             WHERE gap_cause IS NULL OR gap_cause IN ('jump', 'first_start')",
            params![license_key, cause, low, high, since],
        )?;
        self.sync_state(license_key)
    }

    /// The `seq` from which the last snapshot's catalog equals the
    /// backend's (see [`crate::verify::MIGRATION_SETTLED`]); 0 when no
    /// snapshot said.
    pub(crate) fn snapshot_settled(&self, license_key: &str) -> Result<i64, DatabaseError> {
        Ok(self
            .connection
            .query_row(
                "SELECT snapshot_settled_seq FROM possync_sequence WHERE license_key = ?1",
                [license_key],
                |row| row.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten()
            .unwrap_or(0))
    }

    /// Records that the catalog matched the backend's at `seq` (`Some`),
    /// or differed (`None`).
    pub(crate) fn record_verified(
        &mut self,
        license_key: &str,
        verified: Option<crate::verify::Verified>,
    ) -> Result<SyncState, DatabaseError> {
        self.connection.execute(
            "UPDATE possync_sequence SET verified_seq = ?2, verified_ms = ?3 WHERE license_key = ?1",
            params![
                license_key,
                verified.map(|v| v.seq),
                verified.map(|v| v.at_ms)
            ],
        )?;
        self.sync_state(license_key)
    }

    /// How far this database is in sync with `license_key`'s sequence.
    pub fn sync_state(&self, license_key: &str) -> Result<SyncState, DatabaseError> {
        if !self.has_table("possync_sequence")? {
            return Ok(SyncState::default());
        }
        // A database the terminal has not opened since an upgrade lacks
        // the newer columns; `possync status` reads it all the same.
        let has = |column: &str| -> Result<bool, DatabaseError> {
            Ok(self.connection.query_row(
                "SELECT count(*) > 0 FROM pragma_table_info('possync_sequence') WHERE name = ?1",
                [column],
                |row| row.get(0),
            )?)
        };
        let mut sql = READ_STATE.to_owned();
        if !has("gap_cause")? {
            sql = sql.replace(
                "gap_cause, gap_low, gap_high, gap_since_ms",
                "NULL, NULL, NULL, NULL",
            );
        }
        if !has("verified_seq")? {
            sql = sql.replace("verified_seq, verified_ms", "NULL, NULL");
        }
        Ok(self
            .connection
            .query_row(&sql, [license_key], state_from_row)
            .optional()?
            .unwrap_or_default())
    }

    fn has_table(&self, table: &str) -> Result<bool, DatabaseError> {
        Ok(self.connection.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |row| row.get(0),
        )?)
    }

    /// Forgets quarantined messages older than `max_age_secs`; their
    /// copies stay in the dead-letter queue.
    pub(crate) fn prune_quarantine(&mut self, max_age_secs: i64) -> Result<usize, DatabaseError> {
        Ok(self.connection.execute(
            "DELETE FROM possync_quarantine WHERE received_at < ?1 AND requeued_at IS NULL",
            [unix_now() - max_age_secs],
        )?)
    }

    /// Quarantined messages, newest first.
    pub fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, DatabaseError> {
        let mut statement = self.connection.prepare(
            "SELECT routing_key, message_type, message_id, reason, body,
                    coalesce(body_bytes, length(body)), coalesce(body_sha256, '')
             FROM possync_quarantine ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            Ok(Quarantined {
                routing_key: row.get(0)?,
                message_type: row.get(1)?,
                message_id: row.get(2)?,
                reason: row.get(3)?,
                body: row.get(4)?,
                body_bytes: row.get::<_, i64>(5)?.try_into().unwrap_or(0),
                body_sha256: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Begins the transaction a batch applies in.
    pub(crate) fn begin(&mut self) -> Result<Transaction<'_>, rusqlite::Error> {
        Transaction::begin(&mut self.connection)
    }

    /// [`begin`](Self::begin), failing at once with `SQLITE_BUSY` while
    /// another program holds the write lock. Once begun, everything waits
    /// for locks as batches do: what follows the commit (a gap recorded, a
    /// checkpoint verified) must not fail for a moment's lock.
    pub(crate) fn begin_now(&mut self) -> Result<Transaction<'_>, rusqlite::Error> {
        self.connection.busy_timeout(std::time::Duration::ZERO)?;
        let begun = self.connection.execute_batch("BEGIN IMMEDIATE");
        let waiting = self.connection.busy_timeout(BATCH_LOCK_WAIT);
        if begun.is_ok() && waiting.is_err() {
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        begun?;
        waiting?;
        Ok(Transaction::begun(&mut self.connection))
    }

    /// Records a state change for `possync status`, without waiting for a
    /// lock: the database may be the very thing that is stuck (a Stalled
    /// terminal). What it cannot record goes to a small file beside it,
    /// which `possync status` reads too, until a later state is recorded.
    pub(crate) fn record_state(&mut self, record: &StateRecord) -> Result<(), rusqlite::Error> {
        let recorded = self.without_waiting(|connection| {
            connection.execute(
            "INSERT INTO possync_status (id, license_key, terminal_id, state, since_ms, reason, broker, pid)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET license_key = excluded.license_key, terminal_id = excluded.terminal_id,
                 state = excluded.state, since_ms = excluded.since_ms, reason = excluded.reason,
                 broker = coalesce(excluded.broker, broker), pid = excluded.pid",
            params![
                record.license_key,
                record.terminal_id,
                record.state.name(),
                record.since_ms,
                record.state.reason(),
                record.broker,
                std::process::id()
            ],
            )
        });
        let aside = state_file(&self.path);
        match recorded {
            Ok(_) => {
                if let Err(err) = std::fs::remove_file(&aside)
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    crate::events::status_not_recorded(&format!("{}: {err}", aside.display()));
                }
                Ok(())
            }
            Err(err) => {
                let kept = serde_json::json!({
                    "state": record.state.name(),
                    "since_ms": record.since_ms,
                    "reason": record.state.reason(),
                    "pid": std::process::id(),
                });
                let mut temporary = aside.clone().into_os_string();
                temporary.push(".tmp");
                let written = std::fs::write(&temporary, kept.to_string())
                    .and_then(|()| std::fs::rename(&temporary, &aside));
                if let Err(io) = written {
                    crate::events::status_not_recorded(&format!("{}: {io}", aside.display()));
                }
                Err(err)
            }
        }
    }

    /// The state a terminal could not record in the database, if it is newer.
    fn state_aside(&self, recorded_since_ms: i64) -> Option<(State, i64, Option<i64>)> {
        let text = std::fs::read_to_string(state_file(&self.path)).ok()?;
        let kept: serde_json::Value = serde_json::from_str(&text).ok()?;
        let since_ms = kept["since_ms"].as_i64()?;
        if since_ms < recorded_since_ms {
            return None;
        }
        let state = State::named(
            kept["state"].as_str()?,
            system_time(since_ms),
            kept["reason"].as_str().unwrap_or_default(),
        )?;
        Some((state, since_ms, kept["pid"].as_i64()))
    }

    /// Adds to the counters `possync status` shows, without waiting for
    /// the disk: the counters are for people, and the next batch's commit
    /// syncs them.
    pub(crate) fn record_progress_unsynced(
        &mut self,
        counts: &ProgressRecord,
    ) -> Result<(), rusqlite::Error> {
        if counts.is_empty() {
            return Ok(());
        }
        // Nor for a lock: the counters can wait for the next chance.
        self.without_waiting(|connection| {
            connection.pragma_update(None, "synchronous", "NORMAL")?;
            let written = add_progress(connection, counts);
            let restored = connection.pragma_update(None, "synchronous", "FULL");
            written.and(restored)
        })
    }

    /// Runs `write` failing at once on another program's lock, then waits
    /// for locks as batches do again.
    fn without_waiting<T>(
        &self,
        write: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.connection.busy_timeout(std::time::Duration::ZERO)?;
        let written = write(&self.connection);
        let waiting = self.connection.busy_timeout(BATCH_LOCK_WAIT);
        let written = written?;
        waiting.map(|()| written)
    }

    /// What `possync status` shows, if the terminal ever ran on this database.
    pub fn status_record(&self) -> Result<Option<StoredStatus>, DatabaseError> {
        if !self.has_table("possync_status")? {
            return Ok(None);
        }
        // A database the terminal has not opened since an upgrade lacks
        // the newer columns; `possync status` reads it all the same.
        let column_or_zero = |column: &'static str| -> Result<&'static str, DatabaseError> {
            let has: bool = self.connection.query_row(
                "SELECT count(*) FROM pragma_table_info('possync_status') WHERE name = ?1",
                [column],
                |row| row.get(0),
            )?;
            Ok(if has { column } else { "0" })
        };
        let stale_total = column_or_zero("stale_total")?;
        let collapsed_total = column_or_zero("collapsed_total")?;
        let sql = format!(
            "SELECT license_key, terminal_id, state, since_ms, reason, broker, pid, applied_total,
                    quarantined_total, last_applied_ms, last_message_type,
                    (SELECT count(*) FROM possync_quarantine), {stale_total}, {collapsed_total}
             FROM possync_status WHERE id = 1"
        );
        let stored = self
            .connection
            .query_row(&sql, [], |row| {
                let name: String = row.get(2)?;
                let since_ms = row.get(3)?;
                let reason: Option<String> = row.get(4)?;
                let state =
                    State::named(&name, system_time(since_ms), reason.as_deref().unwrap_or(""))
                        .ok_or_else(|| {
                            rusqlite::Error::FromSqlConversionFailure(
                                2,
                                rusqlite::types::Type::Text,
                                format!(
                                    "possync_status holds the state {name:?}, which this possync does not know"
                                )
                                .into(),
                            )
                        })?;
                Ok(StoredStatus {
                    license_key: row.get(0)?,
                    terminal_id: row.get(1)?,
                    state,
                    since_ms,
                    broker: row.get(5)?,
                    pid: row.get(6)?,
                    applied_total: row.get(7)?,
                    quarantined_total: row.get(8)?,
                    last_applied_ms: row.get(9)?,
                    last_message_type: row.get(10)?,
                    quarantine_rows: row.get(11)?,
                    stale_total: row.get(12)?,
                    collapsed_total: row.get(13)?,
                    sync: SyncState::default(),
                })
            })
            .optional()?;
        let Some(mut stored) = stored else {
            return Ok(None);
        };
        stored.sync = self.sync_state(&stored.license_key)?;
        if let Some((state, since_ms, pid)) = self.state_aside(stored.since_ms) {
            stored.state = state;
            stored.since_ms = since_ms;
            stored.pid = pid;
        }
        Ok(Some(stored))
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }
}

/// Counts to add to `possync_status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProgressRecord {
    pub(crate) applied: u64,
    pub(crate) collapsed: u64,
    pub(crate) quarantined: u64,
    pub(crate) stale: u64,
    pub(crate) last_applied_ms: Option<i64>,
    pub(crate) last_type: Option<String>,
}

impl ProgressRecord {
    /// Nothing to add.
    fn is_empty(&self) -> bool {
        self.applied == 0 && self.quarantined == 0 && self.stale == 0
    }
}

/// Adds `counts` to the counters `possync status` shows.
pub(crate) fn add_progress(
    connection: &Connection,
    counts: &ProgressRecord,
) -> Result<(), rusqlite::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let mut statement = connection.prepare_cached(
        "UPDATE possync_status SET applied_total = applied_total + ?1, quarantined_total = quarantined_total + ?2,
             stale_total = stale_total + ?5, collapsed_total = collapsed_total + ?6,
             last_applied_ms = coalesce(?3, last_applied_ms),
             last_message_type = coalesce(?4, last_message_type)
         WHERE id = 1",
    )?;
    statement.execute(params![
        i64::try_from(counts.applied).unwrap_or(i64::MAX),
        i64::try_from(counts.quarantined).unwrap_or(i64::MAX),
        counts.last_applied_ms,
        counts.last_type,
        i64::try_from(counts.stale).unwrap_or(i64::MAX),
        i64::try_from(counts.collapsed).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

/// Where a state the database could not take is kept: beside it, named
/// like SQLite's own `-wal` and `-shm` files.
fn state_file(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-possync-state");
    PathBuf::from(name)
}

/// While a database opens and migrates, nothing else can happen: wait for
/// another program's lock for up to two minutes, saying so after a second.
fn wait_for_lock_patiently(retries: i32) -> bool {
    const STEP: std::time::Duration = std::time::Duration::from_millis(50);
    const SAY_AFTER: i32 = 20;
    const GIVE_UP_AFTER: i32 = 2400;
    if retries == SAY_AFTER {
        crate::events::database_locked_at_start();
    }
    std::thread::sleep(STEP);
    retries < GIVE_UP_AFTER
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time `ms` milliseconds after the epoch.
fn system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// possync's tables as the release before the quarantine digest and the
    /// stale counter made them.
    const EARLIER_BOOKKEEPING: &str = "
        CREATE TABLE possync_migrations (id TEXT PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL);
        CREATE TABLE possync_status (
            id INTEGER PRIMARY KEY CHECK (id = 1), license_key TEXT NOT NULL, terminal_id TEXT NOT NULL,
            state TEXT NOT NULL, since_ms INTEGER NOT NULL, reason TEXT, broker TEXT, pid INTEGER,
            applied_total INTEGER NOT NULL DEFAULT 0, quarantined_total INTEGER NOT NULL DEFAULT 0,
            last_applied_ms INTEGER, last_message_type TEXT);
        CREATE TABLE possync_quarantine (
            id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, routing_key TEXT NOT NULL,
            message_type TEXT, message_id TEXT, reason TEXT NOT NULL, body BLOB NOT NULL);
        INSERT INTO possync_status (id, license_key, terminal_id, state, since_ms, applied_total)
            VALUES (1, 'K', 'till-1', 'stopped', 0, 41);
        INSERT INTO possync_quarantine (received_at, routing_key, reason, body)
            VALUES (0, 'license.K.t', 'old', x'7b7d');";

    #[test]
    fn a_database_of_the_earlier_release_is_read_before_and_after_it_is_upgraded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos.db");
        Connection::open(&path)
            .and_then(|c| c.execute_batch(EARLIER_BOOKKEEPING))
            .expect("earlier database");

        let before = Database::open_read_only(&path).expect("opens");
        let status = before.status_record().expect("reads").expect("a record");
        assert_eq!((status.applied_total, status.stale_total), (41, 0));
        drop(before);

        let upgraded = Database::open(&path).expect("upgrades");
        let status = upgraded.status_record().expect("reads").expect("a record");
        assert_eq!((status.applied_total, status.stale_total), (41, 0));
        let kept = upgraded.quarantined(10).expect("reads");
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].body_bytes, kept[0].body_sha256.as_str()), (2, ""));
        drop(upgraded);
        Database::open(&path).expect("opens again without running a migration twice");
    }

    #[test]
    fn the_sync_state_of_a_database_without_the_gap_columns_is_read_without_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos.db");
        Database::open(&path).expect("opens");
        Connection::open(&path)
            .and_then(|c| {
                c.execute_batch(
                    "INSERT INTO possync_sequence (license_key, synced_seq, applied_seq) VALUES ('K', 4, 6);
                     ALTER TABLE possync_sequence DROP COLUMN gap_cause;
                     ALTER TABLE possync_sequence DROP COLUMN gap_low;
                     ALTER TABLE possync_sequence DROP COLUMN gap_high;
                     ALTER TABLE possync_sequence DROP COLUMN gap_since_ms;
                     DELETE FROM possync_migrations WHERE id = 'possync/gap';",
                )
            })
            .expect("as the release before made it");
        let earlier = Database::open_read_only(&path).expect("opens");
        let sync = earlier.sync_state("K").expect("reads");
        assert_eq!(
            (sync.synced_up_to, sync.highest_applied, sync.gap),
            (4, 6, None)
        );
    }

    #[test]
    fn a_state_the_database_could_not_take_is_read_from_beside_it_until_a_later_one_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos.db");
        let mut database = Database::open(&path).expect("opens");
        let record = |state: &str, since_ms: i64| StateRecord {
            license_key: "K".into(),
            terminal_id: "till-1".into(),
            state: State::named(state, UNIX_EPOCH, &format!("{state} reason")).expect("a state"),
            since_ms,
            broker: None,
        };
        database
            .record_state(&record("live", 10))
            .expect("recorded");
        let locker = Connection::open(&path).expect("opens");
        locker.execute_batch("BEGIN EXCLUSIVE").expect("locks");
        database
            .record_state(&record("stalled", 20))
            .expect_err("the database is locked");
        let shown = Database::open_read_only(&path)
            .and_then(|db| db.status_record())
            .expect("reads")
            .expect("a record");
        assert_eq!((shown.state.name(), shown.since_ms), ("stalled", 20));
        assert_eq!(shown.state.reason(), Some("stalled reason"));
        locker.execute_batch("COMMIT").expect("unlocks");
        database
            .record_state(&record("live", 30))
            .expect("recorded");
        assert!(
            !state_file(&path).exists(),
            "the file goes once the database took a state"
        );
        let shown = database.status_record().expect("reads").expect("a record");
        assert_eq!((shown.state.name(), shown.since_ms), ("live", 30));
    }
}
