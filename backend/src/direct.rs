//! The direct consumer: records in the catalog the changes other publishers
//! (a back office app, `possync publish` without a backend) send straight
//! to the exchange, so the catalog of record stays complete. Terminals
//! receive those messages directly as well; the backend's copy comes from
//! its own durable queue, bound to `license.#`.
//!
//! Each message is submitted through [`Catalog::submit`] with its clock, and
//! acknowledged only after the commit. A message carrying `seq` came from a
//! backend's relay: one that names this catalog is skipped (it is in the
//! catalog already); one that names another catalog means two backends
//! publish on one exchange, and is logged as an error, counted and skipped;
//! one with `seq` but no catalog is dead-lettered. A checkpoint (the
//! relay's statement of a store's checksums) changes nothing: it is
//! acknowledged and not recorded. A message is recorded
//! once per store: keyed by its store and message id, or its store and
//! body when it has no id. One the catalog refuses (its checks, or
//! the database for what it holds) is dead-lettered with the reason; the
//! queue never stops for it. Only while the database fails (cannot be
//! reached) is the message held and tried again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use possync_core::{Backoff, BrokerConfig, CHECKPOINT_TYPE};
use possync_sdk::Envelope;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::catalog::{Catalog, ChangeRequest, SubmitError};
use crate::config::DirectConfig;
use crate::events;
use crate::queue::{self, QueueSpec, Settle};
use crate::service::stopped;
use crate::storage::{IdempotencyKey, Outcome, Storage, StorageError};

/// The idempotency client of messages consumed from the exchange, keyed by
/// their message id: a name no token can have (`:` is not allowed in one),
/// so that no back office client shares these keys.
pub(crate) const EXCHANGE_CLIENT: &str = ":exchange";

/// A change the database fails to store waits from 250 ms up to 5 s between
/// tries.
const HELD: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));

/// Consumes the backend's direct queue into a catalog.
#[derive(Debug)]
pub(crate) struct Direct<S> {
    catalog: Arc<Catalog<S>>,
    broker: BrokerConfig,
    config: DirectConfig,
    /// This catalog's id, read once.
    catalog_id: std::sync::OnceLock<String>,
    /// Messages another catalog's relay published, seen since start.
    foreign: AtomicU64,
    /// When each (catalog, store) publishing here was last logged.
    foreign_told: std::sync::Mutex<std::collections::HashMap<(String, String), Instant>>,
}

/// How often another catalog publishing to a store is logged again.
const FOREIGN_EVERY: Duration = Duration::from_secs(60);

impl<S: Storage> Direct<S> {
    /// Consumes until `stop` turns true, reconnecting with backoff.
    pub(crate) async fn run(self, stop: watch::Receiver<bool>) {
        queue::consume(&self, stop).await;
    }

    pub(crate) fn new(
        catalog: Arc<Catalog<S>>,
        broker: BrokerConfig,
        config: DirectConfig,
    ) -> Self {
        Self {
            catalog,
            broker,
            config,
            catalog_id: std::sync::OnceLock::new(),
            foreign: AtomicU64::new(0),
            foreign_told: std::sync::Mutex::default(),
        }
    }

    /// This catalog's id, held while the database cannot say; `None` if
    /// asked to stop meanwhile.
    async fn catalog_id(&self, stop: &mut watch::Receiver<bool>) -> Option<String> {
        let mut attempts: u32 = 0;
        loop {
            if let Some(id) = self.catalog_id.get() {
                return Some(id.clone());
            }
            match self.catalog.storage().catalog_id().await {
                Ok(id) => return Some(self.catalog_id.get_or_init(|| id).clone()),
                Err(err) => {
                    attempts += 1;
                    let delay = HELD.delay(attempts);
                    events::direct_held(&err.to_string(), delay.as_millis(), attempts == 1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stopped(stop) => return None,
                    }
                }
            }
        }
    }

    /// Records the deliveries of a batch in their order: each run of
    /// changes that carry a message id goes in one submission (one
    /// transaction); a submission the catalog refuses is tried again one
    /// change at a time, so that only the refused one is dead-lettered.
    /// `None` if asked to stop meanwhile.
    async fn record_batch(
        &self,
        batch: &[Delivery],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<Settle>> {
        let ours = self.catalog_id(stop).await?;
        let mut settles: Vec<Option<Settle>> = Vec::with_capacity(batch.len());
        let mut run: Vec<(usize, ChangeRequest, Option<IdempotencyKey>)> = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            let routing_key = delivery.routing_key.as_str();
            let settle = match request(routing_key, &delivery.data, &ours) {
                // A message without an id is recorded once by its own key
                // (its body): alone, after the run before it.
                Ok(Read::Change(request, key)) if request.message_id.is_none() => {
                    self.record_run(batch, &mut run, &mut settles, stop).await?;
                    self.record(routing_key, request, key, stop).await?
                }
                Ok(Read::Change(request, key)) => {
                    run.push((index, request, key));
                    settles.push(None);
                    continue;
                }
                read => self.settle_read(routing_key, read, &ours),
            };
            settles.push(Some(settle));
        }
        self.record_run(batch, &mut run, &mut settles, stop).await?;
        self.catalog.direct_taken(batch.len());
        Some(
            settles
                .into_iter()
                .map(|settle| settle.unwrap_or(Settle::Ack))
                .collect(),
        )
    }

