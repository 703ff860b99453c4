//! Snapshots: how a terminal with a gap converges. It asks the backend,
//! over its upstream identity, for its store's catalog at a sequence
//! number S, chunk by chunk; the chunks come back to its channel alone
//! (RabbitMQ's direct reply-to). Each chunk is applied by the plugins'
//! own handlers into a staging database beside the terminal's, and the
//! whole snapshot is swapped in in one transaction: the POS app reads the
//! old catalog or the new one, never half of one.
//!
//! While a snapshot runs the terminal takes nothing from its queue: the
//! changes that arrive meanwhile wait there. After the swap, those up to S
//! are duplicates and those after it apply, each once. A snapshot that
//! fails (the connection lost, no answer) is dropped and asked again
//! later from the start.
//!
//! An entity's state is restored through the type its plugin declares as
//! replacing it (`x-possync-entity` with `"change": "replace"`), so every
//! plugin with such a declaration takes part without code of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use rusqlite::params;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::applier::{Applier, Limits};
use crate::connection::{self, BrokerError};
use crate::dispatch::Outcome;
use crate::entity::{ChangeKind, EntityRule};
use crate::events;
use crate::identity::{LicenseKey, TerminalId};
use crate::inbound::Inbound;
use crate::registry::Registry;
use crate::sequence::SyncState;
use crate::store::{Database, DatabaseError, unix_now_ms};
use crate::topology::routing_key;
use crate::upstream::{
    SNAPSHOT_TYPE, SnapshotChunk, SnapshotEntity, SnapshotRequest, UpstreamMessage, upstream_key,
};

/// RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Entities asked for per chunk.
const CHUNK: u32 = 2_000;

/// How long the terminal waits for a chunk before it drops the snapshot.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long it waits for the first: no answer then means no backend reads
/// the requests (one of an earlier release, or one that is down).
const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(5);

/// A jump in the sequence is given this long to fill (the relay sends a
/// change again late) before it is taken for a loss.
const JUMP_WAIT: Duration = Duration::from_secs(30);

/// A failed snapshot is asked again after 5 s, growing to 5 minutes.
const RETRY: crate::Backoff = crate::Backoff::new(Duration::from_secs(5), Duration::from_secs(300));

/// How often a running snapshot says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Why a snapshot did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
    /// No queue takes the store's snapshot requests: no backend serves it.
    #[error(
        "no possync backend takes this store's snapshot requests (no queue is bound to them); start one with [upstream] enabled, or ignore this where the store has no backend"
    )]
    NoBackend,
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// No chunk came in time.
    #[error("no chunk came within {0} s: is the backend running and reading its snapshot queue?")]
    Timeout(u64),
    /// The backend could not answer.
    #[error("the backend could not answer: {0}")]
    Backend(String),
    /// A chunk could not be staged or swapped in.
    #[error("{0}")]
    Local(String),
    /// Some of the snapshot cannot be restored by the plugins enabled
    /// here: asking again changes nothing until the config does.
    #[error("{0}")]
    Incomplete(String),
}

/// When this terminal asks for a snapshot.
#[derive(Debug)]
pub(crate) struct SnapshotPlan {
    /// Asked once at a first start, before anything was applied.
    first_start: bool,
    next_try: Instant,
    failures: u32,
    /// Not asked again in this run: the enabled plugins cannot restore it.
    given_up: bool,
}

impl SnapshotPlan {
    /// A plan for a session; `first_start` when the queue was just made for
    /// a terminal that follows no catalog yet.
    pub(crate) fn new(first_start: bool) -> Self {
        Self {
            first_start,
            next_try: Instant::now(),
            failures: 0,
            given_up: false,
        }
    }

    /// Whether a snapshot is due now.
    pub(crate) fn due(&self, sync: &SyncState) -> bool {
        if self.given_up || Instant::now() < self.next_try {
            return false;
        }
        match sync.gap {
            Some(gap) => match gap.cause {
                crate::GapCause::Jump { .. } => {
                    unix_now_ms() - gap.since_ms
                        >= i64::try_from(JUMP_WAIT.as_millis()).unwrap_or(i64::MAX)
                }
                _ => true,
            },
            None => self.first_start && sync.highest_applied == 0,
        }
    }

    /// The snapshot completed.
    pub(crate) fn done(&mut self) {
        self.first_start = false;
        self.failures = 0;
    }

