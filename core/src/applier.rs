//! The applier: applies batches of received messages to the database, one
//! transaction a batch, and keeps the database's bookkeeping bounded.
//! [`ApplierHandle`] is its async side, so SQLite's blocking calls never
//! stall the broker connection.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::checksum::Checkpoint;
use crate::config::TerminalConfig;
use crate::dispatch::{BatchError, Dispatch, Dispatched, Outcome};
use crate::events;
use crate::feed::{Feed, FeedSender};
use crate::gap::{AppliedMark, Gap, GapCause};
use crate::identity::LicenseKey;
use crate::inbound::Inbound;
use crate::poison::Poison;
use crate::progress::{Progress, Tally};
use crate::registry::Registry;
use crate::sequence::SyncState;
use crate::snapshot::SnapshotMeta;
use crate::store::{Database, StateRecord, unix_now_ms};
use crate::transaction::Transaction;
use crate::verify::{Verdict, Verified, Verifier};

/// A committed batch: one outcome per message, what they add up to, and
/// the store's sync state if the batch moved it.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) tally: Tally,
    pub(crate) sync: Option<SyncState>,
}

/// Applies batches; see [`ApplierHandle`] for the async side.
pub(crate) struct Applier {
    database: Database,
    dispatch: Dispatch,
    limits: Limits,
    progress: Progress,
    feed: Feed,
    pruned_at: std::time::Instant,
    /// Whether the batch being applied gives up at once on another
    /// program's write lock ([`Applier::apply_at_once`]).
    begin_at_once: bool,
    /// Beside the database: how far it was applied, to tell a restored copy.
    mark: AppliedMark,
    /// Compares the backend's checkpoints with the database.
    verifier: Verifier,
}

/// How often a busy terminal prunes its bookkeeping; an idle one prunes
/// each time it goes idle.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("dispatch", &self.dispatch)
            .finish_non_exhaustive()
    }
}

/// What the terminal's config bounds while applying.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_message_bytes: usize,
    pub(crate) max_attempts: u32,
    pub(crate) quarantine_max_rows: u32,
    pub(crate) quarantine_max_age_secs: i64,
    /// Applied message ids are kept as long as the broker may redeliver.
    pub(crate) applied_ids_max_age_secs: i64,
    /// Batches of at least this many messages collapse; 0: none do.
    pub(crate) collapse_min_batch: usize,
    /// Changes the change feed keeps; 0: no feed.
    pub(crate) feed_keep: u32,
}

impl Limits {
    pub(crate) fn of(config: &TerminalConfig) -> Self {
        const DAY: i64 = 24 * 3600;
        Self {
            max_message_bytes: config.max_message_bytes,
            max_attempts: config.max_attempts,
            quarantine_max_rows: config.quarantine_max_rows,
            quarantine_max_age_secs: i64::from(config.quarantine_max_days) * DAY,
            applied_ids_max_age_secs: i64::from(config.queue_expiry_days) * DAY,
            collapse_min_batch: config.collapse_min_batch,
            feed_keep: config.feed_keep,
        }
    }
}

impl Applier {
    /// When its verifier would compare a checkpoint, for the consumer.
    pub(crate) fn verify_turn(&self) -> crate::verify::Turn {
        self.verifier.turn()
    }

    pub(crate) fn new(
        database: Database,
        registry: Arc<Registry>,
        license_key: LicenseKey,
        limits: Limits,
        feed: FeedSender,
    ) -> Self {
        let poison = Poison {
            max_attempts: limits.max_attempts,
            quarantine_max_rows: limits.quarantine_max_rows,
        };
        let exports = registry.exports().into_iter().cloned().collect();
        Self {
            mark: AppliedMark::beside(database.path(), license_key.as_str()),
            verifier: Verifier::new(exports),
            database,
            dispatch: Dispatch::new(
                registry,
                license_key,
                limits.max_message_bytes,
                poison,
                limits.collapse_min_batch,
            ),
            feed: Feed::new(limits.feed_keep, feed),
            limits,
            progress: Progress::default(),
            pruned_at: std::time::Instant::now(),
            begin_at_once: false,
        }
    }

