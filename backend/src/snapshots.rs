//! Snapshots: a terminal that lacks some of its store's changes (a gap)
//! asks for its store's catalog, one chunk per request, on
//! `up.<KEY>.<TERMINAL>.snapshot`; each chunk goes to the request's
//! `reply_to` (RabbitMQ's direct reply-to), so only the channel that asked
//! receives it. A request is answered only when its routing key, its body
//! and its sender name the same terminal, as for every upstream message.
//!
//! The server keeps nothing between requests: the terminal sends back the
//! snapshot's `seq` and the last entity it has, so a backend restart or a
//! second backend process answers the next chunk as well.

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use possync_core::{BrokerConfig, SNAPSHOT_TYPE, SnapshotChunk, SnapshotEntity, SnapshotRequest};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::UpstreamConfig;
use crate::events;
use crate::queue::{self, QueueSpec, Settle};
use crate::storage::Storage;
use crate::upstream::checked;

/// The most entities in one chunk, whatever a terminal asks: a chunk of
/// products is about 200 bytes an entity.
const CHUNK_MAX: u32 = 5_000;

/// A request nobody answered within this long is dropped: its terminal
/// stopped waiting for it and asks again.
const REQUEST_TTL_MS: u32 = 30_000;

/// A chunk holds entities of about this many bytes of state at most (one
/// larger entity goes alone): far below what the broker takes in one
/// message, and what a terminal holds in memory while it stages it.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Answers terminals' snapshot requests.
pub(crate) struct Snapshots<S> {
    catalog: Arc<Catalog<S>>,
    broker: BrokerConfig,
    config: UpstreamConfig,
    own_user: String,
}

impl<S: Storage> Snapshots<S> {
    pub(crate) fn new(
        catalog: Arc<Catalog<S>>,
        broker: BrokerConfig,
        config: UpstreamConfig,
        own_user: String,
    ) -> Self {
        Self {
            catalog,
            broker,
            config,
            own_user,
        }
    }

    /// Answers until `stop` turns true, reconnecting with backoff.
    pub(crate) async fn run(self, stop: watch::Receiver<bool>) {
        queue::consume(&self, stop).await;
    }

    /// Answers each request of `batch`; a request that cannot be answered
    /// is logged and dropped: the terminal asks again.
    async fn answer_batch(&self, batch: &[Delivery], channel: &Channel) -> Vec<Settle> {
        for delivery in batch {
            let routing_key = delivery.routing_key.as_str();
            let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
                events::snapshot_refused(routing_key, "the request names no reply_to");
                continue;
            };
            let user = delivery
                .properties
                .user_id()
                .as_ref()
                .map(|user| user.as_str().to_owned());
            let chunk = match self
                .chunk(routing_key, &delivery.data, user.as_deref())
                .await
            {
                Ok(chunk) => chunk,
                Err(reason) => {
                    events::snapshot_refused(routing_key, &reason);
                    continue;
                }
            };
            let entities = chunk.entities.len();
            let body = match serde_json::to_vec(&chunk) {
                Ok(body) => body,
                Err(err) => {
                    events::snapshot_refused(routing_key, &err.to_string());
                    continue;
                }
            };
            // The default exchange routes the reply to the asking channel.
            let published = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await;
            match published {
                Ok(_) => events::snapshot_chunk_sent(&chunk.store, chunk.seq, entities),
                Err(err) => events::snapshot_refused(routing_key, &err.to_string()),
            }
        }
        batch.iter().map(|_| Settle::Ack).collect()
    }

    /// The chunk a request asks for, or why it is refused. A request the
    /// database cannot answer gets a chunk that says why.
    async fn chunk(
        &self,
        routing_key: &str,
        body: &[u8],
        user: Option<&str>,
    ) -> Result<SnapshotChunk, String> {
        let (message, store, _, message_type) =
            checked(&self.config, &self.own_user, routing_key, body, user)
                .map_err(|refusal| refusal.reason)?;
        if message_type != SNAPSHOT_TYPE {
            return Err(format!("type {message_type} is not a snapshot request"));
        }
        let request: SnapshotRequest = serde_json::from_str(message.payload.get())
            .map_err(|err| format!("not a snapshot request: {err}"))?;
        let limit = request.limit.clamp(1, CHUNK_MAX);
        let storage = self.catalog.storage();
        let answer = async {
            let catalog = storage.catalog_id().await?;
            let page = storage
                .catalog_page(store, request.after.clone(), limit as usize)
                .await?;
            Ok::<_, crate::storage::StorageError>((catalog, page))
        };
        let mut chunk = SnapshotChunk {
            request: message.message_id.clone(),
            store: store.to_owned(),
            catalog: String::new(),
            seq: 0,
            settled: 0,
            entities: Vec::new(),
            next: None,
            error: None,
        };
        match answer.await {
            // A store this backend never recorded: it is not the store's
            // catalog of record, and an empty answer would wipe the till.
            Ok((_, page)) if page.head == 0 && request.seq.is_none() => {
                chunk.error = Some(format!(
                    "this backend holds no change of store {store}: it is not the store's catalog of record, or the store has no catalog yet"
                ));
            }
            Ok((catalog, page)) => {
                let mut more = page.entries.len() == limit as usize;
                chunk.catalog = catalog;
                // The first chunk sets the snapshot's seq; later ones keep it.
                chunk.seq = request.seq.unwrap_or(page.head);
                chunk.settled = page.settled;
                let mut bytes = 0;
                for entry in page.entries {
                    // Entities with large states (pictures) fill a chunk
                    // sooner: the rest come in the next.
                    let size = serde_json::to_string(&entry.state).map_or(0, |text| text.len());
                    if !chunk.entities.is_empty() && bytes + size > CHUNK_BYTES {
                        more = true;
                        break;
                    }
                    bytes += size;
                    chunk.entities.push(SnapshotEntity {
                        entity: entry.entity,
                        id: entry.id,
                        seq: entry.seq,
                        state: entry.state,
                    });
                }
                chunk.next = chunk
                    .entities
                    .last()
                    .filter(|_| more)
                    .map(|last| (last.entity.clone(), last.id.clone()));
            }
            Err(err) => chunk.error = Some(err.to_string()),
        }
        Ok(chunk)
    }
}