    /// The snapshot failed; returns when it is asked again.
    pub(crate) fn failed(&mut self, err: &SnapshotError) -> Option<Duration> {
        if matches!(err, SnapshotError::Incomplete(_)) {
            self.given_up = true;
            return None;
        }
        if self.first_start
            && matches!(
                err,
                SnapshotError::NoBackend | SnapshotError::Timeout(_) | SnapshotError::Backend(_)
            )
        {
            // Nothing to converge from: the store has no backend.
            self.first_start = false;
            return None;
        }
        self.failures += 1;
        let delay = RETRY.delay(self.failures);
        self.next_try = Instant::now() + delay;
        Some(delay)
    }
}

/// Who asks, and where.
#[derive(Debug, Clone)]
pub(crate) struct Asker {
    pub(crate) license_key: LicenseKey,
    pub(crate) terminal_id: TerminalId,
    pub(crate) exchange: String,
    /// The broker user, set as each request's `user_id`.
    pub(crate) user: String,
    pub(crate) url: String,
    pub(crate) timeout_secs: u64,
    /// The catalog the terminal follows, if any: a snapshot of another is
    /// refused.
    pub(crate) follows: Option<String>,
}

/// What a completed fetch staged.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) seq: i64,
    /// The highest of its chunks' `settled`, at least `seq`.
    pub(crate) settled: i64,
    pub(crate) catalog: String,
    pub(crate) entities: u64,
}

/// Asks for the store's catalog chunk by chunk on `connection` and hands
/// each chunk to `stage`, which applies it to the staging database.
pub(crate) async fn fetch(
    connection: &Connection,
    asker: &Asker,
    staging: &mut Option<Staging>,
) -> Result<Fetched, SnapshotError> {
    let timeout = asker.timeout_secs;
    let url = asker.url.as_str();
    let channel = connection::confirming_channel(connection, timeout, url).await?;
    let result = fetch_on(&channel, asker, staging).await;
    let _ = channel.close(200, "snapshot done".into()).await;
    result
}

