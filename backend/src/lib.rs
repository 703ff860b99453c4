//! The back office's side of possync: `possync backend`.
//!
//! The backend is the catalog of record. Every change it accepts is written,
//! in one transaction, to the entity's current state in the catalog and to
//! an outbox row carrying the store's next sequence number (per store,
//! gapless, from 1); the caller is answered after that commit. A relay
//! publishes the outbox in sequence order with publisher confirms, and a
//! consumer records the changes other publishers send straight to the
//! exchange.

pub mod api;
mod catalog;
mod config;
mod direct;
mod events;
mod failpoint;
mod fleet;
mod queue;
mod relay;
mod serve;
mod service;
mod snapshots;
mod storage;
mod store_databases;
#[cfg(test)]
mod testing;
pub mod token;
mod upstream;

pub use catalog::{Catalog, ChangeRequest, SubmitError};
pub use config::{
    BackendConfig, DatabaseLocation, DirectConfig, RelayConfig, ServiceConfig, UpstreamConfig,
};
pub use fleet::{Counters, FleetRules, Judged, TerminalState};
pub use service::{ServiceError, run, run_with};

pub use storage::{
    Accepted, CatalogEntry, CatalogPage, Change, IdempotencyKey, NewChange, OutboxRow, Outcome,
    PostgresStorage, ReceiptRecord, Received, Recomputed, SqliteStorage, Storage, StorageError,
    StoreCheckpoint, StoreHead, Submitted, TerminalRecord, TokenRecord, UpstreamRecord,
};
