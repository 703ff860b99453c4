//! The catalog as the handlers see it: one object-safe interface, so that
//! the handlers (and their OpenAPI annotations) are plain functions rather
//! than generic over the storage.

use std::future::Future;
use std::pin::Pin;

use crate::catalog::{Catalog, ChangeRequest, SubmitError};
use crate::storage::{
    CatalogEntry, Change, IdempotencyKey, Received, Storage, StorageError, StoreHead, Submitted,
    TerminalRecord, TokenRecord,
};

pub(super) type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the API does with the catalog and its storage.
pub(super) trait Access: Send + Sync + 'static {
    fn submit(
        &self,
        requests: Vec<ChangeRequest>,
        key: Option<IdempotencyKey>,
    ) -> Boxed<'_, Result<Submitted, SubmitError>>;

    fn catalog<'a>(&'a self, store: &'a str) -> Boxed<'a, Result<Vec<CatalogEntry>, StorageError>>;

    fn changes_after<'a>(
        &'a self,
        store: &'a str,
        after: i64,
        limit: usize,
    ) -> Boxed<'a, Result<Vec<Change>, StorageError>>;

    fn heads(&self) -> Boxed<'_, Result<Vec<StoreHead>, StorageError>>;

    fn token_by_hash<'a>(
        &'a self,
        hash: &'a str,
    ) -> Boxed<'a, Result<Option<TokenRecord>, StorageError>>;

    /// The message types of the enabled plugins, sorted.
    fn message_types(&self) -> Vec<String>;

    fn upstream_after<'a>(
        &'a self,
        store: &'a str,
        message_type: Option<&'a str>,
        after: i64,
        limit: usize,
    ) -> Boxed<'a, Result<Vec<Received>, StorageError>>;

    fn fleet<'a>(
        &'a self,
        store: Option<&'a str>,
    ) -> Boxed<'a, Result<Vec<TerminalRecord>, StorageError>>;

    fn forget_terminal<'a>(
        &'a self,
        store: &'a str,
        terminal: &'a str,
    ) -> Boxed<'a, Result<bool, StorageError>>;
}

impl<S: Storage> Access for Catalog<S> {
    fn submit(
        &self,
        requests: Vec<ChangeRequest>,
        key: Option<IdempotencyKey>,
    ) -> Boxed<'_, Result<Submitted, SubmitError>> {
        Box::pin(Catalog::submit(self, requests, key))
    }

    fn catalog<'a>(&'a self, store: &'a str) -> Boxed<'a, Result<Vec<CatalogEntry>, StorageError>> {
        Box::pin(self.storage().catalog(store))
    }

    fn changes_after<'a>(
        &'a self,
        store: &'a str,
        after: i64,
        limit: usize,
    ) -> Boxed<'a, Result<Vec<Change>, StorageError>> {
        Box::pin(self.storage().changes_after(store, after, limit))
    }

    fn heads(&self) -> Boxed<'_, Result<Vec<StoreHead>, StorageError>> {
        Box::pin(self.storage().heads())
    }

    fn token_by_hash<'a>(
        &'a self,
        hash: &'a str,
    ) -> Boxed<'a, Result<Option<TokenRecord>, StorageError>> {
        Box::pin(self.storage().token_by_hash(hash))
    }

    fn upstream_after<'a>(
        &'a self,
        store: &'a str,
        message_type: Option<&'a str>,
        after: i64,
        limit: usize,
    ) -> Boxed<'a, Result<Vec<Received>, StorageError>> {
        Box::pin(
            self.storage()
                .upstream_after(store, message_type, after, limit),
        )
    }

    fn fleet<'a>(
        &'a self,
        store: Option<&'a str>,
    ) -> Boxed<'a, Result<Vec<TerminalRecord>, StorageError>> {
        Box::pin(self.storage().fleet(store))
    }

    fn forget_terminal<'a>(
        &'a self,
        store: &'a str,
        terminal: &'a str,
    ) -> Boxed<'a, Result<bool, StorageError>> {
        Box::pin(self.storage().forget_terminal(store, terminal))
    }

    fn message_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .registry()
            .plugins()
            .into_iter()
            .filter(|plugin| plugin.enabled)
            .flat_map(|plugin| plugin.message_types)
            .collect();
        types.sort();
        types
    }
}
