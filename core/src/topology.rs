//! The broker objects a terminal uses, and their names.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::{Config, Delivery, QueueType};
use crate::identity::{LicenseKey, TerminalId};

/// The names and settings of one terminal's exchange, queue and dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalTopology {
    /// The topic exchange the back office publishes to.
    pub exchange: String,
    /// This terminal's durable queue.
    pub queue: String,
    /// Where messages that can never apply go.
    pub dead_letter_exchange: String,
    /// This terminal's dead-letter queue.
    pub dead_letter_queue: String,
    /// `license.<KEY>.#`
    pub binding_key: String,
    /// Milliseconds an unused queue lives.
    pub expires_ms: u64,
    /// Classic or quorum.
    pub queue_type: QueueType,
    /// Durable, or transient (exclusive and auto-deleted).
    pub delivery: Delivery,
    /// For quorum queues: deliveries after which the broker dead-letters a
    /// message itself, a second guard behind `terminal.max_attempts`.
    pub delivery_limit: u32,
}

impl TerminalTopology {
    /// The topology of terminal `terminal_id` of store `license_key`.
    pub fn new(config: &Config, license_key: &LicenseKey, terminal_id: &TerminalId) -> Self {
        let exchange = config.broker.exchange.as_str();
        let expiry_days = config.terminal.queue_expiry_days;
        // Both ids are checked words without '.', so these names cannot collide across stores.
        let queue = match config.terminal.delivery {
            Delivery::Durable => format!("possync.{license_key}.{terminal_id}"),
            // Its own name, so switching modes never meets a queue declared with other settings.
            Delivery::Transient => format!("possync.{license_key}.{terminal_id}.transient"),
        };
        Self {
            queue_type: config.broker.queue_type,
            delivery: config.terminal.delivery,
            // Our own count settles poison first; the broker's catches a crash loop.
            delivery_limit: config.terminal.max_attempts.saturating_mul(4).max(20),
            exchange: exchange.to_owned(),
            dead_letter_exchange: format!("{exchange}.dead_letter"),
            dead_letter_queue: format!("{queue}.dead_letter"),
            queue,
            binding_key: format!("license.{license_key}.#"),
            expires_ms: u64::from(expiry_days) * 24 * 3600 * 1000,
        }
    }

    /// Declares everything (idempotent) on `channel`.
    pub(crate) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        declare_exchange(channel, &self.exchange).await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        let mut dead_letter_args = FieldTable::default();
        // Dead letters are for people to read; keep them as long as an idle queue lives.
        dead_letter_args.insert("x-message-ttl".into(), long(self.expires_ms));
        dead_letter_args.insert("x-max-length".into(), AMQPValue::LongLongInt(100_000));
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
                dead_letter_args,
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                self.dead_letter_queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), string(&self.dead_letter_exchange));
        args.insert("x-dead-letter-routing-key".into(), string(&self.dead_letter_queue));
        let options = match self.delivery {
            Delivery::Durable => {
                args.insert("x-expires".into(), long(self.expires_ms));
                if self.queue_type == QueueType::Quorum {
                    args.insert("x-queue-type".into(), string("quorum"));
                    args.insert("x-delivery-limit".into(), long(u64::from(self.delivery_limit)));
                }
                QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
            }
            // Gone with the connection, as in the original system.
            Delivery::Transient => {
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() }
            }
        };
        channel.queue_declare(self.queue.as_str().into(), options, args).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

/// Declares the durable topic exchange of the wire contract.
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
}

/// The routing key of a message of `message_type` for store `license_key`.
pub fn routing_key(license_key: &LicenseKey, message_type: &str) -> String {
    format!("license.{license_key}.{message_type}")
}

fn long(value: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX))
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

