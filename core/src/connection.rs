//! Opening a connection to the broker, with errors that say what to do.

use std::time::Duration;

use futures_util::FutureExt;
use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};

use crate::config::{BrokerConfig, TlsNeedsAmqps};
use crate::redact::{redact_secrets, redact_url};

/// The broker could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing answers at the address.
    #[error(
        "no broker answers at {url} ({detail}); is RabbitMQ running? (start it with `rabbitmq-server -detached`)"
    )]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// The underlying error.
        detail: String,
    },
    /// The broker answered but refused the credentials or a permission.
    #[error(
        "the broker at {url} refused access: {detail}; check the user and password in broker.url and the user's permissions"
    )]
    AccessRefused {
        /// The URL, password redacted.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// The TLS handshake failed: a certificate the CA does not vouch for, a
    /// name that does not match, or a server that does not speak TLS.
    #[error(
        "TLS with {url} failed: {detail}; check broker.tls_ca_file (the CA that signed the broker's certificate) and the host name in broker.url"
    )]
    Tls {
        /// The URL, password redacted.
        url: String,
        /// What failed.
        detail: String,
    },
    /// A TLS file named in config cannot be read.
    #[error("cannot read {key} {path}: {detail}")]
    TlsFile {
        /// The config key.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// A TLS file is configured for an `amqp://` URL.
    #[error(transparent)]
    TlsNeedsAmqps(#[from] TlsNeedsAmqps),
    /// A queue or exchange this terminal expects does not exist.
    #[error(
        "{detail}: with broker.declare_topology = false the queue must exist already; provision it with `possync admin provision-terminal`"
    )]
    NotFound {
        /// What the broker said.
        detail: String,
    },
    /// The broker did not store a published message (a nack).
    #[error(
        "the broker refused {routing_key} (nack) and did not store it: a queue it goes to has no leader (a cluster node down) or is full"
    )]
    Nacked {
        /// The message's routing key.
        routing_key: String,
    },
    /// The cluster node that holds a classic queue is down: the queue is
    /// back when the node is.
    #[error(
        "{detail}: a classic queue lives on one node of a cluster; possync tries again, and `broker.queue_type = \"quorum\"` keeps queues available while a node is down"
    )]
    QueueNodeDown {
        /// What the broker said.
        detail: String,
    },
    /// A queue or exchange exists with settings other than the ones requested.
    #[error(
        "the broker refused to declare {what}: {detail}; it exists with other settings (an older version or another queue type?): delete it with `rabbitmqctl delete_queue NAME` or use the old settings"
    )]
    Conflict {
        /// What was declared.
        what: String,
        /// What the broker said.
        detail: String,
    },
    /// Another process consumes this terminal's queue: a second copy of the
    /// terminal (a cloned disk, a copied config).
    #[error(
        "another process is already running as this terminal: the broker refused a second consumer on queue {queue}. Stop the other process, or give this one its own terminal.terminal_id. (A till that just lost power may still hold the queue: the broker drops it within three minutes, and a terminal starting meanwhile keeps trying that long before it gives up.)"
    )]
    AlreadyRunning {
        /// The terminal's queue.
        queue: String,
    },
    /// The queue still counts this terminal's consumer on a cluster node it
    /// lost, which the broker may still deliver to: taking the queue now
    /// could let later changes overtake the ones that consumer holds.
    #[error(
        "the queue still counts this terminal's consumer on cluster node {node}, which it lost; it takes the queue over in {seconds} s, once the cluster can no longer deliver to it (broker.node_down_after_secs, and three heartbeats: `?heartbeat=5` on the URLs shortens the wait)"
    )]
    LostNodeConsumer {
        /// `host:port` of the node.
        node: String,
        /// How long until the terminal takes the queue over.
        seconds: u64,
    },
    /// The broker did not answer in time.
    #[error("the broker did not answer within {seconds} s while {during}")]
    Timeout {
        /// What was waited for.
        during: &'static str,
        /// How long.
        seconds: u64,
    },
    /// The broker ended the consumer, for example because the queue was deleted.
    #[error("the broker cancelled the consumer (was the queue deleted?)")]
    ConsumerCancelled,
    /// The connection is gone.
    #[error("the connection to the broker was lost")]
    ConnectionLost,
    /// Any other protocol or I/O failure.
    #[error("{during}: {source}")]
    Protocol {
        /// What was being done.
        during: &'static str,
        /// The error.
        source: lapin::Error,
    },
}