    /// Records a state change for `possync status`, with the counters
    /// not yet written.
    pub(crate) fn record_state(&mut self, record: &StateRecord) {
        self.flush_progress();
        if let Err(err) = self.database.record_state(record) {
            events::status_not_recorded(&err.to_string());
        }
    }

    fn perform(&mut self, job: Job) {
        match job {
            Job::Apply(batch, reply) => {
                let result = self.apply(&batch);
                // The receiver is gone only when the terminal stopped waiting; nothing to tell.
                let _ = reply.send((batch, result));
            }
            Job::RecordState(record, done) => {
                self.record_state(&record);
                let _ = done.send(());
            }
            Job::Requeue => self.requeue(),
            Job::RecordGap(gap, reply) => {
                let _ = reply.send(self.record_gap(gap));
            }
            Job::SwapIn(staged, meta, reply) => {
                let _ = reply.send(self.swap_in(&staged, &meta));
            }
            Job::FlushProgress => {
                self.flush_progress();
                self.prune();
            }
        }
    }

    /// Forgets applied message ids the broker can no longer redeliver and
    /// quarantined messages past their time, so the database stays bounded
    /// on a terminal that runs for months.
    fn prune(&mut self) {
        self.pruned_at = std::time::Instant::now();
        let limits = &self.limits;
        let pruned = self
            .database
            .prune_applied(limits.applied_ids_max_age_secs)
            .and_then(|ids| {
                let rows = self
                    .database
                    .prune_quarantine(limits.quarantine_max_age_secs)?;
                Ok((ids, rows))
            });
        match pruned {
            Ok((ids, rows)) => events::pruned(ids, rows),
            Err(err) => events::prune_failed(&err.to_string()),
        }
    }

