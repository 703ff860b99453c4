//! Applies batches of received messages to the database, one transaction a
//! batch, on a thread of its own so SQLite's blocking calls never stall the
//! broker connection.

use std::sync::Arc;

use possync_sdk::{Context, Envelope, HandlerError};
use tokio::sync::{mpsc, oneshot};

use crate::config::TerminalConfig;
use crate::events;
use crate::identity::LicenseKey;
use crate::registry::{Registry, Route};
use crate::store::{Database, ProgressRecord, Quarantined, StateRecord, unix_now_ms};
use crate::transaction::{StaleEntity, Transaction};

/// A message taken from the terminal's queue, not yet settled.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    pub(crate) tag: u64,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    /// The broker delivered it before (it may have failed a try).
    pub(crate) redelivered: bool,
}

impl Inbound {
    /// Identifies the message across deliveries: its id, else its body.
    fn key(&self, envelope: &Envelope) -> String {
        match &envelope.message_id {
            Some(id) => format!("id:{id}"),
            None => format!("body:{:016x}", fnv1a(&self.body)),
        }
    }
}

/// A stable 64-bit hash (FNV-1a): the key must survive restarts and upgrades.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Written and committed.
    Applied { message_type: String },
    /// Its message id was applied before; nothing changed.
    Duplicate,
    /// Its entity holds a newer change; nothing changed.
    Stale {
        message_type: String,
        entities: Vec<StaleEntity>,
    },
    /// Its handler is switched off in config; nothing changed.
    Disabled { message_type: String },
    /// It can never apply; recorded in the quarantine table.
    DeadLetter {
        reason: String,
        message_type: Option<String>,
    },
    /// It may apply later; nothing changed.
    Retry { reason: String },
}

impl Outcome {
    pub(crate) fn settles_by_ack(&self) -> bool {
        !matches!(self, Self::Retry { .. })
    }
}

/// What a batch's outcomes add up to, for the status and the database.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) by_type: Vec<(String, u64)>,
    /// Messages that changed nothing because their entity held a newer change.
    pub(crate) stale_by_type: Vec<(String, u64)>,
    pub(crate) applied: u64,
    pub(crate) quarantined: u64,
    pub(crate) duplicates: u64,
    pub(crate) retries: u64,
    /// The type of the last message applied.
    pub(crate) last_type: Option<String>,
}

impl Tally {
    pub(crate) fn of(outcomes: &[Outcome]) -> Self {
        let mut tally = Self::default();
        let mut last_type = None;
        for outcome in outcomes {
            match outcome {
                Outcome::Applied { message_type } => {
                    tally.applied += 1;
                    last_type = Some(message_type);
                    count_type(&mut tally.by_type, message_type);
                }
                Outcome::Stale { message_type, .. } => {
                    count_type(&mut tally.stale_by_type, message_type);
                }
                Outcome::DeadLetter { .. } => tally.quarantined += 1,
                Outcome::Duplicate => tally.duplicates += 1,
                Outcome::Retry { .. } => tally.retries += 1,
                Outcome::Disabled { .. } => {}
            }
        }
        tally.last_type = last_type.cloned();
        tally
    }
}

fn count_type(counts: &mut Vec<(String, u64)>, message_type: &str) {
    match counts.iter_mut().find(|(t, _)| t == message_type) {
        Some((_, count)) => *count += 1,
        None => counts.push((message_type.to_owned(), 1)),
    }
}

/// A committed batch: one outcome per message, and what they add up to.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) tally: Tally,
}

/// How often the counters of `possync status` are written: a batch that
/// wrote them would dirty one more page of the database per commit.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counters committed to the catalog but not yet to `possync_status`.
#[derive(Debug, Clone)]
struct Progress {
    counts: ProgressRecord,
    written_at: std::time::Instant,
    /// The transaction in progress writes the counters.
    writing: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            counts: ProgressRecord::default(),
            written_at: std::time::Instant::now(),
            writing: false,
        }
    }
}

