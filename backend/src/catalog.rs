//! The catalog of record's one way in: every change, from the HTTP API, the
//! CLI or another publisher on the exchange, is checked by its plugin, given
//! its entity change, and sequenced through [`Storage::submit`].

use std::sync::Arc;

use possync_core::{CheckError, ChecksumSpec, LicenseKey, Registry, TerminalConfig};
use possync_sdk::Version;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;

use crate::events;
use crate::storage::{IdempotencyKey, NewChange, Storage, StorageError, Submitted};

/// A change as a client asks for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRequest {
    /// The store's license key.
    pub store: String,
    /// The envelope `type`.
    pub message_type: String,
    /// The payload as JSON text.
    pub payload: String,
    /// When the change was made (RFC 3339, refused otherwise); the
    /// backend's clock if absent. It is carried to terminals, never used to
    /// order.
    pub timestamp: Option<String>,
    /// The message id; a new one if absent. Terminals drop a message whose
    /// id they saw: one already used in the store is refused
    /// ([`StorageError::MessageIdUsed`]).
    pub message_id: Option<String>,
    /// For a message consumed from the exchange, its clock order.
    pub clock: Option<Version>,
}

/// Why a submission was refused; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A change names an invalid store.
    #[error("change {index}: {reason}")]
    InvalidStore {
        /// Its position in the submission, from 0.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A change's type is unknown or its payload invalid.
    #[error("change {index} ({message_type}): {reason}")]
    Invalid {
        /// Its position in the submission, from 0.
        index: usize,
        /// Its type.
        message_type: String,
        /// What is wrong.
        reason: String,
    },
    /// A change's envelope, as the relay would publish it, is larger than
    /// terminals take: it could never be delivered.
    #[error(
        "change {index} ({message_type}): its message would be {size} bytes, over the terminals' limit of {limit} bytes ([relay] max_message_bytes, set to the terminals' terminal.max_message_bytes); send a smaller payload, or raise the limit on the terminals and in the backend's config together"
    )]
    TooLarge {
        /// Its position in the submission, from 0.
        index: usize,
        /// Its type.
        message_type: String,
        /// The relayed envelope's size at most, in bytes.
        size: usize,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The submission is empty.
    #[error("the submission holds no change")]
    Empty,
    /// The database failed, or the key was reused.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The catalog of record: storage, the plugins that check payloads, and the
/// relay to wake when something was committed.
#[derive(Debug)]
pub struct Catalog<S> {
    storage: Arc<S>,
    registry: Arc<Registry>,
    /// The kinds of entity whose checksums every submission keeps: those
    /// the plugins export.
    checksums: ChecksumSpec,
    committed: Arc<Notify>,
    max_message_bytes: usize,
    /// When the direct consumer last took a change of each store.
    direct: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The direct queue's messages still to take from those it held when
    /// its consumer last started, and when it last took some (`None`
    /// before it started); `None` once taken (or without a direct
    /// consumer). Until then terminals may hold changes sent straight to
    /// the exchange while the backend was away, which no store's catalog
    /// holds yet.
    direct_backlog: std::sync::Mutex<Option<(i64, Option<std::time::Instant>)>>,
}

/// A direct consumer that started and took nothing for this long has none
/// of the backlog left to take: other backend processes on the queue took
/// it. Before it starts, nothing releases the hold.
const DIRECT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

impl<S: Storage> Catalog<S> {
    /// A catalog over `storage`, checking payloads with `registry`'s plugins.
    pub fn new(storage: Arc<S>, registry: Arc<Registry>) -> Self {
        Self {
            storage,
            checksums: registry.checksum_spec(),
            registry,
            committed: Arc::new(Notify::new()),
            max_message_bytes: TerminalConfig::default().max_message_bytes,
            direct: std::sync::Mutex::default(),
            direct_backlog: std::sync::Mutex::default(),
        }
    }

    /// A direct consumer will record changes sent straight to the
    /// exchange: no checkpoint goes out before it took those that wait.
    pub(crate) fn direct_expected(&self) {
        *self.backlog() = Some((i64::MAX, None));
    }

    /// The direct queue held `ready` messages as its consumer started (at
    /// the backend's start, or again after the broker was away).
    pub(crate) fn direct_backlog(&self, ready: u32) {
        let mut backlog = self.backlog();
        *backlog = Some((i64::from(ready), Some(std::time::Instant::now())));
        Self::caught_up(&mut backlog);
    }

    /// The direct consumer recorded `count` messages.
    pub(crate) fn direct_taken(&self, count: usize) {
        let mut backlog = self.backlog();
        if let Some((left, at)) = backlog.as_mut() {
            *left = left.saturating_sub(i64::try_from(count).unwrap_or(i64::MAX));
            *at = Some(std::time::Instant::now());
        }
        Self::caught_up(&mut backlog);
    }

    /// Whether the direct consumer has yet to take what waited for it.
    fn direct_behind(&self) -> bool {
        let mut backlog = self.backlog();
        Self::caught_up(&mut backlog);
        backlog.is_some()
    }

    fn caught_up(backlog: &mut Option<(i64, Option<std::time::Instant>)>) {
        let idle =
            |at: Option<std::time::Instant>| at.is_some_and(|at| at.elapsed() >= DIRECT_IDLE);
        if backlog.is_some_and(|(left, at)| left <= 0 || idle(at)) {
            *backlog = None;
            events::direct_caught_up();
        }
    }

    fn backlog(&self) -> std::sync::MutexGuard<'_, Option<(i64, Option<std::time::Instant>)>> {
        self.direct_backlog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The direct consumer took a change of `store` sent straight to the
    /// exchange: terminals may hold it before the catalog does.
    pub(crate) fn note_direct(&self, store: &str) {
        let mut direct = self
            .direct
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        direct.insert(store.to_owned(), std::time::Instant::now());
    }

    /// Whether the direct consumer took a change of `store` within
    /// `within`, or has yet to take those that waited for it at its start:
    /// `store`'s checkpoint would describe a catalog that terminals may be
    /// past.
    pub(crate) fn direct_within(&self, store: &str, within: std::time::Duration) -> bool {
        if self.direct_behind() {
            return true;
        }
        let mut direct = self
            .direct
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        direct.retain(|_, at| at.elapsed() < within);
        direct.contains_key(store)
    }

    /// Refuses changes whose relayed message would be larger than `bytes`
    /// (the terminals' `terminal.max_message_bytes`; theirs by default).
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// The largest message the relay may publish, in bytes: the limit to
    /// give its publisher.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<S> {
        &self.storage
    }

    /// The plugins.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// What the catalog's checksums cover, as its plugins export.
    pub(crate) fn checksums(&self) -> &ChecksumSpec {
        &self.checksums
    }

    /// Notified after every commit that added outbox rows, even when the
    /// caller stopped waiting for its answer (and, spuriously, when it
    /// stopped waiting before the commit).
    pub fn committed(&self) -> &Arc<Notify> {
        &self.committed
    }

    /// Checks every change, then stores them all in one transaction: each
    /// is answered with its sequence number only once it is durable.
    pub async fn submit(
        &self,
        requests: Vec<ChangeRequest>,
        key: Option<IdempotencyKey>,
    ) -> Result<Submitted, SubmitError> {
        if requests.is_empty() {
            return Err(SubmitError::Empty);
        }
        let mut changes = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            changes.push(self.prepare(index, request)?);
        }
        // Armed across the await: a caller that stops waiting after the
        // commit still wakes the relay, which would otherwise find the rows
        // only at its next poll.
        let mut wake = WakeOnDrop(Some(&self.committed));
        let submitted = self.storage.submit(changes, key, &self.checksums).await;
        if !matches!(&submitted, Ok(submitted) if !submitted.replayed) {
            wake.0 = None;
        }
        Ok(submitted?)
    }

    fn prepare(&self, index: usize, request: ChangeRequest) -> Result<NewChange, SubmitError> {
        let store = LicenseKey::new(request.store).map_err(|err| SubmitError::InvalidStore {
            index,
            reason: err.to_string(),
        })?;
        let invalid = |reason: String| SubmitError::Invalid {
            index,
            message_type: request.message_type.clone(),
            reason,
        };
        self.registry
            .check(&request.message_type, &request.payload)
            .map_err(|err| {
                invalid(match err {
                    CheckError::Unknown => format!(
                        "no enabled plugin handles {:?}; this backend takes: {}; or enable its plugin in the backend's [plugins]",
                        request.message_type,
                        self.message_types().join(", ")
                    ),
                    err => err.to_string(),
                })
            })?;
        if holds_nul(&request.payload) {
            return Err(invalid(
                "the payload holds a NUL character (\\u0000), which the catalog's database cannot store; remove it from the payload's text".into(),
            ));
        }
        let entity = match self.registry.entity_rule(&request.message_type) {
            Some(rule) => Some(
                rule.change(&request.payload)
                    .map_err(|err| invalid(err.to_string()))?,
            ),
            None => None,
        };
        let timestamp = match request.timestamp {
            Some(timestamp) => {
                if OffsetDateTime::parse(&timestamp, &Rfc3339).is_err() {
                    return Err(invalid(format!(
                        "timestamp {timestamp:?} is not an RFC 3339 time (2025-11-27T10:30:00Z); leave it out to use the backend's clock"
                    )));
                }
                timestamp
            }
            None => OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .map_err(|err| invalid(format!("cannot format the time: {err}")))?,
        };
        let message_id = match request.message_id {
            Some(id) if id.is_empty() || id.chars().any(char::is_control) => {
                return Err(invalid(format!(
                    "message_id {id:?} is empty or holds control characters; leave it out to get a new one"
                )));
            }
            Some(id) => id,
            None => uuid::Uuid::now_v7().to_string(),
        };
        let size = relayed_size(
            &store,
            &request.message_type,
            &request.payload,
            &timestamp,
            &message_id,
        );
        if size > self.max_message_bytes {
            return Err(SubmitError::TooLarge {
                index,
                message_type: request.message_type,
                size,
                limit: self.max_message_bytes,
            });
        }
        Ok(NewChange {
            store: store.to_string(),
            message_type: request.message_type.clone(),
            payload: request.payload,
            timestamp,
            message_id,
            entity,
            clock: request.clock,
        })
    }

    /// The message types of the enabled plugins, sorted.
    fn message_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .registry
            .plugins()
            .into_iter()
            .filter(|plugin| plugin.enabled)
            .flat_map(|plugin| plugin.message_types)
            .collect();
        types.sort();
        types
    }
}