async fn fetch_on(
    channel: &Channel,
    asker: &Asker,
    staging: &mut Option<Staging>,
) -> Result<Fetched, SnapshotError> {
    let (timeout, url) = (asker.timeout_secs, asker.url.as_str());
    let mut replies = connection::within(
        timeout,
        "waiting for snapshot chunks",
        url,
        channel.basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let started = Instant::now();
    let mut said_at = Instant::now();
    let mut seq = None;
    let mut settled = 0;
    let mut first_catalog: Option<String> = None;
    let mut entities: u64 = 0;
    let mut asked = ask(channel, asker, None, None).await?;
    loop {
        // A backend answers in milliseconds: the first answer, or its
        // absence, says whether one is there.
        let wait = if seq.is_none() {
            FIRST_CHUNK_TIMEOUT
        } else {
            CHUNK_TIMEOUT
        };
        let chunk = loop {
            let delivery = match tokio::time::timeout(wait, replies.next()).await {
                Err(_) => return Err(SnapshotError::Timeout(wait.as_secs())),
                Ok(None) => return Err(BrokerError::ConnectionLost.into()),
                Ok(Some(Err(err))) => {
                    return Err(
                        BrokerError::from_lapin("waiting for snapshot chunks", url, err).into(),
                    );
                }
                Ok(Some(Ok(delivery))) => delivery,
            };
            let chunk: SnapshotChunk = serde_json::from_slice(&delivery.data).map_err(|err| {
                SnapshotError::Backend(format!("a chunk that is not JSON: {err}"))
            })?;
            // A late answer to a request given up on is not this one's.
            if chunk.request == asked {
                break chunk;
            }
        };
        if let Some(reason) = chunk.error {
            return Err(SnapshotError::Backend(reason));
        }
        if chunk.store != asker.license_key.as_str() {
            return Err(SnapshotError::Backend(format!(
                "a chunk of store {}, not {}",
                chunk.store, asker.license_key
            )));
        }
        check_catalog(&chunk, asker.follows.as_deref(), first_catalog.as_deref())?;
        first_catalog.get_or_insert_with(|| chunk.catalog.clone());
        let seq = *seq.get_or_insert(chunk.seq);
        settled = settled.max(seq).max(chunk.settled);
        // The next chunk is on its way while this one is staged.
        if let Some(after) = chunk.next.clone() {
            asked = ask(channel, asker, Some(seq), Some(after)).await?;
        }
        let staged = staging
            .take()
            .ok_or_else(|| SnapshotError::Local("the staging database is gone".into()))?;
        let count = chunk.entities.len() as u64;
        let last = chunk.next.is_none();
        let catalog = chunk.catalog.clone();
        let (back, result) = tokio::task::spawn_blocking(move || {
            let mut staged = staged;
            let result = staged.stage(&chunk);
            (staged, result)
        })
        .await
        .map_err(|err| SnapshotError::Local(format!("staging panicked: {err}")))?;
        *staging = Some(back);
        result.map_err(SnapshotError::Local)?;
        entities += count;
        if said_at.elapsed() >= PROGRESS_EVERY {
            said_at = Instant::now();
            events::snapshot_progress(seq, entities, started.elapsed().as_millis());
        }
        if last {
            return Ok(Fetched {
                seq,
                settled,
                catalog,
                entities,
            });
        }
    }
}

/// Refuses a chunk of another catalog than the one the terminal follows,
/// or than the snapshot's first chunk: its `seq` counts in another
/// sequence.
fn check_catalog(
    chunk: &SnapshotChunk,
    follows: Option<&str>,
    first: Option<&str>,
) -> Result<(), SnapshotError> {
    if let Some(first) = first.filter(|first| *first != chunk.catalog) {
        return Err(SnapshotError::Backend(format!(
            "chunks of two catalogs ({first} and {}): two backends answer for this store; stop the one that is not its catalog of record",
            chunk.catalog
        )));
    }
    if let Some(follows) = follows.filter(|follows| *follows != chunk.catalog) {
        return Err(SnapshotError::Backend(format!(
            "the snapshot comes from catalog {}, but this terminal follows catalog {follows}: another backend answers for this store (stop it), or the backend's database was replaced (re-provision the terminal so it follows the new catalog)",
            chunk.catalog
        )));
    }
    Ok(())
}

/// Sends one request; returns its message id.
async fn ask(
    channel: &Channel,
    asker: &Asker,
    seq: Option<i64>,
    after: Option<(String, String)>,
) -> Result<String, SnapshotError> {
    let (timeout, url) = (asker.timeout_secs, asker.url.as_str());
    let id = uuid::Uuid::now_v7().to_string();
    let request = SnapshotRequest {
        seq,
        after,
        limit: CHUNK,
    };
    let payload = serde_json::to_string(&request)
        .ok()
        .and_then(|text| RawValue::from_string(text).ok())
        .ok_or_else(|| SnapshotError::Local("cannot write the request".into()))?;
    let message = UpstreamMessage {
        message_type: SNAPSHOT_TYPE.into(),
        license_key: asker.license_key.to_string(),
        terminal_id: asker.terminal_id.to_string(),
        message_id: id.clone(),
        created_at: crate::publisher::now_rfc3339().unwrap_or_default(),
        payload,
    };
    let body = serde_json::to_vec(&message)
        .map_err(|err| SnapshotError::Local(format!("cannot write the request: {err}")))?;
    let confirm = connection::within(
        timeout,
        "asking for a snapshot",
        url,
        channel.basic_publish(
            asker.exchange.as_str().into(),
            upstream_key(&asker.license_key, &asker.terminal_id, SNAPSHOT_TYPE)
                .as_str()
                .into(),
            // mandatory: the broker says when no backend's queue takes it.
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_reply_to(REPLY_TO.into())
                .with_user_id(asker.user.as_str().into()),
        ),
    )
    .await?;
    match connection::within(timeout, "asking for a snapshot", url, confirm).await? {
        Confirmation::Ack(Some(_)) => Err(SnapshotError::NoBackend),
        Confirmation::Ack(None) => Ok(id),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(SnapshotError::Backend(
            "the broker refused the snapshot request".into(),
        )),
    }
}

/// The staging database: a fresh database beside the terminal's, where
/// the plugins' handlers apply the snapshot's entities.
pub(crate) struct Staging {
    applier: Applier,
    path: PathBuf,
    registry: Arc<Registry>,
    license_key: LicenseKey,
    /// Entities of a kind no enabled plugin restores, by kind.
    skipped: std::collections::BTreeMap<String, u64>,
    /// Entities their handler refused, with the first reason.
    refused: (u64, Option<String>),
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Staging {
    /// Makes the staging database of the terminal's `database` afresh.
    pub(crate) fn create(
        database: &Path,
        registry: Arc<Registry>,
        license_key: &LicenseKey,
    ) -> Result<Self, DatabaseError> {
        let path = staging_path(database);
        remove_database(&path);
        let mut staged = Database::open(&path)?;
        // Only the tables of the plugins that take part: they are replaced.
        staged.migrate(registry.snapshot_migrations().iter())?;
        // Thrown away if anything stops it: no need to wait for the disk.
        staged.commit_without_sync()?;
        let limits = Limits {
            max_message_bytes: usize::MAX,
            max_attempts: 1,
            quarantine_max_rows: 100_000,
            quarantine_max_age_secs: 24 * 3600,
            applied_ids_max_age_secs: 24 * 3600,
            collapse_min_batch: 0,
            feed_keep: 0,
        };
        Ok(Self {
            applier: Applier::new(
                staged,
                Arc::clone(&registry),
                license_key.clone(),
                limits,
                crate::feed::channel(),
            ),
            path,
            registry,
            license_key: license_key.clone(),
            skipped: std::collections::BTreeMap::new(),
            refused: (0, None),
        })
    }

    /// Applies a chunk's entities through their plugins' handlers: each by
    /// the type that replaces its kind; one that type refuses (an entity
    /// only ever written by merges, such as a price for a product never
    /// sent whole) by the types that merge into its kind, in turn.
    pub(crate) fn stage(&mut self, chunk: &SnapshotChunk) -> Result<(), String> {
        let mut batch = Vec::with_capacity(chunk.entities.len());
        let mut sent = Vec::with_capacity(chunk.entities.len());
        for entity in &chunk.entities {
            match self.registry.restoring_type(&entity.entity) {
                Some((message_type, rule)) => {
                    batch.push(self.inbound(entity, &chunk.catalog, message_type, rule, "r"));
                    sent.push(entity);
                }
                None => *self.skipped.entry(entity.entity.clone()).or_default() += 1,
            }
        }
        let mut refused: Vec<(&SnapshotEntity, String)> = sent
            .into_iter()
            .zip(self.apply(&batch)?)
            .filter_map(|(entity, refusal)| refusal.map(|reason| (entity, reason)))
            .collect();
        let registry = Arc::clone(&self.registry);
        for (index, (message_type, rule)) in registry.merging_types().into_iter().enumerate() {
            let (tried, left): (Vec<_>, Vec<_>) = refused
                .into_iter()
                .partition(|(entity, _)| rule.entity == entity.entity);
            refused = left;
            if tried.is_empty() {
                continue;
            }
            // Tried before under its seq: the staging marks forget it.
            self.applier.forget_marks().map_err(|err| err.to_string())?;
            let tag = format!("m{index}");
            let batch: Vec<Inbound> = tried
                .iter()
                .map(|(entity, _)| self.inbound(entity, &chunk.catalog, message_type, rule, &tag))
                .collect();
            for ((entity, first), refusal) in tried.into_iter().zip(self.apply(&batch)?) {
                if refusal.is_some() {
                    refused.push((entity, first));
                }
            }
        }
        for (_, reason) in refused {
            self.refused.0 += 1;
            self.refused.1.get_or_insert(reason);
        }
        Ok(())
    }

    /// Applies `batch`: for each message, why it was refused, if it was.
    fn apply(&mut self, batch: &[Inbound]) -> Result<Vec<Option<String>>, String> {
        let applied = self.applier.apply(batch).map_err(|err| err.to_string())?;
        applied
            .outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::DeadLetter { reason, .. } => Ok(Some(reason)),
                Outcome::Retry { reason } => Err(format!("a handler asked to try again: {reason}")),
                Outcome::Disabled { message_type } => Ok(Some(format!(
                    "the plugin of {message_type} is switched off"
                ))),
                _ => Ok(None),
            })
            .collect()
    }

    /// The entity as a message of `message_type`, with its own `seq` (so
    /// that it orders against later changes as the change that wrote it
    /// would): the entity's fields back under the payload's names, and
    /// only those the type declares.
    fn inbound(
        &self,
        entity: &SnapshotEntity,
        catalog: &str,
        message_type: &str,
        rule: &EntityRule,
        tag: &str,
    ) -> Inbound {
        let mut payload: Map<String, Value> = entity.state.clone();
        for (field, name) in &rule.fields {
            if let Some(value) = payload.remove(name) {
                payload.insert(field.clone(), value);
            }
        }
        if let Some(declared) = &rule.properties {
            payload.retain(|field, _| declared.contains(field));
        }
        payload
            .entry(rule.id.clone())
            .or_insert_with(|| Value::String(entity.id.clone()));
        let body = serde_json::json!({
            "type": message_type,
            "license_key": self.license_key.as_str(),
            "payload": payload,
            "message_id": format!("snapshot/{tag}/{}/{}", entity.entity, entity.id),
            "seq": entity.seq,
            "catalog": catalog,
        });
        Inbound {
            tag: 0,
            routing_key: routing_key(&self.license_key, message_type),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            redelivered: false,
            requeued: false,
        }
    }

    /// Whether every entity staged: else why not, and nothing of the
    /// snapshot may replace what the terminal holds.
    pub(crate) fn complete(&self) -> Result<(), String> {
        let (skipped, refused) = (&self.skipped, &self.refused);
        if skipped.is_empty() && refused.0 == 0 {
            return Ok(());
        }
        let mut parts = Vec::new();
        for (kind, count) in skipped {
            parts.push(format!(
                "{count} {kind} that no enabled plugin restores (enable the plugin whose type replaces a {kind})"
            ));
        }
        if refused.0 > 0 {
            parts.push(format!(
                "{} refused by their plugin (the first: {})",
                refused.0,
                refused.1.as_deref().unwrap_or("?")
            ));
        }
        Err(format!(
            "the snapshot is not applied, so that nothing the terminal holds is lost: {}",
            parts.join("; ")
        ))
    }

    /// The staging database's file, closed.
    pub(crate) fn finish(self) -> PathBuf {
        self.path
    }
}

