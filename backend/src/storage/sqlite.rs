//! The backend's database in one SQLite file: zero setup, for one backend
//! process (other processes, such as `possync backend token`, may open the
//! same file at the same time).
//!
//! Every call runs on tokio's blocking pool, never on an async worker. Writes
//! go through one connection and take the write lock up front
//! (`BEGIN IMMEDIATE`), so a submission never fails half-way for a lock; reads
//! use a second connection, which WAL lets run beside a write.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use std::collections::HashMap;

use possync_core::{ChecksumSpec, unix_now_ms};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::checksums::{self, STALE, Tally};
use super::plan::{self, Before, StoredEntity};
use super::{
    CatalogEntry, CatalogPage, Change, ChecksumsAt, IdempotencyKey, NewChange, OutboxRow,
    ReceiptRecord, Received, Recomputed, Storage, StorageError, StoreCheckpoint, StoreHead,
    Submitted, TerminalRecord, TokenRecord, UpstreamRecord, answer,
};

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, one migration per entry; `PRAGMA user_version` counts those
/// applied.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE stores (
        store TEXT PRIMARY KEY,
        head INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- id gives the relay one order across stores, oldest first.
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        store TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message_type TEXT NOT NULL,
        payload TEXT NOT NULL CHECK (json_valid(payload)),
        timestamp TEXT NOT NULL,
        message_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        published INTEGER NOT NULL DEFAULT 0,
        published_at INTEGER,
        UNIQUE (store, seq)
    );
    CREATE INDEX outbox_unpublished ON outbox (id) WHERE published = 0;

    -- state NULL: deleted. The row stays so that its clock judges a late
    -- change from the exchange.
    CREATE TABLE entities (
        store TEXT NOT NULL,
        entity TEXT NOT NULL,
        id TEXT NOT NULL,
        state TEXT,
        seq INTEGER NOT NULL,
        clock INTEGER NOT NULL,
        PRIMARY KEY (store, entity, id)
    ) WITHOUT ROWID;

    CREATE TABLE idempotency (
        client TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        answer TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (client, key)
    ) WITHOUT ROWID;

    -- stores: a JSON array of license keys; NULL: every store.
    CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        stores TEXT,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
",
    r"
    -- The last clock from the exchange of each type without an entity, per
    -- store: it judges that type's late changes.
    CREATE TABLE type_clocks (
        store TEXT NOT NULL,
        message_type TEXT NOT NULL,
        clock INTEGER NOT NULL,
        PRIMARY KEY (store, message_type)
    ) WITHOUT ROWID;

    -- A message id names one change of its store.
    CREATE INDEX outbox_message_id ON outbox (store, message_id);

    -- Keys are forgotten after a retention.
    CREATE INDEX idempotency_created_at ON idempotency (created_at);

    -- The direct consumer's keys, under a name no token can have.
    UPDATE idempotency SET client = ':exchange' WHERE client = 'exchange';
",
    r"
    -- The catalog's id, made once with the database: terminals follow one
    -- catalog's sequence per store and refuse another's.
    CREATE TABLE catalog_identity (id TEXT NOT NULL);
    INSERT INTO catalog_identity (id) SELECT lower(hex(randomblob(16)));
",
    r"
    -- What terminals sent upstream, each message once; cursor orders them.
    CREATE TABLE upstream (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        store TEXT NOT NULL,
        terminal TEXT NOT NULL,
        message_type TEXT NOT NULL,
        message_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        payload TEXT NOT NULL CHECK (json_valid(payload)),
        UNIQUE (store, terminal, message_id)
    );
    CREATE INDEX upstream_store ON upstream (store, cursor);

    -- Each terminal's latest receipt.
    CREATE TABLE fleet (
        store TEXT NOT NULL,
        terminal TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        applied_up_to INTEGER NOT NULL,
        highest_applied INTEGER NOT NULL,
        quarantined INTEGER NOT NULL,
        outbox INTEGER NOT NULL,
        applied_changed_ms INTEGER NOT NULL,
        stopping INTEGER NOT NULL,
        run TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (store, terminal)
    ) WITHOUT ROWID;
",
    r"
    -- Each store's checksum per kind of entity: the wrapping sum of its
    -- entities' digests (the bits of an unsigned 64-bit integer) and how
    -- many, kept by every submission.
    CREATE TABLE checksums (
        store TEXT NOT NULL,
        entity TEXT NOT NULL,
        digest_sum INTEGER NOT NULL,
        entity_count INTEGER NOT NULL,
        PRIMARY KEY (store, entity)
    ) WITHOUT ROWID;

    -- The fingerprint of the spec the checksums are kept under; '': none,
    -- computed at the backend's next start.
    CREATE TABLE checksum_spec (fingerprint TEXT NOT NULL);
    INSERT INTO checksum_spec (fingerprint) VALUES ('');

    -- A store's unpublished changes, found without reading its published ones.
    CREATE INDEX outbox_store_unpublished ON outbox (store, seq) WHERE published = 0;

    -- What each terminal's latest receipt said of its catalog's verification.
    ALTER TABLE fleet ADD COLUMN verified_seq INTEGER;
    ALTER TABLE fleet ADD COLUMN gap TEXT;
",
    r"
    -- The checksums' past values: each row is a store's checksum of a kind
    -- from seq on, seq being the end of the submission that moved it.
    CREATE TABLE checksum_log (
        store TEXT NOT NULL,
        entity TEXT NOT NULL,
        seq INTEGER NOT NULL,
        digest_sum INTEGER NOT NULL,
        entity_count INTEGER NOT NULL,
        PRIMARY KEY (store, entity, seq)
    ) WITHOUT ROWID;

    -- The log starts when the checksums are computed again, at the
    -- backend's next start: that logs every kind at each store's head.
    UPDATE checksum_spec SET fingerprint = '';
",
];