    /// Applies the messages the operator requeued from the quarantine
    /// (`possync quarantine requeue`), as messages from the queue are
    /// applied, removing each from the table in the transaction that
    /// settles it; one that fails again is quarantined again.
    pub(crate) fn requeue(&mut self) {
        let rows = match self.database.requeued() {
            Ok(rows) if rows.is_empty() => return,
            Ok(rows) => rows,
            Err(err) => {
                events::requeue_held(&err.to_string());
                return;
            }
        };
        let ids: Vec<i64> = rows.iter().map(|(id, _, _)| *id).collect();
        let batch: Vec<Inbound> = rows
            .into_iter()
            .map(|(_, routing_key, body)| Inbound {
                tag: 0,
                routing_key,
                body,
                // Its tries, if it needs some, are forgotten once it settles.
                redelivered: true,
                requeued: true,
            })
            .collect();
        let record = |transaction: &mut Transaction<'_>, outcomes: &[Outcome]| {
            for (id, outcome) in ids.iter().zip(outcomes) {
                match outcome {
                    // Quarantined again: its row, whole, with the new reason.
                    Outcome::DeadLetter { reason, .. } => transaction.execute(
                        "UPDATE possync_quarantine
                         SET reason = ?2, requeued_at = NULL, received_at = ?3 WHERE id = ?1",
                        rusqlite::params![id, reason, crate::store::unix_now()],
                    )?,
                    outcome if outcome.settles_by_ack() => {
                        transaction.execute("DELETE FROM possync_quarantine WHERE id = ?1", [id])?
                    }
                    _ => 0,
                };
            }
            Ok(())
        };
        match self.apply_recording(&batch, &record) {
            Ok(applied) => {
                let again = applied
                    .outcomes
                    .iter()
                    .filter(|outcome| matches!(outcome, Outcome::DeadLetter { .. }))
                    .count();
                let settled = applied
                    .outcomes
                    .iter()
                    .filter(|outcome| outcome.settles_by_ack())
                    .count();
                events::requeued(settled - again, again, batch.len() - settled);
            }
            Err(err) => events::requeue_held(&err.to_string()),
        }
    }

    /// Records a gap found outside the sequence, unless one is open; the
    /// sync state as it is then.
    pub(crate) fn record_gap(&mut self, gap: Gap) -> Option<SyncState> {
        match self.database.record_gap(self.dispatch.license_key(), &gap) {
            Ok(state) => {
                if state.gap == Some(gap) {
                    events::gap_found(&gap.cause);
                }
                Some(state)
            }
            Err(err) => {
                events::status_not_recorded(&err.to_string());
                None
            }
        }
    }

    /// The database, for reading.
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &rusqlite::Connection {
        self.database.connection()
    }

    /// Forgets every change settled here (sequence marks, publisher marks,
    /// message ids): for a staging database, whose entities may be tried
    /// again under another type.
    pub(crate) fn forget_marks(&mut self) -> rusqlite::Result<()> {
        self.database.connection().execute_batch(
            "DELETE FROM possync_sequence; DELETE FROM possync_sequence_above;
             DELETE FROM possync_publishers; DELETE FROM possync_applied;",
        )
    }

    /// Swaps a staged snapshot in: the plugins' tables and the sync state.
    pub(crate) fn swap_in(
        &mut self,
        staged: &std::path::Path,
        meta: &SnapshotMeta,
    ) -> Result<SyncState, String> {
        let (sync, feed_last) = self
            .database
            .swap_in(staged, self.dispatch.license_key(), meta)
            .map_err(|err| err.to_string())?;
        self.feed.replaced(feed_last);
        self.mark.note(&sync);
        self.mark.flush();
        Ok(sync)
    }

    /// Compares a checkpoint with the database, just committed up to it;
    /// records a match, or a gap when the catalog differs. The sync state
    /// after, when it changed.
    fn verify(&mut self, checkpoint: &Checkpoint, catalog: Option<&str>) -> Option<SyncState> {
        let key = self.dispatch.license_key();
        let seq = checkpoint.seq;
        let state = self.database.sync_state(key).and_then(|sync| {
            let settled = self.database.snapshot_settled(key)?;
            Ok((sync, settled))
        });
        let (sync, settled) = match state {
            Ok(state) => state,
            Err(err) => {
                events::checkpoint_unread(seq, &err.to_string());
                return None;
            }
        };
        let started = std::time::Instant::now();
        let verdict = match self.verifier.verify(
            self.database.connection(),
            &sync,
            settled,
            checkpoint,
            catalog,
        ) {
            Ok(verdict) => verdict,
            Err(err) => {
                events::checkpoint_unread(seq, &err.to_string());
                return None;
            }
        };
        let recorded = match verdict {
            Verdict::Skipped(reason) => {
                events::checkpoint_skipped(seq, reason);
                return None;
            }
            Verdict::Matched { kinds } => {
                events::checkpoint_verified(seq, kinds, started.elapsed().as_millis());
                let verified = Verified {
                    seq,
                    at_ms: unix_now_ms(),
                };
                self.database.record_verified(key, Some(verified))
            }
            Verdict::Differs(kinds) => {
                for (kind, ours, theirs) in &kinds {
                    events::checksum_differs(seq, kind, ours, theirs);
                }
                if let Err(err) = self.database.record_verified(key, None) {
                    events::status_not_recorded(&err.to_string());
                }
                return self.record_gap(Gap {
                    cause: GapCause::ChecksumMismatch { seq },
                    since_ms: unix_now_ms(),
                });
            }
        };
        match recorded {
            Ok(sync) => Some(sync),
            Err(err) => {
                events::status_not_recorded(&err.to_string());
                None
            }
        }
    }

    /// Writes the counters not yet written, for `possync status`.
    pub(crate) fn flush_progress(&mut self) {
        self.mark.flush();
        match self
            .database
            .record_progress_unsynced(self.progress.unwritten())
        {
            Ok(()) => self.progress = Progress::default(),
            Err(err) => events::status_not_recorded(&err.to_string()),
        }
    }

    /// Applies `batch` in one transaction and returns one outcome per
    /// message, with their tally.
    ///
    /// Most batches apply cleanly, so a batch first runs without a savepoint
    /// per message; only if a handler fails does it run again with them, so
    /// that the failure undoes that one message's writes.
    pub(crate) fn apply(&mut self, batch: &[Inbound]) -> Result<Applied, BatchError> {
        self.apply_recording(batch, &|_, _| Ok(()))
    }

    /// [`apply`](Self::apply) if it can start at once: `None`, having
    /// done nothing, when another program holds the database's write lock
    /// or the bookkeeping is due to be pruned (both may take a while).
    pub(crate) fn apply_at_once(
        &mut self,
        batch: &[Inbound],
    ) -> Option<Result<Applied, BatchError>> {
        if self.pruned_at.elapsed() >= PRUNE_EVERY {
            return None;
        }
        self.begin_at_once = true;
        let applied = self.run_or_careful(batch, &|_, _| Ok(()));
        self.begin_at_once = false;
        match applied {
            // Another program holds the write lock (BEGIN IMMEDIATE takes
            // it first, so the batch wrote nothing): tried again where
            // waiting for it stalls nothing else.
            Err(BatchError::Database(err))
                if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) =>
            {
                None
            }
            applied => Some(applied),
        }
    }

    /// [`apply`](Self::apply), with `record` writing, in the batch's
    /// transaction, what its caller keeps of the outcomes (a back office
    /// its cursor), so that it commits or rolls back with the batch.
    pub(crate) fn apply_recording(
        &mut self,
        batch: &[Inbound],
        record: &Record<'_>,
    ) -> Result<Applied, BatchError> {
        if self.pruned_at.elapsed() >= PRUNE_EVERY {
            self.prune();
        }
        self.run_or_careful(batch, record)
    }

    /// The batch without a savepoint per message, and again with them if
    /// a handler failed.
    fn run_or_careful(
        &mut self,
        batch: &[Inbound],
        record: &Record<'_>,
    ) -> Result<Applied, BatchError> {
        if let Some(applied) = self.run(batch, false, record)? {
            return Ok(applied);
        }
        Ok(self.run(batch, true, record)?.unwrap_or_default())
    }

    /// One attempt at the batch; `None` when a handler failed outside
    /// `careful` mode (everything rolled back).
    fn run(
        &mut self,
        batch: &[Inbound],
        careful: bool,
        record: &Record<'_>,
    ) -> Result<Option<Applied>, BatchError> {
        let mut transaction = if self.begin_at_once {
            self.database.begin_now()?
        } else {
            self.database.begin()?
        };
        let Some(Dispatched {
            outcomes,
            sync,
            gaps,
            closed_gap,
            changes,
            checkpoint,
            unsequenced,
        }) = self
            .dispatch
            .apply_in_transaction(&mut transaction, batch, careful)?
        else {
            return Ok(None);
        };
        let tally = Tally::of(&outcomes);
        if self.progress.due() {
            transaction.record_progress(&self.progress.with(&tally))?;
        }
        let changed = self.feed.write(&mut transaction, changes)?;
        record(&mut transaction, &outcomes)?;
        transaction.commit()?;
        self.feed.after_commit();
        self.progress.committed(&tally);
        if let Some(changed) = changed {
            self.feed.committed(changed);
        }
        log_committed(batch, &outcomes);
        for (expected, received) in gaps {
            events::sequence_gap(expected, received);
        }
        if let Some(cause) = closed_gap {
            events::gap_closed(&cause);
        }
        if let Some(sync) = &sync {
            self.mark.note(sync);
        }
        if unsequenced {
            self.verifier.unsequenced_applied();
        }
        let sync = match checkpoint {
            Some((checkpoint, catalog)) => self.verify(&checkpoint, catalog.as_deref()).or(sync),
            None => sync,
        };
        Ok(Some(Applied {
            outcomes,
            tally,
            sync,
        }))
    }
}