impl Progress {
    /// The counters with a batch's added, as of now.
    fn with(&self, tally: &Tally) -> ProgressRecord {
        let mut counts = self.counts.clone();
        counts.applied += tally.applied;
        counts.quarantined += tally.quarantined;
        counts.stale += tally.stale_by_type.iter().map(|(_, n)| n).sum::<u64>();
        if tally.applied > 0 {
            counts.last_applied_ms = Some(unix_now_ms());
        }
        if tally.last_type.is_some() {
            counts.last_type.clone_from(&tally.last_type);
        }
        counts
    }

    /// A batch committed, and the counters with it if it wrote them.
    fn committed(&mut self, tally: &Tally) {
        if self.writing {
            *self = Self::default();
        } else {
            self.counts = self.with(tally);
        }
    }
}

/// Applies batches; see [`ApplierHandle`] for the async side.
pub(crate) struct Applier {
    database: Database,
    dispatch: Dispatch,
    progress: Progress,
    pruned_at: std::time::Instant,
}

/// How often a busy terminal prunes its bookkeeping; an idle one prunes
/// each time it goes idle.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("license_key", &self.dispatch.license_key)
            .finish_non_exhaustive()
    }
}

/// Checks each message of a batch and hands it to its handler, inside the
/// batch's transaction.
struct Dispatch {
    registry: Arc<Registry>,
    license_key: LicenseKey,
    limits: Limits,
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
        }
    }
}

/// The whole batch failed: nothing of it applied, and it is held to be
/// tried again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    /// The database refused it (locked, full, read-only, ...).
    #[error("the batch could not be committed: {0}")]
    Database(#[from] rusqlite::Error),
    /// A handler's storage outside the database cannot take writes now.
    #[error("the batch could not be applied: {handler}: {reason}")]
    Storage { handler: String, reason: String },
}

