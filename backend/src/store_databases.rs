//! The store databases: one SQLite database per store, where the plugins
//! apply what the store's terminals sent upstream (orders into `orders`),
//! as they apply the back office's changes on a terminal.
//!
//! The upstream consumer records each message once and acknowledges it
//! after that commit; this task follows the record by its cursor and hands
//! each store its messages in order. A store database keeps its own cursor
//! in the transaction of the writes it covers, so each message applies
//! once, whatever stops the backend when. A store database opened afresh
//! (new, deleted, or closed to make room) first catches up from its own
//! cursor; one that cannot take its messages (a full disk, a handler that
//! asks to try again) is set aside and tried again with a growing wait
//! while the other stores go on. The folder's `applied-up-to` file only
//! spares a restart from reading the whole record again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use possync_core::{Backoff, LicenseKey, Registry, StoreApplied, StoreDatabase, UpstreamEntry};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::events;
use crate::fleet::Counters;
use crate::service::stopped;
use crate::storage::{Received, Storage};

/// Messages read from the record at a time.
const ROUND: usize = 200;

/// How often the record is read when this process recorded nothing (the
/// upstream consumer may run in another backend process).
const POLL: Duration = Duration::from_secs(1);

/// A store set aside, or the record that fails, waits from 250 ms up to
/// 30 s between tries.
const HELD: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// Store databases kept open; the one used least recently is closed to
/// open another.
const OPEN_MAX: usize = 64;

/// The name of the file that says how far every store is applied.
const PROGRESS_FILE: &str = "applied-up-to";

/// What the task needs to know of the backend.
pub(crate) struct Settings {
    pub(crate) dir: PathBuf,
    pub(crate) types: Vec<String>,
    pub(crate) max_message_bytes: usize,
}

/// Applies recorded upstream messages to their stores' databases.
pub(crate) struct StoreDatabases<S> {
    storage: Arc<S>,
    registry: Arc<Registry>,
    settings: Arc<Settings>,
    counters: Arc<Counters>,
    /// The backend database's identity: cursors mean something only in it.
    record: String,
    open: HashMap<String, (u64, StoreDatabase)>,
    uses: u64,
    /// Stores set aside after a failure, with their next try.
    parked: HashMap<String, Parked>,
}

struct Parked {
    tries: u32,
    retry_at: Instant,
    /// Where the store's database is applied up to: the record is read
    /// again from here.
    applied_up_to: i64,
}

