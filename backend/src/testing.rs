//! A storage for unit tests of what sits on top of [`Storage`]: a SQLite
//! storage in a temporary folder, whose relay leadership follows a script,
//! whose submissions can hang after their commit and whose outbox can keep
//! rows from the relay.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use possync_core::ChecksumSpec;

use crate::storage::{
    CatalogEntry, Change, ChecksumsAt, IdempotencyKey, NewChange, OutboxRow, ReceiptRecord,
    Received, Recomputed, SqliteStorage, Storage, StorageError, StoreCheckpoint, StoreHead,
    Submitted, TerminalRecord, TokenRecord, UpstreamRecord,
};

/// The storage; the folder lives as long as it.
pub(crate) struct Scripted {
    inner: SqliteStorage,
    _dir: tempfile::TempDir,
    /// What `lead_relay` answers, in turn; the last answer repeats.
    pub(crate) leads: Mutex<VecDeque<bool>>,
    /// Calls of `unpublished`: one per relay round.
    pub(crate) rounds: AtomicUsize,
    /// Whether a submission, once committed, never returns.
    pub(crate) hang_after_commit: AtomicBool,
    /// How long each mark takes before it is made.
    pub(crate) mark_delay: Mutex<Duration>,
    /// Marks still to fail, one per call.
    pub(crate) failing_marks: AtomicUsize,
    /// Records of upstream messages still to fail, one per call, as a
    /// database that cannot be reached fails.
    pub(crate) failing_records: AtomicUsize,
    /// The relay's reads of the outbox leave out rows above this seq, as
    /// if they were committed after the read.
    pub(crate) withheld_above: Mutex<Option<i64>>,
}

impl Scripted {
    pub(crate) async fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let inner = SqliteStorage::open(dir.path().join("backend.db"))
            .await
            .expect("the SQLite database opens");
        Self {
            inner,
            _dir: dir,
            leads: Mutex::new(VecDeque::from([true])),
            rounds: AtomicUsize::new(0),
            hang_after_commit: AtomicBool::new(false),
            mark_delay: Mutex::new(Duration::ZERO),
            failing_marks: AtomicUsize::new(0),
            failing_records: AtomicUsize::new(0),
            withheld_above: Mutex::new(None),
        }
    }
}

impl Storage for Scripted {
    async fn submit(
        &self,
        changes: Vec<NewChange>,
        key: Option<IdempotencyKey>,
        checksums: &ChecksumSpec,
    ) -> Result<Submitted, StorageError> {
        let submitted = self.inner.submit(changes, key, checksums).await?;
        if self.hang_after_commit.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(submitted)
    }

    async fn sync_checksums(
        &self,
        spec: &ChecksumSpec,
    ) -> Result<Option<Recomputed>, StorageError> {
        self.inner.sync_checksums(spec).await
    }

    async fn checkpoint(
        &self,
        store: &str,
        spec: &ChecksumSpec,
    ) -> Result<StoreCheckpoint, StorageError> {
        self.inner.checkpoint(store, spec).await
    }

    async fn checkpoint_at(
        &self,
        store: &str,
        up_to: i64,
        spec: &ChecksumSpec,
    ) -> Result<Option<ChecksumsAt>, StorageError> {
        self.inner.checkpoint_at(store, up_to, spec).await
    }

    async fn prune_checksum_log(&self, store: &str, below: i64) -> Result<u64, StorageError> {
        self.inner.prune_checksum_log(store, below).await
    }

    async fn unpublished(&self, limit: usize) -> Result<Vec<OutboxRow>, StorageError> {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        let mut rows = self.inner.unpublished(limit).await?;
        if let Some(above) = *self.withheld_above.lock().expect("not poisoned") {
            rows.retain(|row| row.seq <= above);
        }
        Ok(rows)
    }

    async fn mark_published(&self, rows: &[(String, i64)]) -> Result<(), StorageError> {
        let delay = *self.mark_delay.lock().expect("not poisoned");
        tokio::time::sleep(delay).await;
        let failing = self
            .failing_marks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StorageError::Database("the disk is full (scripted)".into()));
        }
        self.inner.mark_published(rows).await
    }

    async fn lead_relay(&self) -> Result<bool, StorageError> {
        let mut leads = self.leads.lock().expect("not poisoned");
        let lead = leads.front().copied().unwrap_or(false);
        if leads.len() > 1 {
            leads.pop_front();
        }
        Ok(lead)
    }

    async fn prune_keys(&self, older_than: Duration) -> Result<u64, StorageError> {
        self.inner.prune_keys(older_than).await
    }

    async fn catalog(&self, store: &str) -> Result<Vec<CatalogEntry>, StorageError> {
        self.inner.catalog(store).await
    }

    async fn changes_after(
        &self,
        store: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Change>, StorageError> {
        self.inner.changes_after(store, after, limit).await
    }

    async fn catalog_id(&self) -> Result<String, StorageError> {
        self.inner.catalog_id().await
    }

    async fn heads(&self) -> Result<Vec<StoreHead>, StorageError> {
        self.inner.heads().await
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        self.inner.create_token(token).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        self.inner.tokens().await
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StorageError> {
        self.inner.revoke_token(name).await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StorageError> {
        self.inner.token_by_hash(hash).await
    }

    async fn record_upstream(
        &self,
        messages: Vec<UpstreamRecord>,
    ) -> Result<Vec<bool>, StorageError> {
        let failing = self
            .failing_records
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StorageError::Database(
                "connection refused (scripted)".into(),
            ));
        }
        self.inner.record_upstream(messages).await
    }

    async fn upstream_after(
        &self,
        store: &str,
        message_type: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        self.inner
            .upstream_after(store, message_type, after, limit)
            .await
    }

    async fn upstream_since(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        self.inner.upstream_since(after, limit).await
    }

    async fn record_receipts(&self, receipts: Vec<ReceiptRecord>) -> Result<(), StorageError> {
        self.inner.record_receipts(receipts).await
    }

    async fn fleet(&self, store: Option<&str>) -> Result<Vec<TerminalRecord>, StorageError> {
        self.inner.fleet(store).await
    }

    async fn forget_terminal(&self, store: &str, terminal: &str) -> Result<bool, StorageError> {
        self.inner.forget_terminal(store, terminal).await
    }
}