impl Applier {
    pub(crate) fn new(
        database: Database,
        registry: Arc<Registry>,
        license_key: LicenseKey,
        limits: Limits,
    ) -> Self {
        Self {
            database,
            dispatch: Dispatch {
                registry,
                license_key,
                limits,
            },
            progress: Progress::default(),
            pruned_at: std::time::Instant::now(),
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
            Job::RecordState(record) => self.record_state(&record),
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
        let limits = &self.dispatch.limits;
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

    /// Writes the counters not yet written, for `possync status`.
    pub(crate) fn flush_progress(&mut self) {
        match self
            .database
            .record_progress_unsynced(&self.progress.counts)
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
        if self.pruned_at.elapsed() >= PRUNE_EVERY {
            self.prune();
        }
        if let Some(applied) = self.run(batch, false)? {
            return Ok(applied);
        }
        Ok(self.run(batch, true)?.unwrap_or_default())
    }

    /// One attempt at the batch; `None` when a handler failed outside
    /// `careful` mode (everything rolled back).
    fn run(&mut self, batch: &[Inbound], careful: bool) -> Result<Option<Applied>, BatchError> {
        let mut transaction = self.database.begin()?;
        let Some(outcomes) =
            self.dispatch
                .apply_in_transaction(&mut transaction, batch, careful)?
        else {
            return Ok(None);
        };
        let tally = Tally::of(&outcomes);
        self.progress.writing = self.progress.written_at.elapsed() >= PROGRESS_EVERY;
        if self.progress.writing {
            transaction.record_progress(&self.progress.with(&tally))?;
        }
        transaction.commit()?;
        self.progress.committed(&tally);
        log_committed(batch, &outcomes);
        Ok(Some(Applied { outcomes, tally }))
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

impl Dispatch {
    fn apply_in_transaction(
        &self,
        transaction: &mut Transaction<'_>,
        batch: &[Inbound],
        careful: bool,
    ) -> Result<Option<Vec<Outcome>>, BatchError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for inbound in batch {
            transaction.begin_message();
            let outcome = match self.check(inbound) {
                Ok(envelope) => {
                    let Some(outcome) = self.apply_one(transaction, inbound, &envelope, careful)?
                    else {
                        return Ok(None);
                    };
                    if inbound.redelivered && outcome.settles_by_ack() {
                        transaction.forget_attempts(&inbound.key(&envelope))?;
                    }
                    outcome
                }
                Err(reason) => self.quarantine(transaction, inbound, None, reason)?,
            };
            let retry = !outcome.settles_by_ack();
            outcomes.push(outcome);
            if retry {
                // The messages behind it wait for it, so that order holds.
                break;
            }
        }
        Ok(Some(outcomes))
    }

    fn check(&self, inbound: &Inbound) -> Result<Envelope, String> {
        check_envelope(
            &inbound.body,
            &inbound.routing_key,
            &self.license_key,
            self.limits.max_message_bytes,
        )
    }

    /// Applies one message; `None` when its handler failed outside
    /// `careful` mode (the batch must run again, carefully).
    fn apply_one(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: &Envelope,
        careful: bool,
    ) -> Result<Option<Outcome>, BatchError> {
        let handler = match self.registry.route(&envelope.message_type) {
            Route::Handler(handler) => handler,
            Route::Disabled(plugin) => {
                events::message_ignored(&envelope.message_type, plugin);
                return Ok(Some(Outcome::Disabled {
                    message_type: envelope.message_type.clone(),
                }));
            }
            Route::Unknown => {
                let reason = format!(
                    "unknown message type {:?}: no plugin handles it",
                    envelope.message_type
                );
                return Ok(Some(self.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    reason,
                )?));
            }
        };
        if careful {
            transaction.savepoint()?;
        }
        if let Some(message_id) = &envelope.message_id
            && !transaction.record_applied(message_id)?
        {
            if careful {
                transaction.release()?;
            }
            return Ok(Some(Outcome::Duplicate));
        }
        let result = handler.handle(
            envelope.payload.get(),
            &Context::of(envelope),
            &mut transaction.store(),
        );
        if let Some(fault) = transaction.take_fault() {
            // The database itself failed: no message of this batch can commit.
            return Err(fault.into());
        }
        if let Err(HandlerError::Storage(reason)) = result {
            return Err(BatchError::Storage {
                handler: handler.name().to_owned(),
                reason,
            });
        }
        if !careful && result.is_err() {
            return Ok(None);
        }
        let outcome = match result {
            Ok(()) => {
                if careful {
                    transaction.release()?;
                }
                let stale = transaction.take_stale();
                Ok(if stale.is_empty() {
                    Outcome::Applied {
                        message_type: envelope.message_type.clone(),
                    }
                } else {
                    Outcome::Stale {
                        message_type: envelope.message_type.clone(),
                        entities: stale,
                    }
                })
            }
            Err(HandlerError::Transient(reason)) => {
                transaction.rollback_to_savepoint()?;
                self.failed_try(
                    transaction,
                    inbound,
                    envelope,
                    format!("{}: {reason}", handler.name()),
                )
            }
            Err(HandlerError::Panicked(message)) => {
                transaction.rollback_to_savepoint()?;
                self.failed_try(
                    transaction,
                    inbound,
                    envelope,
                    format!("handler {} panicked: {message}", handler.name()),
                )
            }
            Err(err) => {
                transaction.rollback_to_savepoint()?;
                self.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    format!("{}: {err}", handler.name()),
                )
            }
        };
        Ok(Some(outcome?))
    }

    /// A try that may succeed another time: retry, unless the message has
    /// failed `max_attempts` times already (then it is a poison message).
    fn failed_try(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: &Envelope,
        reason: String,
    ) -> Result<Outcome, rusqlite::Error> {
        let key = inbound.key(envelope);
        let attempts = transaction.record_attempt(&key, &reason)?;
        if attempts < self.limits.max_attempts {
            return Ok(Outcome::Retry { reason });
        }
        transaction.forget_attempts(&key)?;
        self.quarantine(
            transaction,
            inbound,
            Some(envelope),
            format!("failed {attempts} times; last: {reason}"),
        )
    }

    fn quarantine(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: Option<&Envelope>,
        reason: String,
    ) -> Result<Outcome, rusqlite::Error> {
        let message = Quarantined::new(
            &inbound.routing_key,
            envelope.map(|e| e.message_type.as_str()),
            envelope.and_then(|e| e.message_id.as_deref()),
            reason,
            &inbound.body,
        );
        transaction.record_quarantined(&message, self.limits.quarantine_max_rows)?;
        Ok(Outcome::DeadLetter {
            reason: message.reason,
            message_type: message.message_type,
        })
    }
}

/// Decodes and validates a body from the broker; the error is the reason
/// to dead-letter it. Input from the network: it must never panic.
pub(crate) fn check_envelope(
    body: &[u8],
    routing_key: &str,
    license_key: &LicenseKey,
    max_message_bytes: usize,
) -> Result<Envelope, String> {
    if body.len() > max_message_bytes {
        return Err(format!(
            "message is {} bytes, over the limit of {max_message_bytes} (terminal.max_message_bytes)",
            body.len()
        ));
    }
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|err| format!("not a valid envelope: {err}"))?;
    if envelope.license_key != license_key.as_str() {
        return Err(format!(
            "envelope license_key {:?} is not this terminal's ({license_key})",
            envelope.license_key
        ));
    }
    // A license key holds no '.', so its word is exactly what follows "license.".
    let routed_type = routing_key
        .strip_prefix("license.")
        .and_then(|rest| rest.strip_prefix(license_key.as_str()))
        .and_then(|rest| match rest {
            "" => Some(None),
            _ => rest.strip_prefix('.').map(Some),
        });
    match routed_type {
        None => Err(format!(
            "routing key {routing_key:?} is not for this terminal's license"
        )),
        // A publisher that routes by one type and sends another is confused;
        // applying the body would bypass whatever the key was bound for.
        Some(Some(routed)) if routed != envelope.message_type => Err(format!(
            "routing key {routing_key:?} says type {routed:?} but the body says {:?}",
            envelope.message_type
        )),
        Some(_) => Ok(envelope),
    }
}

