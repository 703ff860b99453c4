//! The backend service's configuration: built-in defaults, then a TOML file
//! (`--config`), then `POSSYNC_...` environment variables
//! (`POSSYNC_SERVICE__DATABASE` sets `service.database`), as for a terminal.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use possync_core::{BrokerConfig, ConfigError, EnvText, PluginSetting, redact_url};
use serde::{Deserialize, Serialize};

/// Everything `possync backend` is configured with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Where the HTTP API listens and which database holds the catalog.
    pub service: BackendConfig,
    /// How to reach the broker the relay publishes to and the direct
    /// consumer reads from.
    pub broker: BrokerConfig,
    /// The relay that publishes the outbox.
    pub relay: RelayConfig,
    /// The queue of changes other publishers sent straight to the exchange.
    pub direct: DirectConfig,
    /// What terminals send upstream: orders and delivery receipts.
    pub upstream: UpstreamConfig,
    /// The plugins that check payloads and declare entities, as on a
    /// terminal: built-ins switched on or off by name (`price = false`),
    /// plugin libraries by path (`[plugins.product_images] path = "..."`).
    /// A change of a type no enabled plugin handles is refused.
    pub plugins: BTreeMap<String, PluginSetting>,
}

/// The `[service]` section.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The address the HTTP API listens on (`127.0.0.1:8480`); loopback
    /// unless back office apps on other machines must reach it. Port 0
    /// takes a free port, logged at start.
    pub listen: SocketAddr,
    /// The catalog's database: a SQLite file (`possync-backend.db`, made if
    /// missing; one backend process at a time), or a PostgreSQL URL
    /// (`postgres://user:password@host/db`; several backend processes may
    /// share it, one of them relaying at a time). Keep a password out of
    /// files others can read, or set `POSSYNC_SERVICE__DATABASE` instead.
    pub database: String,
    /// Days an idempotency key is kept (a client's `Idempotency-Key`, and
    /// the id of each message consumed from the exchange), at least 1,
    /// default 7. Older keys are forgotten, checked hourly: a submission
    /// retried later under its key is applied again (a change from the
    /// exchange with a message id is still recognised by that id).
    pub idempotency_days: u32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8480)),
            database: "possync-backend.db".into(),
            idempotency_days: 7,
        }
    }
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("listen", &self.listen)
            .field("database", &self.database_location())
            .field("idempotency_days", &self.idempotency_days)
            .finish()
    }
}

/// Where the catalog is kept, as `service.database` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (it may hold a password: shown redacted).
    Postgres(String),
}

impl DatabaseLocation {
    /// `service.database` read: a `postgres://` or `postgresql://` URL, else
    /// a SQLite file's path.
    pub fn parse(database: &str) -> Self {
        let scheme = database.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some(scheme)
                if scheme.eq_ignore_ascii_case("postgres")
                    || scheme.eq_ignore_ascii_case("postgresql") =>
            {
                Self::Postgres(database.to_owned())
            }
            _ => Self::Sqlite(PathBuf::from(database)),
        }
    }
}

/// Shows the location with any password replaced by `***`.
impl std::fmt::Display for DatabaseLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "SQLite {}", path.display()),
            Self::Postgres(url) => write!(f, "PostgreSQL {}", redact_url(url)),
        }
    }
}

impl std::fmt::Debug for DatabaseLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl BackendConfig {
    /// The database `database` names.
    pub fn database_location(&self) -> DatabaseLocation {
        DatabaseLocation::parse(&self.database)
    }
}

/// The longest `[relay] checkpoint_every_secs`: a week.
const MAX_CHECKPOINT_EVERY_SECS: u64 = 7 * 24 * 3600;

