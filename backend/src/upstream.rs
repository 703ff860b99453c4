//! The upstream consumer: records what terminals send on
//! `up.<KEY>.<TERMINAL>.<type>`, orders and the other upstream types
//! through their plugins, delivery receipts in the fleet.
//!
//! A message is accepted only when its routing key, its body and (unless
//! `upstream.verify_user` is off) its AMQP `user_id` all name the same
//! store and terminal: RabbitMQ checks `user_id` against the sender's
//! connection, so a terminal cannot speak for another. A message is
//! recorded once by (store, terminal, message id), in one transaction per
//! batch, and acknowledged only after that commit. One that can never be
//! recorded is dead-lettered with the reason and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use possync_core::{
    Backoff, BrokerConfig, RECEIPT_TYPE, Receipt, SNAPSHOT_TYPE, UpstreamMessage, expected_user,
    parse_upstream_key, unix_now_ms,
};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::UpstreamConfig;
use crate::events;
use crate::fleet::Counters;
use crate::queue::{self, QueueSpec, Settle};
use crate::service::stopped;
use crate::storage::{ReceiptRecord, Storage, StorageError, UpstreamRecord};

/// A batch the database fails to store waits from 250 ms up to 5 s between
/// tries.
const HELD: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));

/// The longest message id recorded.
const MAX_MESSAGE_ID: usize = 128;

/// The most characters of a receipt's gap kept: a line on the fleet page.
const MAX_GAP_CHARS: usize = 300;

/// Consumes the backend's upstream queue.
pub(crate) struct Upstream<S> {
    catalog: Arc<Catalog<S>>,
    broker: BrokerConfig,
    config: UpstreamConfig,
    counters: Arc<Counters>,
    /// The backend's own broker user: a message from it failed the identity
    /// check because terminals share the backend's credentials.
    own_user: String,
}

/// What a delivery is.
#[derive(Debug, PartialEq)]
enum Read {
    /// A message to record.
    Message(UpstreamRecord),
    /// A receipt.
    Receipt(ReceiptRecord),
    /// Not for this queue: acknowledged, nothing recorded.
    Ignored,
}

/// Why a delivery was refused: the reason, and the name it is counted by.
#[derive(Debug, PartialEq)]
pub(crate) struct Refusal {
    pub(crate) reason: String,
    pub(crate) kind: &'static str,
}

fn refused(kind: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        kind,
    }
}

/// Cuts a terminal's description of its gap to [`MAX_GAP_CHARS`]: it
/// sends what it likes, and the fleet shows it on a line.
fn shorten(gap: &mut String) {
    if let Some((cut, _)) = gap.char_indices().nth(MAX_GAP_CHARS) {
        gap.truncate(cut);
        gap.push('…');
    }
}

impl<S: Storage> Upstream<S> {
    /// Consumes until `stop` turns true, reconnecting with backoff.
    pub(crate) async fn run(self, stop: watch::Receiver<bool>) {
        if !self.config.verify_user {
            events::upstream_unverified();
        }
        queue::consume(&self, stop).await;
    }

    pub(crate) fn new(
        catalog: Arc<Catalog<S>>,
        broker: BrokerConfig,
        config: UpstreamConfig,
        counters: Arc<Counters>,
    ) -> Self {
        let own_user = own_user(&broker);
        Self {
            catalog,
            broker,
            config,
            counters,
            own_user,
        }
    }

