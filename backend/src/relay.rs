//! The relay: publishes the outbox to the broker in each store's sequence
//! order, with publisher confirms, and marks rows published once confirmed.
//!
//! Rows go out in chunks, each marked published once the broker confirmed
//! all of it: when the broker refuses a message (a full queue that rejects
//! publishes) or the connection fails, the rows of the chunks confirmed
//! before are marked, no row after a store's first unconfirmed one is, and
//! the next round starts each store from its first unpublished row. The
//! rows sent after the refused one go again; terminals drop those they
//! applied by their `seq` and apply the refused one when it comes.
//!
//! Every message names the catalog (`catalog`, this database's id):
//! terminals follow one catalog per store and refuse another's.
//!
//! A row confirmed but not yet marked (the process died in between) is
//! published again after a restart: terminals drop it by its seq (and its
//! message id). A store with no terminal queue yet is no error: its changes
//! are in the catalog for the terminals that join later.
//!
//! Only the process that leads (see [`Storage::lead_relay`]) publishes, and
//! it asks again before every round: one that lost the lead (its database
//! connection ended) stops and waits to lead again.
//!
//! Marking is a commit of its own (a flush to disk), so it runs beside the
//! publishing, not in its way: confirmed rows go to a marker task, and the
//! next round skips what it holds. A mark that fails leaves its rows
//! unpublished, to go again; terminals drop the copies by their seq.
//!
//! A commit wakes the relay; a commit it is not told of (another backend
//! process's, on PostgreSQL) is found at the next poll
//! (`[relay] poll_interval_ms`).
//!
//! After a round, and between rounds, the relay publishes the checkpoints
//! that are due (see [`checkpoints`]).

mod checkpoints;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use possync_core::{Backoff, BrokerConfig, PublishError, Publisher};
use possync_sdk::Envelope;
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, watch};

use crate::catalog::Catalog;
use crate::config::RelayConfig;
use crate::events;
use crate::failpoint;
use crate::service::stopped;
use crate::storage::{OutboxRow, Storage};
use checkpoints::Schedule;

/// A failed round waits from 250 ms up to 30 s (a broker restart) before
/// the next.
const RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// Rows published before their confirms are awaited: a refusal sends
/// again at most this many rows the broker had already confirmed.
const CHUNK: usize = 256;

/// How often a stall that lasts is logged again.
const STALL_EVERY: Duration = Duration::from_secs(60);

/// Rounds a slow marker may fall behind before the relay waits for it: the
/// rows it holds are read again (and skipped) each round.
const MARKS_BEHIND: usize = 4;

/// Publishes a catalog's outbox while this process leads the relay.
#[derive(Debug)]
pub(crate) struct Relay<S> {
    catalog: Arc<Catalog<S>>,
    broker: BrokerConfig,
    config: RelayConfig,
    /// The catalog's id, read once.
    catalog_id: std::sync::OnceLock<String>,
}

/// Why a round published nothing.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("outbox row {store} #{seq} holds a payload that is not JSON: {detail}")]
    BadPayload {
        store: String,
        seq: i64,
        detail: String,
    },
    #[error("a checkpoint: {0}")]
    Checkpoint(String),
}

/// What a round did.
enum Round {
    /// Published this many rows.
    Published(usize),
    /// The outbox is empty.
    Idle,
}

/// Failed rounds in a row, for logging a stretch of failures once.
#[derive(Default)]
struct Failures {
    attempts: u32,
    since: Option<Instant>,
    /// When the stall was last logged loudly.
    told: Option<Instant>,
}

impl<S: Storage> Relay<S> {
    pub(crate) fn new(catalog: Arc<Catalog<S>>, broker: BrokerConfig, config: RelayConfig) -> Self {
        Self {
            catalog,
            broker,
            config,
            catalog_id: std::sync::OnceLock::new(),
        }
    }

