//! Opening a connection to the broker, with errors that say what to do.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::config::BrokerConfig;
use crate::redact::redact_url;

/// The broker could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing answers at the address.
    #[error("no broker answers at {url} ({detail}); is RabbitMQ running? (start it with `rabbitmq-server -detached`)")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// The underlying error.
        detail: String,
    },
    /// The broker answered but refused the credentials or a permission.
    #[error("the broker at {url} refused access: {detail}; check the user and password in broker.url and the user's permissions")]
    AccessRefused {
        /// The URL, password redacted.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// A queue or exchange exists with settings other than the ones requested.
    #[error("the broker refused to declare {what}: {detail}; it exists with other settings (an older version or another queue type?): delete it with `rabbitmqctl delete_queue NAME` or use the old settings")]
    Conflict {
        /// What was declared.
        what: String,
        /// What the broker said.
        detail: String,
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
        matches!(self, Self::AccessRefused { .. } | Self::Conflict { .. })
    }

    /// Whether a new connection may get past this failure.
    pub(crate) fn is_connection_failure(&self) -> bool {
        // A timeout counts: a half-open link is noticed by heartbeats only
        // after minutes, and a fresh connection gets past it at once.
        matches!(
            self,
            Self::Unreachable { .. } | Self::ConnectionLost | Self::Protocol { .. } | Self::ConsumerCancelled | Self::Timeout { .. }
        )
    }

    pub(crate) fn from_lapin(during: &'static str, url: &str, err: lapin::Error) -> Self {
        match err.kind() {
            ErrorKind::ProtocolError(amqp) => {
                let detail = amqp.get_message().to_string();
                match amqp.kind() {
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                        Self::AccessRefused { url: redact_url(url), detail }
                    }
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Self::Conflict { what: during.into(), detail },
                    _ => Self::Protocol { during, source: err },
                }
            }
            ErrorKind::IOError(io) => Self::Unreachable { url: redact_url(url), detail: io.to_string() },
            _ => Self::Protocol { during, source: err },
        }
    }
}

/// Connects to `url` (one of `broker.url`), naming the connection `name` in
/// the broker's management UI.
pub(crate) async fn connect(broker: &BrokerConfig, url: &str, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let seconds = broker.connect_timeout_secs;
    match tokio::time::timeout(Duration::from_secs(seconds), Connection::connect(url, properties)).await {
        Err(_) => Err(BrokerError::Timeout { during: "connecting", seconds }),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(BrokerError::from_lapin("connecting", url, err)),
    }
}

/// Waits at most `seconds` for a broker operation.
pub(crate) async fn within<T>(
    seconds: u64,
    during: &'static str,
    url: &str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(Duration::from_secs(seconds), operation).await {
        Err(_) => Err(BrokerError::Timeout { during, seconds }),
        Ok(result) => result.map_err(|err| BrokerError::from_lapin(during, url, err)),
    }
}
