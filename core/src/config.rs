//! Configuration: built-in defaults, then a TOML file, then `POSSYNC_...`
//! environment variables (`POSSYNC_TERMINAL__LICENSE_KEY` sets
//! `terminal.license_key`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::config_env::EnvText;
use crate::identity::{LicenseKey, TerminalId};
use crate::redact::{redact_config_error, redact_secrets, redact_url};

/// The sections of `possync backend`'s config that a terminal's or
/// publisher's config does not have: their environment variables are the
/// backend's, not errors here.
const SERVICE_SECTIONS: &[&str] = &["service", "relay", "direct", "upstream"];

/// Everything possync can be configured with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How to reach the broker.
    pub broker: BrokerConfig,
    /// This terminal: which store, which database (only for `possync terminal`).
    pub terminal: TerminalConfig,
    /// The broker's management API, for `possync admin` only.
    pub admin: AdminConfig,
    /// The terminal's status endpoint and page.
    pub status: StatusConfig,
    /// What a terminal sends to the back office: its outbox (orders) and
    /// delivery receipts.
    pub uplink: UplinkConfig,
    /// Built-in handlers switched on or off by name (`price = false`; those
    /// not named are on), and dynamic plugins loaded from a path
    /// (`[plugins.product_images] path = "..."`).
    pub plugins: BTreeMap<String, PluginSetting>,
    /// A `possync backend` that `possync publish` submits through, so that
    /// the catalog of record sequences every change; without it, publish
    /// sends straight to the broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendLink>,
}

/// The `[backend]` section of a publisher: the backend's HTTP API and the
/// bearer token to call it with (from `possync backend token create NAME`).
/// Keep the token out of files others can read, or set it with
/// `POSSYNC_BACKEND__TOKEN`; it is never printed.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendLink {
    /// The API's base URL, `http://127.0.0.1:8480`.
    pub url: String,
    /// The bearer token.
    pub token: String,
}

impl std::fmt::Debug for BackendLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendLink")
            .field("url", &redact_url(&self.url))
            .field("token", &"***")
            .finish()
    }
}

/// One entry of `[plugins]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PluginSetting {
    /// `name = true` or `false`: a built-in handler on or off.
    Toggle(bool),
    /// `[plugins.name]` with a `path`: a plugin library to load.
    Dynamic(DynamicPlugin),
}

/// A dynamic plugin's `[plugins.<name>]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicPlugin {
    /// Path of the plugin library (`.so`, `.dylib`, `.dll`), built against
    /// a possync-sdk of this possync's line: the same 0.x minor (or major),
    /// older or newer (docs/plugin-boundary.md).
    pub path: PathBuf,
    /// Whether its handlers apply messages; when off, its messages are
    /// acknowledged and not applied.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// The plugin's own settings (`[plugins.<name>.settings]`), passed to it.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

fn enabled_by_default() -> bool {
    true
}