/// Logs what a committed batch dead-lettered or found stale: once, and
/// only for what took effect (a pass that rolled back or a stalled try
/// logs nothing).
fn log_committed(batch: &[Inbound], outcomes: &[Outcome]) {
    for (inbound, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            Outcome::DeadLetter {
                reason,
                message_type,
            } => events::message_quarantined(&inbound.routing_key, message_type.as_deref(), reason),
            Outcome::Stale {
                message_type,
                entities,
            } => {
                for entity in entities {
                    events::message_stale(
                        message_type,
                        &entity.id,
                        entity.incoming.micros,
                        entity.stored,
                    );
                }
            }
            _ => {}
        }
    }
}

/// Writes, in a batch's transaction, what the caller keeps of its outcomes.
pub(crate) type Record<'r> = dyn Fn(&mut Transaction<'_>, &[Outcome]) -> rusqlite::Result<()> + 'r;

type Reply = oneshot::Sender<(Vec<Inbound>, Result<Applied, BatchError>)>;

pub(crate) enum Job {
    Apply(Vec<Inbound>, Reply),
    RecordState(StateRecord, oneshot::Sender<()>),
    FlushProgress,
    Requeue,
    RecordGap(Gap, oneshot::Sender<Option<SyncState>>),
    SwapIn(
        std::path::PathBuf,
        SnapshotMeta,
        oneshot::Sender<Result<SyncState, String>>,
    ),
}