/// The backend's database in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Held while this storage lives once it leads the relay.
    relay_lock: Mutex<Option<File>>,
    /// Submissions for the next group commit.
    waiting: Mutex<Vec<Waiting>>,
    /// Whether the writer may have been left at `synchronous = NORMAL` by
    /// a mark whose switch back failed: no submission commits until it is
    /// back at FULL.
    not_full: AtomicBool,
}

impl SqliteStorage {
    /// Opens (creating it if needed) the database at `path` and brings its
    /// schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let inner = tokio::task::spawn_blocking(move || Inner::open(path))
            .await
            .map_err(joined)??;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn run<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(joined)?
    }
}

impl Inner {
    fn open(path: PathBuf) -> Result<Self, StorageError> {
        if in_memory(&path) {
            return Err(StorageError::Refused(format!(
                "{:?} is a SQLite database in memory, which each connection would see empty and which is gone at exit; name a file (possync-backend.db)",
                path.display().to_string()
            )));
        }
        let failed = |err: rusqlite::Error| {
            StorageError::Database(format!(
                "cannot open {}: {err}; check that its folder exists and is writable",
                path.display()
            ))
        };
        let mut writer = connect(&path).map_err(failed)?;
        migrate(&mut writer, &path)?;
        let reader = connect(&path).map_err(failed)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            relay_lock: Mutex::new(None),
            waiting: Mutex::new(Vec::new()),
            not_full: AtomicBool::new(false),
            path,
        })
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction rolled it back when the guard dropped: the
        // connection is sound.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer, syncing fully: what commits through it is answered as
    /// durable. A mark that could not switch it back (see `not_full`) is
    /// repaired here, or the write refused.
    fn durable_writer(&self) -> Result<MutexGuard<'_, Connection>, rusqlite::Error> {
        let connection = self.writer();
        if self.not_full.load(Ordering::SeqCst) {
            connection.pragma_update(None, "synchronous", "FULL")?;
            self.not_full.store(false, Ordering::SeqCst);
        }
        Ok(connection)
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether SQLite would keep `path` in memory rather than in a file: the
/// empty name (a temporary database), `:memory:`, or a `file:` URI naming
/// either or `mode=memory`.
fn in_memory(path: &Path) -> bool {
    let name = path.to_string_lossy();
    let uri = name
        .strip_prefix("file:")
        .map(|rest| rest.split_once('?').unwrap_or((rest, "")));
    match uri {
        Some((file, query)) => {
            file.is_empty()
                || file == ":memory:"
                || query.split('&').any(|pair| pair == "mode=memory")
        }
        None => name.is_empty() || name == ":memory:",
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // An answered change must survive a power loss: NORMAL may lose the
    // last commits in WAL mode.
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), StorageError> {
    let sql = |err| StorageError::Database(format!("cannot migrate {}: {err}", path.display()));
    // IMMEDIATE: two processes opening a new file migrate one after the other.
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let applied: usize = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sql)?;
    if applied > MIGRATIONS.len() {
        return Err(StorageError::Database(format!(
            "{}'s schema is version {applied}, newer than this possync knows ({}); upgrade possync",
            path.display(),
            MIGRATIONS.len()
        )));
    }
    for migration in MIGRATIONS.iter().skip(applied) {
        tx.execute_batch(migration).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

fn joined(err: tokio::task::JoinError) -> StorageError {
    StorageError::Database(format!("a database task failed: {err}"))
}

/// A failed statement: refused for what it holds (a constraint, a value
/// too large or of the wrong type), which no retry changes, or the
/// database failed.
fn failed(what: &str) -> impl Fn(rusqlite::Error) -> StorageError + '_ {
    move |err| {
        let refused = matches!(
            err.sqlite_error_code(),
            Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch)
        );
        let text = format!("{what}: {err}");
        if refused {
            StorageError::Refused(text)
        } else {
            StorageError::Database(text)
        }
    }
}

fn state_text(state: &Option<Map<String, Value>>) -> Result<Option<String>, StorageError> {
    state
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|err| StorageError::Database(format!("cannot encode an entity's state: {err}")))
}

fn parse_state(text: &str) -> Result<Map<String, Value>, StorageError> {
    serde_json::from_str(text).map_err(|err| {
        StorageError::Database(format!(
            "an entity's stored state is unreadable ({err}); the database was changed by hand"
        ))
    })
}

/// A submission waiting for the next group commit.
#[derive(Debug)]
struct Waiting {
    changes: Vec<NewChange>,
    key: Option<IdempotencyKey>,
    checksums: ChecksumSpec,
    answer: oneshot::Sender<Result<Submitted, StorageError>>,
}