impl<'de> Deserialize<'de> for PluginSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PluginSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "true or false (a built-in handler), or a table with `path` (a plugin library)",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<PluginSetting, E> {
                Ok(PluginSetting::Toggle(on))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PluginSetting, E> {
                match text {
                    "true" => Ok(PluginSetting::Toggle(true)),
                    "false" => Ok(PluginSetting::Toggle(false)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                map: M,
            ) -> Result<PluginSetting, M::Error> {
                DynamicPlugin::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PluginSetting::Dynamic)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The `[broker]` section.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL of the broker (`amqp://user:password@host:port/vhost`), or a
    /// list of them (the nodes of a cluster), tried in turn.
    #[serde(rename = "url", deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
    /// The topic exchange that carries `license.<KEY>.<type>` messages.
    pub exchange: String,
    /// `classic` or `quorum` (replicated by a RabbitMQ cluster) terminal queues.
    pub queue_type: QueueType,
    /// Seconds to wait for the broker to accept a connection.
    pub connect_timeout_secs: u64,
    /// Seconds to wait for the broker to confirm a published message.
    pub confirm_timeout_secs: u64,
    /// Seconds a publish keeps reconnecting through a broker outage before
    /// it fails.
    pub publish_retry_secs: u64,
    /// Seconds a RabbitMQ cluster takes to notice that one of its nodes is
    /// gone: 1.25 times the nodes' Erlang `net_ticktime` (60 s by default),
    /// and a margin. A terminal on quorum queues that lost its connection
    /// to a node that stays unreachable waits this long, and at least three
    /// heartbeats, after it last heard from the node before it takes the
    /// consumer the queue still counts there for its own: until then the
    /// broker may still deliver to it.
    pub node_down_after_secs: u64,
    /// Whether possync declares the exchange and queues itself. `false` for
    /// users provisioned by `possync admin`, who may not: the objects exist
    /// already, and dead letters go through the queue's dead-letter exchange
    /// (the reason stays in `possync_quarantine`).
    pub declare_topology: bool,
    /// PEM file of the CA that signed the broker's certificate, for
    /// `amqps://` URLs (default: the system's trusted CAs). Beside an
    /// `amqp://` URL it is an error: that URL never uses TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, if the broker asks for one
    /// (`amqps://` URLs only, like every TLS setting).
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM file (PKCS#8) of the client certificate's private key.
    pub tls_client_key_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()],
            exchange: "pos_license_events".into(),
            queue_type: QueueType::Classic,
            connect_timeout_secs: 10,
            confirm_timeout_secs: 30,
            publish_retry_secs: 60,
            node_down_after_secs: 80,
            declare_topology: true,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("exchange", &self.exchange)
            .field("queue_type", &self.queue_type)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("confirm_timeout_secs", &self.confirm_timeout_secs)
            .field("publish_retry_secs", &self.publish_retry_secs)
            .field("node_down_after_secs", &self.node_down_after_secs)
            .field("declare_topology", &self.declare_topology)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert_file", &self.tls_client_cert_file)
            .field("tls_client_key_file", &self.tls_client_key_file)
            .finish()
    }
}

/// A TLS file is configured for a URL that never uses TLS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{key} is set, but broker.url {url} starts with amqp://, which connects in clear text and never uses it: write amqps:// (port 5671) to connect over TLS, or remove {key}"
)]
pub struct TlsNeedsAmqps {
    /// The TLS setting, for example `broker.tls_ca_file`.
    pub key: &'static str,
    /// The URL, password redacted.
    pub url: String,
}

