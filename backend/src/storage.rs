//! The backend's database, behind one interface with two implementations:
//! SQLite (one file, zero setup, one backend process) and PostgreSQL
//! (several backend processes on one catalog). Both pass the same tests.

mod answer;
mod plan;
mod postgres;
mod sqlite;

pub use postgres::PostgresStorage;
pub use sqlite::SqliteStorage;

use std::future::Future;

use possync_core::EntityChange;
use possync_sdk::Version;
use serde_json::{Map, Value};

/// A change handed to the backend, before it has a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChange {
    /// The store (license key, already checked).
    pub store: String,
    /// The envelope `type`.
    pub message_type: String,
    /// The payload, as JSON text (already checked by its plugin).
    pub payload: String,
    /// When the change was made (RFC 3339), as the envelope will carry it.
    pub timestamp: String,
    /// Unique per change: the published message's id.
    pub message_id: String,
    /// The entity it changes, when its plugin declares one.
    pub entity: Option<EntityChange>,
    /// For a message another publisher sent straight to the exchange: its
    /// clock order. Such a change is [`Outcome::Stale`] when the entity's
    /// last change from the exchange was newer, as a terminal would judge
    /// it. `None` (API changes) orders by arrival at the backend.
    pub clock: Option<Version>,
}

/// A client-supplied key that makes a submission idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Who submitted it (a token's name; `exchange` for messages consumed
    /// from the broker, keyed by their message id).
    pub client: String,
    /// The client's key.
    pub key: String,
    /// A digest of the request: the same key with another request is refused.
    pub fingerprint: String,
}

/// What became of one change of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the catalog and the outbox, with this sequence number.
    Sequenced {
        /// The store's sequence number of the change.
        seq: i64,
    },
    /// Older than what the catalog holds for its entity: not sequenced.
    Stale,
}

/// One change of a submission, answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The store.
    pub store: String,
    /// The change's message id.
    pub message_id: String,
    /// What became of it.
    pub outcome: Outcome,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// Per change, in the order submitted.
    pub accepted: Vec<Accepted>,
    /// The key was seen before: this is the first submission's answer, and
    /// nothing was written again.
    pub replayed: bool,
}

/// An outbox row the relay publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The store.
    pub store: String,
    /// Its sequence number.
    pub seq: i64,
    /// The envelope `type`.
    pub message_type: String,
    /// The payload (JSON text).
    pub payload: String,
    /// The envelope `timestamp`.
    pub timestamp: String,
    /// The message id.
    pub message_id: String,
}

/// A sequenced change, as the API lists a store's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The change.
    pub row: OutboxRow,
    /// Whether the broker confirmed it.
    pub published: bool,
}

/// One entity of a store's catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// The kind of entity (`product`).
    pub entity: String,
    /// Its id.
    pub id: String,
    /// Its current state.
    pub state: Map<String, Value>,
    /// The sequence number of the change that last wrote it.
    pub seq: i64,
}

/// Where a store's sequence stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHead {
    /// The store.
    pub store: String,
    /// The highest sequence number given out (0: none yet).
    pub head: i64,
    /// How many of its changes the relay has not yet seen confirmed.
    pub unpublished: i64,
}

/// A back office client's bearer token, as stored: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The client's name, unique.
    pub name: String,
    /// SHA-256 of the token, lowercase hex.
    pub hash: String,
    /// The stores it may touch; `None`: every store.
    pub stores: Option<Vec<String>>,
    /// When it was made (seconds since the Unix epoch).
    pub created_at: i64,
}

/// A database operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The idempotency key was used before for a different request.
    #[error(
        "idempotency key {key:?} was already used for a different request; use a new key for a new request"
    )]
    KeyReused {
        /// The key.
        key: String,
    },
    /// A token of that name exists.
    #[error("a token named {0:?} exists; revoke it first or choose another name")]
    TokenExists(String),
    /// The database failed or could not be reached.
    #[error("the backend database failed: {0}")]
    Database(String),
}

/// The backend's database.
///
/// Every method is one transaction. A submission is answered only after its
/// commit: then the change is durable and will be published.
pub trait Storage: Send + Sync + 'static {
    /// Sequences and stores changes: for each, the store's next sequence
    /// number (gapless: a failed submission gives none out), the entity's
    /// new state and an outbox row, all in one transaction. With a key seen
    /// before (same client and fingerprint), returns the first answer and
    /// writes nothing.
    fn submit(
        &self,
        changes: Vec<NewChange>,
        key: Option<IdempotencyKey>,
    ) -> impl Future<Output = Result<Submitted, StorageError>> + Send;

    /// Up to `limit` unpublished outbox rows, each store's in sequence order.
    fn unpublished(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StorageError>> + Send;

    /// Marks rows (store, seq) as confirmed by the broker.
    fn mark_published(
        &self,
        rows: &[(String, i64)],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Whether this storage may run the relay: once it returned `true`, no
    /// other storage on the same database gets `true` while this one lives
    /// (SQLite: an exclusive lock on the file `<database>.relay.lock`;
    /// PostgreSQL: a session advisory lock).
    fn lead_relay(&self) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// A store's catalog: every entity that exists, by kind then id.
    fn catalog(
        &self,
        store: &str,
    ) -> impl Future<Output = Result<Vec<CatalogEntry>, StorageError>> + Send;

    /// A store's changes with a sequence number above `after`, in order, at
    /// most `limit`.
    fn changes_after(
        &self,
        store: &str,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Change>, StorageError>> + Send;

    /// Every store's sequence head, by store.
    fn heads(&self) -> impl Future<Output = Result<Vec<StoreHead>, StorageError>> + Send;

    /// Stores a new token.
    fn create_token(
        &self,
        token: TokenRecord,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Every token, by name.
    fn tokens(&self) -> impl Future<Output = Result<Vec<TokenRecord>, StorageError>> + Send;

    /// Removes a token; whether it existed.
    fn revoke_token(&self, name: &str) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// The token with this hash.
    fn token_by_hash(
        &self,
        hash: &str,
    ) -> impl Future<Output = Result<Option<TokenRecord>, StorageError>> + Send;
}
