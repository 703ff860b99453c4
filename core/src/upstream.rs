//! What a terminal sends to the back office: the routing keys and the body
//! of an upstream message, shared by the terminal that sends it and the
//! backend that receives it.
//!
//! Upstream keys are `up.<KEY>.<TERMINAL>.<type>`: a terminal's binding
//! `license.<KEY>.#` never matches them, so no till receives another's
//! orders, and topic permissions can grant each terminal its own keys only.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::identity::{LicenseKey, TerminalId};

/// The first word of every upstream routing key.
pub(crate) const UPSTREAM_PREFIX: &str = "up";

/// The binding of the backend's upstream queue: every terminal's messages.
pub const UPSTREAM_BINDING: &str = "up.#";

/// The type of a delivery receipt.
pub const RECEIPT_TYPE: &str = "receipt";

/// The type of a terminal's request for a snapshot of its store's catalog.
/// The backend answers each request with one chunk, sent to the request's
/// `reply_to` (RabbitMQ's direct reply-to): only the channel that asked
/// receives it.
pub const SNAPSHOT_TYPE: &str = "snapshot";

/// `up.<KEY>.<TERMINAL>.<type>`.
pub fn upstream_key(
    license_key: &LicenseKey,
    terminal_id: &TerminalId,
    message_type: &str,
) -> String {
    format!("{UPSTREAM_PREFIX}.{license_key}.{terminal_id}.{message_type}")
}

/// The parts of an upstream routing key: store, terminal, type. `None` for
/// a key of another shape.
pub fn parse_upstream_key(routing_key: &str) -> Option<(&str, &str, &str)> {
    let mut words = routing_key.split('.');
    let (prefix, store, terminal, message_type) =
        (words.next()?, words.next()?, words.next()?, words.next()?);
    if prefix != UPSTREAM_PREFIX || words.next().is_some() {
        return None;
    }
    if [store, terminal, message_type].iter().any(|w| w.is_empty()) {
        return None;
    }
    Some((store, terminal, message_type))
}

/// The broker user whose messages the backend accepts as coming from
/// `terminal` of `store`: the one `possync admin provision-terminal` made.
pub fn expected_user(store: &str, terminal: &str) -> String {
    format!("possync.terminal.{store}.{terminal}")
}

/// The body of an upstream message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamMessage {
    /// The message type (`order`, `receipt`).
    #[serde(rename = "type")]
    pub message_type: String,
    /// The store the terminal belongs to.
    pub license_key: String,
    /// The terminal that sent it.
    pub terminal_id: String,
    /// Unique per message of a terminal: the backend records a message once
    /// by it, however often it arrives.
    pub message_id: String,
    /// When the POS app wrote it (RFC 3339), as its outbox row says.
    pub created_at: String,
    /// The message's own content, a JSON object.
    pub payload: Box<RawValue>,
}

/// What a receipt reports: how far the terminal is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Every change of the store up to this `seq` is applied ("synced up
    /// to N").
    pub applied_up_to: i64,
    /// The highest `seq` applied (above `applied_up_to` while a gap waits).
    pub highest_applied: i64,
    /// Messages in the terminal's quarantine (dead-lettered, kept for
    /// `possync status`).
    pub quarantined: u64,
    /// Rows of its outbox not yet confirmed by the broker.
    pub outbox: u64,
    /// The terminal is stopping: the backend shows it offline at once
    /// instead of after its heartbeats stop.
    #[serde(default)]
    pub stopping: bool,
    /// The seq at which the terminal's catalog last matched the backend's
    /// checksums (see [`crate::Checkpoint`]); `None` until it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_seq: Option<i64>,
    /// The gap the terminal has open, if any, as its log says it (a lost
    /// queue, a checksum that differs, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
    /// Random per run of the terminal: receipts of one run are told apart
    /// from a late one of an earlier run.
    pub run: String,
    /// The receipt's number in its run: the backend keeps the highest.
    pub n: u64,
}

/// The payload of a [`SNAPSHOT_TYPE`] request: the next chunk of the
/// store's catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's sequence number, from its first chunk; `None` to
    /// start one.
    pub seq: Option<i64>,
    /// The last entity of the previous chunk, `(entity, id)`; `None` for the
    /// first chunk.
    pub after: Option<(String, String)>,
    /// The most entities in the chunk.
    pub limit: u32,
}

/// One entity of a snapshot: its kind, id, state, and the `seq` of the
/// change that last wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntity {
    /// The kind (`product`).
    pub entity: String,
    /// Its id.
    pub id: String,
    /// The `seq` of the change that last wrote it.
    pub seq: i64,
    /// Its state, under its entity's field names.
    pub state: serde_json::Map<String, serde_json::Value>,
}

/// The backend's answer to a [`SnapshotRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The request's message id.
    pub request: String,
    /// The store.
    pub store: String,
    /// The catalog (backend database) the snapshot comes from.
    pub catalog: String,
    /// Every change up to this `seq` is in the snapshot; an entity may
    /// show a later state, which the changes after `seq` write again.
    pub seq: i64,
    /// No entity of this chunk shows a change after this `seq` (the
    /// store's head once the chunk was read): a terminal's catalog equals
    /// the backend's at a `seq` only from the highest of these on. 0 from
    /// a backend that does not say.
    #[serde(default)]
    pub settled: i64,
    /// The entities, ordered by kind then id.
    pub entities: Vec<SnapshotEntity>,
    /// Where the next chunk starts; `None` after the last.
    pub next: Option<(String, String)>,
    /// Why the backend could not answer; nothing else is set then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_keys_never_match_a_store_binding_and_parse_back() {
        let key = LicenseKey::new("S1").expect("key");
        let terminal = TerminalId::new("till-2").expect("terminal");
        let routing_key = upstream_key(&key, &terminal, "order");
        assert_eq!(routing_key, "up.S1.till-2.order");
        assert!(!routing_key.starts_with("license."));
        assert_eq!(
            parse_upstream_key(&routing_key),
            Some(("S1", "till-2", "order"))
        );
    }

    #[test]
    fn keys_of_another_shape_are_not_upstream() {
        for key in [
            "license.S1.price",
            "up.S1.order",
            "up.S1.T1.order.extra",
            "up..T1.order",
            "down.S1.T1.order",
        ] {
            assert_eq!(parse_upstream_key(key), None, "{key}");
        }
    }
}