impl BrokerConfig {
    /// Refuses TLS settings beside an `amqp://` URL: lapin would connect in
    /// clear text and ignore them, and the operator would believe the link
    /// encrypted.
    pub fn check_tls(&self) -> Result<(), TlsNeedsAmqps> {
        let key = [
            ("broker.tls_ca_file", &self.tls_ca_file),
            ("broker.tls_client_cert_file", &self.tls_client_cert_file),
            ("broker.tls_client_key_file", &self.tls_client_key_file),
        ]
        .into_iter()
        .find_map(|(key, path)| path.is_some().then_some(key));
        let Some(key) = key else {
            return Ok(());
        };
        let clear = self.urls.iter().find(|url| {
            !url.split_once("://")
                .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("amqps"))
        });
        match clear {
            Some(url) => Err(TlsNeedsAmqps {
                key,
                url: redact_url(url),
            }),
            None => Ok(()),
        }
    }

    /// Checks what loading cannot: at least one URL, each a valid AMQP URL,
    /// TLS settings only beside `amqps://` URLs, timeouts of at least 1 s.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(ConfigError::OutOfRange {
                key: "broker.url",
                problem: "must name at least one broker",
            });
        }
        for url in &self.urls {
            if let Err(detail) = url.parse::<lapin::uri::AMQPUri>() {
                return Err(ConfigError::InvalidUrl {
                    url: redact_url(url),
                    // The parser quotes a URL it cannot read, password and all.
                    detail: redact_secrets(&detail, url),
                });
            }
        }
        self.check_tls()?;
        if self.confirm_timeout_secs == 0 || self.connect_timeout_secs == 0 {
            return Err(ConfigError::OutOfRange {
                key: "broker.*_timeout_secs",
                problem: "must be at least 1",
            });
        }
        if self.node_down_after_secs > 86_400 {
            return Err(ConfigError::OutOfRange {
                key: "broker.node_down_after_secs",
                problem: "must be at most 86400 (a day): a cluster notices a node gone in seconds to minutes",
            });
        }
        Ok(())
    }

    /// The first broker URL, or the only one.
    pub fn url(&self) -> &str {
        self.urls.first().map_or("", String::as_str)
    }

    /// Every broker URL, passwords redacted, for messages.
    pub fn redacted_urls(&self) -> String {
        self.urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `[admin]` section: how `possync admin` reaches the RabbitMQ
/// management API. Set the password here (in a file only its owner reads) or
/// with `POSSYNC_ADMIN__PASSWORD`, never on the command line.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Base URL of the management API.
    pub url: String,
    /// An administrator of the broker.
    pub user: String,
    /// Their password.
    pub password: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:15672".into(),
            user: "guest".into(),
            password: "guest".into(),
        }
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// The `[status]` section: an HTTP endpoint with `/` (a page a store
/// manager reads at a glance), `/status` (JSON), `/healthz` and `/metrics`
/// (Prometheus). Off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Whether a terminal serves it.
    pub enabled: bool,
    /// The address to listen on; loopback unless it must be reached from
    /// another machine.
    pub address: std::net::IpAddr,
    /// The port.
    pub port: u16,
    /// Names, besides `localhost` and IP addresses, that a request may give
    /// in its `Host` header: a name the terminal has on the LAN
    /// (`till-3.store.lan`, taken with the status port or without one), or a
    /// `name:port` taken exactly (`localhost:8080` through an SSH tunnel).
    /// A request for any other name is refused, so that a web page cannot
    /// read the status through a name of its own pointed at this machine
    /// (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port: 9464,
            allowed_hosts: Vec::new(),
        }
    }
}

/// The `[uplink]` section: what a terminal sends to the back office on
/// `up.<KEY>.<TERMINAL>.<type>`, as its own broker user. The rows the POS
/// app writes to `possync_outbox` go up in order, each removed once the
/// broker confirmed it; a receipt says how far the terminal has applied
/// its store's changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Whether the terminal sends its outbox and receipts. A terminal whose
    /// broker user may not publish (provisioned before the uplink existed)
    /// logs why and keeps applying; provision it again.
    pub enabled: bool,
    /// How often the outbox is looked at for rows the POS app wrote (ms).
    pub poll_ms: u64,
    /// Most outbox rows sent per round, confirmed together.
    pub batch: usize,
    /// The largest message sent, in bytes: a larger outbox row stays on the
    /// till, in its quarantine. Keep it at the backend's
    /// `upstream.max_message_bytes` (1 MiB by default), which refuses more.
    pub max_message_bytes: usize,
    /// Fewest milliseconds between two receipts: receipts after commits
    /// are coalesced to one per this interval.
    pub receipt_interval_ms: u64,
    /// A receipt is sent at least this often while nothing changes, so the
    /// back office knows the terminal is up (it shows it offline after
    /// two missed, 7 s by default).
    pub heartbeat_secs: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_ms: 100,
            batch: 500,
            max_message_bytes: 1024 * 1024,
            receipt_interval_ms: 1000,
            heartbeat_secs: 3,
        }
    }
}

/// How a terminal's queue outlives the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// A durable queue: nothing is lost while the terminal is off.
    Durable,
    /// An exclusive, auto-deleted queue, as in the system possync replaces.
    Transient,
}