    /// Records a run of changes with message ids in one submission, or one
    /// by one if the catalog refuses it; empties `run`.
    async fn record_run(
        &self,
        batch: &[Delivery],
        run: &mut Vec<(usize, ChangeRequest, Option<IdempotencyKey>)>,
        settles: &mut [Option<Settle>],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<()> {
        if run.len() > 1 {
            // A change recorded before is refused by its message id
            // (MessageIdUsed), so the submission needs no key of its own.
            for (_, request, _) in run.iter() {
                self.catalog.note_direct(&request.store);
            }
            let requests = run.iter().map(|(_, request, _)| request.clone()).collect();
            if let Ok(submitted) = self.catalog.submit(requests, None).await {
                for ((index, _, _), accepted) in run.iter().zip(&submitted.accepted) {
                    let seq = match accepted.outcome {
                        Outcome::Sequenced { seq } => Some(seq),
                        Outcome::Stale => None,
                    };
                    events::direct_recorded(batch[*index].routing_key.as_str(), seq);
                    settles[*index] = Some(Settle::Ack);
                }
                run.clear();
                return Some(());
            }
        }
        for (index, request, key) in run.drain(..) {
            let routing_key = batch[index].routing_key.as_str();
            settles[index] = Some(self.record(routing_key, request, key, stop).await?);
        }
        Some(())
    }

    /// What to do with a delivery that records nothing.
    fn settle_read(&self, routing_key: &str, read: Result<Read, String>, ours: &str) -> Settle {
        match read {
            Ok(Read::Change(..) | Read::Ours | Read::Checkpoint) => Settle::Ack,
            Ok(Read::Foreign { catalog, store }) => {
                let seen = self.foreign.fetch_add(1, Ordering::Relaxed) + 1;
                // Said at once, then once a minute while it lasts: every
                // message of the other backend comes here.
                let now = Instant::now();
                let mut told = self
                    .foreign_told
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let key = (catalog, store);
                let due = told
                    .get(&key)
                    .is_none_or(|last| now.duration_since(*last) >= FOREIGN_EVERY);
                if due {
                    events::direct_foreign_catalog(&key.0, &key.1, ours, seen);
                    told.insert(key, now);
                }
                Settle::Ack
            }
            Err(reason) => {
                events::direct_refused(routing_key, &reason);
                Settle::DeadLetter(reason)
            }
        }
    }

    /// Records one change in the catalog, holding it while the database
    /// fails; `None` if asked to stop meanwhile.
    async fn record(
        &self,
        routing_key: &str,
        request: ChangeRequest,
        key: Option<IdempotencyKey>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Settle> {
        let mut attempts: u32 = 0;
        loop {
            self.catalog.note_direct(&request.store);
            match self
                .catalog
                .submit(vec![request.clone()], key.clone())
                .await
            {
                Ok(submitted) => {
                    let seq = submitted.accepted.first().and_then(|a| match a.outcome {
                        Outcome::Sequenced { seq } => Some(seq),
                        Outcome::Stale => None,
                    });
                    events::direct_recorded(routing_key, seq);
                    return Some(Settle::Ack);
                }
                Err(SubmitError::Storage(StorageError::MessageIdUsed { .. })) => {
                    // Recorded before under this id, by a key since
                    // forgotten: terminals drop it by its id as well.
                    events::direct_recorded(routing_key, None);
                    return Some(Settle::Ack);
                }
                Err(SubmitError::Storage(err)) if err.is_transient() => {
                    let reason = err.to_string();
                    attempts += 1;
                    let delay = HELD.delay(attempts);
                    events::direct_held(&reason, delay.as_millis(), attempts == 1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stopped(stop) => return None,
                    }
                }
                Err(refused) => {
                    let reason = refused.to_string();
                    events::direct_refused(routing_key, &reason);
                    return Some(Settle::DeadLetter(reason));
                }
            }
        }
    }
}

/// The binding of the direct queue: every store's changes.
const BINDING: &str = "license.#";

/// What a delivery is to this catalog.
#[derive(Debug, PartialEq)]
enum Read {
    /// A change to record, with its idempotency key.
    Change(ChangeRequest, Option<IdempotencyKey>),
    /// This catalog's relay published it: it is in the catalog already.
    Ours,
    /// A checkpoint, which states a catalog and changes nothing.
    Checkpoint,
    /// Another catalog's relay published it: two backends on one exchange.
    Foreign { catalog: String, store: String },
}

/// What a delivery is to the catalog `ours`; the reason it can never
/// enter the catalog if it cannot.
fn request(routing_key: &str, body: &[u8], ours: &str) -> Result<Read, String> {
    let envelope: Envelope = serde_json::from_slice(body)
        .map_err(|err| format!("not a possync message (JSON envelope): {err}"))?;
    if envelope.message_type == CHECKPOINT_TYPE {
        return Ok(match envelope.catalog {
            Some(catalog) if catalog != ours => Read::Foreign {
                catalog,
                store: envelope.license_key,
            },
            _ => Read::Checkpoint,
        });
    }
    if let Some(seq) = envelope.seq {
        return match envelope.catalog {
            Some(catalog) if catalog == ours => Ok(Read::Ours),
            Some(catalog) => Ok(Read::Foreign {
                catalog,
                store: envelope.license_key,
            }),
            None => Err(format!(
                "seq {seq} for store {} names no catalog, so no backend can tell whose sequence it is; it was not recorded: publish sequenced changes only through a possync backend that stamps its catalog id (upgrade the backend), and changes of your own without seq",
                envelope.license_key
            )),
        };
    }
    let expected = format!("license.{}.", envelope.license_key);
    if !routing_key.starts_with(&expected) {
        return Err(format!(
            "the routing key {routing_key} does not match the envelope's license_key {:?}",
            envelope.license_key
        ));
    }
    // A message is recorded once: by its id when it has one (a publisher
    // that sends it again after a reconnect may stamp it anew, so its body
    // can differ), else by its body, the same bytes when the broker
    // delivers it again after the backend died between commit and ack.
    // Message ids are unique per store only: the key names the store.
    let store = &envelope.license_key;
    let key = match &envelope.message_id {
        Some(id) => IdempotencyKey {
            client: EXCHANGE_CLIENT.into(),
            key: format!("{store}:{id}"),
            fingerprint: hex(&Sha256::digest(id.as_bytes())),
        },
        None => {
            let digest = hex(&Sha256::digest(body));
            IdempotencyKey {
                client: EXCHANGE_CLIENT.into(),
                key: format!("{store}:body:{digest}"),
                fingerprint: digest,
            }
        }
    };
    let key = Some(key);
    let clock = envelope.order();
    let request = ChangeRequest {
        store: envelope.license_key,
        message_type: envelope.message_type,
        payload: envelope.payload.get().to_owned(),
        timestamp: envelope.timestamp,
        message_id: envelope.message_id,
        clock,
    };
    Ok(Read::Change(request, key))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut text, b| {
        let _ = write!(text, "{b:02x}");
        text
    })
}

impl<S: Storage> queue::BatchConsumer for Direct<S> {
    fn broker(&self) -> &BrokerConfig {
        &self.broker
    }