    /// Relays until `stop` turns true: waits to lead, then publishes
    /// whenever a commit wakes it or the poll interval passes, for as long
    /// as it leads.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut publisher: Option<Publisher> = None;
        while self.lead(&mut stop).await {
            let (marker, marking) = Marker::start(Arc::clone(&self.catalog));
            let mut schedule =
                Schedule::start(&self.config, self.catalog.checksums(), Instant::now());
            self.publish_while_leading(&mut publisher, &marker, schedule.as_mut(), &mut stop)
                .await;
            // What the broker confirmed is marked before the relay stops or
            // stands by: a row marked late goes out again, harmless but
            // wasted.
            drop(marker);
            let _ = marking.await;
        }
        if let Some(publisher) = publisher {
            publisher.close().await;
        }
    }

    /// Publishes until `stop` turns true or this process no longer leads.
    async fn publish_while_leading(
        &self,
        publisher: &mut Option<Publisher>,
        marker: &Marker,
        mut schedule: Option<&mut Schedule>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let mut failures = Failures::default();
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        while !*stop.borrow() {
            match self.catalog.storage().lead_relay().await {
                Ok(true) => {}
                Ok(false) => {
                    events::relay_lost_lead("another backend process took the relay's lock");
                    return;
                }
                Err(err) => {
                    events::relay_lost_lead(&err.to_string());
                    return;
                }
            }
            tokio::select! {
                () = marker.keep_up(self.config.batch_size) => {}
                () = stopped(stop) => return,
            }
            let round = self.round(publisher, marker, schedule.as_deref_mut()).await;
            if round.is_ok()
                && let Some(schedule) = schedule.as_deref_mut()
            {
                self.checkpoints(schedule, publisher, marker).await;
            }
            match round {
                // While marks fail, a round that publishes is no recovery:
                // the back-off keeps growing.
                Ok(Round::Published(rows)) => {
                    if !marker.failing() {
                        failures.recovered();
                    }
                    if rows >= self.config.batch_size {
                        // More may wait: no sleep between full rounds.
                        continue;
                    }
                }
                Ok(Round::Idle) => {
                    if !marker.failing() {
                        failures.recovered();
                    }
                }
                Err(err) => {
                    if let RoundError::Publish(PublishError::Broker(_)) = err {
                        // A new connection on the next round.
                        if let Some(old) = publisher.take() {
                            old.close().await;
                        }
                    }
                    let delay = failures.failed(&err, self.unpublished_count().await);
                    if sleep_or_stop(delay, stop).await {
                        return;
                    }
                    continue;
                }
            }
            tokio::select! {
                () = self.catalog.committed().notified() => {}
                () = tokio::time::sleep(poll) => {}
                () = stopped(stop) => return,
            }
        }
    }

    /// Waits until this process may relay; false if asked to stop first.
    async fn lead(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let retry = Duration::from_secs(self.config.lead_retry_secs);
        let mut told = false;
        let mut failures = Failures::default();
        loop {
            if *stop.borrow() {
                return false;
            }
            let delay = match self.catalog.storage().lead_relay().await {
                Ok(true) => {
                    events::relay_leading();
                    return true;
                }
                Ok(false) => {
                    if !told {
                        events::relay_standby(self.config.lead_retry_secs);
                        told = true;
                    }
                    retry
                }
                Err(err) => failures.failed(&RoundError::Storage(err), 0),
            };
            if sleep_or_stop(delay, stop).await {
                return false;
            }
        }
    }

    /// Publishes up to a batch of unpublished rows and marks them published;
    /// counts them towards their stores' checkpoints.
    async fn round(
        &self,
        publisher: &mut Option<Publisher>,
        marker: &Marker,
        mut schedule: Option<&mut Schedule>,
    ) -> Result<Round, RoundError> {
        let storage = self.catalog.storage();
        // Taken before the read: a row whose mark lands meanwhile is
        // skipped by what was held, not published again.
        let (held_rows, held) = marker.held_now();
        // A mark that failed fails the round: its rows go again, after the
        // back-off, not at once and forever while the database refuses.
        // Asked after the snapshot: a failure is told before its rows are
        // released, so rows released by it are never published at once.
        if let Some(err) = marker.failure() {
            return Err(RoundError::Storage(err));
        }
        let mut rows = storage
            .unpublished(self.config.batch_size + held_rows)
            .await?;
        rows.retain(|row| held.get(&row.store).is_none_or(|&up_to| row.seq > up_to));
        rows.truncate(self.config.batch_size);
        if rows.is_empty() {
            return Ok(Round::Idle);
        }
        let started = Instant::now();
        let catalog = self.catalog_id().await?;
        // Each store's last row of the round (a store's rows come in seq
        // order): its head, as far as the relay knows, which tells a
        // terminal in a backlog how far it is.
        let heads: HashMap<&str, i64> = rows.iter().map(|r| (r.store.as_str(), r.seq)).collect();
        let envelopes = rows
            .iter()
            .map(|row| {
                let head = heads.get(row.store.as_str()).copied().unwrap_or(row.seq);
                envelope(row, &catalog).map(|envelope| envelope.with_head(head))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The checkpoints due for stores of this round, each placed right
        // after the change it states the catalog at: a terminal meets it
        // standing exactly there.
        let placed = match schedule.as_deref_mut() {
            Some(schedule) => self.place_checkpoints(schedule, &rows).await?,
            None => checkpoints::Placed::default(),
        };
        let sequence = placed.interleave(envelopes);
        let publisher = self.connected(publisher).await?;
        // Marked once per round (a mark is a commit, a flush to disk), or,
        // after a refusal or failure, as far as the chunks the broker
        // confirmed: that chunk and those after go again next round from
        // each store's first unpublished row.
        let mut confirmed: Vec<(String, i64)> = Vec::with_capacity(rows.len());
        let mut published_checkpoints = Vec::new();
        for chunk in checkpoints::chunks(sequence, CHUNK) {
            let chunk_rows: Vec<&OutboxRow> = chunk.rows.iter().map(|&i| &rows[i]).collect();
            let sent = publisher
                .publish_envelopes(chunk.envelopes)
                .await
                .inspect_err(|err| name_unpublishable(err, &chunk_rows));
            match sent {
                Ok(_) => {
                    failpoint::relay_confirmed(chunk_rows.len());
                    confirmed.extend(chunk_rows.iter().map(|r| (r.store.clone(), r.seq)));
                    published_checkpoints.extend(chunk.checkpoints);
                }
                Err(err) => {
                    if let Some(schedule) = schedule.as_deref_mut() {
                        schedule.published(&confirmed, Instant::now());
                        self.checkpoints_published(schedule, &published_checkpoints)
                            .await;
                    }
                    marker.mark(confirmed);
                    return Err(err.into());
                }
            }
        }
        marker.mark(confirmed.clone());
        if let Some(schedule) = schedule {
            schedule.published(&confirmed, Instant::now());
            self.checkpoints_published(schedule, &published_checkpoints)
                .await;
        }
        let stores = rows
            .iter()
            .map(|r| r.store.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        events::relay_published(rows.len(), stores, started.elapsed().as_millis());
        Ok(Round::Published(rows.len()))
    }

    /// The catalog's id, read once.
    async fn catalog_id(&self) -> Result<String, crate::storage::StorageError> {
        if let Some(id) = self.catalog_id.get() {
            return Ok(id.clone());
        }
        let id = self.catalog.storage().catalog_id().await?;
        Ok(self.catalog_id.get_or_init(|| id).clone())
    }

    /// The publisher, connected first if it is not.
    async fn connected<'p>(
        &self,
        publisher: &'p mut Option<Publisher>,
    ) -> Result<&'p Publisher, PublishError> {
        Ok(match publisher {
            Some(publisher) => publisher,
            None => publisher.insert(
                Publisher::connect(&self.broker)
                    .await?
                    .unroutable_is_published()
                    // The limit changes were checked against when submitted.
                    .with_max_message_bytes(self.catalog.max_message_bytes()),
            ),
        })
    }

    /// How many rows wait, for the failure log; 0 if the database cannot say.
    async fn unpublished_count(&self) -> usize {
        match self.catalog.storage().heads().await {
            Ok(heads) => heads
                .iter()
                .map(|h| usize::try_from(h.unpublished).unwrap_or(0))
                .sum(),
            Err(_) => 0,
        }
    }
}