impl Inner {
    /// Commits every submission waiting, in one transaction: with
    /// `synchronous = FULL` a commit costs a flush to disk, so submissions
    /// that arrive while one commits share the next one instead of each
    /// waiting for its own. Each runs in a savepoint of its own, so one
    /// refused submission leaves the others whole; each is answered only
    /// after the commit.
    fn commit_waiting(&self) {
        let sql = failed("cannot store the submission");
        let connection = self.durable_writer();
        let group: Vec<Waiting> =
            std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        if group.is_empty() {
            // An earlier caller's group took this one's submission.
            return;
        }
        let mut connection = match connection {
            Ok(connection) => connection,
            Err(err) => {
                // Refused rather than answered without a flush to disk.
                let err = sql(err);
                for waiting in group {
                    let _ = waiting.answer.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut tx = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(err) => {
                let err = sql(err);
                for waiting in group {
                    let _ = waiting.answer.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut results = Vec::with_capacity(group.len());
        let mut answers = Vec::with_capacity(group.len());
        for waiting in group {
            let result = match tx.savepoint() {
                Ok(savepoint) => {
                    let result =
                        submit(&savepoint, waiting.changes, waiting.key, &waiting.checksums);
                    match &result {
                        Ok(_) => savepoint.commit().map_err(&sql).and(result),
                        // Dropping the savepoint rolls this submission back alone.
                        Err(_) => result,
                    }
                }
                Err(err) => Err(sql(err)),
            };
            results.push(result);
            answers.push(waiting.answer);
        }
        let committed = tx.commit().map_err(&sql);
        for (result, answer) in results.into_iter().zip(answers) {
            let _ = answer.send(match &committed {
                Ok(()) => result,
                Err(err) => Err(err.clone()),
            });
        }
    }
}

/// One submission's writes, inside the group's transaction.
fn submit(
    tx: &Connection,
    changes: Vec<NewChange>,
    key: Option<IdempotencyKey>,
    spec: &ChecksumSpec,
) -> Result<Submitted, StorageError> {
    let sql = failed("cannot store the submission");
    if let Some(key) = &key {
        let seen: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT fingerprint, answer FROM idempotency WHERE client = ? AND key = ?",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![key.client, key.key], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
            })
            .map_err(&sql)?;
        if let Some((fingerprint, stored)) = seen {
            if fingerprint != key.fingerprint {
                return Err(StorageError::KeyReused {
                    key: key.key.clone(),
                });
            }
            return Ok(Submitted {
                accepted: answer::decode(&stored)?,
                replayed: true,
            });
        }
    }

    let mut before = Before::default();
    {
        let mut stmt = tx
            .prepare_cached("SELECT head FROM stores WHERE store = ?")
            .map_err(&sql)?;
        for store in plan::stores(&changes) {
            let head: Option<i64> = stmt
                .query_row([&store], |row| row.get(0))
                .optional()
                .map_err(&sql)?;
            before.heads.insert(store, head.unwrap_or(0));
        }
    }
    {
        let mut stmt = tx
            .prepare_cached("SELECT clock FROM type_clocks WHERE store = ? AND message_type = ?")
            .map_err(&sql)?;
        for key in plan::type_keys(&changes) {
            let clock: Option<i64> = stmt
                .query_row(params![key.0, key.1], |row| row.get(0))
                .optional()
                .map_err(&sql)?;
            if let Some(clock) = clock {
                before.type_clocks.insert(key, clock);
            }
        }
    }
    {
        let mut stmt = tx
            .prepare_cached("SELECT 1 FROM outbox WHERE store = ? AND message_id = ? LIMIT 1")
            .map_err(&sql)?;
        for key in plan::message_keys(&changes) {
            let used = stmt
                .query_row(params![key.0, key.1], |_| Ok(()))
                .optional()
                .map_err(&sql)?;
            if used.is_some() {
                before.used_ids.insert(key);
            }
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT state, clock FROM entities WHERE store = ? AND entity = ? AND id = ?",
            )
            .map_err(&sql)?;
        for key in plan::entity_keys(&changes) {
            let row: Option<(Option<String>, i64)> = stmt
                .query_row(params![key.0, key.1, key.2], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
                .map_err(&sql)?;
            if let Some((state, clock)) = row {
                let state = state.as_deref().map(parse_state).transpose()?;
                before.entities.insert(key, StoredEntity { state, clock });
            }
        }
    }
    if plan::reads_checksums(&changes, &before) {
        before.checksums = stored_checksums(tx, &changes, spec)?;
    }

    let plan = plan::plan(changes, before, spec)?;
    let now = unix_now_ms();
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO outbox (store, seq, message_type, payload, timestamp, message_id, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .map_err(&sql)?;
        for row in &plan.outbox {
            stmt.execute(params![
                row.store,
                row.seq,
                row.message_type,
                row.payload,
                row.timestamp,
                row.message_id,
                now
            ])
            .map_err(&sql)?;
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO entities (store, entity, id, state, seq, clock) VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (store, entity, id) DO UPDATE
                 SET state = excluded.state, seq = excluded.seq, clock = excluded.clock",
            )
            .map_err(&sql)?;
        for write in &plan.entities {
            let (store, entity, id) = &write.key;
            let state = state_text(&write.stored.state)?;
            stmt.execute(params![
                store,
                entity,
                id,
                state,
                write.seq,
                write.stored.clock
            ])
            .map_err(&sql)?;
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO checksums (store, entity, digest_sum, entity_count) VALUES (?, ?, ?, ?)
                 ON CONFLICT (store, entity) DO UPDATE
                 SET digest_sum = excluded.digest_sum, entity_count = excluded.entity_count",
            )
            .map_err(&sql)?;
        for ((store, entity), checksum) in &plan.checksums {
            let (sum, count) = checksums::to_row(*checksum);
            stmt.execute(params![store, entity, sum, count])
                .map_err(&sql)?;
        }
    }
    log_checksums(tx, &plan.log)?;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO stores (store, head) VALUES (?, ?)
                 ON CONFLICT (store) DO UPDATE SET head = excluded.head",
            )
            .map_err(&sql)?;
        for (store, head) in &plan.heads {
            stmt.execute(params![store, head]).map_err(&sql)?;
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO type_clocks (store, message_type, clock) VALUES (?, ?, ?)
                 ON CONFLICT (store, message_type) DO UPDATE SET clock = excluded.clock",
            )
            .map_err(&sql)?;
        for ((store, message_type), clock) in &plan.type_clocks {
            stmt.execute(params![store, message_type, clock])
                .map_err(&sql)?;
        }
    }
    if let Some(key) = &key {
        let answer = answer::encode(&plan.accepted)?;
        tx.prepare_cached(
            "INSERT INTO idempotency (client, key, fingerprint, answer, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![key.client, key.key, key.fingerprint, answer, now])
        })
        .map_err(&sql)?;
    }
    Ok(Submitted {
        accepted: plan.accepted,
        replayed: false,
    })
}

/// Writes a submission's checksum log rows, each trimmed of its rows more
/// than [`checksums::LOG_WINDOW`] seqs older and below the store's
/// unpublished changes (but the latest of those).
fn log_checksums(tx: &Connection, rows: &[checksums::LogRow]) -> Result<(), StorageError> {
    let sql = failed("cannot log the checksums");
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO checksum_log (store, entity, seq, digest_sum, entity_count)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (store, entity, seq) DO UPDATE
             SET digest_sum = excluded.digest_sum, entity_count = excluded.entity_count",
        )
        .map_err(&sql)?;
    let mut trim = tx
        .prepare_cached(
            "DELETE FROM checksum_log WHERE store = ?1 AND entity = ?2 AND seq <
                (SELECT max(seq) FROM checksum_log
                 WHERE store = ?1 AND entity = ?2 AND seq <= min(?3,
                    coalesce((SELECT min(seq) FROM outbox
                              WHERE store = ?1 AND published = 0), ?3 + 1) - 1))",
        )
        .map_err(&sql)?;
    for ((store, entity), seq, checksum) in rows {
        let (sum, count) = checksums::to_row(*checksum);
        insert
            .execute(params![store, entity, seq, sum, count])
            .map_err(&sql)?;
        trim.execute(params![
            store,
            entity,
            seq.saturating_sub(checksums::LOG_WINDOW)
        ])
        .map_err(&sql)?;
    }
    Ok(())
}