/// Whether JSON text holds the escape `\u0000`: PostgreSQL refuses the
/// character in text and JSON, so no database of the catalog takes it.
fn holds_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1..i + 6) == Some(b"u0000") {
                return true;
            }
            // Skip the escaped character, an escaped backslash included.
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// The size of the message the relay publishes for a change, at most: its
/// envelope with the largest `seq` and `version` the publisher may give it.
/// The payload goes out verbatim, so it is measured, not copied.
fn relayed_size(
    store: &LicenseKey,
    message_type: &str,
    payload: &str,
    timestamp: &str,
    message_id: &str,
) -> usize {
    let mut envelope = crate::relay::relayed_envelope(
        store.as_str(),
        message_type,
        RawValue::NULL.to_owned(),
        timestamp,
        message_id,
        i64::MAX,
        &"0".repeat(crate::relay::CATALOG_ID_LEN),
    );
    envelope.version = Some(i64::MAX);
    envelope.head = Some(i64::MAX);
    // Serializing strings and numbers into memory does not fail.
    let frame = serde_json::to_vec(&envelope).map_or(0, |body| body.len());
    frame.saturating_sub(RawValue::NULL.get().len()) + payload.len()
}

/// Notifies the relay when dropped, unless disarmed.
struct WakeOnDrop<'a>(Option<&'a Notify>);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(committed) = self.0 {
            committed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use possync_catalog as _;