/// The `[relay]` section: how the outbox reaches the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most outbox rows published (and confirmed) in one round.
    pub batch_size: usize,
    /// Milliseconds between looks at the outbox when no commit woke the
    /// relay: picks up changes another backend process committed (on
    /// PostgreSQL) and rows a failed round left behind.
    pub poll_interval_ms: u64,
    /// Seconds between attempts to become the relaying process when another
    /// backend process relays (PostgreSQL).
    pub lead_retry_secs: u64,
    /// The largest message the relay publishes, in bytes: set it to the
    /// terminals' limit (their `terminal.max_message_bytes`, 8 MiB by
    /// default, which is this default). A change whose message would be
    /// larger is refused when submitted (422 from the API, dead-lettered
    /// from the direct queue), since no terminal would ever take it.
    pub max_message_bytes: usize,
    /// Publish a store's checkpoint once this many of its changes were
    /// published since its last one (default 1000; 0: never for this
    /// reason). A checkpoint (`license.<KEY>.possync_checkpoint`) states
    /// the checksum of each kind of entity the plugins export at the
    /// store's latest change; a terminal standing at that change compares
    /// it with its own database and takes a snapshot if they differ. It
    /// goes out only once the broker confirmed every change it covers.
    pub checkpoint_every_changes: u64,
    /// Publish each store's checkpoint at least this often, in seconds,
    /// even when nothing changed (default 300, at most 604800, a week; 0:
    /// never for this reason): how a terminal finds a row changed behind
    /// possync's back. Stores are spread over the interval, not all at
    /// once.
    pub checkpoint_every_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval_ms: 1000,
            lead_retry_secs: 5,
            max_message_bytes: possync_core::TerminalConfig::default().max_message_bytes,
            checkpoint_every_changes: 1000,
            checkpoint_every_secs: 300,
        }
    }
}

/// The `[direct]` section: the backend's own durable queue, bound to
/// `license.#` on the exchange, through which it records in the catalog the
/// changes other publishers (a back office app, `possync publish` without a
/// backend) send straight to the exchange. Terminals receive those directly
/// as well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectConfig {
    /// Whether the backend consumes that queue. Off, changes sent straight
    /// to the exchange still reach terminals but are missing from the
    /// catalog.
    pub enabled: bool,
    /// The queue's name; its dead-letter queue is `<queue>.dead_letter`,
    /// where a message the catalog refuses goes, with the reason in its
    /// `x-possync-reason` header. Backend processes sharing a database
    /// share the queue.
    pub queue: String,
    /// Messages the broker may send ahead before they are acknowledged.
    pub prefetch: u16,
    /// Days the queue is kept once no backend reads it, before the broker
    /// deletes it (a backend stopped for good must not pile up every store's
    /// changes forever), and days a dead letter is kept. Set it before the
    /// queue is first declared: RabbitMQ refuses to change it on an
    /// existing queue.
    pub queue_expiry_days: u32,
}

impl Default for DirectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue: "possync.backend.direct".into(),
            prefetch: 100,
            queue_expiry_days: 30,
        }
    }
}