/// The kind of queue a terminal gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic durable queue on one node.
    Classic,
    /// A quorum queue, replicated across a cluster's nodes.
    Quorum,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

/// The `[terminal]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalConfig {
    /// The store's license key; the terminal receives `license.<KEY>.#`.
    /// A terminal needs it; a publisher does not.
    pub license_key: Option<LicenseKey>,
    /// This terminal's id, unique within the store; names its queue. A
    /// terminal needs it; a publisher does not.
    pub terminal_id: Option<TerminalId>,
    /// Path of the SQLite database the POS app reads.
    pub database: PathBuf,
    /// Messages the broker may send ahead before they are acknowledged.
    pub prefetch: u16,
    /// Most messages applied in one database transaction.
    pub batch_size: usize,
    /// A batch of at least this many messages (a terminal draining a
    /// backlog) collapses: a change that a later change of the same batch
    /// overwrites (as its plugin's entity declaration says) is settled
    /// without being applied. 0 switches collapsing off. Smaller batches,
    /// live traffic, never pay for it.
    pub collapse_min_batch: usize,
    /// `durable`: a named durable queue that keeps changes while the
    /// terminal is off. `transient`: the original behaviour, an exclusive
    /// queue that lives only while the terminal is connected (changes made
    /// meanwhile are lost).
    pub delivery: Delivery,
    /// Days an unused terminal queue, and its dead-letter queue, is kept
    /// before the broker deletes it.
    pub queue_expiry_days: u32,
    /// Bodies larger than this many bytes are dead-lettered unread, and a
    /// publisher with this config refuses to send them. The default, 8 MiB,
    /// holds an image of the product_images plugin's default
    /// `max_image_bytes` (5 MiB, sent base64-encoded: 6.7 MiB) with its
    /// envelope, and stays under RabbitMQ's own `max_message_size` (16 MiB
    /// since 4.0, 128 MiB before). Raise it together with `max_image_bytes`,
    /// on the terminals and the publisher alike; the broker may hold up to
    /// `prefetch` messages of this size in a terminal's memory.
    pub max_message_bytes: usize,
    /// Tries a message gets when its handler fails transiently or panics,
    /// before it is dead-lettered. The messages behind it wait meanwhile,
    /// so that changes apply in order.
    pub max_attempts: u32,
    /// Most rows kept in `possync_quarantine`; the oldest go first. Every
    /// quarantined message is also in the terminal's dead-letter queue.
    pub quarantine_max_rows: u32,
    /// Days a row is kept in `possync_quarantine`.
    pub quarantine_max_days: u32,
    /// Changes kept in `possync_feed` for the change feed (`/events` on the
    /// status endpoint): a POS app away for longer than this many changes
    /// is told to read everything again. 0 switches the feed off.
    pub feed_keep: u32,
}

impl Default for TerminalConfig {
    fn default() -> Self {
        Self {
            license_key: None,
            terminal_id: None,
            database: PathBuf::from("possync.db"),
            prefetch: 500,
            batch_size: 250,
            collapse_min_batch: 100,
            delivery: Delivery::Durable,
            queue_expiry_days: 30,
            max_message_bytes: 8 * 1024 * 1024,
            max_attempts: 5,
            quarantine_max_rows: 1000,
            quarantine_max_days: 30,
            feed_keep: 10_000,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist or cannot be read.
    #[error("config file {path} cannot be read: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key is unknown, a value has the wrong type, or a value is refused.
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    /// A value a terminal needs is not set.
    #[error(
        "{key} is not set: set it in the [{section}] section of the config file or with the environment variable {env}"
    )]
    Missing {
        /// The dotted key, for example `terminal.license_key`.
        key: &'static str,
        /// The config file section.
        section: &'static str,
        /// The environment variable that sets it.
        env: &'static str,
    },
    /// A broker URL cannot be parsed.
    #[error(
        "broker.url {url} is not a valid AMQP URL ({detail}); it looks like amqp://user:password@host:5672/vhost"
    )]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// Why.
        detail: String,
    },
    /// A TLS setting beside an `amqp://` URL.
    #[error(transparent)]
    TlsNeedsAmqps(#[from] TlsNeedsAmqps),
    /// A value is out of range.
    #[error("{key} {problem}")]
    OutOfRange {
        /// The dotted key.
        key: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        Self::Invalid(Box::new(redact_config_error(err)))
    }
}