/// Marks confirmed rows published, beside the relay's rounds.
#[derive(Debug)]
struct Marker {
    marks: mpsc::UnboundedSender<Vec<(String, i64)>>,
    /// The rows handed over and not yet marked: per store, the highest seq
    /// (each store's rows are confirmed, and so marked, in order) and how
    /// many rows that covers.
    held: Arc<Mutex<Held>>,
    /// Rung after each mark.
    marked: Arc<Notify>,
    /// The last mark's failure, until a round reports it.
    failed: Arc<Mutex<Option<crate::storage::StorageError>>>,
    /// Whether the last mark failed.
    failing: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Held {
    up_to: HashMap<String, i64>,
    rows: usize,
}

impl Marker {
    /// The marker and its task, which ends once the marker is dropped and
    /// everything handed over is marked (or failed to be).
    fn start<S: Storage>(catalog: Arc<Catalog<S>>) -> (Self, tokio::task::JoinHandle<()>) {
        let (marks, mut handed) = mpsc::unbounded_channel::<Vec<(String, i64)>>();
        let held = Arc::new(Mutex::new(Held::default()));
        let marked = Arc::new(Notify::new());
        let failed = Arc::new(Mutex::new(None));
        let failing = Arc::new(AtomicBool::new(false));
        let task = {
            let held = Arc::clone(&held);
            let marked = Arc::clone(&marked);
            let failed = Arc::clone(&failed);
            let failing = Arc::clone(&failing);
            tokio::spawn(async move {
                while let Some(mut rows) = handed.recv().await {
                    // Whatever else waits shares the commit.
                    while let Ok(more) = handed.try_recv() {
                        rows.extend(more);
                    }
                    let marked_ok = match catalog.storage().mark_published(&rows).await {
                        Ok(()) => true,
                        Err(err) => {
                            // Unmarked rows go out again; terminals drop the copies.
                            events::relay_mark_failed(&err.to_string(), rows.len());
                            *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                            false
                        }
                    };
                    failing.store(!marked_ok, Ordering::SeqCst);
                    release(&held, &rows);
                    marked.notify_waiters();
                }
            })
        };
        (
            Self {
                marks,
                held,
                marked,
                failed,
                failing,
            },
            task,
        )
    }

