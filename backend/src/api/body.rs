//! The bodies the API reads and writes. Their OpenAPI schemas are derived
//! from these types, so the document cannot drift from what is parsed.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;

/// A refusal: what is wrong and what to do.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// What is wrong with the request, and what to do about it.
    pub(super) error: String,
}

/// One change for the store named in the path.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangeBody {
    /// The message type (`price_update`, `product_update`, ...): one of
    /// the types whose plugin the backend enables.
    #[serde(rename = "type")]
    #[schema(example = "price_update")]
    pub(super) message_type: String,
    /// The payload, as the type's plugin defines it.
    #[schema(value_type = Object, example = json!({"product_id": "PROD-001", "new_price": 12.99}))]
    pub(super) payload: Map<String, Value>,
    /// When the change was made (RFC 3339), carried to terminals; the
    /// backend's clock when absent. It orders nothing: the sequence does.
    #[schema(format = DateTime)]
    pub(super) timestamp: Option<String>,
    /// The message id terminals see; a new one when absent.
    #[schema(min_length = 1, max_length = 128)]
    pub(super) message_id: Option<String>,
}

/// One change of a batch: the store it is for, and the change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchChange {
    /// The store's license key.
    #[schema(example = "STORE-1", pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub(super) store: String,
    /// The message type.
    #[serde(rename = "type")]
    #[schema(example = "price_update")]
    pub(super) message_type: String,
    /// The payload, as the type's plugin defines it.
    #[schema(value_type = Object, example = json!({"product_id": "PROD-001", "new_price": 12.99}))]
    pub(super) payload: Map<String, Value>,
    /// When the change was made (RFC 3339); the backend's clock when absent.
    #[schema(format = DateTime)]
    pub(super) timestamp: Option<String>,
    /// The message id terminals see; a new one when absent.
    #[schema(min_length = 1, max_length = 128)]
    pub(super) message_id: Option<String>,
}

impl BatchChange {
    pub(super) fn split(self) -> (String, ChangeBody) {
        (
            self.store,
            ChangeBody {
                message_type: self.message_type,
                payload: self.payload,
                timestamp: self.timestamp,
                message_id: self.message_id,
            },
        )
    }
}

/// Changes for any stores, applied in one transaction: all or none.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    /// The changes, in the order they are sequenced.
    pub(super) changes: Vec<BatchChange>,
}

/// What became of a change.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum ChangeStatus {
    /// In the catalog and on its way to the store's terminals, with `seq`.
    Sequenced,
    /// Older than what the catalog holds for its entity: nothing changed.
    Stale,
}

/// One submitted change, answered.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ChangeResult {
    /// The store.
    pub(super) store: String,
    /// The change's message id.
    pub(super) message_id: String,
    /// What became of it.
    pub(super) status: ChangeStatus,
    /// The store's sequence number of the change; null when it was stale.
    pub(super) seq: Option<i64>,
}

/// The answer to a submission: every change is durable when it is sent.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Submission {
    /// Per change, in the order submitted.
    pub(super) changes: Vec<ChangeResult>,
    /// True when the Idempotency-Key was seen before: this is the first
    /// submission's answer and nothing was applied again.
    pub(super) replayed: bool,
}

/// Where one store's sequence stands.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct StoreHeadBody {
    /// The store's license key.
    pub(super) store: String,
    /// The highest sequence number given out (0: none yet).
    pub(super) head: i64,
    /// Changes not yet confirmed by the broker.
    pub(super) unpublished: i64,
}

/// The stores this token may see.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct StoresBody {
    /// By license key.
    pub(super) stores: Vec<StoreHeadBody>,
}

/// One entity of a store's catalog.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct EntityBody {
    /// Its kind (`product`, `category`, ...).
    pub(super) entity: String,
    /// Its id.
    pub(super) id: String,
    /// The sequence number of the change that last wrote it.
    pub(super) seq: i64,
    /// Its current state.
    #[schema(value_type = Object)]
    pub(super) state: Map<String, Value>,
}

/// A store's catalog: what every one of its terminals should hold.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CatalogBody {
    /// The store's license key.
    pub(super) store: String,
    /// Read before the entities: every change up to it is in them (a later
    /// one may be too, with its own `seq`), so reading changes after `head`
    /// misses nothing.
    pub(super) head: i64,
    /// Every entity that exists, by kind then id.
    pub(super) entities: Vec<EntityBody>,
}

/// One sequenced change.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ChangeEntry {
    /// Its sequence number in its store.
    pub(super) seq: i64,
    /// The message type.
    #[serde(rename = "type")]
    pub(super) message_type: String,
    /// The payload.
    #[schema(value_type = Object)]
    pub(super) payload: Value,
    /// When the change was made (RFC 3339).
    pub(super) timestamp: String,
    /// The message id.
    pub(super) message_id: String,
    /// Whether the broker confirmed it.
    pub(super) published: bool,
}

/// A page of a store's changes.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ChangesBody {
    /// The store's license key.
    pub(super) store: String,
    /// The store's head sequence number when the page was read.
    pub(super) head: i64,
    /// In sequence order. Fewer than `limit` when the page reaches the head;
    /// ask again with `after` set to the last `seq` for the next page.
    pub(super) changes: Vec<ChangeEntry>,
}