/// The stored checksums a submission under `spec` may move, if they are
/// kept under it; if not, marks them stale (see [`STALE`]) and leaves them.
fn stored_checksums(
    tx: &Connection,
    changes: &[NewChange],
    spec: &ChecksumSpec,
) -> Result<Option<HashMap<checksums::ChecksumKey, possync_core::Checksum>>, StorageError> {
    let sql = failed("cannot read the checksums");
    let stored: String = tx
        .prepare_cached("SELECT fingerprint FROM checksum_spec")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(&sql)?;
    if stored != spec.fingerprint() {
        if stored != STALE {
            tx.prepare_cached("UPDATE checksum_spec SET fingerprint = ?")
                .and_then(|mut stmt| stmt.execute([STALE]))
                .map_err(&sql)?;
        }
        return Ok(None);
    }
    let mut kept = HashMap::new();
    let mut stmt = tx
        .prepare_cached(
            "SELECT digest_sum, entity_count FROM checksums WHERE store = ? AND entity = ?",
        )
        .map_err(&sql)?;
    for key in plan::checksum_keys(changes, spec) {
        let row: Option<(i64, i64)> = stmt
            .query_row(params![key.0, key.1], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .map_err(&sql)?;
        if let Some((sum, count)) = row {
            kept.insert(key, checksums::from_row(sum, count));
        }
    }
    Ok(Some(kept))
}

/// Computes every checksum under `spec` again from the catalog, unless
/// they are kept under it already.
fn sync_checksums(
    connection: &mut Connection,
    spec: &ChecksumSpec,
) -> Result<Option<Recomputed>, StorageError> {
    let sql = failed("cannot compute the checksums again");
    let fingerprint = spec.fingerprint();
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&sql)?;
    let stored: String = tx
        .query_row("SELECT fingerprint FROM checksum_spec", [], |row| {
            row.get(0)
        })
        .map_err(&sql)?;
    if stored == fingerprint {
        return Ok(None);
    }
    let kinds = serde_json::to_string(&spec.kinds().collect::<Vec<_>>())
        .map_err(|err| StorageError::Database(format!("cannot encode the kinds: {err}")))?;
    let mut tally = Tally::new(spec);
    {
        let mut stmt = tx
            .prepare(
                "SELECT store, entity, id, state FROM entities
                 WHERE state IS NOT NULL AND entity IN (SELECT value FROM json_each(?))",
            )
            .map_err(&sql)?;
        let mut rows = stmt.query([&kinds]).map_err(&sql)?;
        while let Some(row) = rows.next().map_err(&sql)? {
            let (store, kind, id): (String, String, String) = (
                row.get(0).map_err(&sql)?,
                row.get(1).map_err(&sql)?,
                row.get(2).map_err(&sql)?,
            );
            let state: String = row.get(3).map_err(&sql)?;
            tally.add(&store, &kind, &id, &parse_state(&state)?);
        }
    }
    let (sums, recomputed) = tally.finish();
    tx.execute("DELETE FROM checksums", []).map_err(&sql)?;
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO checksums (store, entity, digest_sum, entity_count)
                 VALUES (?, ?, ?, ?)",
            )
            .map_err(&sql)?;
        for ((store, kind), checksum) in &sums {
            let (sum, count) = checksums::to_row(*checksum);
            stmt.execute(params![store, kind, sum, count])
                .map_err(&sql)?;
        }
    }
    // The log starts again: every kind of every store at its head.
    tx.execute("DELETE FROM checksum_log", []).map_err(&sql)?;
    tx.execute(RESTART_LOG, [&kinds]).map_err(&sql)?;
    tx.execute("UPDATE checksum_spec SET fingerprint = ?", [fingerprint])
        .map_err(&sql)?;
    tx.commit().map_err(&sql)?;
    Ok(Some(recomputed))
}

/// Logs every kind (a JSON array) of every store at its head, as the
/// checksums table holds them (no row: zero).
const RESTART_LOG: &str = "
    INSERT INTO checksum_log (store, entity, seq, digest_sum, entity_count)
    SELECT stores.store, kinds.value, stores.head,
        coalesce(kept.digest_sum, 0), coalesce(kept.entity_count, 0)
    FROM stores CROSS JOIN json_each(?) AS kinds
    LEFT JOIN checksums AS kept ON kept.store = stores.store AND kept.entity = kinds.value";