    /// Records a batch: its messages in one transaction, its receipts in
    /// another; `None` if asked to stop while the database fails.
    async fn record_batch(
        &self,
        batch: &[Delivery],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<Settle>> {
        let now = unix_now_ms();
        let mut settles = Vec::with_capacity(batch.len());
        let mut messages: Vec<(usize, UpstreamRecord)> = Vec::new();
        // The latest receipt of each terminal in the batch is enough.
        let mut receipts: HashMap<(String, String), ReceiptRecord> = HashMap::new();
        for (index, delivery) in batch.iter().enumerate() {
            let user = delivery
                .properties
                .user_id()
                .as_ref()
                .map(|user| user.as_str().to_owned());
            match self.read(
                delivery.routing_key.as_str(),
                &delivery.data,
                user.as_deref(),
                now,
            ) {
                Ok(Read::Message(record)) => {
                    messages.push((index, record));
                    settles.push(Settle::Ack);
                }
                Ok(Read::Ignored) => settles.push(Settle::Ack),
                Ok(Read::Receipt(receipt)) => {
                    let key = (receipt.store.clone(), receipt.terminal.clone());
                    let newer = receipts.get(&key).is_none_or(|kept| {
                        kept.receipt.run != receipt.receipt.run
                            || kept.receipt.n < receipt.receipt.n
                    });
                    if newer {
                        receipts.insert(key, receipt);
                    }
                    settles.push(Settle::Ack);
                }
                Err(refusal) => {
                    self.counters.refused(refusal.kind);
                    let routing_key = delivery.routing_key.as_str();
                    if routing_key.ends_with(".receipt") {
                        // A report the next one replaces: counted and
                        // dropped, not kept where refused orders are.
                        events::upstream_receipt_refused(routing_key, &refusal.reason);
                        settles.push(Settle::Ack);
                    } else {
                        events::upstream_refused(routing_key, &refusal.reason);
                        settles.push(Settle::DeadLetter(refusal.reason));
                    }
                }
            }
        }
        let receipts: Vec<ReceiptRecord> = receipts.into_values().collect();
        let records: Vec<UpstreamRecord> = messages.iter().map(|(_, r)| r.clone()).collect();
        let new = self
            .hold(stop, || {
                self.catalog.storage().record_upstream(records.clone())
            })
            .await?;
        match new {
            Ok(new) => {
                for ((_, record), new) in messages.iter().zip(new) {
                    if new {
                        self.counters.received(&record.store, &record.message_type);
                    } else {
                        self.counters.duplicate();
                    }
                }
            }
            Err(err) => {
                // The database refused the batch for what it holds: each
                // message alone, so that only the refused one is dead-lettered.
                events::upstream_refused("(batch)", &err.to_string());
                for (index, record) in &messages {
                    let one = self
                        .hold(stop, || {
                            self.catalog.storage().record_upstream(vec![record.clone()])
                        })
                        .await?;
                    match one {
                        Ok(new) if new.first() == Some(&true) => {
                            self.counters.received(&record.store, &record.message_type);
                        }
                        Ok(_) => self.counters.duplicate(),
                        Err(err) => {
                            self.counters.refused("database");
                            settles[*index] = Settle::DeadLetter(err.to_string());
                        }
                    }
                }
            }
        }
        if !messages.is_empty() {
            self.counters.recorded_messages();
        }
        if !receipts.is_empty() {
            let count = receipts.len();
            match self
                .hold(stop, || {
                    self.catalog.storage().record_receipts(receipts.clone())
                })
                .await?
            {
                Ok(()) => self.counters.receipts(count),
                // A refused receipt is only a report: the next one replaces it.
                Err(err) => events::upstream_refused("(receipts)", &err.to_string()),
            }
        }
        Some(settles)
    }

    /// Runs `work` until the database answers or refuses; `None` if asked
    /// to stop while it fails.
    async fn hold<T, F, W>(
        &self,
        stop: &mut watch::Receiver<bool>,
        work: W,
    ) -> Option<Result<T, StorageError>>
    where
        W: Fn() -> F,
        F: Future<Output = Result<T, StorageError>>,
    {
        let mut attempts: u32 = 0;
        loop {
            match work().await {
                Err(err) if err.is_transient() => {
                    attempts += 1;
                    let delay = HELD.delay(attempts);
                    events::upstream_held(&err.to_string(), delay.as_millis(), attempts == 1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stopped(stop) => return None,
                    }
                }
                done => return Some(done),
            }
        }
    }

    /// What a delivery is, or why it is refused.
    fn read(
        &self,
        routing_key: &str,
        body: &[u8],
        user: Option<&str>,
        now_ms: i64,
    ) -> Result<Read, Refusal> {
        // The snapshot queue has its copy, checks it and answers it.
        if parse_upstream_key(routing_key).is_some_and(|(_, _, kind)| kind == SNAPSHOT_TYPE) {
            return Ok(Read::Ignored);
        }
        let (message, store, terminal, message_type) =
            checked(&self.config, &self.own_user, routing_key, body, user)?;
        if message_type == RECEIPT_TYPE {
            let mut receipt: Receipt = serde_json::from_str(message.payload.get())
                .map_err(|err| refused("invalid", format!("not a receipt: {err}")))?;
            if let Some(gap) = &mut receipt.gap {
                shorten(gap);
            }
            if receipt.applied_up_to < 0 || receipt.highest_applied < receipt.applied_up_to {
                return Err(refused(
                    "invalid",
                    format!(
                        "a receipt with applied_up_to {} and highest_applied {}: no terminal applies that",
                        receipt.applied_up_to, receipt.highest_applied
                    ),
                ));
            }
            return Ok(Read::Receipt(ReceiptRecord {
                store: store.to_owned(),
                terminal: terminal.to_owned(),
                receipt,
                seen_ms: now_ms,
            }));
        }
        if !self.config.types.iter().any(|taken| taken == message_type) {
            return Err(refused(
                "type",
                format!(
                    "type {message_type} is not taken upstream; the backend takes {} (upstream.types)",
                    self.config.types.join(", ")
                ),
            ));
        }
        self.catalog
            .registry()
            .check(message_type, message.payload.get())
            .map_err(|err| refused("invalid", format!("{message_type}: {err}")))?;
        Ok(Read::Message(UpstreamRecord {
            store: message.license_key,
            terminal: message.terminal_id,
            message_type: message.message_type,
            message_id: message.message_id,
            created_at: message.created_at,
            payload: message.payload.get().to_owned(),
        }))
    }
}

/// The backend's own broker user: a message from it failed the identity
/// check because terminals share the backend's credentials.
pub(crate) fn own_user(broker: &BrokerConfig) -> String {
    broker
        .urls
        .first()
        .and_then(|url| url.parse::<lapin::uri::AMQPUri>().ok())
        .map_or_else(|| "guest".into(), |uri| uri.authority.userinfo.username)
}

/// The upstream message a delivery holds, with its store, terminal and
/// type, when its routing key, its body and (unless `verify_user` is off)
/// its sender all name the same terminal; else why not.
pub(crate) fn checked<'k>(
    config: &UpstreamConfig,
    own_user: &str,
    routing_key: &'k str,
    body: &[u8],
    user: Option<&str>,
) -> Result<(UpstreamMessage, &'k str, &'k str, &'k str), Refusal> {
    let limit = config.max_message_bytes;
    if body.len() > limit {
        return Err(refused(
            "malformed",
            format!(
                "{} bytes, over the {limit} the backend takes (upstream.max_message_bytes)",
                body.len()
            ),
        ));
    }
    let (store, terminal, message_type) = parse_upstream_key(routing_key).ok_or_else(|| {
        refused(
            "malformed",
            format!("{routing_key:?} is not an upstream key up.<KEY>.<TERMINAL>.<type>"),
        )
    })?;
    if possync_core::LicenseKey::new(store).is_err()
        || possync_core::TerminalId::new(terminal).is_err()
    {
        return Err(refused(
            "malformed",
            format!("{routing_key:?} names a store or terminal that is not a valid id"),
        ));
    }
    let message: UpstreamMessage = serde_json::from_slice(body).map_err(|err| {
        refused(
            "malformed",
            format!("not an upstream message (JSON): {err}"),
        )
    })?;
    if message.license_key != store
        || message.terminal_id != terminal
        || message.message_type != message_type
    {
        return Err(refused(
            "mismatch",
            format!(
                "the body names store {:?}, terminal {:?}, type {:?}, the routing key {routing_key}",
                message.license_key, message.terminal_id, message.message_type
            ),
        ));
    }
    if config.verify_user {
        let expected = expected_user(store, terminal);
        if user != Some(expected.as_str()) {
            let shown = user.unwrap_or("(none)");
            let advice = if user == Some(own_user) {
                " (it is the backend's own broker user: terminals share the backend's credentials; provision each with `possync admin provision-terminal`, or set upstream.verify_user = false for development)"
            } else {
                ""
            };
            return Err(refused(
                "identity",
                format!(
                    "sent by broker user {shown:?}, not {expected:?}, the user of terminal {terminal} of store {store}{advice}"
                ),
            ));
        }
    }
    if message.message_id.is_empty() || message.message_id.len() > MAX_MESSAGE_ID {
        return Err(refused(
            "malformed",
            format!("a message id must have 1 to {MAX_MESSAGE_ID} bytes"),
        ));
    }
    Ok((message, store, terminal, message_type))
}