/// A loaded configuration and where it came from.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The values.
    pub config: Config,
    figment: Figment,
}

impl LoadedConfig {
    /// Where a key's value came from (`"default"`, a file path, an environment variable).
    pub fn source_of(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            // Built-in defaults come from code.
            Some(metadata) if matches!(metadata.source, Some(figment::Source::Code(_))) => {
                "default".into()
            }
            Some(metadata) => match &metadata.source {
                Some(source) => format!("{} {source}", metadata.name),
                None => metadata.name.to_string(),
            },
            None => "default".into(),
        }
    }
}

impl Config {
    /// Loads the defaults, then `file` if given (it must exist), then the
    /// environment. Unknown keys are errors that name the key and the file.
    pub fn load(file: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // figment treats a missing file as empty; a typo in --config must not silently run on defaults.
            std::fs::metadata(path).map_err(|source| ConfigError::Unreadable {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvText::ignoring(SERVICE_SECTIONS));
        // Lossy: a number or boolean setting reads the text the environment holds.
        let config: Config = figment.extract_lossy()?;
        config.check()?;
        if let Some(path) = file {
            warn_if_secrets_are_readable(path);
        }
        Ok(LoadedConfig { config, figment })
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.terminal.prefetch == 0 {
            return Err(ConfigError::OutOfRange {
                key: "terminal.prefetch",
                problem: "must be at least 1",
            });
        }
        if self.terminal.batch_size == 0 {
            return Err(ConfigError::OutOfRange {
                key: "terminal.batch_size",
                problem: "must be at least 1",
            });
        }
        if !(1..=49).contains(&self.terminal.queue_expiry_days) {
            // RabbitMQ takes at most 2^32-1 ms (49.7 days) for x-expires and x-message-ttl.
            return Err(ConfigError::OutOfRange {
                key: "terminal.queue_expiry_days",
                problem: "must be from 1 to 49 (RabbitMQ's limit for queue expiry)",
            });
        }
        if self.terminal.max_attempts == 0 {
            return Err(ConfigError::OutOfRange {
                key: "terminal.max_attempts",
                problem: "must be at least 1",
            });
        }
        if self.terminal.quarantine_max_rows == 0 || self.terminal.quarantine_max_days == 0 {
            return Err(ConfigError::OutOfRange {
                key: "terminal.quarantine_max_rows and terminal.quarantine_max_days",
                problem: "must be at least 1: the quarantine table is where an operator reads why a message was dead-lettered",
            });
        }
        if self.uplink.poll_ms == 0 || self.uplink.batch == 0 || self.uplink.heartbeat_secs == 0 {
            return Err(ConfigError::OutOfRange {
                key: "uplink.poll_ms, uplink.batch and uplink.heartbeat_secs",
                problem: "must be at least 1",
            });
        }
        if let Some(backend) = &self.backend {
            let scheme = backend.url.split_once("://").map(|(scheme, _)| scheme);
            if !matches!(scheme, Some("http" | "https")) {
                return Err(ConfigError::OutOfRange {
                    key: "backend.url",
                    problem: "must be the backend API's http:// or https:// URL, like http://127.0.0.1:8480",
                });
            }
            if backend.token.trim().is_empty() {
                return Err(ConfigError::Missing {
                    key: "backend.token",
                    section: "backend",
                    env: "POSSYNC_BACKEND__TOKEN",
                });
            }
        }
        self.broker.check()
    }

    /// This config as TOML, with every password replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.broker.urls = shown.broker.urls.iter().map(|u| redact_url(u)).collect();
        shown.admin.password = "***".into();
        if let Some(backend) = &mut shown.backend {
            backend.url = redact_url(&backend.url);
            backend.token = "***".into();
        }
        for plugin in shown.plugins.values_mut() {
            if let PluginSetting::Dynamic(dynamic) = plugin {
                for (key, value) in &mut dynamic.settings {
                    hide_secret_setting(key, value);
                }
            }
        }
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|err| format!("# cannot show the config: {err}\n"))
    }
}