/// What a checkpoint of `store` states, in one read transaction.
fn checkpoint(
    connection: &mut Connection,
    store: &str,
    spec: &ChecksumSpec,
) -> Result<StoreCheckpoint, StorageError> {
    let sql = failed("cannot read the store's checkpoint");
    // One snapshot: the head, the outbox and the checksums agree.
    let tx = connection.transaction().map_err(&sql)?;
    let head: i64 = tx
        .prepare_cached("SELECT head FROM stores WHERE store = ?")
        .and_then(|mut stmt| stmt.query_row([store], |row| row.get(0)).optional())
        .map_err(&sql)?
        .unwrap_or(0);
    let highest_unpublished: Option<i64> = tx
        .prepare_cached("SELECT max(seq) FROM outbox WHERE store = ? AND published = 0")
        .and_then(|mut stmt| stmt.query_row([store], |row| row.get(0)))
        .map_err(&sql)?;
    let fingerprint: String = tx
        .prepare_cached("SELECT fingerprint FROM checksum_spec")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(&sql)?;
    let checksums = if fingerprint == spec.fingerprint() {
        let mut stmt = tx
            .prepare_cached(
                "SELECT entity, digest_sum, entity_count FROM checksums WHERE store = ?",
            )
            .map_err(&sql)?;
        let rows: Vec<(String, i64, i64)> = stmt
            .query_map([store], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .and_then(Iterator::collect)
            .map_err(&sql)?;
        Some(checksums::of_store(
            spec,
            rows.into_iter()
                .map(|(kind, sum, count)| (kind, checksums::from_row(sum, count))),
        ))
    } else {
        None
    };
    Ok(StoreCheckpoint {
        head,
        highest_unpublished,
        checksums,
    })
}

/// The checksums at `store`'s last boundary at or below `up_to`, from the
/// checksum log, in one read transaction.
fn checkpoint_at(
    connection: &mut Connection,
    store: &str,
    up_to: i64,
    spec: &ChecksumSpec,
) -> Result<Option<ChecksumsAt>, StorageError> {
    let sql = failed("cannot read the checksum log");
    // One snapshot: the fingerprint and every kind's row agree.
    let tx = connection.transaction().map_err(&sql)?;
    let fingerprint: String = tx
        .prepare_cached("SELECT fingerprint FROM checksum_spec")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(&sql)?;
    if fingerprint != spec.fingerprint() {
        return Ok(None);
    }
    // Each kind's latest row at or below `up_to`: the highest of them is
    // the boundary, and each is its kind's latest at or below it too.
    let mut stmt = tx
        .prepare_cached(
            "SELECT seq, digest_sum, entity_count FROM checksum_log
             WHERE store = ? AND entity = ? AND seq <= ? ORDER BY seq DESC LIMIT 1",
        )
        .map_err(&sql)?;
    let mut rows = Vec::new();
    for kind in spec.kinds() {
        let row: Option<(i64, i64, i64)> = stmt
            .query_row(params![store, kind, up_to], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()
            .map_err(&sql)?;
        let Some((seq, sum, count)) = row else {
            return Ok(None);
        };
        rows.push((kind.to_owned(), seq, checksums::from_row(sum, count)));
    }
    Ok(checksums::at_boundary(spec, rows))
}

/// Trims `store`'s checksum log below `below` (see
/// [`Storage::prune_checksum_log`]).
fn prune_checksum_log(
    connection: &Connection,
    store: &str,
    below: i64,
) -> Result<u64, StorageError> {
    let removed = connection
        .prepare_cached(
            "DELETE FROM checksum_log WHERE store = ?1 AND seq < ?2 AND seq <
                (SELECT max(seq) FROM checksum_log AS kept
                 WHERE kept.store = ?1 AND kept.entity = checksum_log.entity
                   AND kept.seq <= ?2)",
        )
        .and_then(|mut stmt| stmt.execute(params![store, below]))
        .map_err(failed("cannot trim the checksum log"))?;
    Ok(removed as u64)
}

/// An outbox row from the first six columns of a query that selects
/// `store, seq, message_type, payload, timestamp, message_id`.
fn mark(connection: &mut Connection, rows: &[(String, i64)]) -> rusqlite::Result<()> {
    let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE outbox SET published = 1, published_at = ?
             WHERE store = ? AND seq = ? AND published = 0",
        )?;
        let now = unix_now_ms();
        for (store, seq) in rows {
            stmt.execute(params![now, store, seq])?;
        }
    }
    tx.commit()
}

fn outbox_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        store: row.get(0)?,
        seq: row.get(1)?,
        message_type: row.get(2)?,
        payload: row.get(3)?,
        timestamp: row.get(4)?,
        message_id: row.get(5)?,
    })
}

fn token_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenRecord, Option<String>)> {
    Ok((
        TokenRecord {
            name: row.get(0)?,
            hash: row.get(1)?,
            stores: None,
            created_at: row.get(3)?,
        },
        row.get(2)?,
    ))
}

fn with_stores(
    (mut token, stores): (TokenRecord, Option<String>),
) -> Result<TokenRecord, StorageError> {
    token.stores = stores
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|err| {
            StorageError::Database(format!(
                "token {:?}'s stores are unreadable ({err}); revoke it and make it again",
                token.name
            ))
        })?;
    Ok(token)
}