    fn spec(&self) -> QueueSpec {
        QueueSpec {
            queue: self.config.queue.clone(),
            bindings: vec![BINDING.to_owned()],
            prefetch: self.config.prefetch,
            expiry_days: Some(self.config.queue_expiry_days),
            single_active_consumer: false,
            message_ttl_ms: None,
            connection_name: "possync backend direct",
            what: "declaring the backend's direct queue",
        }
    }

    fn handle_batch(
        &self,
        batch: &[Delivery],
        _channel: &lapin::Channel,
        stop: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Option<Vec<Settle>>> + Send {
        self.record_batch(batch, stop)
    }

    fn live(&self, ready: u32) {
        events::direct_live(&self.config.queue, BINDING, ready);
        self.catalog.direct_backlog(ready);
    }

    fn offline(&self, reason: &str, retry_in_ms: u128, first: bool) {
        events::direct_offline(reason, retry_in_ms, first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "c-ours";

    fn change(read: Result<Read, String>) -> (ChangeRequest, Option<IdempotencyKey>) {
        match read {
            Ok(Read::Change(request, key)) => (request, key),
            other => panic!("a change to record, not {other:?}"),
        }
    }

    #[test]
    fn a_message_in_the_original_format_is_submitted_with_its_clock_keyed_by_its_body() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{"product_id":"P1","new_price":2.5},"timestamp":"2025-11-27T10:30:00Z"}"#;
        let (request, key) = change(request("license.STORE-1.price_update", body, OURS));
        assert_eq!(request.store, "STORE-1");
        assert_eq!(request.message_type, "price_update");
        assert_eq!(request.payload, r#"{"product_id":"P1","new_price":2.5}"#);
        assert_eq!(request.timestamp.as_deref(), Some("2025-11-27T10:30:00Z"));
        assert_eq!(request.message_id, None);
        assert!(request.clock.is_some_and(|clock| !clock.exact));
        let key = key.expect("keyed by its body");
        assert!(key.key.starts_with("STORE-1:body:"), "{}", key.key);
        let (_, again) = change(super::request("license.STORE-1.price_update", body, OURS));
        assert_eq!(
            again,
            Some(key),
            "the same bytes delivered again are the same change"
        );
    }

    #[test]
    fn a_message_sent_again_with_new_stamps_is_the_same_change() {
        let first = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","publisher_id":"a","publisher_seq":1}"#;
        let again = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","publisher_id":"b","publisher_seq":7}"#;
        let key = |body: &[u8]| change(request("license.STORE-1.price_update", body, OURS)).1;
        assert_eq!(key(first), key(again));
    }

    #[test]
    fn a_message_with_an_id_is_idempotent_by_it() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","version":42}"#;
        let (request, key) = change(request("license.STORE-1.price_update", body, OURS));
        let key = key.expect("a key");
        assert_eq!(
            (key.client.as_str(), key.key.as_str()),
            (EXCHANGE_CLIENT, "STORE-1:m-1")
        );
        assert!(
            !key.client
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "no token can be named {:?}: its keys are the exchange's own",
            key.client
        );
        assert_eq!(key.fingerprint.len(), 64);
        assert_eq!(request.message_id.as_deref(), Some("m-1"));
        assert!(
            request
                .clock
                .is_some_and(|clock| clock.exact && clock.micros == 42)
        );
    }

    #[test]
    fn a_message_this_catalogs_relay_published_is_skipped() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","seq":3,"catalog":"c-ours"}"#;
        assert_eq!(
            request("license.STORE-1.price_update", body, OURS),
            Ok(Read::Ours)
        );
    }