/// The async side of an [`Applier`]. On a multi-threaded runtime a batch
/// runs on the consumer's own worker, as long as it is quick: handing
/// each batch to another thread costs more than a small batch itself (ten
/// terminals in one process make many small batches). A batch that would
/// wait for another program's lock, and every batch of a terminal whose
/// last one held its worker too long (a slow disk), go through
/// `block_in_place`, which gives the worker's place to another thread for
/// the length of the batch. So another program's lock never stalls the
/// runtime's other tasks (other terminals, the status page), and a slow
/// disk stalls them for the length of one batch, then again at most once
/// per hand-off period, which grows while batches stay slow. On any other
/// runtime the applier gets a thread of its own.
#[derive(Debug)]
pub(crate) enum ApplierHandle {
    Worker(Box<std::sync::Mutex<OnWorker>>),
    Thread {
        jobs: mpsc::Sender<Job>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

/// The longest a batch may hold a runtime's worker: several flushes to
/// disk, and short enough for a status page not to seem stuck.
const WORKER_BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a terminal whose batch held its worker too long hands its
/// batches off at first; each batch over budget after that doubles it, up
/// to [`HAND_OFF_AT_MOST`], so that a disk that stays slow stalls a worker
/// rarely, and one slow flush costs little.
const HAND_OFF_AT_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const HAND_OFF_AT_MOST: std::time::Duration = std::time::Duration::from_secs(300);

/// An applier that runs on the consumer's worker while its batches are quick.
#[derive(Debug)]
pub(crate) struct OnWorker {
    applier: Applier,
    /// Until when batches go through `block_in_place`.
    hand_off_until: Option<std::time::Instant>,
    /// How long the next hand-off lasts.
    hand_off_for: std::time::Duration,
}

impl OnWorker {
    fn apply(&mut self, batch: &[Inbound]) -> Result<Applied, BatchError> {
        let started = std::time::Instant::now();
        if self.hand_off_until.is_none_or(|until| started >= until)
            && let Some(applied) = self.applier.apply_at_once(batch)
        {
            let took = started.elapsed();
            if took > WORKER_BATCH_BUDGET {
                events::batches_handed_off(took.as_millis(), self.hand_off_for.as_millis());
                self.hand_off_until = Some(std::time::Instant::now() + self.hand_off_for);
                self.hand_off_for = (self.hand_off_for * 2).min(HAND_OFF_AT_MOST);
            } else {
                // Shrinks back slowly: a disk slow now and then stays handed off.
                self.hand_off_for = (self.hand_off_for / 2).max(HAND_OFF_AT_FIRST);
            }
            return applied;
        }
        tokio::task::block_in_place(|| self.applier.apply(batch))
    }
}

impl ApplierHandle {
    pub(crate) fn spawn(mut applier: Applier) -> std::io::Result<Self> {
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Ok(Self::Worker(Box::new(std::sync::Mutex::new(OnWorker {
                applier,
                hand_off_until: None,
                hand_off_for: HAND_OFF_AT_FIRST,
            }))));
        }
        let (jobs, mut receiver) = mpsc::channel::<Job>(1);
        let thread = std::thread::Builder::new()
            .name("possync-apply".into())
            .spawn(move || {
                while let Some(job) = receiver.blocking_recv() {
                    applier.perform(job);
                }
            })?;
        Ok(Self::Thread {
            jobs,
            thread: Some(thread),
        })
    }

    /// Applies `batch`; gives the batch back with the outcomes.
    pub(crate) async fn apply(
        &self,
        batch: Vec<Inbound>,
    ) -> (Vec<Inbound>, Result<Applied, BatchError>) {
        match self {
            Self::Worker(applier) => {
                let result = match applier.lock() {
                    Ok(mut applier) => applier.apply(&batch),
                    Err(_) => unreachable_thread(),
                };
                (batch, result)
            }
            Self::Thread { jobs, .. } => {
                let (reply, response) = oneshot::channel();
                if jobs.send(Job::Apply(batch, reply)).await.is_err() {
                    unreachable_thread();
                }
                match response.await {
                    Ok(done) => done,
                    Err(_) => unreachable_thread(),
                }
            }
        }
    }

    /// Records a state change for `possync status`, in order with the batches.
    ///
    /// Returns once it is recorded: `possync status` run after the state
    /// was logged shows it.
    pub(crate) async fn record_state(&self, record: StateRecord) {
        let (done, recorded) = oneshot::channel();
        self.submit(Job::RecordState(record, done)).await;
        let _ = recorded.await;
    }

    /// Writes the counters `possync status` shows, when the terminal is idle.
    pub(crate) async fn flush_progress(&self) {
        self.submit(Job::FlushProgress).await;
    }

    /// Applies what the operator requeued from the quarantine, in order
    /// with the batches.
    pub(crate) async fn requeue(&self) {
        self.submit(Job::Requeue).await;
    }

    /// Records a gap found outside the sequence (unless one is open), in
    /// order with the batches; the sync state as it is then.
    pub(crate) async fn record_gap(&self, gap: Gap) -> Option<SyncState> {
        let (reply, response) = oneshot::channel();
        self.submit(Job::RecordGap(gap, reply)).await;
        response.await.ok().flatten()
    }

    /// Swaps a staged snapshot in, in order with the batches.
    pub(crate) async fn swap_in(
        &self,
        staged: std::path::PathBuf,
        meta: SnapshotMeta,
    ) -> Result<SyncState, String> {
        let (reply, response) = oneshot::channel();
        self.submit(Job::SwapIn(staged, meta, reply)).await;
        response
            .await
            .unwrap_or_else(|_| Err("the apply thread is gone".into()))
    }

    /// Carries out a job that answers nothing, in order with the batches.
    async fn submit(&self, job: Job) {
        match self {
            Self::Worker(applier) => tokio::task::block_in_place(|| {
                if let Ok(mut applier) = applier.lock() {
                    applier.applier.perform(job);
                }
            }),
            Self::Thread { jobs, .. } => {
                if jobs.send(job).await.is_err() {
                    unreachable_thread();
                }
            }
        }
    }

    /// Stops the thread after the batch in progress.
    pub(crate) fn shutdown(self) {
        if let Self::Thread { jobs, thread } = self {
            drop(jobs);
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

/// The applier catches handler panics and the apply thread only ends when
/// its handle drops, so either failing is a bug in possync itself.
fn unreachable_thread() -> ! {
    panic!("the applier stopped unexpectedly")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use possync_catalog as _;
    use possync_sdk::Envelope;
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::checksum::Checksum;

    fn applier(path: &std::path::Path) -> Applier {
        let mut database = Database::open(path).expect("opens");
        let registry = Registry::from_config(&Default::default()).expect("built-ins");
        database
            .migrate(registry.migrations().iter())
            .expect("migrates");
        Applier::new(
            database,
            Arc::new(registry),
            LicenseKey::new("K").expect("valid"),
            Limits {
                max_message_bytes: 1 << 20,
                max_attempts: 3,
                quarantine_max_rows: 100,
                quarantine_max_age_secs: 3600,
                applied_ids_max_age_secs: 3600,
                collapse_min_batch: 0,
                feed_keep: 0,
            },
            crate::feed::channel(),
        )
    }

    fn inbound(envelope: &Envelope) -> Inbound {
        Inbound {
            tag: 1,
            routing_key: format!("license.K.{}", envelope.message_type),
            body: serde_json::to_vec(envelope).expect("encodes"),
            redelivered: false,
            requeued: false,
        }
    }

    /// The store's changes, as the backend sequences them.
    fn changes() -> Vec<(&'static str, Value)> {
        vec![
            (
                "category_update",
                json!({"category_id": 7, "category_name": "Drinks"}),
            ),
            (
                "product_update",
                json!({"product_id": 42, "product_name": "Tea", "price": 3, "category_id": 7}),
            ),
            (
                "price_update",
                json!({"product_id": "PX", "new_price": 0.1 + 0.2}),
            ),
            (
                "product_update",
                json!({"product_id": "GONE", "product_name": "Gone", "price": 1.5}),
            ),
            ("product_delete", json!({"product_id": "GONE"})),
            ("price_update", json!({"product_id": 42, "new_price": 3.25})),
        ]
    }

    /// The checkpoint the backend sends after `changes`: each entity's
    /// state kept from the types' declarations, summed by the spec.
    fn checkpoint(registry: &Registry, seq: i64) -> Checkpoint {
        let mut states: BTreeMap<(String, String), Map<String, Value>> = BTreeMap::new();
        for (message_type, payload) in changes() {
            let rule = registry.entity_rule(message_type).expect("declared");
            let change = rule.change(&payload.to_string()).expect("a change");
            let key = (change.entity, change.id);
            match change.kind {
                crate::ChangeKind::Delete => {
                    states.remove(&key);
                }
                crate::ChangeKind::Replace => {
                    states.insert(key, change.fields);
                }
                crate::ChangeKind::Merge => states.entry(key).or_default().extend(change.fields),
            }
        }
        let spec = registry.checksum_spec();
        let mut checksums: BTreeMap<String, Checksum> = spec
            .kinds()
            .map(|kind| (kind.to_owned(), Checksum::default()))
            .collect();
        for ((entity, id), state) in &states {
            if let (Some(digest), Some(sum)) =
                (spec.digest(entity, id, state), checksums.get_mut(entity))
            {
                sum.add(digest);
            }
        }
        Checkpoint {
            seq,
            checksums,
            specs: BTreeMap::new(),
        }
    }

    /// [`changes`] as the relay sends them: seq 1, 2... of catalog `c`.
    fn sequenced_changes() -> Vec<Inbound> {
        changes()
            .into_iter()
            .zip(1..)
            .map(|((message_type, payload), seq)| {
                inbound(
                    &Envelope::new(message_type, "K", payload)
                        .with_seq(seq)
                        .with_catalog("c"),
                )
            })
            .collect()
    }

    fn checkpoint_message(checkpoint: &Checkpoint) -> Inbound {
        inbound(
            &Envelope::new(
                crate::CHECKPOINT_TYPE,
                "K",
                serde_json::to_value(checkpoint).expect("encodes"),
            )
            .with_catalog("c"),
        )
    }

    #[test]
    fn a_till_that_applied_the_changes_matches_the_backends_checksums_and_a_row_changed_behind_its_back_does_not()
     {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path);
        let registry = Registry::from_config(&Default::default()).expect("built-ins");
        let mut batch = sequenced_changes();
        let expected = checkpoint(&registry, 6);
        assert_eq!(expected.checksums["product"].count, 2, "{expected:?}");
        batch.push(checkpoint_message(&expected));
        let applied = applier.apply(&batch).expect("applies");
        assert_eq!(applied.outcomes.last(), Some(&Outcome::Checkpoint));
        let sync = applied.sync.expect("moved");
        assert_eq!(sync.gap, None);
        assert_eq!(sync.verified.map(|v| v.seq), Some(6), "verified at seq 6");

        // A checkpoint of a seq the till is not at is not compared.
        applier.verifier.turn.set(std::time::Instant::now());
        let ahead = applier
            .apply(&[checkpoint_message(&checkpoint(&registry, 7))])
            .expect("applies");
        assert_eq!(ahead.sync, None, "nothing recorded");

        applier
            .database
            .connection()
            .execute("UPDATE products SET price = 9 WHERE id = '42'", [])
            .expect("changed behind possync's back");
        applier.verifier.turn.set(std::time::Instant::now());
        let found = applier
            .apply(&[checkpoint_message(&expected)])
            .expect("applies")
            .sync
            .expect("a gap");
        assert_eq!(
            found.gap.map(|gap| gap.cause),
            Some(GapCause::ChecksumMismatch { seq: 6 })
        );
        assert_eq!(found.verified, None, "no longer verified");
    }

    #[test]
    fn no_checkpoint_is_compared_below_where_the_last_snapshot_settled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut applier = applier(&dir.path().join("pos.db"));
        let registry = Registry::from_config(&Default::default()).expect("built-ins");
        let batch = sequenced_changes();
        applier.apply(&batch).expect("applies");
        // A snapshot's pages showed changes up to 7: at 6 the till may hold
        // some of them, and differ from the backend without any damage.
        let settle = |applier: &mut Applier, seq: i64| {
            applier
                .database
                .connection()
                .execute(
                    "UPDATE possync_sequence SET snapshot_settled_seq = ?1",
                    [seq],
                )
                .expect("settled");
        };
        settle(&mut applier, 7);
        applier
            .database
            .connection()
            .execute("UPDATE products SET price = 9 WHERE id = '42'", [])
            .expect("changed");
        let skipped = applier
            .apply(&[checkpoint_message(&checkpoint(&registry, 6))])
            .expect("applies");
        assert_eq!(skipped.sync, None, "not compared");

        settle(&mut applier, 6);
        applier.verifier.turn.set(std::time::Instant::now());
        let found = applier
            .apply(&[checkpoint_message(&checkpoint(&registry, 6))])
            .expect("applies")
            .sync
            .expect("compared");
        assert_eq!(
            found.gap.map(|gap| gap.cause),
            Some(GapCause::ChecksumMismatch { seq: 6 })
        );
    }

    #[test]
    fn no_checkpoint_is_compared_soon_after_a_change_sent_straight_to_the_exchange() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut applier = applier(&dir.path().join("pos.db"));
        let registry = Registry::from_config(&Default::default()).expect("built-ins");
        let sequenced = Envelope::new(
            "category_update",
            "K",
            json!({"category_id": 7, "category_name": "Drinks"}),
        )
        .with_seq(1)
        .with_catalog("c");
        // The same change from the original back office: no seq, no id.
        let direct = Envelope::new(
            "category_update",
            "K",
            json!({"category_id": 8, "category_name": "Food"}),
        );
        applier
            .apply(&[inbound(&sequenced), inbound(&direct)])
            .expect("applies");
        let skipped = applier
            .apply(&[checkpoint_message(&checkpoint(&registry, 1))])
            .expect("applies");
        assert_eq!(
            skipped.sync, None,
            "not compared while the backend may not have sequenced category 8 yet"
        );
    }

    #[test]
    fn a_kind_a_switched_off_plugin_changes_is_not_compared() {
        let all = Registry::from_config(&Default::default()).expect("built-ins");
        let kinds = |registry: &Registry| -> Vec<String> {
            registry
                .checksum_spec()
                .kinds()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(kinds(&all), ["category", "product"]);
        let plugins = [(
            "price".to_owned(),
            crate::config::PluginSetting::Toggle(false),
        )]
        .into_iter()
        .collect();
        let without_prices = Registry::from_config(&plugins).expect("built-ins");
        assert_eq!(
            kinds(&without_prices),
            ["category"],
            "a till that takes no prices holds other products than the backend"
        );
    }

    #[test]
    fn a_kind_that_differs_again_after_a_snapshot_is_no_longer_compared() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path);
        let registry = Registry::from_config(&Default::default()).expect("built-ins");
        let product = Envelope::new(
            "product_update",
            "K",
            json!({"product_id": "A", "product_name": "A", "price": 1}),
        )
        .with_seq(1)
        .with_catalog("c");
        applier.apply(&[inbound(&product)]).expect("applies");
        // The backend's plugin holds products otherwise than this one.
        let mut other = checkpoint(&registry, 1);
        other.checksums.insert(
            "product".into(),
            Checksum {
                sum: 12_345,
                count: 1,
            },
        );
        other.checksums.remove("category");
        let first = applier
            .apply(&[checkpoint_message(&other)])
            .expect("applies")
            .sync
            .expect("a gap");
        assert!(first.gap.is_some());
        // As a snapshot does: the gap closed, the catalog as it was.
        applier
            .database
            .connection()
            .execute("UPDATE possync_sequence SET gap_cause = NULL", [])
            .expect("closed");
        applier.verifier.turn.set(std::time::Instant::now());
        let again = applier
            .apply(&[checkpoint_message(&other)])
            .expect("applies");
        assert_eq!(again.sync, None, "neither a gap nor a match: given up");
        assert!(applier.verifier.given_up.contains("product"));
    }
}