impl<S: Storage> StoreDatabases<S> {
    pub(crate) fn new(
        storage: Arc<S>,
        registry: Arc<Registry>,
        settings: Settings,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            storage,
            registry,
            settings: Arc::new(settings),
            counters,
            record: String::new(),
            open: HashMap::new(),
            uses: 0,
            parked: HashMap::new(),
        }
    }

    /// Applies until `stop` turns true.
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut recorded = self.counters.messages_recorded();
        let mut failures: u32 = 0;
        self.record = loop {
            match self.storage.catalog_id().await {
                Ok(record) => break record,
                Err(err) => {
                    if !record_failed(&err, &mut failures, &mut stop).await {
                        return;
                    }
                }
            }
        };
        let mut read_from = read_progress(&self.settings.dir, &self.record);
        events::store_databases_started(&self.settings.dir, read_from);
        failures = 0;
        loop {
            if !self.retry_parked(read_from, &mut stop).await {
                return;
            }
            let round = match self.storage.upstream_since(read_from, ROUND).await {
                Ok(round) => round,
                Err(err) => {
                    if !record_failed(&err, &mut failures, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            failures = 0;
            let Some(last) = round.last().map(|entry| entry.cursor) else {
                let next_retry = self
                    .parked
                    .values()
                    .map(|parked| parked.retry_at)
                    .min()
                    .unwrap_or_else(|| Instant::now() + POLL);
                tokio::select! {
                    _ = recorded.changed() => {}
                    () = tokio::time::sleep(POLL) => {}
                    () = tokio::time::sleep_until(next_retry) => {}
                    () = stopped(&mut stop) => return,
                }
                continue;
            };
            for (store, entries) in by_store(round) {
                // A store set aside reads its messages again when tried.
                if !self.parked.contains_key(&store) {
                    self.bring_up(&store, Some(entries), last).await;
                }
            }
            read_from = last;
            // A store set aside holds the progress back to where it is.
            let progress = self
                .parked
                .values()
                .map(|parked| parked.applied_up_to)
                .fold(read_from, i64::min);
            if let Err(err) = write_progress(&self.settings.dir, &self.record, progress) {
                events::store_databases_progress_unsaved(&self.settings.dir, &err.to_string());
            }
        }
    }

    /// Tries again the stores set aside whose time has come, each up to
    /// `up_to`; `false` if asked to stop.
    async fn retry_parked(&mut self, up_to: i64, stop: &mut watch::Receiver<bool>) -> bool {
        let now = Instant::now();
        let due: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, parked)| parked.retry_at <= now)
            .map(|(store, _)| store.clone())
            .collect();
        for store in due {
            if *stop.borrow() {
                return false;
            }
            self.bring_up(&store, None, up_to).await;
        }
        !*stop.borrow()
    }

    /// Applies `store`'s messages up to cursor `up_to`: `entries` when its
    /// database is open and caught up, else what the record holds after
    /// the database's own cursor. A failure sets the store aside.
    async fn bring_up(&mut self, store: &str, entries: Option<Vec<Received>>, up_to: i64) {
        let Ok(key) = LicenseKey::new(store) else {
            // The upstream consumer records only valid store ids.
            events::store_databases_skipped(store, entries.map_or(0, |e| e.len()));
            return;
        };
        // A file deleted while open is rebuilt, not written on unseen.
        let cached = self
            .open
            .remove(store)
            .map(|(_, database)| database)
            .filter(|database| database.path().exists());
        let caught_up = cached.is_some() && !self.parked.contains_key(store);
        let database = match cached {
            Some(database) => Ok(database),
            None => self.open_database(key).await,
        };
        let database = match database {
            Ok(database) => database,
            Err(reason) => return self.park(store, None, &reason),
        };
        let batch = match entries.filter(|_| caught_up) {
            Some(entries) => entries,
            // Catching up: one round at a time, so that one store with a
            // long history does not hold up the others.
            None if database.applied_up_to() >= up_to => return self.caught_up(store, database),
            None => match self
                .storage
                .upstream_after(store, None, database.applied_up_to(), ROUND)
                .await
            {
                Ok(mut batch) => {
                    batch.retain(|entry| entry.cursor <= up_to);
                    if batch.is_empty() {
                        return self.caught_up(store, database);
                    }
                    batch
                }
                Err(err) => return self.park(store, Some(database), &err.to_string()),
            },
        };
        let (back, applied) = apply(database, batch).await;
        let Some(database) = back else {
            // Applying panicked, taking the database with it.
            return self.park(store, None, &applied.err().unwrap_or_default());
        };
        match applied {
            Ok(done) => {
                self.count(store, &done);
                match done.waiting {
                    Some(reason) => self.park(store, Some(database), &reason),
                    None if caught_up || database.applied_up_to() >= up_to => {
                        self.caught_up(store, database);
                    }
                    None => self.behind(store, database),
                }
            }
            Err(reason) => self.park(store, Some(database), &reason),
        }
    }

    /// `store`'s database holds every message up to the round's end.
    fn caught_up(&mut self, store: &str, database: StoreDatabase) {
        if let Some(parked) = self.parked.remove(store)
            && parked.tries > 0
        {
            events::store_database_recovered(store, parked.tries);
        }
        self.keep_open(store, database);
    }

    /// `store`'s database took a round and has more to catch up: the next
    /// round comes after the other stores' turn.
    fn behind(&mut self, store: &str, database: StoreDatabase) {
        let tries = self.parked.get(store).map_or(0, |parked| parked.tries);
        self.parked.insert(
            store.to_owned(),
            Parked {
                tries,
                retry_at: Instant::now(),
                applied_up_to: database.applied_up_to(),
            },
        );
        self.keep_open(store, database);
    }

    /// Opens `key`'s database on a blocking thread. (Not an `async fn` of
    /// `&self`: the open databases cannot be shared across threads.)
    fn open_database(
        &self,
        key: LicenseKey,
    ) -> impl Future<Output = Result<StoreDatabase, String>> + Send + use<S> {
        let registry = Arc::clone(&self.registry);
        let settings = Arc::clone(&self.settings);
        let record = self.record.clone();
        let opening = tokio::task::spawn_blocking(move || {
            StoreDatabase::open(
                &settings.dir,
                &key,
                &record,
                &settings.types,
                registry,
                settings.max_message_bytes,
            )
            .map_err(|err| err.to_string())
        });
        async move {
            opening
                .await
                .unwrap_or_else(|panic| Err(format!("opening panicked: {panic}")))
        }
    }

    /// Sets `store` aside until its next try; its database, if open, is
    /// kept so that the try resumes where it stopped.
    fn park(&mut self, store: &str, database: Option<StoreDatabase>, reason: &str) {
        let applied_up_to = database
            .as_ref()
            .map(StoreDatabase::applied_up_to)
            .or_else(|| self.parked.get(store).map(|parked| parked.applied_up_to))
            .unwrap_or(0);
        let tries = self.parked.get(store).map_or(0, |parked| parked.tries) + 1;
        let delay = HELD.delay(tries);
        events::store_databases_held(
            store,
            reason,
            delay.as_millis(),
            tries == 1 || tries.is_multiple_of(20),
        );
        self.parked.insert(
            store.to_owned(),
            Parked {
                tries,
                retry_at: Instant::now() + delay,
                applied_up_to,
            },
        );
        if let Some(database) = database {
            self.keep_open(store, database);
        }
    }

    fn keep_open(&mut self, store: &str, database: StoreDatabase) {
        if self.open.len() >= OPEN_MAX
            && let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(store, _)| store.clone())
        {
            self.open.remove(&oldest);
        }
        self.uses += 1;
        self.open.insert(store.to_owned(), (self.uses, database));
    }

    fn count(&self, store: &str, done: &StoreApplied) {
        for message_type in &done.applied {
            self.counters.applied(message_type);
        }
        for message_type in &done.stale {
            self.counters.stale(message_type);
        }
        for refused in &done.refused {
            self.counters.unapplied(&refused.message_type);
            events::store_database_refused(
                store,
                refused.cursor,
                &refused.message_type,
                &refused.reason,
            );
        }
        for message_type in &done.skipped {
            events::store_database_skipped_type(store, message_type);
        }
    }
}