    use super::*;
    use crate::storage::Outcome;
    use crate::testing::Scripted;

    async fn catalog() -> Catalog<Scripted> {
        let registry =
            Registry::for_publishing(&BTreeMap::new()).expect("the built-in plugins load");
        Catalog::new(Arc::new(Scripted::new().await), Arc::new(registry))
    }

    #[tokio::test]
    async fn no_store_is_checked_before_the_direct_queues_waiting_changes_are_recorded() {
        let catalog = catalog().await;
        let quiet = Duration::from_secs(60);
        assert!(!catalog.direct_within("A", quiet), "no direct consumer");
        catalog.direct_expected();
        assert!(catalog.direct_within("A", quiet), "not connected yet");
        catalog.direct_backlog(3);
        catalog.direct_taken(2);
        assert!(catalog.direct_within("B", quiet), "one left");
        catalog.direct_taken(1);
        assert!(!catalog.direct_within("B", quiet), "all recorded");
        catalog.direct_taken(1);
        assert!(
            !catalog.direct_within("B", quiet),
            "later ones count by store"
        );
        catalog.direct_expected();
        catalog.direct_backlog(0);
        assert!(!catalog.direct_within("A", quiet), "nothing waited");
        // The broker was away and the queue filled meanwhile: held again.
        catalog.direct_backlog(2);
        assert!(catalog.direct_within("A", quiet), "held after a reconnect");
        catalog.direct_taken(2);
        assert!(!catalog.direct_within("A", quiet), "recorded");
    }