/// The snapshot queue, beside the upstream queue: backends that serve
/// different stores have different upstream queues, so none answers for a
/// store it does not hold.
pub(crate) fn snapshot_queue(config: &UpstreamConfig) -> String {
    format!("{}.snapshots", config.queue)
}

/// The bindings of the snapshot queue: the snapshot requests among the
/// upstream queue's bindings (`up.#` → `up.*.*.snapshot`,
/// `up.STORE.#` → `up.STORE.*.snapshot`).
pub(crate) fn snapshot_bindings(upstream: &[String]) -> Vec<String> {
    upstream
        .iter()
        .filter_map(|binding| {
            let words: Vec<&str> = binding.split('.').collect();
            match words.as_slice() {
                ["up", "#"] => Some(format!("up.*.*.{SNAPSHOT_TYPE}")),
                ["up", store, "#"] => Some(format!("up.{store}.*.{SNAPSHOT_TYPE}")),
                ["up", store, terminal, "#" | "*"] => {
                    Some(format!("up.{store}.{terminal}.{SNAPSHOT_TYPE}"))
                }
                ["up", _, _, kind] if *kind == SNAPSHOT_TYPE => Some(binding.clone()),
                _ => None,
            }
        })
        .collect()
}

impl<S: Storage> queue::BatchConsumer for Snapshots<S> {
    fn broker(&self) -> &BrokerConfig {
        &self.broker
    }

    fn spec(&self) -> QueueSpec {
        QueueSpec {
            queue: snapshot_queue(&self.config),
            bindings: snapshot_bindings(&self.config.bindings),
            prefetch: 16,
            // A request nobody answered is asked again: nothing to keep.
            expiry_days: Some(1),
            single_active_consumer: false,
            message_ttl_ms: Some(REQUEST_TTL_MS),
            connection_name: "possync backend snapshots",
            what: "declaring the backend's snapshot queue",
        }
    }