/// The record could not be read: says so and waits before the next try;
/// `false` if asked to stop meanwhile.
async fn record_failed(
    err: &crate::storage::StorageError,
    failures: &mut u32,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    *failures += 1;
    let delay = HELD.delay(*failures);
    events::store_databases_held(
        "(record)",
        &err.to_string(),
        delay.as_millis(),
        *failures == 1,
    );
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = stopped(stop) => false,
    }
}

/// Applies `entries` to `database` on a blocking thread; gives the
/// database back unless applying panicked.
async fn apply(
    mut database: StoreDatabase,
    entries: Vec<Received>,
) -> (Option<StoreDatabase>, Result<StoreApplied, String>) {
    tokio::task::spawn_blocking(move || {
        let done = database
            .apply(&as_entries(&entries))
            .map_err(|err| err.to_string());
        (Some(database), done)
    })
    .await
    .unwrap_or_else(|panic| (None, Err(format!("applying panicked: {panic}"))))
}

/// A round's entries, store by store, each store's in cursor order.
fn by_store(round: Vec<Received>) -> Vec<(String, Vec<Received>)> {
    let mut stores: Vec<(String, Vec<Received>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for entry in round {
        let store = entry.record.store.clone();
        match index.get(&store) {
            Some(&at) => stores[at].1.push(entry),
            None => {
                index.insert(store.clone(), stores.len());
                stores.push((store, vec![entry]));
            }
        }
    }
    stores
}

fn as_entries(received: &[Received]) -> Vec<UpstreamEntry<'_>> {
    received
        .iter()
        .map(|entry| UpstreamEntry {
            cursor: entry.cursor,
            terminal: &entry.record.terminal,
            message_type: &entry.record.message_type,
            message_id: &entry.record.message_id,
            created_at: &entry.record.created_at,
            payload: &entry.record.payload,
        })
        .collect()
}