/// What a terminal needs to take snapshots.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotContext {
    pub(crate) license_key: LicenseKey,
    pub(crate) terminal_id: TerminalId,
    pub(crate) registry: Arc<Registry>,
    /// The terminal's database; the staging one is made beside it.
    pub(crate) database: PathBuf,
    /// The plugins' tables held no row when the terminal started: only
    /// then does a first start ask for a snapshot, which replaces them
    /// (a till that holds a catalog from before the backend keeps it
    /// until its first sequenced change shows a gap).
    pub(crate) empty_at_start: bool,
}

/// Asks for a snapshot on `connection`, stages it and swaps it in;
/// returns the sync state after the swap.
pub(crate) async fn take(
    connection: &Connection,
    asker: &Asker,
    context: &SnapshotContext,
    applier: &crate::applier::ApplierHandle,
) -> Result<SyncState, SnapshotError> {
    let started = Instant::now();
    let (database, registry, key) = (
        context.database.clone(),
        Arc::clone(&context.registry),
        context.license_key.clone(),
    );
    let staging = tokio::task::spawn_blocking(move || Staging::create(&database, registry, &key))
        .await
        .map_err(|err| SnapshotError::Local(format!("staging panicked: {err}")))?
        .map_err(|err| SnapshotError::Local(format!("cannot make the staging database: {err}")))?;
    // Gone however this ends, a stop in the middle included.
    let files = StagingFiles(staging.path.clone());
    let path = files.0.clone();
    let mut staging = Some(staging);
    let fetched = fetch(connection, asker, &mut staging).await;
    let complete = staging
        .map(|staging| {
            let complete = staging.complete();
            drop(staging.finish());
            complete
        })
        .unwrap_or_else(|| Err("the staging database is gone".into()));
    let swapped = match fetched.and_then(|fetched| {
        complete.map_err(SnapshotError::Incomplete)?;
        Ok(fetched)
    }) {
        Ok(fetched) => applier
            .swap_in(
                path.clone(),
                SnapshotMeta {
                    seq: fetched.seq,
                    settled: fetched.settled,
                    catalog: fetched.catalog.clone(),
                },
            )
            .await
            .map(|sync| (fetched, sync))
            .map_err(|err| SnapshotError::Local(format!("cannot swap the snapshot in: {err}"))),
        Err(err) => Err(err),
    };
    drop(files);
    let (fetched, sync) = swapped?;
    events::snapshot_applied(
        fetched.seq,
        &fetched.catalog,
        fetched.entities,
        started.elapsed().as_millis(),
    );
    Ok(sync)
}