    fn price(store: &str, id: &str, price: f64) -> ChangeRequest {
        ChangeRequest {
            store: store.into(),
            message_type: "price_update".into(),
            payload: serde_json::json!({"product_id": id, "new_price": price}).to_string(),
            timestamp: None,
            message_id: None,
            clock: None,
        }
    }

    fn seqs(submitted: &Submitted) -> Vec<Option<i64>> {
        submitted
            .accepted
            .iter()
            .map(|accepted| match accepted.outcome {
                Outcome::Sequenced { seq } => Some(seq),
                Outcome::Stale => None,
            })
            .collect()
    }

    /// Waits for a notification that should already be there.
    async fn notified(catalog: &Catalog<Scripted>) -> bool {
        tokio::time::timeout(Duration::from_secs(1), catalog.committed().notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_empty_submission_is_refused() {
        let catalog = catalog().await;
        let err = catalog.submit(Vec::new(), None).await.expect_err("refused");
        assert!(matches!(err, SubmitError::Empty), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_store_is_refused_with_its_position_and_nothing_is_stored() {
        let catalog = catalog().await;
        let err = catalog
            .submit(
                vec![price("S1", "P", 1.0), price("not a key!", "P", 1.0)],
                None,
            )
            .await
            .expect_err("refused");
        assert!(
            matches!(err, SubmitError::InvalidStore { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("change 1:"), "{err}");
        assert!(catalog.storage().heads().await.expect("heads").is_empty());
    }

    #[tokio::test]
    async fn an_unknown_type_is_refused_naming_the_enabled_ones() {
        let catalog = catalog().await;
        let mut change = price("S1", "P", 1.0);
        change.message_type = "pryce_update".into();
        let err = catalog
            .submit(vec![change], None)
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains("pryce_update"), "{err}");
        assert!(
            err.contains("price_update"),
            "names the enabled types: {err}"
        );
    }

    #[tokio::test]
    async fn a_commit_notifies_the_relay_and_a_replay_does_not() {
        let catalog = catalog().await;
        let key = IdempotencyKey {
            client: "office".into(),
            key: "k".into(),
            fingerprint: "f".into(),
        };
        let submitted = catalog
            .submit(vec![price("S1", "P", 1.0)], Some(key.clone()))
            .await
            .expect("stored");
        assert_eq!(seqs(&submitted), [Some(1)]);
        assert!(notified(&catalog).await, "the commit woke the relay");
        let replayed = catalog
            .submit(vec![price("S1", "P", 1.0)], Some(key))
            .await
            .expect("replayed");
        assert!(replayed.replayed);
        assert!(!notified(&catalog).await, "a replay commits nothing");
    }

    #[tokio::test]
    async fn a_commit_notifies_the_relay_even_when_its_caller_gave_up() {
        let catalog = catalog().await;
        catalog
            .storage()
            .hang_after_commit
            .store(true, Ordering::SeqCst);
        let submit = catalog.submit(vec![price("S1", "P", 1.0)], None);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), submit)
                .await
                .is_err(),
            "the caller gives up after the commit"
        );
        assert_eq!(catalog.storage().heads().await.expect("heads")[0].head, 1);
        assert!(notified(&catalog).await, "the relay was woken all the same");
    }

    #[tokio::test]
    async fn a_timestamp_that_is_not_rfc_3339_is_refused() {
        let catalog = catalog().await;
        let mut change = price("S1", "P", 1.0);
        change.timestamp = Some("yesterday".into());
        let err = catalog
            .submit(vec![change], None)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("yesterday") && err.contains("RFC 3339"),
            "{err}"
        );
        let mut change = price("S1", "P", 1.0);
        change.timestamp = Some("2025-11-27T10:30:00+01:00".into());
        catalog.submit(vec![change], None).await.expect("stored");
    }

    #[tokio::test]
    async fn a_message_id_already_used_in_the_store_is_refused() {
        let catalog = catalog().await;
        let with_id = |store: &str, price_value: f64| {
            let mut change = price(store, "P", price_value);
            change.message_id = Some("m-1".into());
            change
        };
        catalog
            .submit(vec![with_id("S1", 1.0)], None)
            .await
            .expect("stored");
        let err = catalog
            .submit(vec![with_id("S1", 2.0)], None)
            .await
            .expect_err("the id names another change")
            .to_string();
        assert!(err.contains("m-1"), "{err}");
        catalog
            .submit(vec![with_id("S2", 2.0)], None)
            .await
            .expect("another store's ids are its own");
        let err = catalog
            .submit(vec![with_id("S3", 1.0), with_id("S3", 2.0)], None)
            .await
            .expect_err("twice in one submission");
        assert!(err.to_string().contains("m-1"), "{err}");
    }

    #[tokio::test]
    async fn a_change_whose_relayed_message_would_exceed_the_limit_is_refused_and_nothing_is_stored()
     {
        let catalog = catalog().await.with_max_message_bytes(1024);
        let mut large = price("S1", "P", 1.0);
        large.payload =
            serde_json::json!({"product_id": "x".repeat(1024), "new_price": 1.0}).to_string();
        let err = catalog
            .submit(vec![price("S1", "P", 1.0), large], None)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, SubmitError::TooLarge { index: 1, limit: 1024, size, .. } if size > 1024),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("max_message_bytes") && text.contains("1024"),
            "{text}"
        );
        assert!(catalog.storage().heads().await.expect("heads").is_empty());
        catalog
            .submit(vec![price("S1", "P", 1.0)], None)
            .await
            .expect("a small change still goes in");
    }

    #[test]
    fn the_measured_size_is_never_below_the_relayed_envelopes() {
        let store = LicenseKey::new("STORE-1".to_owned()).expect("a key");
        let payload = r#"{"product_id": "P-1", "new_price": 2.5}"#;
        let measured = relayed_size(
            &store,
            "price_update",
            payload,
            "2025-11-27T10:30:00Z",
            "m-1",
        );
        let mut relayed = crate::relay::relayed_envelope(
            "STORE-1",
            "price_update",
            RawValue::from_string(payload.to_owned()).expect("JSON"),
            "2025-11-27T10:30:00Z",
            "m-1",
            123_456,
            "3f2a9c0d4b6e8f1a2c3d4e5f60718293",
        )
        .with_head(999_999_999);
        relayed.version = Some(1_764_239_400_000_000);
        let actual = serde_json::to_vec(&relayed).expect("encodes").len();
        assert!(measured >= actual, "{measured} < {actual}");
        assert!(
            measured - actual <= 32,
            "close to the real size: {measured} vs {actual}"
        );
    }

    #[tokio::test]
    async fn a_payload_holding_a_nul_character_is_refused_on_every_database() {
        let catalog = catalog().await;
        let mut change = price("S1", "P", 1.0);
        change.payload = r#"{"product_id": "P\u0000", "new_price": 1.0}"#.into();
        let err = catalog
            .submit(vec![change], None)
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains("NUL") && err.contains("u0000"), "{err}");
        assert!(catalog.storage().heads().await.expect("heads").is_empty());
    }

    #[test]
    fn only_an_escaped_nul_counts_not_an_escaped_backslash_before_u0000() {
        assert!(holds_nul(r#"{"a": "x\u0000"}"#));
        assert!(holds_nul(r#"{"a\u0000": 1}"#));
        assert!(holds_nul(r#"{"a": "\\\u0000"}"#));
        assert!(!holds_nul(r#"{"a": "\\u0000"}"#));
        assert!(!holds_nul(r#"{"a": "u0000 \u0001"}"#));
    }
}