    #[test]
    fn a_message_another_catalogs_relay_published_names_that_catalog_and_the_store() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","seq":3,"catalog":"c-other"}"#;
        assert_eq!(
            request("license.STORE-1.price_update", body, OURS),
            Ok(Read::Foreign {
                catalog: "c-other".into(),
                store: "STORE-1".into()
            })
        );
    }

    #[tokio::test]
    async fn a_checkpoint_is_settled_without_being_recorded() {
        let body = br#"{"type":"possync_checkpoint","license_key":"STORE-1","payload":{"seq":3,"checksums":{}},"message_id":"m-9","catalog":"c-ours"}"#;
        assert_eq!(
            request("license.STORE-1.possync_checkpoint", body, OURS),
            Ok(Read::Checkpoint)
        );
        let registry = possync_core::Registry::for_publishing(&Default::default())
            .expect("the built-in plugins load");
        let catalog = Catalog::new(
            Arc::new(crate::testing::Scripted::new().await),
            Arc::new(registry),
        );
        let direct = Direct::new(
            Arc::new(catalog),
            BrokerConfig::default(),
            DirectConfig::default(),
        );
        assert_eq!(
            direct.settle_read(
                "license.STORE-1.possync_checkpoint",
                Ok(Read::Checkpoint),
                OURS
            ),
            Settle::Ack
        );
        let other = br#"{"type":"possync_checkpoint","license_key":"STORE-1","payload":{"seq":3,"checksums":{}},"catalog":"c-other"}"#;
        assert_eq!(
            request("license.STORE-1.possync_checkpoint", other, OURS),
            Ok(Read::Foreign {
                catalog: "c-other".into(),
                store: "STORE-1".into()
            }),
            "another backend's relay on this exchange"
        );
    }

    #[test]
    fn a_message_with_seq_but_no_catalog_is_refused_with_what_to_do() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{},"message_id":"m-1","seq":3}"#;
        let err = request("license.STORE-1.price_update", body, OURS).expect_err("refused");
        assert!(err.contains("names no catalog"), "{err}");
        assert!(err.contains("STORE-1"), "{err}");
    }

    #[test]
    fn the_same_message_id_in_two_stores_is_two_changes() {
        let key = |store: &str| {
            let body = format!(
                r#"{{"type":"price_update","license_key":"{store}","payload":{{}},"message_id":"m-1"}}"#
            );
            change(request(
                &format!("license.{store}.price_update"),
                body.as_bytes(),
                OURS,
            ))
            .1
        };
        assert_ne!(key("STORE-1"), key("STORE-2"));
    }

    #[test]
    fn bad_json_and_a_foreign_routing_key_are_refused_with_a_reason() {
        let err = request("license.STORE-1.price_update", b"{oops", OURS).expect_err("refused");
        assert!(err.contains("not a possync message"), "{err}");
        let body = br#"{"type":"price_update","license_key":"STORE-2","payload":{}}"#;
        let err = request("license.STORE-1.price_update", body, OURS).expect_err("refused");
        assert!(err.contains("does not match"), "{err}");
    }
}