/// Replaces with `***` a plugin setting whose name says it holds a secret
/// (`password`, `secret`, `token`, `key`), in tables within it too: possync
/// cannot know a plugin's settings, only their names.
fn hide_secret_setting(key: &str, value: &mut serde_json::Value) {
    let name = key.to_ascii_lowercase();
    if ["password", "secret", "token", "key"]
        .iter()
        .any(|word| name.contains(word))
    {
        *value = serde_json::Value::String("***".into());
        return;
    }
    if let serde_json::Value::Object(table) = value {
        for (key, value) in table.iter_mut() {
            hide_secret_setting(key, value);
        }
    }
}

/// What a terminal runs with: a configuration with the license key and the
/// terminal id a terminal cannot run without. A publisher needs neither, so
/// [`Config`] may lack them; these settings are made from it once, when a
/// terminal's config is loaded, and nothing checks them again.
#[derive(Debug, Clone, PartialEq)]
pub struct TerminalSettings {
    license_key: LicenseKey,
    terminal_id: TerminalId,
    config: Config,
}

impl TerminalSettings {
    /// Settings for terminal `terminal_id` of store `license_key`, the rest
    /// from `config`.
    pub fn new(license_key: LicenseKey, terminal_id: TerminalId, mut config: Config) -> Self {
        config.terminal.license_key = Some(license_key.clone());
        config.terminal.terminal_id = Some(terminal_id.clone());
        Self {
            license_key,
            terminal_id,
            config,
        }
    }

    /// The settings of the terminal `config` describes, or an error that
    /// says how to set what it lacks.
    pub fn from_config(config: Config) -> Result<Self, ConfigError> {
        let license_key = config
            .terminal
            .license_key
            .clone()
            .ok_or(ConfigError::Missing {
                key: "terminal.license_key",
                section: "terminal",
                env: "POSSYNC_TERMINAL__LICENSE_KEY",
            })?;
        let terminal_id = config
            .terminal
            .terminal_id
            .clone()
            .ok_or(ConfigError::Missing {
                key: "terminal.terminal_id",
                section: "terminal",
                env: "POSSYNC_TERMINAL__TERMINAL_ID",
            })?;
        Ok(Self {
            license_key,
            terminal_id,
            config,
        })
    }

    /// The store's license key.
    pub fn license_key(&self) -> &LicenseKey {
        &self.license_key
    }

    /// This terminal's id within the store.
    pub fn terminal_id(&self) -> &TerminalId {
        &self.terminal_id
    }

    /// The whole configuration, these two included.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl TryFrom<Config> for TerminalSettings {
    type Error = ConfigError;

    fn try_from(config: Config) -> Result<Self, ConfigError> {
        Self::from_config(config)
    }
}