/// The `[upstream]` section: the backend's queue of what terminals send on
/// `up.<KEY>.<TERMINAL>.<type>` (orders and other upstream types, handled
/// by plugins, and delivery receipts), and how the fleet is judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Whether the backend consumes that queue. Off, terminals' outbox rows
    /// wait on their terminals and the fleet is unknown.
    pub enabled: bool,
    /// The queue's name; its dead-letter queue is `<queue>.dead_letter`,
    /// where a refused message goes with the reason in its
    /// `x-possync-reason` header. Unlike the direct queue it never expires:
    /// it holds orders. Terminals' snapshot requests (a terminal that lacks
    /// changes asks for its store's catalog) go to `<queue>.snapshots`,
    /// bound to the snapshot requests among `bindings`.
    pub queue: String,
    /// The queue's bindings: every terminal's messages (`up.#`, the
    /// default), or some stores' only (`up.STORE-1.#`), for a backend that
    /// serves those stores.
    pub bindings: Vec<String>,
    /// Messages the broker may send ahead before they are acknowledged.
    pub prefetch: u16,
    /// The largest upstream message taken, in bytes; a larger one is
    /// dead-lettered. Orders are a few KiB. The broker delivers a message
    /// whole before the backend can look at it, so to bound what a hostile
    /// till can make the backend hold (prefetch times the size), set
    /// RabbitMQ's `max_message_size` as low as your largest message type
    /// allows. Terminals keep a larger row in their quarantine
    /// (`uplink.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Days the queue is kept once no backend reads it, before the broker
    /// deletes it with whatever it holds; unset (the default), it is kept
    /// until deleted by hand. Set it before the queue is first declared.
    pub queue_expiry_days: Option<u32>,
    /// Accept a message only when its AMQP `user_id`, which RabbitMQ
    /// checks against the sender's connection, is the broker user
    /// `possync admin provision-terminal` made for the terminal its routing
    /// key and body name. Turn off only for development, where every
    /// terminal shares one broker user: then any holder of those
    /// credentials can speak for any terminal, and the backend says so at
    /// start.
    pub verify_user: bool,
    /// The message types terminals may send up (besides delivery
    /// receipts): each is checked and applied by the plugin of that type.
    /// A message of another type is refused and dead-lettered, so that a
    /// till cannot write catalog types into its store's database.
    pub types: Vec<String>,
    /// The folder of the store databases: one SQLite file per store
    /// (`<folder>/<KEY>.db`), where the plugins apply what the store's
    /// terminals sent (orders into `orders`), as they apply changes on a
    /// terminal. They are derived from the recorded messages: to rebuild
    /// them, stop the backend and delete the folder. Each backend process
    /// keeps its own: give each its own folder.
    pub store_databases: PathBuf,
    /// A terminal whose last receipt is older than this is offline
    /// (terminals send one at least every `uplink.heartbeat_secs`, 3 s by
    /// default).
    pub offline_after_secs: u64,
    /// A live terminal behind its store's head whose applied sequence has
    /// not moved for this long is stalled.
    pub stalled_after_secs: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue: "possync.backend.upstream".into(),
            bindings: vec![possync_core::UPSTREAM_BINDING.to_owned()],
            prefetch: 200,
            max_message_bytes: 1024 * 1024,
            queue_expiry_days: None,
            verify_user: true,
            types: vec!["order".into()],
            store_databases: PathBuf::from("possync-stores"),
            offline_after_secs: 7,
            stalled_after_secs: 60,
        }
    }
}

