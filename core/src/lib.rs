//! The possync runtime: configuration, the broker connection, topology and
//! reconnect, routing and dispatch of messages to plugins, the terminal's
//! SQLite database, and the publisher.
//!
//! The runtime knows nothing about prices or products: every message type is
//! applied by a [`possync_sdk::Plugin`]'s handler, found in the [`Registry`].

mod admin;
mod applier;
mod backoff;
mod checksum;
mod collapse;
mod config;
mod config_env;
mod connection;
mod consumer;
mod dead_letters;
mod dispatch;
mod doctor;
mod effects;
mod entity;
mod events;
mod failpoint;
mod feed;
mod gap;
mod host;
mod identity;
mod in_process;
mod inbound;
mod plugin_loader;
mod poison;
mod progress;
mod publisher;
mod quarantine;
mod redact;
mod registry;
mod sequence;
mod shutdown;
mod snapshot;
mod status;
mod status_server;
mod store;
mod store_database;
mod telemetry;
mod terminal;
mod topology;
mod transaction;
mod uplink;
mod upstream;
mod verify;

pub use admin::{Admin, AdminError, Provisioned, Revoked, publisher_user, terminal_user};
pub use backoff::Backoff;
pub use checksum::{CHECKPOINT_TYPE, Checkpoint, Checksum, ChecksumSpec, digest};
pub use config::{
    AdminConfig, BackendLink, BrokerConfig, Config, ConfigError, Delivery, DynamicPlugin,
    LoadedConfig, PluginSetting, QueueType, StatusConfig, TerminalConfig, TerminalSettings,
    TlsNeedsAmqps, UplinkConfig,
};
pub use config_env::EnvText;
pub use connection::{BrokerError, connect as connect_broker};
pub use dead_letters::{TakenDeadLetters, take_dead_letters};
pub use doctor::{Check, config_sources, diagnose};
pub use entity::{ChangeKind, ENTITY_KEYWORD, EntityChange, EntityError, EntityRule};
pub use feed::{Change, ChangeOp};
pub use gap::{Gap, GapCause};
pub use identity::{InvalidId, LicenseKey, MAX_ID_LEN, TerminalId};
pub use in_process::{DeadLetter, InProcessBroker};
pub use plugin_loader::PluginLoadError;
pub use publisher::{PublishError, Published, Publisher};
pub use quarantine::{QuarantineEntry, Rows};
pub use redact::redact_url;
pub use registry::{CheckError, Origin, PluginInfo, Registry, RegistryError};
pub use sequence::SyncState;
pub use shutdown::shutdown_signal;
pub use status::{State, Status, StatusReport, moment_text};
pub use store::{Database, DatabaseError, Quarantined, StoredStatus, unix_now_ms};
pub use store_database::{
    RefusedEntry, StoreApplied, StoreDatabase, StoreHeld, StoreOpenError, UpstreamEntry,
};
pub use telemetry::{LogFormat, init_logging};
pub use terminal::{Terminal, TerminalError};
pub use topology::{TerminalTopology, is_message_type, routing_key};
pub use upstream::{
    RECEIPT_TYPE, Receipt, SNAPSHOT_TYPE, SnapshotChunk, SnapshotEntity, SnapshotRequest,
    UPSTREAM_BINDING, UpstreamMessage, expected_user, parse_upstream_key, upstream_key,
};
pub use verify::Verified;