impl BrokerError {
    /// Whether retrying the same thing cannot help until someone changes
    /// the config or the broker.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::AccessRefused { .. }
                | Self::AlreadyRunning { .. }
                | Self::Conflict { .. }
                | Self::Tls { .. }
                | Self::TlsFile { .. }
                | Self::TlsNeedsAmqps(_)
                | Self::NotFound { .. }
        )
    }

    /// Whether the connection was given up because the broker fell silent
    /// (its heartbeats stopped): it was last heard two heartbeats ago.
    pub(crate) fn is_missed_heartbeat(&self) -> bool {
        matches!(self, Self::Protocol { source, .. }
            if matches!(source.kind(), ErrorKind::MissingHeartbeatError))
    }

    /// Whether a new connection may get past this failure.
    pub fn is_connection_failure(&self) -> bool {
        // A timeout counts: a half-open link is noticed by heartbeats only
        // after minutes, and a fresh connection gets past it at once.
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::ConnectionLost
                | Self::Protocol { .. }
                | Self::ConsumerCancelled
                | Self::Timeout { .. }
                | Self::QueueNodeDown { .. }
                | Self::Nacked { .. }
        )
    }

    /// A lapin error met while `during` on `url`, named for an operator.
    pub fn from_lapin(during: &'static str, url: &str, err: lapin::Error) -> Self {
        match err.kind() {
            ErrorKind::ProtocolError(amqp) => {
                let detail = redact_secrets(amqp.get_message().as_str(), url);
                match amqp.kind() {
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Self::AccessRefused {
                        url: redact_url(url),
                        detail,
                    },
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Self::Conflict {
                        what: during.into(),
                        detail,
                    },
                    // RabbitMQ's words for a queue whose home node is away.
                    AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
                        if detail.contains("is down or inaccessible") =>
                    {
                        Self::QueueNodeDown { detail }
                    }
                    AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Self::NotFound { detail },
                    _ => Self::Protocol {
                        during,
                        source: err,
                    },
                }
            }
            // lapin reports a URL it cannot parse as an I/O error that quotes it whole.
            ErrorKind::IOError(io) if is_tls_failure(io) => Self::Tls {
                url: redact_url(url),
                detail: redact_secrets(&io.to_string(), url),
            },
            ErrorKind::IOError(io) => Self::Unreachable {
                url: redact_url(url),
                detail: redact_secrets(&io.to_string(), url),
            },
            _ => Self::Protocol {
                during,
                source: err,
            },
        }
    }
}

fn is_tls_failure(io: &std::io::Error) -> bool {
    let text = io.to_string().to_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "alert",
        "unknownissuer",
        "corrupt message",
    ]
    .iter()
    .any(|word| text.contains(word))
}

/// The TLS settings of `broker`, if any are set.
fn tls_config(broker: &BrokerConfig) -> Result<Option<OwnedTLSConfig>, BrokerError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|err| BrokerError::TlsFile {
            key,
            path: path.to_owned(),
            detail: err.to_string(),
        })
    };
    let cert_chain = match &broker.tls_ca_file {
        Some(path) => {
            Some(String::from_utf8_lossy(&read("broker.tls_ca_file", path)?).into_owned())
        }
        None => None,
    };
    let identity = match (&broker.tls_client_cert_file, &broker.tls_client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("broker.tls_client_cert_file", cert)?,
            key: read("broker.tls_client_key_file", key)?,
        }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(BrokerError::TlsFile {
                key: "broker.tls_client_cert_file",
                path: broker
                    .tls_client_cert_file
                    .clone()
                    .or_else(|| broker.tls_client_key_file.clone())
                    .unwrap_or_default(),
                detail:
                    "a client certificate needs both tls_client_cert_file and tls_client_key_file"
                        .into(),
            });
        }
    };
    if cert_chain.is_none() && identity.is_none() {
        return Ok(None);
    }
    Ok(Some(OwnedTLSConfig {
        identity,
        cert_chain,
    }))
}