impl Storage for SqliteStorage {
    async fn submit(
        &self,
        changes: Vec<NewChange>,
        key: Option<IdempotencyKey>,
        checksums: &ChecksumSpec,
    ) -> Result<Submitted, StorageError> {
        let (answer, answered) = oneshot::channel();
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Waiting {
                changes,
                key,
                checksums: checksums.clone(),
                answer,
            });
        self.run(|inner| {
            inner.commit_waiting();
            Ok(())
        })
        .await?;
        answered.await.map_err(|_| {
            StorageError::Database("the submission was lost before its commit".into())
        })?
    }

    async fn sync_checksums(
        &self,
        spec: &ChecksumSpec,
    ) -> Result<Option<Recomputed>, StorageError> {
        let spec = spec.clone();
        self.run(move |inner| {
            let mut connection = inner
                .durable_writer()
                .map_err(failed("cannot compute the checksums again"))?;
            sync_checksums(&mut connection, &spec)
        })
        .await
    }

    async fn checkpoint(
        &self,
        store: &str,
        spec: &ChecksumSpec,
    ) -> Result<StoreCheckpoint, StorageError> {
        let (store, spec) = (store.to_owned(), spec.clone());
        self.run(move |inner| checkpoint(&mut inner.reader(), &store, &spec))
            .await
    }

    async fn checkpoint_at(
        &self,
        store: &str,
        up_to: i64,
        spec: &ChecksumSpec,
    ) -> Result<Option<ChecksumsAt>, StorageError> {
        let (store, spec) = (store.to_owned(), spec.clone());
        self.run(move |inner| checkpoint_at(&mut inner.reader(), &store, up_to, &spec))
            .await
    }

    async fn prune_checksum_log(&self, store: &str, below: i64) -> Result<u64, StorageError> {
        let store = store.to_owned();
        self.run(move |inner| {
            let connection = inner
                .durable_writer()
                .map_err(failed("cannot trim the checksum log"))?;
            prune_checksum_log(&connection, &store, below)
        })
        .await
    }

    async fn unpublished(&self, limit: usize) -> Result<Vec<OutboxRow>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            let sql = failed("cannot read the outbox");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT store, seq, message_type, payload, timestamp, message_id FROM outbox
                     WHERE published = 0 ORDER BY id LIMIT ?",
                )
                .map_err(&sql)?;
            let rows = stmt
                .query_map([limit], outbox_row)
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            Ok(rows)
        })
        .await
    }

    async fn mark_published(&self, rows: &[(String, i64)]) -> Result<(), StorageError> {
        let rows = rows.to_vec();
        self.run(move |inner| {
            let sql = failed("cannot mark outbox rows published");
            let mut connection = inner.writer();
            // A mark lost to a power cut only sends its rows again, which
            // terminals drop by their seq: it need not wait for the disk.
            // The next submission's commit flushes it with its own.
            inner.not_full.store(true, Ordering::SeqCst);
            connection
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(&sql)?;
            let marked = mark(&mut connection, &rows).map_err(&sql);
            let restored = connection
                .pragma_update(None, "synchronous", "FULL")
                .map_err(&sql);
            if restored.is_ok() {
                inner.not_full.store(false, Ordering::SeqCst);
            }
            marked.and(restored)
        })
        .await
    }

    async fn lead_relay(&self) -> Result<bool, StorageError> {
        // Asked before every round: once held, the answer needs no thread.
        if self
            .inner
            .relay_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Ok(true);
        }
        self.run(|inner| {
            let mut held = inner
                .relay_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if held.is_some() {
                return Ok(true);
            }
            let mut path = inner.path.clone().into_os_string();
            path.push(".relay.lock");
            let cannot = |err: std::io::Error| {
                StorageError::Database(format!(
                    "cannot open the relay lock {}: {err}; check that its folder is writable",
                    Path::new(&path).display()
                ))
            };
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(cannot)?;
            match file.try_lock() {
                Ok(()) => {
                    *held = Some(file);
                    Ok(true)
                }
                Err(TryLockError::WouldBlock) => Ok(false),
                Err(TryLockError::Error(err)) => Err(cannot(err)),
            }
        })
        .await
    }

    async fn prune_keys(&self, older_than: Duration) -> Result<u64, StorageError> {
        let age = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let before = unix_now_ms().saturating_sub(age);
        self.run(move |inner| {
            let sql = failed("cannot forget old idempotency keys");
            let removed = inner
                .durable_writer()
                .map_err(&sql)?
                .execute("DELETE FROM idempotency WHERE created_at < ?", [before])
                .map_err(&sql)?;
            Ok(removed as u64)
        })
        .await
    }

    async fn catalog(&self, store: &str) -> Result<Vec<CatalogEntry>, StorageError> {
        let store = store.to_owned();
        self.run(move |inner| {
            let sql = failed("cannot read the catalog");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT entity, id, state, seq FROM entities
                     WHERE store = ? AND state IS NOT NULL ORDER BY entity, id",
                )
                .map_err(&sql)?;
            let rows: Vec<(String, String, String, i64)> = stmt
                .query_map([&store], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            catalog_entries(rows)
        })
        .await
    }

    async fn catalog_page(
        &self,
        store: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<CatalogPage, StorageError> {
        let store = store.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            let sql = failed("cannot read the catalog");
            let connection = inner.reader();
            // The head first: the page, read after it, holds every change up to it.
            let head: i64 = connection
                .prepare_cached("SELECT head FROM stores WHERE store = ?")
                .and_then(|mut stmt| stmt.query_row([&store], |row| row.get(0)).optional())
                .map_err(&sql)?
                .unwrap_or(0);
            let (entity, id) = after.unwrap_or_default();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT entity, id, state, seq FROM entities
                     WHERE store = ?1 AND (entity, id) > (?2, ?3) AND state IS NOT NULL
                     ORDER BY entity, id LIMIT ?4",
                )
                .map_err(&sql)?;
            let rows: Vec<(String, String, String, i64)> = stmt
                .query_map(rusqlite::params![store, entity, id, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            let entries = catalog_entries(rows)?;
            // Read after the states: it bounds the changes they show.
            let settled: i64 = connection
                .prepare_cached("SELECT head FROM stores WHERE store = ?")
                .and_then(|mut stmt| stmt.query_row([&store], |row| row.get(0)).optional())
                .map_err(&sql)?
                .unwrap_or(0);
            Ok(CatalogPage {
                head,
                settled,
                entries,
            })
        })
        .await
    }

    async fn changes_after(
        &self,
        store: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Change>, StorageError> {
        let store = store.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            let sql = failed("cannot read a store's changes");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT store, seq, message_type, payload, timestamp, message_id, published
                     FROM outbox WHERE store = ? AND seq > ? ORDER BY seq LIMIT ?",
                )
                .map_err(&sql)?;
            let rows = stmt
                .query_map(params![store, after, limit], |row| {
                    Ok(Change {
                        row: outbox_row(row)?,
                        published: row.get(6)?,
                    })
                })
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            Ok(rows)
        })
        .await
    }

    async fn catalog_id(&self) -> Result<String, StorageError> {
        self.run(|inner| {
            inner
                .reader()
                .query_row("SELECT id FROM catalog_identity", [], |row| row.get(0))
                .map_err(failed("cannot read the catalog's id"))
        })
        .await
    }

    async fn heads(&self) -> Result<Vec<StoreHead>, StorageError> {
        self.run(|inner| {
            let sql = failed("cannot read the stores' heads");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT store, head,
                        (SELECT count(*) FROM outbox
                         WHERE outbox.store = stores.store AND published = 0)
                     FROM stores ORDER BY store",
                )
                .map_err(&sql)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(StoreHead {
                        store: row.get(0)?,
                        head: row.get(1)?,
                        unpublished: row.get(2)?,
                    })
                })
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            Ok(rows)
        })
        .await
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        self.run(move |inner| {
            let stores = token
                .stores
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|err| {
                    StorageError::Database(format!("cannot encode a token's stores: {err}"))
                })?;
            let connection = inner
                .durable_writer()
                .map_err(failed("cannot store the token"))?;
            let inserted = connection
                .execute(
                    "INSERT INTO tokens (name, hash, stores, created_at) VALUES (?, ?, ?, ?)
                     ON CONFLICT (name) DO NOTHING",
                    params![token.name, token.hash, stores, token.created_at],
                )
                .map_err(failed("cannot store the token"))?;
            if inserted == 0 {
                return Err(StorageError::TokenExists(token.name));
            }
            Ok(())
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        self.run(|inner| {
            let sql = failed("cannot read the tokens");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached("SELECT name, hash, stores, created_at FROM tokens ORDER BY name")
                .map_err(&sql)?;
            let rows: Vec<_> = stmt
                .query_map([], token_from_row)
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            rows.into_iter().map(with_stores).collect()
        })
        .await
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StorageError> {
        let name = name.to_owned();
        self.run(move |inner| {
            let sql = failed("cannot revoke the token");
            let removed = inner
                .durable_writer()
                .map_err(&sql)?
                .execute("DELETE FROM tokens WHERE name = ?", [&name])
                .map_err(&sql)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn record_upstream(
        &self,
        messages: Vec<UpstreamRecord>,
    ) -> Result<Vec<bool>, StorageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.record_upstream_now(messages).await
    }

    async fn upstream_after(
        &self,
        store: &str,
        message_type: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        let store = store.to_owned();
        let message_type = message_type.map(str::to_owned);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            read_upstream(
                inner,
                "WHERE store = ?1 AND cursor > ?2 AND (?3 IS NULL OR message_type = ?3)
                 ORDER BY cursor LIMIT ?4",
                params![store, after, message_type, limit],
            )
        })
        .await
    }

    async fn upstream_since(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            read_upstream(
                inner,
                "WHERE cursor > ?1 ORDER BY cursor LIMIT ?2",
                params![after, limit],
            )
        })
        .await
    }

    async fn record_receipts(&self, receipts: Vec<ReceiptRecord>) -> Result<(), StorageError> {
        if receipts.is_empty() {
            return Ok(());
        }
        self.run(move |inner| {
            let sql = failed("cannot record receipts");
            let mut connection = inner.durable_writer().map_err(&sql)?;
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&sql)?;
            {
                let mut stmt = transaction.prepare_cached(RECORD_RECEIPT).map_err(&sql)?;
                for r in &receipts {
                    let receipt = &r.receipt;
                    stmt.execute(params![
                        r.store,
                        r.terminal,
                        r.seen_ms,
                        receipt.applied_up_to,
                        receipt.highest_applied,
                        i64::try_from(receipt.quarantined).unwrap_or(i64::MAX),
                        i64::try_from(receipt.outbox).unwrap_or(i64::MAX),
                        receipt.stopping,
                        receipt.run,
                        i64::try_from(receipt.n).unwrap_or(i64::MAX),
                        receipt.verified_seq,
                        receipt.gap,
                    ])
                    .map_err(&sql)?;
                }
            }
            transaction.commit().map_err(&sql)
        })
        .await
    }

    async fn fleet(&self, store: Option<&str>) -> Result<Vec<TerminalRecord>, StorageError> {
        let store = store.map(str::to_owned);
        self.run(move |inner| {
            let sql = failed("cannot read the fleet");
            let connection = inner.reader();
            let mut stmt = connection
                .prepare_cached(
                    "SELECT fleet.store, terminal, first_seen_ms, last_seen_ms, applied_up_to,
                        highest_applied, quarantined, outbox, applied_changed_ms, stopping,
                        outbox.published_at, verified_seq, gap
                     FROM fleet LEFT JOIN outbox
                        ON outbox.store = fleet.store AND outbox.seq = fleet.applied_up_to + 1
                     WHERE ?1 IS NULL OR fleet.store = ?1 ORDER BY fleet.store, terminal",
                )
                .map_err(&sql)?;
            let rows = stmt
                .query_map([store], terminal_from_row)
                .and_then(Iterator::collect)
                .map_err(&sql)?;
            Ok(rows)
        })
        .await
    }

    async fn forget_terminal(&self, store: &str, terminal: &str) -> Result<bool, StorageError> {
        let (store, terminal) = (store.to_owned(), terminal.to_owned());
        self.run(move |inner| {
            let sql = failed("cannot forget the terminal");
            let removed = inner
                .durable_writer()
                .map_err(&sql)?
                .execute(
                    "DELETE FROM fleet WHERE store = ? AND terminal = ?",
                    [&store, &terminal],
                )
                .map_err(&sql)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StorageError> {
        let hash = hash.to_owned();
        self.run(move |inner| {
            let found = inner
                .reader()
                .prepare_cached("SELECT name, hash, stores, created_at FROM tokens WHERE hash = ?")
                .and_then(|mut stmt| stmt.query_row([&hash], token_from_row).optional())
                .map_err(failed("cannot look the token up"))?;
            found.map(with_stores).transpose()
        })
        .await
    }
}

/// The latest receipt of a run wins; another run's replaces it.
const RECORD_RECEIPT: &str = "
    INSERT INTO fleet (store, terminal, first_seen_ms, last_seen_ms, applied_up_to,
        highest_applied, quarantined, outbox, applied_changed_ms, stopping, run, n,
        verified_seq, gap)
    VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?3, ?8, ?9, ?10, ?11, ?12)
    ON CONFLICT (store, terminal) DO UPDATE SET
        last_seen_ms = max(fleet.last_seen_ms, excluded.last_seen_ms),
        applied_changed_ms = CASE WHEN excluded.applied_up_to != fleet.applied_up_to
            THEN excluded.last_seen_ms ELSE fleet.applied_changed_ms END,
        applied_up_to = excluded.applied_up_to,
        highest_applied = excluded.highest_applied,
        quarantined = excluded.quarantined,
        outbox = excluded.outbox,
        stopping = excluded.stopping,
        run = excluded.run,
        n = excluded.n,
        verified_seq = excluded.verified_seq,
        gap = excluded.gap
    WHERE excluded.run != fleet.run OR excluded.n > fleet.n";

/// Upstream messages chosen by `clause` (the query's `WHERE ... LIMIT`).
fn read_upstream(
    inner: &Inner,
    clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Received>, StorageError> {
    let sql = failed("cannot read upstream messages");
    let connection = inner.reader();
    let mut stmt = connection
        .prepare_cached(&format!(
            "SELECT cursor, store, terminal, message_type, message_id, created_at, payload,
                received_ms
             FROM upstream {clause}"
        ))
        .map_err(&sql)?;
    stmt.query_map(params, |row| {
        Ok(Received {
            cursor: row.get(0)?,
            record: UpstreamRecord {
                store: row.get(1)?,
                terminal: row.get(2)?,
                message_type: row.get(3)?,
                message_id: row.get(4)?,
                created_at: row.get(5)?,
                payload: row.get(6)?,
            },
            received_ms: row.get(7)?,
        })
    })
    .and_then(Iterator::collect)
    .map_err(&sql)
}

fn terminal_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TerminalRecord> {
    Ok(TerminalRecord {
        store: row.get(0)?,
        terminal: row.get(1)?,
        first_seen_ms: row.get(2)?,
        last_seen_ms: row.get(3)?,
        applied_up_to: row.get(4)?,
        highest_applied: row.get(5)?,
        quarantined: row.get(6)?,
        outbox: row.get(7)?,
        applied_changed_ms: row.get(8)?,
        stopping: row.get(9)?,
        behind_since_ms: row.get(10)?,
        verified_seq: row.get(11)?,
        gap: row.get(12)?,
    })
}

impl SqliteStorage {
    async fn record_upstream_now(
        &self,
        messages: Vec<UpstreamRecord>,
    ) -> Result<Vec<bool>, StorageError> {
        self.run(move |inner| {
            let sql = failed("cannot record upstream messages");
            let mut connection = inner.durable_writer().map_err(&sql)?;
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&sql)?;
            let now = unix_now_ms();
            let mut new = Vec::with_capacity(messages.len());
            {
                let mut stmt = transaction
                    .prepare_cached(
                        "INSERT INTO upstream (store, terminal, message_type, message_id,
                            created_at, received_ms, payload)
                         VALUES (?, ?, ?, ?, ?, ?, ?)
                         ON CONFLICT (store, terminal, message_id) DO NOTHING",
                    )
                    .map_err(&sql)?;
                for m in &messages {
                    let inserted = stmt
                        .execute(params![
                            m.store,
                            m.terminal,
                            m.message_type,
                            m.message_id,
                            m.created_at,
                            now,
                            m.payload
                        ])
                        .map_err(&sql)?;
                    new.push(inserted > 0);
                }
            }
            transaction.commit().map_err(&sql)?;
            Ok(new)
        })
        .await
    }
}