    /// Hands confirmed rows over to be marked.
    fn mark(&self, rows: Vec<(String, i64)>) {
        if rows.is_empty() {
            return;
        }
        {
            let mut held = lock(&self.held);
            held.rows += rows.len();
            for (store, seq) in &rows {
                let up_to = held.up_to.entry(store.clone()).or_insert(*seq);
                *up_to = (*up_to).max(*seq);
            }
        }
        if let Err(unsent) = self.marks.send(rows) {
            // The task is gone (it only ends once this marker is dropped):
            // nothing holds these rows, so they go out again.
            release(&self.held, &unsent.0);
        }
    }

    /// How many rows wait to be marked.
    fn held(&self) -> usize {
        lock(&self.held).rows
    }

    /// Whether the last mark failed.
    fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// Why the last mark failed, once.
    fn failure(&self) -> Option<crate::storage::StorageError> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// How many rows wait to be marked, and up to which seq of each store.
    fn held_now(&self) -> (usize, HashMap<String, i64>) {
        let held = lock(&self.held);
        (held.rows, held.up_to.clone())
    }

    /// Waits while the marker is more than a few rounds behind.
    async fn keep_up(&self, batch_size: usize) {
        loop {
            let marked = self.marked.notified();
            if self.held() <= batch_size.saturating_mul(MARKS_BEHIND) {
                return;
            }
            marked.await;
        }
    }
}

/// Forgets marked (or failed) rows, leaving a store held only by rows
/// handed over after them.
fn release(held: &Mutex<Held>, rows: &[(String, i64)]) {
    let mut held = lock(held);
    held.rows = held.rows.saturating_sub(rows.len());
    for (store, seq) in rows {
        if held.up_to.get(store) == Some(seq) {
            held.up_to.remove(store);
        }
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    // Plain numbers: sound whatever panicked while holding them.
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Failures {
    /// A failed round: logs it (loudly the first time) and returns the wait.
    fn failed(&mut self, err: &RoundError, unpublished: usize) -> Duration {
        self.attempts += 1;
        let first = self.since.is_none();
        self.since.get_or_insert_with(Instant::now);
        let delay = RETRY.delay(self.attempts);
        events::relay_failed(&err.to_string(), unpublished, delay.as_millis(), first);
        let now = Instant::now();
        if first {
            self.told = Some(now);
        } else if self
            .told
            .is_none_or(|told| now.duration_since(told) >= STALL_EVERY)
        {
            self.told = Some(now);
            let since = self
                .since
                .map_or(0, |since| now.duration_since(since).as_millis());
            events::relay_stalled(&err.to_string(), unpublished, since, self.attempts);
        }
        delay
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            events::relay_recovered(since.elapsed().as_millis(), self.attempts);
        }
        self.attempts = 0;
        self.told = None;
    }
}

/// The wire envelope of an outbox row: the original format's four fields,
/// the message id (terminals drop a duplicate), the store's seq and the
/// catalog that gave it.
fn envelope(row: &OutboxRow, catalog: &str) -> Result<Envelope, RoundError> {
    let payload =
        RawValue::from_string(row.payload.clone()).map_err(|err| RoundError::BadPayload {
            store: row.store.clone(),
            seq: row.seq,
            detail: err.to_string(),
        })?;
    Ok(relayed_envelope(
        &row.store,
        &row.message_type,
        payload,
        &row.timestamp,
        &row.message_id,
        row.seq,
        catalog,
    ))
}

/// The length of a catalog id: 16 random bytes in hex, on every storage.
pub(crate) const CATALOG_ID_LEN: usize = 32;

/// The envelope the relay publishes for a change: what terminals receive,
/// and what a submission's size is measured by.
pub(crate) fn relayed_envelope(
    store: &str,
    message_type: &str,
    payload: Box<RawValue>,
    timestamp: &str,
    message_id: &str,
    seq: i64,
    catalog: &str,
) -> Envelope {
    Envelope::with_raw_payload(message_type, store, payload)
        .with_timestamp(timestamp)
        .with_message_id(message_id)
        .with_seq(seq)
        .with_catalog(catalog)
}

/// A row the publisher refuses before sending (invalid store or type, too
/// large) will be refused every time: named loudly, with its store and seq.
fn name_unpublishable(err: &PublishError, rows: &[&OutboxRow]) {
    let routing_key = match err {
        PublishError::InvalidLicense(_)
        | PublishError::InvalidType(_)
        | PublishError::Encode(_) => None,
        PublishError::TooLarge { routing_key, .. } => Some(routing_key.as_str()),
        _ => return,
    };
    let row = rows.iter().find(|row| {
        routing_key.is_none_or(|key| key == format!("license.{}.{}", row.store, row.message_type))
    });
    if let Some(row) = row {
        events::relay_row_unpublishable(&row.store, row.seq, &err.to_string());
    }
}

/// Sleeps `delay`; true if asked to stop meanwhile.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stopped(stop) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_row_goes_out_in_the_original_format_with_its_id_and_seq() {
        let row = OutboxRow {
            store: "STORE-1".into(),
            seq: 7,
            message_type: "price_update".into(),
            payload: r#"{"product_id":"P1","new_price":2.5}"#.into(),
            timestamp: "2025-11-27T10:30:00Z".into(),
            message_id: "m-7".into(),
        };
        let wire =
            serde_json::to_value(envelope(&row, "c0ffee").expect("an envelope")).expect("encodes");
        assert_eq!(
            wire,
            serde_json::json!({
                "type": "price_update",
                "license_key": "STORE-1",
                "payload": {"product_id": "P1", "new_price": 2.5},
                "timestamp": "2025-11-27T10:30:00Z",
                "message_id": "m-7",
                "seq": 7,
                "catalog": "c0ffee",
            })
        );
    }