/// Removes the staging database's files when dropped.
struct StagingFiles(PathBuf);

impl Drop for StagingFiles {
    fn drop(&mut self) {
        remove_database(&self.0);
    }
}

/// Why a snapshot is due, for the log.
pub(crate) fn reason(sync: &SyncState) -> String {
    match sync.gap {
        Some(gap) => gap.cause.to_string(),
        None => "first start: this terminal holds nothing of its store's catalog yet".into(),
    }
}

/// `<database>-snapshot`.
fn staging_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-snapshot");
    PathBuf::from(name)
}

/// Removes a database file and its journal files, if there.
pub(crate) fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal", "-applied"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// What a snapshot swapped in.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotMeta {
    pub(crate) seq: i64,
    /// From this `seq` on the catalog equals the backend's: the chunks'
    /// entities may show changes up to it, which replay after `seq`.
    pub(crate) settled: i64,
    pub(crate) catalog: String,
}

impl Database {
    /// Whether no plugin table holds a row.
    pub(crate) fn holds_no_catalog(&self) -> Result<bool, DatabaseError> {
        let connection = self.connection();
        let tables: Vec<String> = connection
            .prepare(PLUGIN_TABLES)?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for table in tables {
            let any: bool = connection.query_row(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", quoted(&table)),
                [],
                |row| row.get(0),
            )?;
            if any {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Replaces every plugin table with the staging database's, moves the
    /// store's sync state to the snapshot's `seq` and has the change feed's
    /// clients read everything again, in one transaction; returns the sync
    /// state and the feed's last id.
    pub(crate) fn swap_in(
        &mut self,
        staged: &Path,
        license_key: &str,
        meta: &SnapshotMeta,
    ) -> Result<(SyncState, i64), DatabaseError> {
        let connection = self.connection();
        connection.execute("ATTACH DATABASE ?1 AS snapshot", [staged.to_string_lossy()])?;
        let swapped = swap_tables(connection, license_key, meta);
        let detached = connection.execute_batch("DETACH DATABASE snapshot");
        let feed_last = swapped?;
        detached?;
        Ok((self.sync_state(license_key)?, feed_last))
    }
}

fn swap_tables(
    connection: &rusqlite::Connection,
    license_key: &str,
    meta: &SnapshotMeta,
) -> Result<i64, DatabaseError> {
    let transaction = connection.unchecked_transaction()?;
    let tables: Vec<String> = transaction
        .prepare(&PLUGIN_TABLES.replace("sqlite_master", "snapshot.sqlite_master"))?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    // Plugins' tables may refer to each other: emptied all first, filled
    // in the order they were made, the references checked at the commit.
    transaction.execute_batch("PRAGMA defer_foreign_keys = ON")?;
    for table in tables.iter().rev() {
        transaction.execute_batch(&format!("DELETE FROM main.{};", quoted(table)))?;
    }
    for table in &tables {
        let columns: Vec<String> = transaction
            .prepare("SELECT name FROM pragma_table_info(?1, 'snapshot')")?
            .query_map([table], |row| row.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        let list = columns
            .iter()
            .map(|c| quoted(c))
            .collect::<Vec<_>>()
            .join(", ");
        let table = quoted(table);
        transaction.execute_batch(&format!(
            "INSERT INTO main.{table} ({list}) SELECT {list} FROM snapshot.{table};"
        ))?;
    }
    // Everything up to the snapshot's seq is here now, and nothing above it.
    transaction.execute(
        "INSERT INTO possync_sequence (license_key, synced_seq, applied_seq, settled_seq,
             last_change_ms, head_seq, dead_seq, catalog)
         VALUES (?1, ?2, ?2, ?2, ?3, ?2, NULL, ?4)
         ON CONFLICT (license_key) DO UPDATE SET synced_seq = excluded.synced_seq,
             applied_seq = excluded.applied_seq, settled_seq = excluded.settled_seq,
             last_change_ms = excluded.last_change_ms,
             head_seq = max(coalesce(head_seq, 0), excluded.head_seq), dead_seq = NULL,
             catalog = excluded.catalog, gap_cause = NULL, gap_low = NULL, gap_high = NULL,
             gap_since_ms = NULL, verified_seq = NULL, verified_ms = NULL",
        params![license_key, meta.seq, unix_now_ms(), meta.catalog],
    )?;
    transaction.execute(
        "UPDATE possync_sequence SET snapshot_settled_seq = ?2 WHERE license_key = ?1",
        params![license_key, meta.settled],
    )?;
    transaction.execute(
        "DELETE FROM possync_sequence_above WHERE license_key = ?1",
        [license_key],
    )?;
    let feed_last = crate::feed::forget(&transaction)?;
    transaction.commit()?;
    Ok(feed_last)
}

/// The plugins' tables (not possync's own, not SQLite's), in the order
/// they were made.
const PLUGIN_TABLES: &str = "SELECT name FROM sqlite_master WHERE type = 'table'
     AND name NOT LIKE 'possync\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
     ORDER BY rowid";

/// `name` as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A kind of entity's replacing type: used by [`Registry::restoring_type`].
pub(crate) fn replaces(rule: &crate::entity::EntityRule, entity: &str) -> bool {
    rule.entity == entity && rule.change == ChangeKind::Replace
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_catalog as _;

    fn entity(id: &str, seq: i64, price: f64) -> SnapshotEntity {
        let state = serde_json::json!({"product_id": id, "product_name": id, "price": price});
        SnapshotEntity {
            entity: "product".into(),
            id: id.into(),
            seq,
            state: state.as_object().cloned().unwrap_or_default(),
        }
    }

    fn chunk(catalog: &str, entities: Vec<SnapshotEntity>) -> SnapshotChunk {
        SnapshotChunk {
            request: "r".into(),
            store: "STORE".into(),
            catalog: catalog.into(),
            seq: 40,
            settled: 40,
            entities,
            next: None,
            error: None,
        }
    }

    fn staging(dir: &Path, registry: Registry) -> Staging {
        let key = LicenseKey::new("STORE").expect("a key");
        Staging::create(&dir.join("till.db"), Arc::new(registry), &key).expect("staging")
    }

    #[test]
    fn an_entity_only_ever_merged_is_restored_by_the_type_that_merges_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::from_config(&Default::default()).expect("the built-in plugins");
        let mut staged = staging(dir.path(), registry);
        let mut priced_only = entity("PX", 7, 3.0);
        priced_only.state.remove("product_name");
        staged
            .stage(&chunk("cat", vec![priced_only, entity("A", 8, 2.0)]))
            .expect("staged");
        assert_eq!(staged.complete(), Ok(()));
        let price: f64 = staged
            .applier
            .connection()
            .query_row("SELECT price FROM products WHERE id = 'PX'", [], |row| {
                row.get(0)
            })
            .expect("PX is there");
        assert_eq!(price, 3.0);
    }

    #[test]
    fn a_snapshot_with_entities_no_enabled_plugin_restores_is_not_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = [(
            "product".to_owned(),
            crate::config::PluginSetting::Toggle(false),
        )]
        .into_iter()
        .collect();
        let registry = Registry::from_config(&plugins).expect("the built-in plugins");
        let mut staged = staging(dir.path(), registry);
        staged
            .stage(&chunk("cat", vec![entity("A", 8, 2.0)]))
            .expect("staged");
        let refusal = staged.complete().expect_err("products cannot be restored");
        assert!(
            refusal.contains("1 product that no enabled plugin restores"),
            "{refusal}"
        );
    }

    #[test]
    fn a_snapshot_the_enabled_plugins_cannot_restore_is_not_asked_again_in_this_run() {
        let gap = SyncState {
            gap: Some(crate::Gap {
                cause: crate::GapCause::QueueRecreated,
                since_ms: 0,
            }),
            ..SyncState::default()
        };
        let mut plan = SnapshotPlan::new(false);
        assert!(plan.due(&gap));
        let retry = plan.failed(&SnapshotError::Timeout(15));
        assert!(retry.is_some(), "a timeout is asked again");
        let mut plan = SnapshotPlan::new(false);
        let retry = plan.failed(&SnapshotError::Incomplete("1 product".into()));
        assert_eq!(retry, None);
        assert!(!plan.due(&gap), "not even once the back-off has passed");
    }

    #[test]
    fn chunks_of_another_catalog_are_refused() {
        let ours = chunk("ours", Vec::new());
        assert!(check_catalog(&ours, Some("ours"), Some("ours")).is_ok());
        assert!(check_catalog(&ours, None, None).is_ok(), "a first start");
        let theirs = chunk("theirs", Vec::new());
        let err = check_catalog(&theirs, Some("ours"), None).expect_err("followed");
        assert!(err.to_string().contains("follows catalog ours"), "{err}");
        let err = check_catalog(&theirs, None, Some("ours")).expect_err("mixed");
        assert!(err.to_string().contains("two catalogs"), "{err}");
    }

    #[test]
    fn a_swap_replaces_the_catalog_whole_moves_the_marks_and_has_feed_clients_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry =
            Arc::new(Registry::from_config(&Default::default()).expect("the built-in plugins"));
        let key = LicenseKey::new("STORE").expect("a key");
        let path = dir.path().join("till.db");
        let mut live = Database::open(&path).expect("opens");
        live.migrate(registry.migrations().iter())
            .expect("migrates");
        assert!(live.holds_no_catalog().expect("reads"), "a new till's");
        live.connection()
            .execute_batch(
                "INSERT INTO products (id, name, price) VALUES ('GONE', 'Gone', 1.0);
                 INSERT INTO possync_feed_state (id, last_id, floor, kept) VALUES (1, 50, 0, 50);
                 INSERT INTO possync_sequence (license_key, synced_seq, applied_seq, settled_seq, catalog, gap_cause)
                     VALUES ('STORE', 3, 9, 3, 'old', 'queue_recreated');
                 INSERT INTO possync_sequence_above (license_key, first_seq, last_seq) VALUES ('STORE', 8, 9);",
            )
            .expect("a till with a gap");
        assert!(!live.holds_no_catalog().expect("reads"));

        let mut staging = Staging::create(&path, Arc::clone(&registry), &key).expect("staging");
        staging
            .stage(&SnapshotChunk {
                request: "r".into(),
                store: "STORE".into(),
                catalog: "new".into(),
                seq: 40,
                settled: 41,
                entities: vec![entity("A", 12, 2.0), entity("B", 40, 3.5)],
                next: None,
                error: None,
            })
            .expect("staged");
        let staged = staging.finish();
        let (sync, feed_last) = live
            .swap_in(
                &staged,
                "STORE",
                &SnapshotMeta {
                    seq: 40,
                    settled: 41,
                    catalog: "new".into(),
                },
            )
            .expect("swapped");
        let settled: i64 = live
            .connection()
            .query_row(
                "SELECT snapshot_settled_seq FROM possync_sequence WHERE license_key = 'STORE'",
                [],
                |row| row.get(0),
            )
            .expect("settled");
        assert_eq!(settled, 41, "checkpoints are compared from 41 on");

        let products: Vec<(String, f64, i64)> = live
            .connection()
            .prepare("SELECT id, price, sync_version FROM products ORDER BY id")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect()
            })
            .expect("products");
        let versions: Vec<Option<i64>> = products
            .iter()
            .map(|(_, _, version)| possync_sdk::Version::seq_of(*version))
            .collect();
        assert_eq!(
            products
                .iter()
                .map(|(id, price, _)| (id.as_str(), *price))
                .collect::<Vec<_>>(),
            [("A", 2.0), ("B", 3.5)],
            "GONE went with the old catalog"
        );
        assert_eq!(
            versions,
            [Some(12), Some(40)],
            "each row as the change that wrote it"
        );
        assert_eq!(
            (
                sync.synced_up_to,
                sync.highest_applied,
                sync.gap,
                sync.catalog.as_deref()
            ),
            (40, 40, None, Some("new"))
        );
        let above: i64 = live
            .connection()
            .query_row("SELECT count(*) FROM possync_sequence_above", [], |row| {
                row.get(0)
            })
            .expect("counted");
        assert_eq!(above, 0);
        assert!(feed_last > 50);
        assert_eq!(
            crate::feed::backlog(live.connection(), 50).expect("read"),
            crate::feed::Backlog::Reload { last: feed_last },
            "a feed client that saw the old catalog reads everything again"
        );
    }
}
