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
            let chunk = match self.chunk(delivery).await {
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
    async fn chunk(&self, delivery: &Delivery) -> Result<SnapshotChunk, String> {
        let user = delivery
            .properties
            .user_id()
            .as_ref()
            .map(|user| user.as_str().to_owned());
        let (message, store, _, message_type) = checked(
            &self.config,
            &self.own_user,
            delivery.routing_key.as_str(),
            &delivery.data,
            user.as_deref(),
        )
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
            entities: Vec::new(),
            next: None,
            error: None,
        };
        match answer.await {
            Ok((catalog, page)) => {
                let mut more = page.entries.len() == limit as usize;
                chunk.catalog = catalog;
                // The first chunk sets the snapshot's seq; later ones keep it.
                chunk.seq = request.seq.unwrap_or(page.head);
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

    fn live(&self) {
        events::snapshots_live(&snapshot_queue(&self.config));
    }

    fn offline(&self, reason: &str, retry_in_ms: u128, first: bool) {
        events::snapshots_offline(reason, retry_in_ms, first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