impl ServiceConfig {
    /// Loads the defaults, then `file` if given (it must exist), then the
    /// environment. Unknown keys are errors that name the key and the file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = file {
            // figment treats a missing file as empty; a typo in --config must not silently run on defaults.
            std::fs::metadata(path).map_err(|source| ConfigError::Unreadable {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        // A terminal's or publisher's variables (POSSYNC_TERMINAL__..., the
        // publisher's POSSYNC_BACKEND__TOKEN) may be set in the same shell.
        figment = figment.merge(EnvText::ignoring(&[
            "terminal", "status", "admin", "backend", "uplink",
        ]));
        // Lossy: a number or boolean setting reads the text the environment holds.
        let config: Self = figment.extract_lossy()?;
        config.check()?;
        if let Some(path) = file {
            config.warn_if_secrets_are_readable(path);
        }
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.broker.check()?;
        if self.service.database.trim().is_empty() {
            return Err(ConfigError::OutOfRange {
                key: "service.database",
                problem: "must name a SQLite file or a postgres:// URL",
            });
        }
        if self.service.idempotency_days == 0 {
            return Err(ConfigError::OutOfRange {
                key: "service.idempotency_days",
                problem: "must be at least 1",
            });
        }
        if self.relay.batch_size == 0 {
            return Err(ConfigError::OutOfRange {
                key: "relay.batch_size",
                problem: "must be at least 1",
            });
        }
        if self.relay.poll_interval_ms == 0 || self.relay.lead_retry_secs == 0 {
            return Err(ConfigError::OutOfRange {
                key: "relay.poll_interval_ms and relay.lead_retry_secs",
                problem: "must be at least 1",
            });
        }
        if self.relay.max_message_bytes < 1024 {
            return Err(ConfigError::OutOfRange {
                key: "relay.max_message_bytes",
                problem: "must be at least 1024; set it to the terminals' terminal.max_message_bytes",
            });
        }
        if self.relay.checkpoint_every_secs > MAX_CHECKPOINT_EVERY_SECS {
            return Err(ConfigError::OutOfRange {
                key: "relay.checkpoint_every_secs",
                problem: "must be at most 604800 (a week); 0 switches checkpoints by time off",
            });
        }
        if self.direct.prefetch == 0 {
            return Err(ConfigError::OutOfRange {
                key: "direct.prefetch",
                problem: "must be at least 1",
            });
        }
        if !(1..=49).contains(&self.direct.queue_expiry_days) {
            // RabbitMQ takes at most 2^32-1 ms (49.7 days) for x-expires.
            return Err(ConfigError::OutOfRange {
                key: "direct.queue_expiry_days",
                problem: "must be from 1 to 49 (RabbitMQ's limit for queue expiry)",
            });
        }
        if self.upstream.prefetch == 0
            || self.upstream.offline_after_secs == 0
            || self.upstream.max_message_bytes < 1024
        {
            return Err(ConfigError::OutOfRange {
                key: "upstream.prefetch, upstream.offline_after_secs and upstream.max_message_bytes",
                problem: "must be at least 1 (upstream.max_message_bytes at least 1024)",
            });
        }
        if self
            .upstream
            .queue_expiry_days
            .is_some_and(|days| !(1..=49).contains(&days))
        {
            return Err(ConfigError::OutOfRange {
                key: "upstream.queue_expiry_days",
                problem: "must be from 1 to 49 (RabbitMQ's limit for queue expiry), or unset to keep the queue",
            });
        }
        if self.upstream.bindings.is_empty()
            || self
                .upstream
                .bindings
                .iter()
                .any(|binding| binding != "up.#" && !binding.starts_with("up."))
        {
            return Err(ConfigError::OutOfRange {
                key: "upstream.bindings",
                problem: "must list at least one binding, each starting with `up.` (`up.#`, or `up.STORE-1.#`)",
            });
        }
        if self.upstream.queue.is_empty()
            || self.upstream.queue.starts_with("amq.")
            || self.upstream.queue == self.direct.queue
        {
            return Err(ConfigError::OutOfRange {
                key: "upstream.queue",
                problem: "must be a queue name of its own that does not start with amq. (RabbitMQ reserves those)",
            });
        }
        if self.direct.queue.is_empty() || self.direct.queue.starts_with("amq.") {
            return Err(ConfigError::OutOfRange {
                key: "direct.queue",
                problem: "must be a queue name that does not start with amq. (RabbitMQ reserves those)",
            });
        }
        Ok(())
    }

    /// Warns when the file holds a password (in a broker or database URL)
    /// and users other than its owner can read it.
    fn warn_if_secrets_are_readable(&self, path: &Path) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let Ok(text) = std::fs::read_to_string(path) else {
                return;
            };
            let holds_password = self
                .broker
                .urls
                .iter()
                .chain(std::iter::once(&self.service.database))
                .any(|url| redact_url(url) != *url && text.contains(url.as_str()));
            let Ok(metadata) = std::fs::metadata(path) else {
                return;
            };
            let mode = metadata.permissions().mode();
            if holds_password && mode & 0o077 != 0 {
                crate::events::config_readable(path, mode);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.toml");
        std::fs::write(&path, text).expect("writes");
        (dir, path)
    }

    #[test]
    fn the_defaults_listen_on_loopback_and_keep_the_catalog_in_a_sqlite_file() {
        let config = ServiceConfig::default();
        assert_eq!(config.service.listen.to_string(), "127.0.0.1:8480");
        assert_eq!(
            config.service.database_location(),
            DatabaseLocation::Sqlite("possync-backend.db".into())
        );
        assert!(config.direct.enabled);
        assert_eq!(config.direct.queue, "possync.backend.direct");
        assert_eq!(config.service.idempotency_days, 7);
        assert_eq!(
            config.relay.max_message_bytes,
            possync_core::TerminalConfig::default().max_message_bytes,
            "the terminals' default limit"
        );
    }

    #[test]
    fn a_postgres_url_is_a_postgres_database_and_its_password_is_never_shown() {
        let config = ServiceConfig {
            service: BackendConfig {
                database: "postgres://possync:Sup3rSecret@db.example/catalog".into(),
                ..BackendConfig::default()
            },
            ..ServiceConfig::default()
        };
        let location = config.service.database_location();
        assert!(matches!(location, DatabaseLocation::Postgres(_)));
        assert_eq!(
            location.to_string(),
            "PostgreSQL postgres://possync:***@db.example/catalog"
        );
        assert!(!format!("{config:?}").contains("Sup3rSecret"));
        assert!(matches!(
            DatabaseLocation::parse("POSTGRESQL://h/db"),
            DatabaseLocation::Postgres(_)
        ));
        assert_eq!(
            DatabaseLocation::parse("/var/lib/possync/catalog.db"),
            DatabaseLocation::Sqlite("/var/lib/possync/catalog.db".into())
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_the_key_and_the_file() {
        let (_dir, path) = write("[service]\nlisten = \"127.0.0.1:9000\"\ndatabse = \"x.db\"\n");
        let err = ServiceConfig::load(Some(&path))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("databse"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_the_defaults() {
        let err = ServiceConfig::load(Some(Path::new("/no/such/backend.toml")))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("/no/such/backend.toml"), "{err}");
    }

    #[test]
    fn every_section_loads_from_a_file() {
        let (_dir, path) = write(
            "[service]\nlisten = \"0.0.0.0:9000\"\ndatabase = \"catalog.db\"\n\n[broker]\nurl = \"amqp://u:p@broker:5672/%2f\"\n\n[relay]\nbatch_size = 50\n\n[direct]\nqueue = \"office.direct\"\n\n[plugins]\nprice = false\n",
        );
        let config = ServiceConfig::load(Some(&path)).expect("loads");
        assert_eq!(config.service.listen.port(), 9000);
        assert_eq!(config.relay.batch_size, 50);
        assert_eq!(config.direct.queue, "office.direct");
        assert_eq!(
            config.plugins.get("price"),
            Some(&PluginSetting::Toggle(false))
        );
    }

    #[test]
    fn checkpoints_go_by_changes_and_by_time_and_0_switches_either_off() {
        let defaults = RelayConfig::default();
        assert_eq!(
            (
                defaults.checkpoint_every_changes,
                defaults.checkpoint_every_secs
            ),
            (1000, 300)
        );
        let (_dir, path) =
            write("[relay]\ncheckpoint_every_changes = 0\ncheckpoint_every_secs = 60\n");
        let config = ServiceConfig::load(Some(&path)).expect("loads");
        assert_eq!(
            (
                config.relay.checkpoint_every_changes,
                config.relay.checkpoint_every_secs
            ),
            (0, 60)
        );
    }

    #[test]
    fn values_out_of_range_are_refused_with_their_key() {
        for (text, key) in [
            ("[relay]\nbatch_size = 0\n", "relay.batch_size"),
            (
                "[service]\nidempotency_days = 0\n",
                "service.idempotency_days",
            ),
            ("[direct]\nprefetch = 0\n", "direct.prefetch"),
            (
                "[relay]\nmax_message_bytes = 0\n",
                "relay.max_message_bytes",
            ),
            ("[direct]\nqueue = \"amq.x\"\n", "direct.queue"),
            ("[service]\ndatabase = \"\"\n", "service.database"),
            ("[broker]\nurl = \"http://x\"\n", "broker.url"),
            (
                "[relay]\ncheckpoint_every_secs = 604801\n",
                "relay.checkpoint_every_secs",
            ),
        ] {
            let (_dir, path) = write(text);
            let err = ServiceConfig::load(Some(&path))
                .expect_err("refused")
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
