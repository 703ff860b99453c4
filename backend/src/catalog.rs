//! The catalog of record's one way in: every change, from the HTTP API, the
//! CLI or another publisher on the exchange, is checked by its plugin, given
//! its entity change, and sequenced through [`Storage::submit`].

use std::sync::Arc;

use possync_core::{CheckError, LicenseKey, Registry};
use possync_sdk::Version;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;

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
    /// When the change was made (RFC 3339); the backend's clock if absent.
    /// It is carried to terminals, never used to order.
    pub timestamp: Option<String>,
    /// The message id; a new one if absent.
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
    committed: Arc<Notify>,
}

impl<S: Storage> Catalog<S> {
    /// A catalog over `storage`, checking payloads with `registry`'s plugins.
    pub fn new(storage: Arc<S>, registry: Arc<Registry>) -> Self {
        Self {
            storage,
            registry,
            committed: Arc::new(Notify::new()),
        }
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<S> {
        &self.storage
    }

    /// The plugins.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Notified after every commit that added outbox rows.
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
        let submitted = self.storage.submit(changes, key).await?;
        if !submitted.replayed {
            self.committed.notify_one();
        }
        Ok(submitted)
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
                        "no plugin handles {:?}; enable its plugin in the backend's [plugins]",
                        request.message_type
                    ),
                    err => err.to_string(),
                })
            })?;
        let entity = match self.registry.entity_rule(&request.message_type) {
            Some(rule) => Some(
                rule.change(&request.payload)
                    .map_err(|err| invalid(err.to_string()))?,
            ),
            None => None,
        };
        let timestamp = match request.timestamp {
            Some(timestamp) => timestamp,
            None => OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .map_err(|err| invalid(format!("cannot format the time: {err}")))?,
        };
        Ok(NewChange {
            store: store.to_string(),
            message_type: request.message_type.clone(),
            payload: request.payload,
            timestamp,
            message_id: request
                .message_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            entity,
            clock: request.clock,
        })
    }
}