/// Catalog rows `(entity, id, state, seq)` as entries.
fn catalog_entries(
    rows: Vec<(String, String, String, i64)>,
) -> Result<Vec<CatalogEntry>, StorageError> {
    rows.into_iter()
        .map(|(entity, id, state, seq)| {
            Ok(CatalogEntry {
                entity,
                id,
                state: parse_state(&state)?,
                seq,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_connection_is_in_wal_mode_and_syncs_fully() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let storage = SqliteStorage::open(dir.path().join("backend.db"))
            .await
            .expect("opens");
        let pragma = |connection: &Connection, name: &str| -> String {
            connection
                .pragma_query_value(None, name, |row| row.get::<_, rusqlite::types::Value>(0))
                .map(|value| match value {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(text) => text.to_lowercase(),
                    other => format!("{other:?}"),
                })
                .expect("the pragma reads")
        };
        for connection in [&*storage.inner.writer(), &*storage.inner.reader()] {
            assert_eq!(pragma(connection, "journal_mode"), "wal");
            assert_eq!(pragma(connection, "synchronous"), "2", "FULL");
        }
        // A mark commits without a flush, and leaves the writer syncing fully.
        storage
            .mark_published(&[("STORE-1".into(), 1)])
            .await
            .expect("marks");
        assert_eq!(
            pragma(&storage.inner.writer(), "synchronous"),
            "2",
            "FULL again after a mark"
        );
        // A mark that could not switch back leaves the flag: the next
        // durable write switches back first.
        storage
            .inner
            .writer()
            .pragma_update(None, "synchronous", "NORMAL")
            .expect("switched");
        storage.inner.not_full.store(true, Ordering::SeqCst);
        storage.prune_keys(Duration::ZERO).await.expect("prunes");
        assert_eq!(
            pragma(&storage.inner.writer(), "synchronous"),
            "2",
            "FULL before a durable write"
        );
        // WAL is a property of the file: any other connection sees it.
        let raw = Connection::open(storage.path()).expect("opens");
        assert_eq!(pragma(&raw, "journal_mode"), "wal");
    }

    #[test]
    fn only_a_database_in_memory_is_taken_for_one() {
        for path in [
            "",
            ":memory:",
            "file::memory:",
            "file:x?mode=memory",
            "file:x?cache=shared&mode=memory",
        ] {
            assert!(in_memory(Path::new(path)), "{path:?}");
        }
        for path in [
            "backend.db",
            "file:backend.db",
            "file:x?mode=rwc",
            "./:memory:",
        ] {
            assert!(!in_memory(Path::new(path)), "{path:?}");
        }
    }
}
