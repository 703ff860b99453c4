//! The back office's side of possync: `possync backend`.
//!
//! The backend is the catalog of record. Every change it accepts is written,
//! in one transaction, to the entity's current state in the catalog and to
//! an outbox row carrying the store's next sequence number (per store,
//! gapless, from 1); the caller is answered after that commit. A relay
//! publishes the outbox in sequence order with publisher confirms.

pub mod api;
mod catalog;
mod storage;
pub mod token;

pub use catalog::{Catalog, ChangeRequest, SubmitError};

pub use storage::{
    Accepted, CatalogEntry, Change, IdempotencyKey, NewChange, OutboxRow, Outcome, PostgresStorage,
    SqliteStorage, Storage, StorageError, StoreHead, Submitted, TokenRecord,
};