/// The cursor every store is applied up to, as last saved for `record`;
/// 0 (read the record from its start, which applies nothing twice) if
/// there is none, or it was saved for another backend database.
fn read_progress(dir: &Path, record: &str) -> i64 {
    std::fs::read_to_string(dir.join(PROGRESS_FILE))
        .ok()
        .and_then(|text| {
            let (saved_for, cursor) = text.trim().split_once(' ')?;
            (saved_for == record).then(|| cursor.parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Saves the cursor every store is applied up to, whole or not at all.
fn write_progress(dir: &Path, record: &str, cursor: i64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{PROGRESS_FILE}.tmp"));
    std::fs::write(&temporary, format!("{record} {cursor}\n"))?;
    std::fs::rename(temporary, dir.join(PROGRESS_FILE))
}

#[cfg(test)]
mod tests {
    use possync_orders as _;

    use super::*;
    use crate::SqliteStorage;
    use crate::storage::UpstreamRecord;

    fn order(store: &str, id: &str) -> UpstreamRecord {
        UpstreamRecord {
            store: store.into(),
            terminal: "till-1".into(),
            message_type: "order".into(),
            message_id: id.into(),
            created_at: "2026-12-02T10:00:00Z".into(),
            payload: format!(
                r#"{{"order_id":"{id}","lines":[{{"product_id":"P","quantity":1,"unit_price":1}}],"total":1}}"#
            ),
        }
    }

    /// The orders in `store`'s database under `dir`, by id.
    fn orders(dir: &Path, store: &str) -> Vec<String> {
        // Read-only: opening to look must not make a file that is not there.
        let Ok(connection) = rusqlite::Connection::open_with_flags(
            dir.join(format!("{store}.db")),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return Vec::new();
        };
        let Ok(mut statement) = connection.prepare("SELECT id FROM orders ORDER BY id") else {
            return Vec::new();
        };
        statement
            .query_map([], |row| row.get(0))
            .and_then(Iterator::collect)
            .unwrap_or_default()
    }

    /// The task over `storage`, applying into `dir` until the returned
    /// sender says stop.
    fn start(
        storage: &Arc<SqliteStorage>,
        dir: &Path,
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let registry = Arc::new(
            Registry::from_config(&Default::default()).expect("the built-in plugins load"),
        );
        let task = StoreDatabases::new(
            Arc::clone(storage),
            registry,
            Settings {
                dir: dir.to_owned(),
                types: vec!["order".into()],
                max_message_bytes: 1 << 20,
            },
            Arc::new(Counters::default()),
        );
        let (stop, stopped) = watch::channel(false);
        (stop, tokio::spawn(task.run(stopped)))
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn storage(dir: &Path, name: &str) -> Arc<SqliteStorage> {
        Arc::new(SqliteStorage::open(dir.join(name)).await.expect("opens"))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_whose_database_fails_is_set_aside_while_the_others_go_on_and_catches_up_later()
    {
        let temporary = tempfile::tempdir().expect("tempdir");
        let storage = storage(temporary.path(), "backend.db").await;
        storage
            .record_upstream(vec![order("BAD", "O-1"), order("GOOD", "O-2")])
            .await
            .expect("recorded");
        let dir = temporary.path().join("stores");
        std::fs::create_dir_all(&dir).expect("folder");
        std::fs::write(dir.join("BAD.db"), vec![b'x'; 8192]).expect("a damaged file");
        let (stop, task) = start(&storage, &dir);
        until("the good store's order", || orders(&dir, "GOOD") == ["O-2"]).await;
        storage
            .record_upstream(vec![order("GOOD", "O-3")])
            .await
            .expect("recorded");
        until("the good store's next order", || {
            orders(&dir, "GOOD") == ["O-2", "O-3"]
        })
        .await;

        std::fs::remove_file(dir.join("BAD.db")).expect("the damaged file removed");
        until("the set-aside store to catch up", || {
            orders(&dir, "BAD") == ["O-1"]
        })
        .await;
        let _ = stop.send(true);
        task.await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_deleted_store_database_is_rebuilt_from_the_record() {
        let temporary = tempfile::tempdir().expect("tempdir");
        let storage = storage(temporary.path(), "backend.db").await;
        storage
            .record_upstream(vec![order("A", "O-1"), order("B", "O-2")])
            .await
            .expect("recorded");
        let dir = temporary.path().join("stores");
        let (stop, task) = start(&storage, &dir);
        until("both stores", || {
            orders(&dir, "A") == ["O-1"] && orders(&dir, "B") == ["O-2"]
        })
        .await;
        let _ = stop.send(true);
        task.await.expect("stops");

        std::fs::remove_file(dir.join("A.db")).expect("one store's database deleted");
        storage
            .record_upstream(vec![order("A", "O-3")])
            .await
            .expect("recorded");
        let (stop, task) = start(&storage, &dir);
        until("A rebuilt whole", || orders(&dir, "A") == ["O-1", "O-3"]).await;
        let _ = stop.send(true);
        task.await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_database_deleted_while_the_backend_runs_is_rebuilt_at_its_next_message() {
        let temporary = tempfile::tempdir().expect("tempdir");
        let storage = storage(temporary.path(), "backend.db").await;
        storage
            .record_upstream(vec![order("A", "O-1")])
            .await
            .expect("recorded");
        let dir = temporary.path().join("stores");
        let (stop, task) = start(&storage, &dir);
        until("A's first order", || orders(&dir, "A") == ["O-1"]).await;
        for file in ["A.db", "A.db-wal", "A.db-shm"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        storage
            .record_upstream(vec![order("A", "O-2")])
            .await
            .expect("recorded");
        until("A rebuilt with both", || {
            orders(&dir, "A") == ["O-1", "O-2"]
        })
        .await;
        let _ = stop.send(true);
        task.await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_catching_up_a_long_history_lets_the_others_go_first() {
        let temporary = tempfile::tempdir().expect("tempdir");
        let storage = storage(temporary.path(), "backend.db").await;
        let history: Vec<UpstreamRecord> = (0..10 * ROUND)
            .map(|n| order("BIG", &format!("O-{n:05}")))
            .collect();
        storage.record_upstream(history).await.expect("recorded");
        let dir = temporary.path().join("stores");
        let (stop, task) = start(&storage, &dir);
        until("BIG applied", || orders(&dir, "BIG").len() == 10 * ROUND).await;
        let _ = stop.send(true);
        task.await.expect("stops");

        // BIG's database lost: at its next order it catches up round by
        // round from the start, and SMALL's order, recorded after, does not
        // wait for all of it.
        for file in ["BIG.db", "BIG.db-wal", "BIG.db-shm"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        storage
            .record_upstream(vec![order("BIG", "O-new"), order("SMALL", "S-1")])
            .await
            .expect("recorded");
        let (stop, task) = start(&storage, &dir);
        until("SMALL's order", || orders(&dir, "SMALL") == ["S-1"]).await;
        assert!(
            orders(&dir, "BIG").len() < 10 * ROUND,
            "SMALL went before BIG caught up"
        );
        until("BIG rebuilt", || {
            orders(&dir, "BIG").len() == 10 * ROUND + 1
        })
        .await;
        let _ = stop.send(true);
        task.await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn store_databases_of_another_backend_database_are_refused_not_skipped() {
        let temporary = tempfile::tempdir().expect("tempdir");
        let dir = temporary.path().join("stores");
        let old = storage(temporary.path(), "old.db").await;
        old.record_upstream((0..5).map(|n| order("A", &format!("old-{n}"))).collect())
            .await
            .expect("recorded");
        let (stop, task) = start(&old, &dir);
        until("the old record applied", || orders(&dir, "A").len() == 5).await;
        let _ = stop.send(true);
        task.await.expect("stops");

        // The backend's database replaced (a backup restored, a move to PostgreSQL).
        let new = storage(temporary.path(), "new.db").await;
        new.record_upstream(vec![
            order("A", "new-0"),
            order("C", "new-0"),
            order("C", "new-1"),
        ])
        .await
        .expect("recorded");
        let (stop, task) = start(&new, &dir);
        until("C's orders, none skipped", || {
            orders(&dir, "C") == ["new-0", "new-1"]
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            orders(&dir, "A").len(),
            5,
            "A's old database is left alone, not mixed"
        );
        let _ = stop.send(true);
        task.await.expect("stops");
    }
}
