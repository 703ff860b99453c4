//! The backend's database, behind one interface with two implementations:
//! SQLite (one file, zero setup, one backend process) and PostgreSQL
//! (several backend processes on one catalog). Both pass the same tests.

mod answer;
mod checksums;
mod plan;
mod postgres;
mod sqlite;

pub use postgres::PostgresStorage;
pub use sqlite::SqliteStorage;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use possync_core::{Checksum, ChecksumSpec, EntityChange};
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
    /// clock order. Such a change is [`Outcome::Stale`] when the last change
    /// from the exchange it competes with was newer, as a terminal would
    /// judge it: the entity's, or, for a type without an entity, the last
    /// one of its type to its store (see [`Storage::submit`]). `None` (API
    /// changes) orders by arrival at the backend.
    pub clock: Option<Version>,
}

/// A client-supplied key that makes a submission idempotent, for
/// [`Storage::prune_keys`]'s retention: a retry after that is applied again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Who submitted it: a token ([`TokenRecord::idempotency_client`]), or
    /// the direct consumer for messages consumed from the broker (a name
    /// no token can have).
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
    /// From the exchange, and older than the last change from the exchange
    /// it competes with (see [`Storage::submit`]): not sequenced.
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

/// A page of a store's catalog, for a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogPage {
    /// The store's head when the page was read: every change up to it is
    /// in the states.
    pub head: i64,
    /// The store's head read after the states: none of them shows a
    /// change after it.
    pub settled: i64,
    /// The entities, by kind then id.
    pub entries: Vec<CatalogEntry>,
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

/// Where a store stands for a checkpoint, read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCheckpoint {
    /// The store's head (0: no change yet): the checksums are its catalog's
    /// at this seq.
    pub head: i64,
    /// The highest seq of the store's changes not yet marked published;
    /// `None`: every change up to the head is.
    pub highest_unpublished: Option<i64>,
    /// Each kind of the spec asked for, with its checksum (a kind with no
    /// entity has the zero checksum); `None` while the stored checksums are
    /// kept under another spec, until [`Storage::sync_checksums`] computes
    /// them again.
    pub checksums: Option<BTreeMap<String, Checksum>>,
}

/// A store's checksums at a boundary, as [`Storage::checkpoint_at`]
/// answers: the boundary's seq, and each kind of the spec with its
/// checksum there.
pub(crate) type ChecksumsAt = (i64, BTreeMap<String, Checksum>);

/// What [`Storage::sync_checksums`] computed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recomputed {
    /// Stores with an entity of a kind that has a checksum.
    pub stores: u64,
    /// Entities digested.
    pub entities: u64,
}

/// A message a terminal sent upstream (an order), to record once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRecord {
    /// The store.
    pub store: String,
    /// The terminal that sent it.
    pub terminal: String,
    /// Its type (`order`).
    pub message_type: String,
    /// Unique per message of its terminal: a copy is recorded once.
    pub message_id: String,
    /// When the POS app wrote it (RFC 3339, as the terminal sent it).
    pub created_at: String,
    /// Its payload (JSON text, checked by its plugin).
    pub payload: String,
}

/// A recorded upstream message, as the API lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its place among every message recorded: a client reads on after
    /// the last cursor it saw.
    pub cursor: i64,
    /// The message.
    pub record: UpstreamRecord,
    /// When the backend recorded it (ms since the epoch).
    pub received_ms: i64,
}

/// A terminal's delivery receipt, as the backend received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    /// The store.
    pub store: String,
    /// The terminal.
    pub terminal: String,
    /// What it reported.
    pub receipt: possync_core::Receipt,
    /// When the backend received it (ms since the epoch).
    pub seen_ms: i64,
}

/// What the backend knows of one terminal, from its receipts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalRecord {
    /// The store.
    pub store: String,
    /// The terminal.
    pub terminal: String,
    /// Its first receipt (ms since the epoch).
    pub first_seen_ms: i64,
    /// Its latest receipt.
    pub last_seen_ms: i64,
    /// Every change of the store up to this `seq` is applied there.
    pub applied_up_to: i64,
    /// The highest `seq` applied there.
    pub highest_applied: i64,
    /// Messages in its quarantine.
    pub quarantined: i64,
    /// Rows in its outbox not yet sent.
    pub outbox: i64,
    /// When `applied_up_to` last moved (ms since the epoch).
    pub applied_changed_ms: i64,
    /// When the first change it has not applied was published (ms since
    /// the epoch): how long it has been behind. `None` when it is not, or
    /// while that change waits for the relay.
    pub behind_since_ms: Option<i64>,
    /// Its latest receipt said it was stopping.
    pub stopping: bool,
    /// The seq at which its catalog last matched the backend's checksums;
    /// `None` until it has (or while it does not verify).
    pub verified_seq: Option<i64>,
    /// The gap it has open, as its latest receipt described it.
    pub gap: Option<String>,
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