/// Connects to `url` (one of `broker.url`), naming the connection `name` in
/// the broker's management UI. `amqps://` URLs always use TLS: a failed
/// handshake is an error, never a fallback to clear text.
pub async fn connect(
    broker: &BrokerConfig,
    url: &str,
    name: &str,
) -> Result<Connection, BrokerError> {
    connect_framed(broker, url, name, None).await
}

/// The largest frame a terminal's connections take, unless its URL names
/// one (`?frame_max=`). lapin keeps two buffers of 32 frames a
/// connection, and fills each with zeros up to the size agreed with the
/// broker: at RabbitMQ's 128 KiB, 8 MiB for each of a terminal's two
/// connections, most of an idle terminal's memory. A larger message is
/// split into frames of this size; its headers are not (RabbitMQ sends them
/// in one frame), so this is also the most of them a terminal takes.
pub(crate) const TERMINAL_FRAME_MAX: u32 = 16 * 1024;

/// The heartbeat a terminal's connections ask for when the URL names none
/// (or 0): a broker configured without heartbeats would otherwise keep a
/// consumer behind a broken link for good (see `LostSession`).
pub(crate) const TERMINAL_HEARTBEAT_SECS: u16 = 60;

/// [`connect`], asking for frames of at most `frame_max` bytes when the
/// URL does not say (`None`: the broker's size).
pub(crate) async fn connect_framed(
    broker: &BrokerConfig,
    url: &str,
    name: &str,
    frame_max: Option<u32>,
) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let seconds = broker.connect_timeout_secs;
    // Checked here too: a BrokerConfig made in code skips `Config::load`.
    broker.check_tls()?;
    let tls = tls_config(broker)?;
    // Parsed as lapin parses a URL it is given, with the same error.
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|err: String| {
        BrokerError::from_lapin("connecting", url, std::io::Error::other(err).into())
    })?;
    if frame_max.is_some() {
        // A terminal's connection: never without heartbeats.
        if uri.query.heartbeat.unwrap_or(0) == 0 {
            uri.query.heartbeat = Some(TERMINAL_HEARTBEAT_SECS);
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = frame_max;
        }
    }
    let connecting = async {
        match tls {
            Some(tls) => {
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_uri_with_config(uri, properties, tls, runtime).await
            }
            None => Connection::connect_uri(uri, properties).await,
        }
    };
    match tokio::time::timeout(Duration::from_secs(seconds), connecting).await {
        Err(_) => Err(BrokerError::Timeout {
            during: "connecting",
            seconds,
        }),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(BrokerError::from_lapin("connecting", url, err)),
    }
}

/// A new channel on `connection` whose publishes the broker confirms,
/// each step bounded by `seconds`.
pub(crate) async fn confirming_channel(
    connection: &Connection,
    seconds: u64,
    url: &str,
) -> Result<Channel, BrokerError> {
    let channel = within(
        seconds,
        "opening a channel",
        url,
        connection.create_channel(),
    )
    .await?;
    within(
        seconds,
        "enabling publisher confirms",
        url,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// Waits at most `seconds` for a broker operation.
///
/// An operation that is already complete (most publishes and the confirms
/// of a full window) is taken at once, without arming a timer: on the
/// publish path that timer was a visible cost.
pub(crate) async fn within<T>(
    seconds: u64,
    during: &'static str,
    url: &str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    let mut operation = std::pin::pin!(operation);
    let result = match operation.as_mut().now_or_never() {
        Some(result) => result,
        None => match tokio::time::timeout(Duration::from_secs(seconds), operation).await {
            Err(_) => return Err(BrokerError::Timeout { during, seconds }),
            Ok(result) => result,
        },
    };
    result.map_err(|err| BrokerError::from_lapin(during, url, err))
}
