//! The store databases: one SQLite database per store, where the plugins
//! apply what the store's terminals sent upstream (orders into `orders`),
//! as they apply the back office's changes on a terminal.
//!
//! The upstream consumer records each message once and acknowledges it
//! after that commit; this task follows the record by its cursor and hands
//! each store its messages in order. A store database keeps its own cursor
//! in the transaction of the writes it covers, so each message applies
//! once, whatever stops the backend when. The folder's `applied-up-to`
//! file only spares a restart from reading the record from the start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use possync_core::{Backoff, LicenseKey, Registry, StoreApplied, StoreDatabase, UpstreamEntry};
use tokio::sync::watch;

use crate::events;
use crate::fleet::Counters;
use crate::service::stopped;
use crate::storage::{Received, Storage};

/// Messages read from the record per round.
const ROUND: usize = 500;

/// How often the record is read when this process recorded nothing (the
/// upstream consumer may run in another backend process).
const POLL: Duration = Duration::from_secs(1);

/// A store database or the record that fails waits from 250 ms up to 5 s
/// between tries.
const HELD: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));

/// Store databases kept open; more are closed and opened again as needed.
const OPEN_MAX: usize = 64;

/// The name of the file that says how far every store is applied.
const PROGRESS_FILE: &str = "applied-up-to";

/// Applies recorded upstream messages to their stores' databases.
pub(crate) struct StoreDatabases<S> {
    storage: Arc<S>,
    registry: Arc<Registry>,
    dir: PathBuf,
    max_message_bytes: usize,
    counters: Arc<Counters>,
    open: HashMap<String, StoreDatabase>,
}

impl<S: Storage> StoreDatabases<S> {
    pub(crate) fn new(
        storage: Arc<S>,
        registry: Arc<Registry>,
        dir: PathBuf,
        max_message_bytes: usize,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            storage,
            registry,
            dir,
            max_message_bytes,
            counters,
            open: HashMap::new(),
        }
    }

    /// Applies until `stop` turns true.
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut recorded = self.counters.messages_recorded();
        let mut progress = read_progress(&self.dir);
        events::store_databases_started(&self.dir, progress);
        let mut failures: u32 = 0;
        loop {
            let round = match self.storage.upstream_since(progress, ROUND).await {
                Ok(round) => round,
                Err(err) => {
                    failures += 1;
                    let delay = HELD.delay(failures);
                    events::store_databases_held(
                        "(record)",
                        &err.to_string(),
                        delay.as_millis(),
                        failures == 1,
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = stopped(&mut stop) => return,
                    }
                }
            };
            failures = 0;
            let Some(last) = round.last().map(|entry| entry.cursor) else {
                tokio::select! {
                    _ = recorded.changed() => {}
                    () = tokio::time::sleep(POLL) => {}
                    () = stopped(&mut stop) => return,
                }
                continue;
            };
            for (store, entries) in by_store(round) {
                if !self.apply(&store, entries, &mut stop).await {
                    return;
                }
            }
            progress = last;
            if let Err(err) = write_progress(&self.dir, progress) {
                events::store_databases_progress_unsaved(&self.dir, &err.to_string());
            }
        }
    }

    /// Applies one store's entries, trying again while its database
    /// cannot take them; `false` if asked to stop meanwhile.
    async fn apply(
        &mut self,
        store: &str,
        entries: Vec<Received>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let Ok(key) = LicenseKey::new(store) else {
            // The upstream consumer records only valid store ids.
            events::store_databases_skipped(store, entries.len());
            return true;
        };
        let entries = Arc::new(entries);
        let mut database = self.open.remove(store);
        let mut attempts: u32 = 0;
        loop {
            let registry = Arc::clone(&self.registry);
            let dir = self.dir.clone();
            let max_message_bytes = self.max_message_bytes;
            let key = key.clone();
            let batch = Arc::clone(&entries);
            let applied = tokio::task::spawn_blocking(move || {
                let mut database = match database {
                    Some(database) => database,
                    None => StoreDatabase::open(&dir, &key, registry, max_message_bytes)
                        .map_err(|err| err.to_string())?,
                };
                let done = database.apply(&as_entries(&batch));
                Ok::<_, String>((database, done))
            })
            .await
            .unwrap_or_else(|panic| Err(format!("applying panicked: {panic}")));
            let wait = match applied {
                Ok((open, done)) => {
                    database = Some(open);
                    match done {
                        Ok(done) => {
                            self.count(store, &done);
                            match done.waiting {
                                None => break,
                                Some(reason) => reason,
                            }
                        }
                        Err(held) => held.to_string(),
                    }
                }
                Err(reason) => {
                    database = None;
                    reason
                }
            };
            attempts += 1;
            let delay = HELD.delay(attempts);
            events::store_databases_held(store, &wait, delay.as_millis(), attempts == 1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(stop) => return false,
            }
        }
        if let Some(database) = database {
            if self.open.len() >= OPEN_MAX {
                self.open.clear();
            }
            self.open.insert(store.to_owned(), database);
        }
        true
    }

    fn count(&self, store: &str, done: &StoreApplied) {
        for message_type in &done.applied {
            self.counters.applied(message_type);
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
    }
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

/// The cursor every store is applied up to, as last saved; 0 (read the
/// record from its start, which applies nothing twice) if there is none.
fn read_progress(dir: &Path) -> i64 {
    std::fs::read_to_string(dir.join(PROGRESS_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Saves the cursor every store is applied up to, whole or not at all.
fn write_progress(dir: &Path, cursor: i64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{PROGRESS_FILE}.tmp"));
    std::fs::write(&temporary, format!("{cursor}\n"))?;
    std::fs::rename(temporary, dir.join(PROGRESS_FILE))
}