    #[test]
    fn a_payload_that_is_not_json_is_named_by_its_store_and_seq() {
        let row = OutboxRow {
            store: "STORE-1".into(),
            seq: 3,
            message_type: "price_update".into(),
            payload: "{not json".into(),
            timestamp: "2025-11-27T10:30:00Z".into(),
            message_id: "m-3".into(),
        };
        let err = envelope(&row, "c0ffee").expect_err("refused").to_string();
        assert!(err.contains("STORE-1 #3"), "{err}");
    }
}

#[cfg(test)]
mod lead_tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use possync_core::Registry;

    use super::*;
    use crate::testing::Scripted;

    #[tokio::test]
    async fn a_relay_that_lost_the_lead_stops_publishing() {
        let storage = Scripted::new().await;
        *storage.leads.lock().expect("not poisoned") = [true, true, false].into();
        let registry = Registry::for_publishing(&BTreeMap::new()).expect("plugins load");
        let catalog = Arc::new(Catalog::new(Arc::new(storage), Arc::new(registry)));
        let relay = Relay::new(
            Arc::clone(&catalog),
            BrokerConfig::default(),
            RelayConfig {
                poll_interval_ms: 5,
                ..RelayConfig::default()
            },
        );
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(relay.run(stopped));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rounds = catalog.storage().rounds.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            catalog.storage().rounds.load(Ordering::SeqCst),
            rounds,
            "no round once the lead is lost"
        );
        assert!(rounds <= 2, "{rounds} rounds for two answers of `true`");
        let _ = stop.send(true);
        running.await.expect("the relay stops");
    }
}