/// Warns when a config file that holds a password can be read by users other
/// than its owner: anyone on the machine could take the broker credentials.
fn warn_if_secrets_are_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let Ok(file) = text.parse::<toml::Table>() else {
            return;
        };
        let urls = match file.get("broker").and_then(|b| b.get("url")) {
            Some(toml::Value::String(url)) => vec![url.clone()],
            Some(toml::Value::Array(urls)) => urls
                .iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let holds_password = urls.iter().any(|u| redact_url(u) != *u)
            || file.get("admin").and_then(|a| a.get("password")).is_some()
            || file.get("backend").and_then(|b| b.get("token")).is_some();
        let Ok(metadata) = std::fs::metadata(path) else {
            return;
        };
        let mode = metadata.permissions().mode();
        if holds_password && mode & 0o077 != 0 {
            tracing::warn!(
                event = "config_readable",
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the config file holds a password and others can read it: chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("possync.toml");
        std::fs::write(&path, text).expect("writes");
        Config::load(Some(&path)).expect("loads").config
    }

    #[test]
    fn a_publisher_backend_section_is_read_and_its_token_never_shown() {
        let config = loaded(
            "[backend]\nurl = \"http://127.0.0.1:8480\"\ntoken = \"possync_SecretToken123\"\n",
        );
        let backend = config.backend.clone().expect("the [backend] section");
        assert_eq!(backend.url, "http://127.0.0.1:8480");
        assert_eq!(backend.token, "possync_SecretToken123");
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("SecretToken123"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:8480"), "{shown}");
        assert!(!format!("{config:?}").contains("SecretToken123"));
        assert_eq!(
            loaded("").backend,
            None,
            "no section: straight to the broker"
        );
    }

    #[test]
    fn a_backend_section_needs_an_http_url_and_a_token() {
        for (text, says) in [
            (
                "[backend]\nurl = \"amqp://127.0.0.1\"\ntoken = \"t\"\n",
                "backend.url must be",
            ),
            (
                "[backend]\nurl = \"http://127.0.0.1:8480\"\ntoken = \" \"\n",
                "POSSYNC_BACKEND__TOKEN",
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("possync.toml");
            std::fs::write(&path, text).expect("writes");
            let err = Config::load(Some(&path)).expect_err("refused").to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn config_show_hides_plugin_settings_named_as_secrets() {
        let config = loaded(
            "[plugins.upload]\npath = \"/opt/libupload.so\"\n\n[plugins.upload.settings]\napi_password = \"AnotherSecret456\"\nfolder = \"/var/lib/pos\"\n\n[plugins.upload.settings.remote]\nToken = \"tok-789\"\n",
        );
        let shown = config.to_redacted_toml();
        assert!(
            !shown.contains("AnotherSecret456") && !shown.contains("tok-789"),
            "{shown}"
        );
        assert!(
            shown.contains("/var/lib/pos"),
            "other settings stay readable: {shown}"
        );
    }

    #[test]
    fn a_config_without_a_terminal_identity_loads_for_a_publisher_and_says_what_a_terminal_lacks() {
        for (text, key, env) in [
            (
                "[broker]\nexchange = \"pos_license_events\"\n",
                "terminal.license_key",
                "POSSYNC_TERMINAL__LICENSE_KEY",
            ),
            (
                "[terminal]\nlicense_key = \"STORE-1\"\n",
                "terminal.terminal_id",
                "POSSYNC_TERMINAL__TERMINAL_ID",
            ),
        ] {
            let err = TerminalSettings::from_config(loaded(text))
                .expect_err("no terminal without it")
                .to_string();
            assert_eq!(
                err,
                format!(
                    "{key} is not set: set it in the [terminal] section of the config file or with the environment variable {env}"
                )
            );
        }
    }

    #[test]
    fn a_terminal_config_gives_its_license_key_and_id_as_they_are() {
        let config = loaded("[terminal]\nlicense_key = \"STORE-1\"\nterminal_id = \"till-1\"\n");
        let settings = TerminalSettings::from_config(config.clone()).expect("a terminal");
        assert_eq!(settings.license_key().as_str(), "STORE-1");
        assert_eq!(settings.terminal_id().as_str(), "till-1");
        assert_eq!(settings.config(), &config);
        let made = TerminalSettings::new(
            settings.license_key().clone(),
            settings.terminal_id().clone(),
            Config::default(),
        );
        assert_eq!(
            made.config().terminal.license_key,
            config.terminal.license_key
        );
    }
}
