//! Publishing changes to stores: persistent messages, publisher confirms,
//! and an error for anything the broker did not take responsibility for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use possync_sdk::{Envelope, WireMessage};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::BrokerConfig;
use crate::connection::{self, BrokerError};
use crate::identity::{InvalidId, LicenseKey};
use crate::redact::redact_url;
use crate::topology::{declare_exchange, routing_key};

const PERSISTENT: u8 = 2;
/// Messages published before waiting for the oldest confirm.
const WINDOW: usize = 512;

/// A message the broker did not take responsibility for.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The envelope names an invalid license key.
    #[error(transparent)]
    InvalidLicense(#[from] InvalidId),
    /// The message type cannot be a routing-key word.
    #[error("message type {0:?} is not valid: use only lowercase letters, digits and '_'")]
    InvalidType(String),
    /// The payload could not be serialized.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] serde_json::Error),
    /// The broker could not be reached or failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker refused the message (nack): it is not stored.
    #[error("the broker refused {routing_key} (nack); it was not stored")]
    Refused {
        /// The message's routing key.
        routing_key: String,
    },
    /// No queue is bound for the store: no terminal of it has ever started.
    #[error("no terminal queue receives {routing_key}: no terminal of license {license_key} has started yet, so the broker dropped the message; start a terminal of that store first")]
    Unroutable {
        /// The message's routing key.
        routing_key: String,
        /// The store.
        license_key: String,
    },
}

/// A message the broker confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The routing key it went out with.
    pub routing_key: String,
    /// Its unique id.
    pub message_id: String,
}

/// Publishes to `pos_license_events` with confirms.
#[derive(Debug)]
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
    url: String,
    timeout_secs: u64,
    last_version: AtomicI64,
}

struct Pending {
    routing_key: String,
    license_key: String,
    message_id: String,
    confirm: PublisherConfirm,
}

impl Publisher {
    /// Connects and declares the exchange.
    pub async fn connect(broker: &BrokerConfig) -> Result<Self, PublishError> {
        let url = broker.url.clone();
        let timeout = broker.confirm_timeout_secs;
        let connection = connection::connect(broker, &url, "possync publisher").await?;
        let channel = connection::within(timeout, "opening a channel", &url, connection.create_channel()).await?;
        connection::within(timeout, "enabling publisher confirms", &url, channel.confirm_select(ConfirmSelectOptions::default()))
            .await?;
        connection::within(timeout, "declaring the exchange", &url, declare_exchange(&channel, &broker.exchange)).await?;
        Ok(Self {
            connection,
            channel,
            exchange: broker.exchange.clone(),
            url,
            timeout_secs: timeout,
            last_version: AtomicI64::new(0),
        })
    }

    /// Publishes `message` to every store in `license_keys`; returns once
    /// the broker confirmed them all.
    pub async fn publish<M: WireMessage>(
        &self,
        license_keys: &[LicenseKey],
        message: &M,
    ) -> Result<Vec<Published>, PublishError> {
        let envelopes = license_keys
            .iter()
            .map(|key| message.to_envelope(key.as_str()))
            .collect::<Result<Vec<_>, _>>()?;
        self.publish_envelopes(envelopes).await
    }

    /// Publishes one envelope of any type; returns once the broker confirmed it.
    pub async fn publish_envelope(&self, envelope: Envelope) -> Result<Published, PublishError> {
        let mut published = self.publish_envelopes(vec![envelope]).await?;
        Ok(published.remove(0))
    }

    /// Publishes many envelopes, keeping up to a window of them in flight;
    /// returns once the broker confirmed them all, or at the first failure
    /// (the messages before it are confirmed, those after it unknown).
    pub async fn publish_envelopes(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Result<Vec<Published>, PublishError> {
        let mut in_flight = VecDeque::new();
        let mut published = Vec::new();
        for envelope in envelopes {
            if in_flight.len() >= WINDOW
                && let Some(pending) = in_flight.pop_front() {
                    published.push(self.confirmed(pending).await?);
                }
            in_flight.push_back(self.send(envelope).await?);
        }
        while let Some(pending) = in_flight.pop_front() {
            published.push(self.confirmed(pending).await?);
        }
        Ok(published)
    }

    async fn send(&self, mut envelope: Envelope) -> Result<Pending, PublishError> {
        let license_key = LicenseKey::new(envelope.license_key.clone())?;
        check_type(&envelope.message_type)?;
        let message_id = envelope.message_id.get_or_insert_with(|| uuid::Uuid::now_v7().to_string()).clone();
        if envelope.version.is_none() {
            envelope.version = Some(self.next_version());
        }
        if envelope.timestamp.is_none() {
            envelope.timestamp = OffsetDateTime::now_utc().format(&Rfc3339).ok();
        }
        let routing_key = routing_key(&license_key, &envelope.message_type);
        let body = serde_json::to_vec(&envelope)?;
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(message_id.as_str().into())
            .with_type(envelope.message_type.as_str().into());
        let confirm = connection::within(
            self.timeout_secs,
            "publishing",
            &self.url,
            self.channel.basic_publish(
                self.exchange.as_str().into(),
                routing_key.as_str().into(),
                // mandatory: the broker tells us when no queue took the message.
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                &body,
                properties,
            ),
        )
        .await?;
        Ok(Pending { routing_key, license_key: license_key.to_string(), message_id, confirm })
    }

    async fn confirmed(&self, pending: Pending) -> Result<Published, PublishError> {
        let Pending { routing_key, license_key, message_id, confirm } = pending;
        match connection::within(self.timeout_secs, "waiting for the broker's confirm", &self.url, confirm).await? {
            Confirmation::Ack(None) => Ok(Published { routing_key, message_id }),
            Confirmation::Ack(Some(_returned)) => Err(PublishError::Unroutable { routing_key, license_key }),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Refused { routing_key }),
        }
    }

    /// Microseconds since the epoch, strictly increasing for this publisher
    /// even if two messages fall in the same microsecond.
    fn next_version(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut last = self.last_version.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_version.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    /// The broker URL, password redacted.
    pub fn broker(&self) -> String {
        redact_url(&self.url)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = connection::within(self.timeout_secs, "closing", &self.url, self.connection.close(200, "done".into())).await;
    }
}

fn check_type(message_type: &str) -> Result<(), PublishError> {
    let valid = !message_type.is_empty()
        && message_type.len() <= 64
        && message_type.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid { Ok(()) } else { Err(PublishError::InvalidType(message_type.to_owned())) }
}