    async fn handle_batch(
        &self,
        batch: &[Delivery],
        channel: &Channel,
        _stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<Settle>> {
        Some(self.answer_batch(batch, channel).await)
    }

    fn live(&self, _ready: u32) {
        events::snapshots_live(&snapshot_queue(&self.config));
    }

    fn offline(&self, reason: &str, retry_in_ms: u128, first: bool) {
        events::snapshots_offline(reason, retry_in_ms, first);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use possync_core::Registry;

    use super::*;
    use crate::catalog::ChangeRequest;
    use crate::testing::Scripted;

    async fn snapshots() -> Snapshots<Scripted> {
        let registry =
            Registry::for_publishing(&BTreeMap::new()).expect("the built-in plugins load");
        let catalog = Arc::new(Catalog::new(
            Arc::new(Scripted::new().await),
            Arc::new(registry),
        ));
        Snapshots::new(
            catalog,
            BrokerConfig::default(),
            UpstreamConfig::default(),
            "office".into(),
        )
    }

    fn request(seq: Option<i64>, after: Option<(&str, &str)>, limit: u32) -> Vec<u8> {
        let payload = SnapshotRequest {
            seq,
            after: after.map(|(entity, id)| (entity.into(), id.into())),
            limit,
        };
        serde_json::json!({"type": "snapshot", "license_key": "S1", "terminal_id": "till-1",
            "message_id": "m1", "created_at": "2026-12-02T10:00:00Z", "payload": payload})
        .to_string()
        .into_bytes()
    }

    const KEY: &str = "up.S1.till-1.snapshot";
    const USER: Option<&str> = Some("possync.terminal.S1.till-1");

    async fn product(snapshots: &Snapshots<Scripted>, id: &str, name: &str) {
        let payload = serde_json::json!({"product_id": id, "product_name": name, "price": 1.5});
        snapshots
            .catalog
            .submit(
                vec![ChangeRequest {
                    store: "S1".into(),
                    message_type: "product_update".into(),
                    payload: payload.to_string(),
                    timestamp: None,
                    message_id: None,
                    clock: None,
                }],
                None,
            )
            .await
            .expect("submitted");
    }

    #[tokio::test]
    async fn a_store_the_backend_never_recorded_gets_a_refusal_not_an_empty_catalog() {
        let snapshots = snapshots().await;
        let chunk = snapshots
            .chunk(KEY, &request(None, None, 100), USER)
            .await
            .expect("answered");
        assert!(chunk.entities.is_empty());
        assert!(
            chunk
                .error
                .is_some_and(|error| error.contains("holds no change of store S1")),
        );
    }

    #[tokio::test]
    async fn chunks_page_through_the_catalog_at_the_first_chunks_seq() {
        let snapshots = snapshots().await;
        for id in ["A", "B", "C"] {
            product(&snapshots, id, id).await;
        }
        let first = snapshots
            .chunk(KEY, &request(None, None, 2), USER)
            .await
            .expect("answered");
        assert_eq!((first.seq, first.entities.len()), (3, 2));
        assert_eq!(first.next, Some(("product".into(), "B".into())));
        product(&snapshots, "D", "D").await;
        let second = snapshots
            .chunk(KEY, &request(Some(3), Some(("product", "B")), 2), USER)
            .await
            .expect("answered");
        assert_eq!(second.seq, 3, "the snapshot's seq, kept");
        let ids: Vec<&str> = second.entities.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["C", "D"]);
        assert_eq!(
            (first.settled, second.settled),
            (3, 4),
            "each chunk says up to where its states may show changes"
        );
    }

    #[tokio::test]
    async fn a_chunk_holds_about_four_mebibytes_of_state_at_most() {
        let snapshots = snapshots().await;
        let name = "x".repeat(1_500_000);
        for id in ["A", "B", "C", "D"] {
            product(&snapshots, id, &name).await;
        }
        let chunk = snapshots
            .chunk(KEY, &request(None, None, 100), USER)
            .await
            .expect("answered");
        assert_eq!(chunk.entities.len(), 2);
        assert_eq!(chunk.next, Some(("product".into(), "B".into())));
    }

    #[tokio::test]
    async fn a_request_sent_as_another_terminal_is_refused() {
        let snapshots = snapshots().await;
        let refusal = snapshots
            .chunk(KEY, &request(None, None, 100), Some("guest"))
            .await
            .expect_err("refused");
        assert!(
            refusal.contains("sent by broker user \"guest\""),
            "{refusal}"
        );
    }

    #[test]
    fn the_snapshot_queue_is_bound_to_the_snapshot_requests_of_the_upstream_bindings() {
        let bindings: Vec<String> = ["up.#", "up.STORE-1.#", "up.S.T.#", "up.S.T.order", "x.#"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            snapshot_bindings(&bindings),
            [
                "up.*.*.snapshot",
                "up.STORE-1.*.snapshot",
                "up.S.T.snapshot"
            ]
        );
    }
}