#[cfg(test)]
mod marker_tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use possync_core::Registry;

    use super::*;
    use crate::catalog::ChangeRequest;
    use crate::testing::Scripted;

    /// A relay over a scripted storage, and a queue of its own for a store.
    struct Rig {
        store: String,
        connection: lapin::Connection,
        consumer: lapin::Consumer,
        catalog: Arc<Catalog<Scripted>>,
        stop: watch::Sender<bool>,
        running: tokio::task::JoinHandle<()>,
    }

    impl Rig {
        async fn start(storage: Scripted, config: RelayConfig) -> Self {
            let store = format!("MARKS-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
            let broker = BrokerConfig::default();
            let connection = lapin::Connection::connect(&broker.urls[0], Default::default())
                .await
                .expect("the broker answers");
            let channel = connection.create_channel().await.expect("a channel");
            let queue = format!("possync.test.{store}");
            let options = QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await
                .expect("the queue");
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let exchange = broker.exchange.as_str();
            channel
                .exchange_declare(
                    exchange.into(),
                    lapin::ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
                .expect("the exchange");
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    format!("license.{store}.#").as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bound");
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consuming");
            let registry = Registry::for_publishing(&BTreeMap::new()).expect("plugins load");
            let catalog = Arc::new(Catalog::new(Arc::new(storage), Arc::new(registry)));
            // As the service does before it starts the relay.
            crate::service::sync_checksums(&catalog)
                .await
                .expect("the checksums are computed");
            let relay = Relay::new(Arc::clone(&catalog), broker, config);
            let (stop, stopped) = watch::channel(false);
            let running = tokio::spawn(relay.run(stopped));
            Self {
                store,
                connection,
                consumer,
                catalog,
                stop,
                running,
            }
        }

        /// Submits `count` changes one at a time.
        async fn submit(&self, count: i64) {
            for i in 1..=count {
                let change = ChangeRequest {
                    store: self.store.clone(),
                    message_type: "price_update".into(),
                    payload: format!(r#"{{"product_id":"P{i}","new_price":{i}}}"#),
                    timestamp: None,
                    message_id: None,
                    clock: None,
                };
                self.catalog
                    .submit(vec![change], None)
                    .await
                    .expect("accepted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// Submits `count` changes in one submission: the store's head
        /// moves from 0 to `count` at once.
        async fn submit_at_once(&self, count: i64) {
            let changes = (1..=count)
                .map(|i| ChangeRequest {
                    store: self.store.clone(),
                    message_type: "price_update".into(),
                    payload: format!(r#"{{"product_id":"P{i}","new_price":{i}}}"#),
                    timestamp: None,
                    message_id: None,
                    clock: None,
                })
                .collect();
            self.catalog.submit(changes, None).await.expect("accepted");
        }

        /// Waits until every outbox row is marked.
        async fn all_marked(&self) {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let heads = self.catalog.storage().heads().await.expect("heads");
                if heads.iter().all(|h| h.unpublished == 0) {
                    return;
                }
                assert!(Instant::now() < deadline, "the outbox was never all marked");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// The seq of every message the store's queue received so far.
        async fn received(&mut self) -> Vec<i64> {
            self.received_envelopes()
                .await
                .iter()
                .map(|envelope| envelope.seq.expect("a seq"))
                .collect()
        }

        /// Every message the store's queue received so far.
        async fn received_envelopes(&mut self) -> Vec<possync_sdk::Envelope> {
            self.received_deliveries()
                .await
                .into_iter()
                .map(|(_, envelope)| envelope)
                .collect()
        }

        /// Every message the store's queue received so far, with its
        /// routing key.
        async fn received_deliveries(&mut self) -> Vec<(String, possync_sdk::Envelope)> {
            let mut envelopes = Vec::new();
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_millis(500), self.consumer.next()).await
            {
                envelopes.push((
                    delivery.routing_key.to_string(),
                    serde_json::from_slice(&delivery.data).expect("an envelope"),
                ));
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("acked");
            }
            envelopes
        }

        /// What the store's queue received so far, each checkpoint
        /// checked: on the store's key, with no seq, naming the catalog,
        /// stating the stored checksums.
        async fn received_with_checkpoints(&mut self) -> Vec<Seen> {
            let catalog_id = self.catalog.storage().catalog_id().await.expect("its id");
            let stored = self
                .catalog
                .storage()
                .checkpoint(&self.store, self.catalog.checksums())
                .await
                .expect("the checkpoint");
            let mut seen = Vec::new();
            for (routing_key, envelope) in self.received_deliveries().await {
                if envelope.message_type != possync_core::CHECKPOINT_TYPE {
                    seen.push(Seen::Change(envelope.seq.expect("a change has a seq")));
                    continue;
                }
                assert_eq!(
                    routing_key,
                    format!("license.{}.possync_checkpoint", self.store)
                );
                assert_eq!(envelope.seq, None, "a checkpoint changes nothing");
                assert_eq!(envelope.catalog.as_deref(), Some(catalog_id.as_str()));
                assert!(envelope.message_id.is_some() && envelope.timestamp.is_some());
                let checkpoint: possync_core::Checkpoint =
                    serde_json::from_str(envelope.payload.get()).expect("a checkpoint");
                if checkpoint.seq == stored.head {
                    assert_eq!(Some(&checkpoint.checksums), stored.checksums.as_ref());
                }
                seen.push(Seen::Checkpoint(checkpoint.seq));
            }
            seen
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            self.running.await.expect("the relay stops");
            let _ = self.connection.close(200, "done".into()).await;
        }
    }

    #[tokio::test]
    async fn rows_waiting_for_a_slow_mark_are_not_published_again() {
        let storage = Scripted::new().await;
        *storage.mark_delay.lock().expect("not poisoned") = Duration::from_millis(50);
        let mut rig = Rig::start(storage, RelayConfig::default()).await;
        rig.submit(40).await;
        rig.all_marked().await;
        assert_eq!(
            rig.received().await,
            (1..=40).collect::<Vec<_>>(),
            "each once, in order"
        );
        rig.stop().await;
    }

    #[tokio::test]
    async fn a_round_names_the_stores_head_on_each_row_before_its_last() {
        let mut rig = Rig::start(Scripted::new().await, RelayConfig::default()).await;
        let changes = (1..=5)
            .map(|i| ChangeRequest {
                store: rig.store.clone(),
                message_type: "price_update".into(),
                payload: format!(r#"{{"product_id":"P{i}","new_price":{i}}}"#),
                timestamp: None,
                message_id: None,
                clock: None,
            })
            .collect();
        rig.catalog.submit(changes, None).await.expect("accepted");
        rig.all_marked().await;
        let heads: Vec<(i64, Option<i64>)> = rig
            .received_envelopes()
            .await
            .iter()
            .map(|e| (e.seq.expect("a seq"), e.head))
            .collect();
        assert_eq!(
            heads,
            [
                (1, Some(5)),
                (2, Some(5)),
                (3, Some(5)),
                (4, Some(5)),
                (5, None)
            ]
        );
        rig.stop().await;
    }

    #[tokio::test]
    async fn marks_that_keep_failing_back_off_instead_of_flooding_the_store_then_recover() {
        let storage = Scripted::new().await;
        storage.failing_marks.store(usize::MAX, Ordering::SeqCst);
        let config = RelayConfig {
            batch_size: 10,
            ..RelayConfig::default()
        };
        let mut rig = Rig::start(storage, config).await;
        rig.submit(30).await;
        let rounds = || rig.catalog.storage().rounds.load(Ordering::SeqCst);
        let before = rounds();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Waits of 0.125-0.25, 0.25-0.5, 0.5-1, 1-2 and 2-4 s: at most
        // about six rounds in 5 s; a back-off that started over after each
        // round that published would make a dozen or more.
        let failing_rounds = rounds() - before;
        assert!(
            failing_rounds <= 8,
            "{failing_rounds} rounds in 5 s while every mark failed"
        );
        let while_failing = rig.received().await;
        // Each failed round backs off, longer each time while marks keep
        // failing (about 0.25, 0.5, 1 and 2 s): a few rounds of copies in
        // these seconds, not one after another.
        assert!(
            while_failing.len() <= 30 * 5,
            "{} deliveries of 30 changes in about 5 s",
            while_failing.len()
        );
        rig.catalog
            .storage()
            .failing_marks
            .store(0, Ordering::SeqCst);
        rig.all_marked().await;
        let mut every: Vec<i64> = while_failing;
        every.extend(rig.received().await);
        let distinct: std::collections::BTreeSet<i64> = every.iter().copied().collect();
        assert_eq!(
            distinct,
            (1..=30).collect(),
            "every change reached the store"
        );
        rig.stop().await;
    }

    /// What a store's queue received: a change by its seq, or a checkpoint
    /// by the seq it states the catalog at.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Seen {
        Change(i64),
        Checkpoint(i64),
    }
    use Seen::{Change, Checkpoint};

    fn checkpoints(every_changes: u64, every_secs: u64) -> RelayConfig {
        RelayConfig {
            poll_interval_ms: 50,
            checkpoint_every_changes: every_changes,
            checkpoint_every_secs: every_secs,
            ..RelayConfig::default()
        }
    }

    #[tokio::test]
    async fn a_checkpoint_follows_the_changes_it_covers_on_the_stores_key_with_its_checksums() {
        let mut rig = Rig::start(Scripted::new().await, checkpoints(5, 0)).await;
        rig.submit(5).await;
        rig.all_marked().await;
        let received = rig.received_with_checkpoints().await;
        assert_eq!(
            received,
            [
                Change(1),
                Change(2),
                Change(3),
                Change(4),
                Change(5),
                Checkpoint(5)
            ]
        );
        let stored = rig
            .catalog
            .storage()
            .checkpoint(&rig.store, rig.catalog.checksums())
            .await
            .expect("the checkpoint");
        let products = stored
            .checksums
            .as_ref()
            .and_then(|checksums| checksums.get("product"))
            .map(|product| product.count);
        assert_eq!(products, Some(5), "P1 to P5: {stored:?}");
        rig.stop().await;
    }

    #[tokio::test]
    async fn no_checkpoint_goes_out_while_its_store_has_changes_to_publish() {
        let storage = Scripted::new().await;
        // Rows 4 to 6 are committed after each read of the relay.
        *storage.withheld_above.lock().expect("not poisoned") = Some(3);
        let mut rig = Rig::start(storage, checkpoints(1, 0)).await;
        rig.submit_at_once(6).await;
        let storage = Arc::clone(rig.catalog.storage());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let heads = storage.heads().await.expect("heads");
            if heads
                .iter()
                .any(|h| h.store == rig.store && h.unpublished == 3)
            {
                break;
            }
            assert!(Instant::now() < deadline, "rows 1 to 3 were never marked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Rounds (each followed by the due checkpoint's attempt) while 4
        // to 6 wait.
        let rounds = storage.rounds.load(Ordering::SeqCst);
        while storage.rounds.load(Ordering::SeqCst) < rounds + 5 {
            assert!(Instant::now() < deadline, "the relay stopped its rounds");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            rig.received_with_checkpoints().await,
            [Change(1), Change(2), Change(3)],
            "no checkpoint of seq 6 before 4 to 6"
        );
        *storage.withheld_above.lock().expect("not poisoned") = None;
        rig.all_marked().await;
        assert_eq!(
            rig.received_with_checkpoints().await,
            [Change(4), Change(5), Change(6), Checkpoint(6)]
        );
        rig.stop().await;
    }

    #[tokio::test]
    async fn every_store_gets_a_checkpoint_each_interval_even_when_nothing_changed() {
        let mut rig = Rig::start(Scripted::new().await, checkpoints(0, 1)).await;
        rig.submit(2).await;
        rig.all_marked().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut received: Vec<Seen> = Vec::new();
        while received
            .iter()
            .filter(|seen| matches!(seen, Checkpoint(_)))
            .count()
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "two checkpoints within 15 s: {received:?}"
            );
            received.extend(rig.received_with_checkpoints().await);
        }
        assert_eq!(received[..2], [Change(1), Change(2)]);
        assert!(
            received[2..].iter().all(|seen| *seen == Checkpoint(2)),
            "{received:?}"
        );
        rig.stop().await;
    }
}