impl<S: Storage> queue::BatchConsumer for Upstream<S> {
    fn broker(&self) -> &BrokerConfig {
        &self.broker
    }

    fn spec(&self) -> QueueSpec {
        QueueSpec {
            queue: self.config.queue.clone(),
            bindings: self.config.bindings.clone(),
            prefetch: self.config.prefetch,
            expiry_days: self.config.queue_expiry_days,
            // Each terminal's messages are recorded in its order, also with
            // several backend processes on one database.
            single_active_consumer: true,
            message_ttl_ms: None,
            connection_name: "possync backend upstream",
            what: "declaring the backend's upstream queue",
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

    fn live(&self, _ready: u32) {
        events::upstream_live(&self.config.queue, &self.config.bindings.join(", "));
    }

    fn offline(&self, reason: &str, retry_in_ms: u128, first: bool) {
        events::upstream_offline(reason, retry_in_ms, first);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use possync_core::Registry;
    use possync_orders as _;

    use super::*;
    use crate::testing::Scripted;

    async fn upstream(verify_user: bool) -> Upstream<Scripted> {
        let registry =
            Registry::for_publishing(&BTreeMap::new()).expect("the built-in plugins load");
        let catalog = Arc::new(Catalog::new(
            Arc::new(Scripted::new().await),
            Arc::new(registry),
        ));
        let broker = BrokerConfig {
            urls: vec!["amqp://office:secret@127.0.0.1:5672/%2f".into()],
            ..BrokerConfig::default()
        };
        let config = UpstreamConfig {
            verify_user,
            ..UpstreamConfig::default()
        };
        Upstream::new(catalog, broker, config, Arc::new(Counters::default()))
    }

    fn body(store: &str, terminal: &str, message_type: &str, payload: &str) -> Vec<u8> {
        format!(
            r#"{{"type":"{message_type}","license_key":"{store}","terminal_id":"{terminal}","message_id":"m1","created_at":"2026-12-02T10:00:00Z","payload":{payload}}}"#
        )
        .into_bytes()
    }

    const ORDER: &str = r#"{"order_id":"O1","lines":[{"product_id":"P1","quantity":1,"unit_price":2.5}],"total":2.5}"#;
    const USER: &str = "possync.terminal.S1.till-1";

    #[tokio::test]
    async fn an_order_from_its_terminals_own_user_is_a_message_to_record() {
        let upstream = upstream(true).await;
        let read = upstream.read(
            "up.S1.till-1.order",
            &body("S1", "till-1", "order", ORDER),
            Some(USER),
            5,
        );
        match read {
            Ok(Read::Message(record)) => {
                assert_eq!(
                    (
                        record.store.as_str(),
                        record.terminal.as_str(),
                        record.message_id.as_str()
                    ),
                    ("S1", "till-1", "m1")
                );
                assert_eq!(record.payload, ORDER);
            }
            other => panic!("an order to record, not {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_sender_other_than_the_terminals_user_is_refused_unless_the_check_is_off() {
        let checked = upstream(true).await;
        let order = body("S1", "till-1", "order", ORDER);
        for user in [None, Some("possync.terminal.S1.till-2"), Some("guest")] {
            let refused = checked
                .read("up.S1.till-1.order", &order, user, 5)
                .expect_err("refused");
            assert_eq!(refused.kind, "identity", "{user:?}: {}", refused.reason);
            assert!(refused.reason.contains(USER), "{}", refused.reason);
        }
        let own = checked
            .read("up.S1.till-1.order", &order, Some("office"), 5)
            .expect_err("the backend's own user is no terminal's");
        assert!(
            own.reason.contains("upstream.verify_user"),
            "{}",
            own.reason
        );
        let unverified = upstream(false).await;
        assert!(matches!(
            unverified.read("up.S1.till-1.order", &order, Some("guest"), 5),
            Ok(Read::Message(_))
        ));
    }

    #[tokio::test]
    async fn a_type_not_taken_upstream_is_refused_even_when_a_plugin_knows_it() {
        let upstream = upstream(false).await;
        let price = r#"{"product_id":"P1","new_price":1.0}"#;
        let refused = upstream
            .read(
                "up.S1.till-1.price_update",
                &body("S1", "till-1", "price_update", price),
                None,
                5,
            )
            .expect_err("a till does not write prices into its store's database");
        assert_eq!(refused.kind, "type", "{}", refused.reason);
        assert!(
            refused.reason.contains("upstream.types") && refused.reason.contains("order"),
            "{}",
            refused.reason
        );
    }

    #[tokio::test]
    async fn a_body_that_names_another_store_terminal_or_type_than_its_key_is_refused() {
        let upstream = upstream(false).await;
        for (key, body) in [
            ("up.S2.till-1.order", body("S1", "till-1", "order", ORDER)),
            ("up.S1.till-2.order", body("S1", "till-1", "order", ORDER)),
            ("up.S1.till-1.refund", body("S1", "till-1", "order", ORDER)),
        ] {
            let refused = upstream.read(key, &body, None, 5).expect_err("refused");
            assert_eq!(refused.kind, "mismatch", "{key}: {}", refused.reason);
        }
    }

    #[tokio::test]
    async fn malformed_keys_bodies_and_payloads_are_refused_with_their_reason() {
        let upstream = upstream(false).await;
        let cases: [(&str, Vec<u8>, &str, &str); 6] = [
            (
                "license.S1.order",
                body("S1", "till-1", "order", ORDER),
                "malformed",
                "not an upstream key",
            ),
            (
                "up.S#.till-1.order",
                body("S#", "till-1", "order", ORDER),
                "malformed",
                "not a valid id",
            ),
            (
                "up.S1.till-1.order",
                b"{not json".to_vec(),
                "malformed",
                "not an upstream message",
            ),
            (
                "up.S1.till-1.order",
                body(
                    "S1",
                    "till-1",
                    "order",
                    r#"{"order_id":"O1","lines":[],"total":0}"#,
                ),
                "invalid",
                "at least one line",
            ),
            (
                "up.S1.till-1.teleport",
                body("S1", "till-1", "teleport", "{}"),
                "type",
                "not taken upstream",
            ),
            (
                "up.S1.till-1.receipt",
                body("S1", "till-1", "receipt", "{}"),
                "invalid",
                "not a receipt",
            ),
        ];
        for (key, body, kind, says) in cases {
            let refused = upstream.read(key, &body, None, 5).expect_err("refused");
            assert_eq!(refused.kind, kind, "{key}: {}", refused.reason);
            assert!(refused.reason.contains(says), "{key}: {}", refused.reason);
        }
        let long_id = String::from_utf8(body("S1", "till-1", "order", ORDER))
            .expect("utf-8")
            .replace("\"m1\"", &format!("\"{}\"", "m".repeat(129)));
        let refused = upstream
            .read("up.S1.till-1.order", long_id.as_bytes(), None, 5)
            .expect_err("refused");
        assert!(refused.reason.contains("message id"), "{}", refused.reason);
    }

    #[test]
    fn a_long_gap_is_cut_to_a_line() {
        let mut gap = "é".repeat(MAX_GAP_CHARS + 10);
        shorten(&mut gap);
        assert_eq!(gap.chars().count(), MAX_GAP_CHARS + 1);
        assert!(gap.ends_with('…'));
        let mut short = "a lost queue".to_owned();
        shorten(&mut short);
        assert_eq!(short, "a lost queue");
    }

    #[tokio::test]
    async fn a_receipt_is_checked_like_any_message_and_one_that_cannot_be_is_refused() {
        let checked = upstream(true).await;
        let receipt =
            r#"{"applied_up_to":7,"highest_applied":9,"quarantined":1,"outbox":0,"run":"r","n":3}"#;
        let sent = body("S1", "till-1", "receipt", receipt);
        let forged = checked
            .read(
                "up.S1.till-1.receipt",
                &sent,
                Some("possync.terminal.S1.till-2"),
                5,
            )
            .expect_err("another terminal's user");
        assert_eq!(forged.kind, "identity");
        assert!(matches!(
            checked.read("up.S1.till-1.receipt", &sent, Some(USER), 5),
            Ok(Read::Receipt(_))
        ));
        for impossible in [
            r#"{"applied_up_to":-1,"highest_applied":0,"quarantined":0,"outbox":0,"run":"r","n":1}"#,
            r#"{"applied_up_to":9,"highest_applied":7,"quarantined":0,"outbox":0,"run":"r","n":1}"#,
        ] {
            let sent = body("S1", "till-1", "receipt", impossible);
            let refused = checked
                .read("up.S1.till-1.receipt", &sent, Some(USER), 5)
                .expect_err("refused");
            assert_eq!(refused.kind, "invalid", "{}", refused.reason);
        }
    }

    #[tokio::test]
    async fn a_receipt_is_read_with_the_time_it_arrived() {
        let upstream = upstream(false).await;
        let receipt =
            r#"{"applied_up_to":7,"highest_applied":9,"quarantined":1,"outbox":0,"run":"r","n":3}"#;
        match upstream.read(
            "up.S1.till-1.receipt",
            &body("S1", "till-1", "receipt", receipt),
            None,
            42,
        ) {
            Ok(Read::Receipt(record)) => {
                assert_eq!(record.seen_ms, 42);
                assert_eq!((record.receipt.applied_up_to, record.receipt.n), (7, 3));
                assert!(!record.receipt.stopping);
            }
            other => panic!("a receipt, not {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_batch_waits_while_the_database_is_down_and_records_each_message_once() {
        let upstream = upstream(false).await;
        upstream
            .catalog
            .storage()
            .failing_records
            .store(2, std::sync::atomic::Ordering::SeqCst);
        let (_stop, mut stopped) = watch::channel(false);
        let record = || {
            upstream
                .catalog
                .storage()
                .record_upstream(vec![UpstreamRecord {
                    store: "S1".into(),
                    terminal: "till-1".into(),
                    message_type: "order".into(),
                    message_id: "m1".into(),
                    created_at: String::new(),
                    payload: ORDER.into(),
                }])
        };
        let first = upstream.hold(&mut stopped, record).await;
        assert_eq!(
            first.map(|r| r.ok()),
            Some(Some(vec![true])),
            "held, then recorded"
        );
        let again = upstream.hold(&mut stopped, record).await;
        assert_eq!(
            again.map(|r| r.ok()),
            Some(Some(vec![false])),
            "recorded once"
        );
    }
}