impl TokenRecord {
    /// The client its idempotency keys belong to: its name and the start of
    /// its hash, so that a token revoked and made again under the same name
    /// starts with no keys. A `@` never occurs in a token's name, so no
    /// token shares another's keys or the direct consumer's.
    pub fn idempotency_client(&self) -> String {
        let hash = self.hash.get(..16).unwrap_or(&self.hash);
        format!("{}@{hash}", self.name)
    }
}

/// A database operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// A change's message id names another change of its store (terminals
    /// drop a message whose id they saw). Permanent.
    #[error(
        "message id {message_id:?} is already used by another change of store {store}; give each change an id of its own, or leave it out"
    )]
    MessageIdUsed {
        /// The store.
        store: String,
        /// The id.
        message_id: String,
    },
    /// The database refused the request for what it holds (data it cannot
    /// store, a constraint, a sequence exhausted): the same request fails
    /// the same way again. Permanent: do not retry.
    #[error("the backend database refused the request: {0}")]
    Refused(String),
    /// The database failed or could not be reached. Transient: the same
    /// request may succeed later.
    #[error("the backend database failed: {0}")]
    Database(String),
}

impl StorageError {
    /// Whether the same request may succeed later: the database failed,
    /// rather than refused it.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Database(_))
    }
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
    ///
    /// A change with a clock (from the exchange) is [`Outcome::Stale`] when
    /// it does not supersede the last clock of what it competes with: its
    /// entity's, or for a type without an entity, the last clock from the
    /// exchange of that type to that store. Without an entity the backend
    /// cannot tell which changes compete, so it takes every change of a
    /// type to a store as competing: a late one would otherwise be
    /// sequenced after a newer one and win on every terminal. The price is
    /// that a late change to another row of that type is left out of the
    /// sequence (terminals that received it from the exchange keep it);
    /// declare an entity to be judged per entity.
    ///
    /// Refused whole ([`StorageError::MessageIdUsed`]) when a change's
    /// message id is in its store's outbox already, or twice in the
    /// submission.
    ///
    /// The same transaction keeps the checksum of each kind of entity
    /// `checksums` covers, per store: each entity written takes its old
    /// digest out and puts its new one in. Checksums kept under another
    /// spec are left alone and marked stale instead, for
    /// [`Storage::sync_checksums`] to compute again.
    fn submit(
        &self,
        changes: Vec<NewChange>,
        key: Option<IdempotencyKey>,
        checksums: &ChecksumSpec,
    ) -> impl Future<Output = Result<Submitted, StorageError>> + Send;

    /// Makes the stored checksums `spec`'s: when they were kept under
    /// another spec (a database made before checksums, a plugin that
    /// changed what it exports, a submission by a backend process with
    /// other plugins), computes every store's again from the catalog, in
    /// one transaction that holds back submissions meanwhile, and keeps
    /// `spec`'s from then on. `None` when they were `spec`'s already.
    fn sync_checksums(
        &self,
        spec: &ChecksumSpec,
    ) -> impl Future<Output = Result<Option<Recomputed>, StorageError>> + Send;

    /// What a checkpoint of `store` states, read in one snapshot: its head,
    /// whether every change up to it is published, and the checksum of
    /// each kind `spec` covers at that head.
    fn checkpoint(
        &self,
        store: &str,
        spec: &ChecksumSpec,
    ) -> impl Future<Output = Result<StoreCheckpoint, StorageError>> + Send;

    /// The checksums of each kind `spec` covers at a boundary at or below
    /// `up_to`, read from the checksum log in one snapshot: the highest
    /// seq at or below `up_to` that ends a submission which logged one of
    /// `store`'s checksums (a submission that moved none of them leaves
    /// no boundary: the one before states its checksums too), and each
    /// kind's checksum there. `None` when the stored checksums are kept
    /// under another spec, when no such boundary is left, or when the log
    /// cannot tell some kind's checksum there (pruned below it, or reset
    /// above it by [`Storage::sync_checksums`], which logs every kind at
    /// each store's head): never a checksum it does not know.
    ///
    /// The default answers from [`Storage::checkpoint`]: the head, when it
    /// is at or below `up_to`.
    fn checkpoint_at(
        &self,
        store: &str,
        up_to: i64,
        spec: &ChecksumSpec,
    ) -> impl Future<Output = Result<Option<ChecksumsAt>, StorageError>> + Send {
        async move {
            let state = self.checkpoint(store, spec).await?;
            Ok(state
                .checksums
                .filter(|_| state.head > 0 && state.head <= up_to)
                .map(|checksums| (state.head, checksums)))
        }
    }

    /// Trims `store`'s checksum log below `below`: of each kind, the rows
    /// before its latest one at or below `below`. Reads at `below` and
    /// above answer as before; below it, they may answer `None`. The relay
    /// calls it once a checkpoint at `below` is out. Returns how many rows
    /// went. Without it the log is bounded still: each submission that
    /// logs a checksum trims that checksum's rows more than 1024 seqs
    /// below its new one and below the store's first unpublished change
    /// (but the latest of them).
    ///
    /// The default keeps no log: nothing to trim.
    fn prune_checksum_log(
        &self,
        store: &str,
        below: i64,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send {
        let _ = (store, below);
        async { Ok(0) }
    }

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

    /// Whether this storage may run the relay now; the relay asks before
    /// every round. While it answers `true`, no other storage on the same
    /// database does. SQLite: an exclusive lock on the file
    /// `<database>.relay.lock`, held while this storage lives. PostgreSQL:
    /// a session advisory lock, which ends with its connection (a server
    /// restart, a terminated backend, a network cut): each call checks
    /// within seconds that the connection still holds it, and takes it
    /// again on a new connection if it is free. A round already under way
    /// when the lock is lost may overlap the new leader's first round;
    /// terminals drop the duplicates by their `seq`.
    fn lead_relay(&self) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Forgets the idempotency keys recorded more than `older_than` ago;
    /// returns how many. A submission retried under a forgotten key is
    /// applied again (a change from the exchange with a message id is
    /// still recognised by it: [`StorageError::MessageIdUsed`]).
    fn prune_keys(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// A store's catalog: every entity that exists, by kind then id.
    fn catalog(
        &self,
        store: &str,
    ) -> impl Future<Output = Result<Vec<CatalogEntry>, StorageError>> + Send;

    /// A page of a store's catalog for a snapshot: the store's head, read
    /// first, then at most `limit` entities after `(entity, id)` by kind
    /// then id, then the head again. Every change up to the first head is
    /// in the entities' states, and none after the second.
    fn catalog_page(
        &self,
        store: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> impl Future<Output = Result<CatalogPage, StorageError>> + Send {
        async move {
            let head_of = || async {
                Ok::<_, StorageError>(
                    self.heads()
                        .await?
                        .into_iter()
                        .find(|head| head.store == store)
                        .map_or(0, |head| head.head),
                )
            };
            let head = head_of().await?;
            let entries = self
                .catalog(store)
                .await?
                .into_iter()
                .filter(|entry| {
                    after.as_ref().is_none_or(|(entity, id)| {
                        (entry.entity.as_str(), entry.id.as_str()) > (entity.as_str(), id.as_str())
                    })
                })
                .take(limit)
                .collect();
            let settled = head_of().await?;
            Ok(CatalogPage {
                head,
                settled,
                entries,
            })
        }
    }

    /// A store's changes with a sequence number above `after`, in order, at
    /// most `limit`.
    fn changes_after(
        &self,
        store: &str,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Change>, StorageError>> + Send;

    /// The catalog's id: random, made once when the database was created
    /// and kept in it. The relay stamps it on every message (`catalog`), so
    /// terminals tell this catalog's sequence from another backend's.
    fn catalog_id(&self) -> impl Future<Output = Result<String, StorageError>> + Send;

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

    /// Records upstream messages in their order, each once: a message whose
    /// (store, terminal, message id) is recorded already is left out. One
    /// transaction, durable when this returns; per message, whether it was
    /// new.
    fn record_upstream(
        &self,
        messages: Vec<UpstreamRecord>,
    ) -> impl Future<Output = Result<Vec<bool>, StorageError>> + Send;

    /// A store's upstream messages after `after` (a cursor), oldest first,
    /// at most `limit`; of one type when `message_type` names it.
    fn upstream_after(
        &self,
        store: &str,
        message_type: Option<&str>,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Received>, StorageError>> + Send;

    /// Every store's upstream messages after `after` (a cursor), oldest
    /// first, at most `limit`: what the store databases apply.
    fn upstream_since(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Received>, StorageError>> + Send;

    /// Records receipts: per terminal, the latest of a run (by its `n`)
    /// wins; a receipt of another run replaces what an earlier run said.
    fn record_receipts(
        &self,
        receipts: Vec<ReceiptRecord>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Every terminal that ever sent a receipt, by store then terminal; of
    /// one store when `store` names it.
    fn fleet(
        &self,
        store: Option<&str>,
    ) -> impl Future<Output = Result<Vec<TerminalRecord>, StorageError>> + Send;

    /// Forgets a terminal (replaced, gone): the fleet and `--wait-applied`
    /// no longer count it until it sends a receipt again. Whether it was
    /// known.
    fn forget_terminal(
        &self,
        store: &str,
        terminal: &str,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_made_again_under_its_name_is_another_idempotency_client() {
        let token = |hash: &str| TokenRecord {
            name: "office".into(),
            hash: hash.into(),
            stores: None,
            created_at: 0,
        };
        let first = token(&"a".repeat(64)).idempotency_client();
        let again = token(&"b".repeat(64)).idempotency_client();
        assert_ne!(first, again);
        assert!(first.starts_with("office@"), "{first}");
        assert_ne!(first, crate::direct::EXCHANGE_CLIENT);
    }
}