/// Which changes to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChangesQuery {
    /// Only changes with a greater sequence number (0: from the first).
    #[param(minimum = 0)]
    #[serde(default)]
    pub(super) after: i64,
    /// At most this many changes (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub(super) limit: Option<usize>,
}

/// The answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HealthBody {
    /// `ok`, or `unavailable` when the database does not answer.
    pub(super) status: String,
    /// Whether the database answered.
    pub(super) database: bool,
}

/// Reads a JSON body, saying where it is wrong when it is.
pub(super) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let place = if path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        let what = if inner.is_syntax() || inner.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not fit this request"
        };
        ApiError::bad_request(format!(
            "{what}{place}: {inner}; see the request schema in GET /openapi.json"
        ))
    })?;
    deserializer.end().map_err(|err| {
        ApiError::bad_request(format!(
            "the body is not valid JSON: {err}; send exactly one JSON object"
        ))
    })?;
    Ok(value)
}

/// Which upstream messages to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ReceivedQuery {
    /// Only messages with a greater cursor (0: from the first).
    #[param(minimum = 0)]
    #[serde(default)]
    pub(super) after: i64,
    /// Only messages of this type (`order`); every type when absent.
    #[serde(rename = "type")]
    #[param(pattern = r"^[a-z0-9_]{1,64}$")]
    pub(super) message_type: Option<String>,
    /// At most this many messages (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub(super) limit: Option<usize>,
}

/// One message a terminal sent upstream.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ReceivedEntry {
    /// Its place among the messages recorded: read on after the last one.
    pub(super) cursor: i64,
    /// The terminal that sent it.
    pub(super) terminal: String,
    /// Its type.
    #[serde(rename = "type")]
    pub(super) message_type: String,
    /// Unique per message of its terminal.
    pub(super) message_id: String,
    /// When the POS app wrote it (RFC 3339, the terminal's clock).
    pub(super) created_at: String,
    /// When the backend recorded it (ms since the Unix epoch).
    pub(super) received_ms: i64,
    /// The message's content, as its plugin defines it.
    #[schema(value_type = Object)]
    pub(super) payload: Value,
}

/// A store's upstream messages after a cursor.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ReceivedBody {
    /// The store.
    pub(super) store: String,
    /// The messages, oldest first.
    pub(super) messages: Vec<ReceivedEntry>,
    /// The cursor to read on after: the last message's, or the request's
    /// `after` when there was none.
    pub(super) next_after: i64,
}

/// Which fleet, in which order.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct FleetQuery {
    /// `lag` (default): the stores and terminals furthest behind first;
    /// `name`: by store and terminal.
    #[param(pattern = "^(lag|name)$")]
    pub(super) sort: Option<String>,
}

/// One terminal of the fleet.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TerminalBody {
    /// The terminal's id.
    pub(super) terminal: String,
    /// `live`, `offline` or `stalled`.
    pub(super) state: String,
    /// Changes of its store's head it has not applied.
    pub(super) lag: i64,
    /// Every change of the store up to this sequence number is applied there.
    pub(super) applied_up_to: i64,
    /// The highest sequence number applied there.
    pub(super) highest_applied: i64,
    /// Its latest receipt (ms since the Unix epoch).
    pub(super) last_seen_ms: i64,
    /// Offline since (ms since the Unix epoch), when offline.
    pub(super) offline_since_ms: Option<i64>,
    /// Messages in its quarantine.
    pub(super) quarantined: i64,
    /// Rows of its outbox not yet sent.
    pub(super) outbox: i64,
    /// The sequence number at which its catalog last matched the backend's
    /// checksums (a checkpoint); `null` until it has.
    pub(super) verified_seq: Option<i64>,
    /// The cause of the gap it has open, by name (`first_start`, `jump`,
    /// `queue_recreated`, `checksum_mismatch`...); `null` when it has
    /// none. It converges from a snapshot.
    pub(super) gap: Option<String>,
}

/// One store of the fleet.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FleetStore {
    /// The store's license key.
    pub(super) store: String,
    /// Its highest sequence number given out.
    pub(super) head: i64,
    /// The most any of its terminals is behind.
    pub(super) max_lag: i64,
    /// Its terminals.
    pub(super) terminals: Vec<TerminalBody>,
}

/// Every store's terminals.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FleetBody {
    /// The stores with a terminal that reported, as sorted.
    pub(super) stores: Vec<FleetStore>,
    /// The backend's clock (ms since the Unix epoch).
    pub(super) now_ms: i64,
}

/// Which sequence number to wait for.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AppliedQuery {
    /// The sequence number every terminal of the store must have applied.
    #[param(minimum = 1)]
    pub(super) seq: i64,
    /// Seconds to wait for it (0 to 50; default 0: answer at once).
    #[param(minimum = 0, maximum = 50)]
    #[serde(default)]
    pub(super) wait: u64,
}

/// Whether a store's terminals applied a sequence number.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AppliedBody {
    /// The store.
    pub(super) store: String,
    /// The sequence number asked about.
    pub(super) seq: i64,
    /// Every known terminal of the store applied it (true too when the
    /// store has no known terminal: see `terminals`).
    pub(super) complete: bool,
    /// The store's known terminals (those that ever sent a receipt).
    pub(super) terminals: Vec<TerminalBody>,
    /// The terminals that have not applied it.
    pub(super) pending: Vec<String>,
}