type Reply = oneshot::Sender<(Vec<Inbound>, Result<Applied, BatchError>)>;

pub(crate) enum Job {
    Apply(Vec<Inbound>, Reply),
    RecordState(StateRecord),
    FlushProgress,
}

/// The async side of an [`Applier`]. On a multi-threaded runtime the
/// applier runs on the consumer's own worker (`block_in_place`), which
/// spares two thread switches per batch; elsewhere it gets a thread of its
/// own. Either way SQLite's blocking calls never stall the runtime's other
/// tasks.
#[derive(Debug)]
pub(crate) enum ApplierHandle {
    Inline(Box<std::sync::Mutex<Applier>>),
    Thread {
        jobs: mpsc::Sender<Job>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl ApplierHandle {
    pub(crate) fn spawn(mut applier: Applier) -> std::io::Result<Self> {
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Ok(Self::Inline(Box::new(std::sync::Mutex::new(applier))));
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
            Self::Inline(applier) => {
                let result = tokio::task::block_in_place(|| match applier.lock() {
                    Ok(mut applier) => applier.apply(&batch),
                    Err(_) => unreachable_thread(),
                });
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
    pub(crate) async fn record_state(&self, record: StateRecord) {
        self.submit(Job::RecordState(record)).await;
    }

    /// Writes the counters `possync status` shows, when the terminal is idle.
    pub(crate) async fn flush_progress(&self) {
        self.submit(Job::FlushProgress).await;
    }

    /// Carries out a job that answers nothing, in order with the batches.
    async fn submit(&self, job: Job) {
        match self {
            Self::Inline(applier) => tokio::task::block_in_place(|| {
                if let Ok(mut applier) = applier.lock() {
                    applier.perform(job);
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
    use proptest::prelude::*;

    use super::*;

    fn key() -> LicenseKey {
        LicenseKey::new("STORE-1").expect("valid")
    }

    const ROUTING: &str = "license.STORE-1.price_update";

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,12}", inner, 0..8)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = check_envelope(&body, ROUTING, &key(), 1 << 20);
        }

        #[test]
        fn any_json_in_any_field_never_panics(
            message_type in json(), license in json(), payload in json(), timestamp in json(), version in json()
        ) {
            let body = serde_json::json!({
                "type": message_type, "license_key": license, "payload": payload,
                "timestamp": timestamp, "version": version,
            });
            let bytes = serde_json::to_vec(&body).expect("encodes");
            if let Ok(envelope) = check_envelope(&bytes, ROUTING, &key(), 1 << 20) {
                let _ = envelope.order();
            }
        }

        #[test]
        fn any_routing_key_never_panics(routing_key in ".{0,80}") {
            let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
            let _ = check_envelope(body, &routing_key, &key(), 1 << 20);
        }
    }

    #[test]
    fn hostile_shapes_are_refused_with_a_reason() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let cases: Vec<Vec<u8>> = vec![
            deep.into_bytes(),
            br#"{"type":"price_update","license_key":"STORE-1","payload":{},"version":1e999999}"#.to_vec(),
            br#"{"type":"price_update","license_key":"STORE-1","payload":{},"version":123456789012345678901234567890}"#.to_vec(),
            br#"{"type":7,"license_key":"STORE-1","payload":{}}"#.to_vec(),
            b"{\"type\":\"price_update\",\"license_key\":\"STORE-1\xff\",\"payload\":{}}".to_vec(),
            vec![0xff, 0xfe, 0x00],
            Vec::new(),
        ];
        for body in cases {
            let reason = check_envelope(&body, ROUTING, &key(), 1 << 20).expect_err("refused");
            assert!(reason.starts_with("not a valid envelope"), "{reason}");
        }
        let big = vec![b' '; 2048];
        let reason = check_envelope(&big, ROUTING, &key(), 1024).expect_err("too large");
        assert!(reason.contains("over the limit of 1024"), "{reason}");
    }

    #[test]
    fn only_routing_keys_of_this_license_pass() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
        for routing_key in ["license.STORE-1.price_update", "license.STORE-1"] {
            assert!(
                check_envelope(body, routing_key, &key(), 1 << 20).is_ok(),
                "{routing_key}"
            );
        }
        for routing_key in [
            "license.STORE-10.price_update",
            "license.STORE-.price_update",
            "license.STORE-1x",
            "licence.STORE-1.price_update",
            "license..STORE-1",
            "STORE-1.license.price_update",
            "",
        ] {
            let reason = check_envelope(body, routing_key, &key(), 1 << 20).expect_err("refused");
            assert!(
                reason.contains("is not for this terminal's license"),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_routing_key_whose_type_differs_from_the_body_is_refused_with_both_types() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
        for routing_key in [
            "license.STORE-1.product_delete",
            "license.STORE-1.a.b",
            "license.STORE-1.",
        ] {
            let reason = check_envelope(body, routing_key, &key(), 1 << 20).expect_err("refused");
            assert!(
                reason.contains("but the body says \"price_update\""),
                "{routing_key}: {reason}"
            );
        }
    }

    #[test]
    fn odd_timestamps_and_versions_only_change_the_order() {
        for timestamp in [
            "",
            "9999-99-99T99:99:99Z",
            "2025-11-27T10:30:00+99:99",
            "\u{0}",
            "2025-11-27T10:30:00.99999999999999999999Z",
        ] {
            let envelope =
                Envelope::new("t", "STORE-1", serde_json::json!({})).with_timestamp(timestamp);
            let _ = envelope.order();
        }
    }
}
