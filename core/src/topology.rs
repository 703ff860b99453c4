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

    /// The arguments of the terminal's queue; the same whether possync or
    /// `possync admin` declares it, so either finds the other's queue equal.
    pub(crate) fn queue_arguments(&self) -> Vec<(&'static str, Argument)> {
        let mut args = vec![
            (
                "x-dead-letter-exchange",
                Argument::Text(self.dead_letter_exchange.clone()),
            ),
            (
                "x-dead-letter-routing-key",
                Argument::Text(self.dead_letter_queue.clone()),
            ),
        ];
        if self.delivery == Delivery::Durable {
            args.push(("x-expires", Argument::Integer(saturate(self.expires_ms))));
            if self.queue_type == QueueType::Quorum {
                args.push(("x-queue-type", Argument::Text("quorum".into())));
                args.push((
                    "x-delivery-limit",
                    Argument::Integer(i64::from(self.delivery_limit)),
                ));
            }
        }
        args
    }

    /// The arguments of the dead-letter queue: dead letters are for people
    /// to read, kept as long as an idle queue lives, and bounded.
    pub(crate) fn dead_letter_arguments(&self) -> Vec<(&'static str, Argument)> {
        vec![
            (
                "x-message-ttl",
                Argument::Integer(saturate(self.expires_ms)),
            ),
            ("x-max-length", Argument::Integer(100_000)),
        ]
    }

    /// Declares everything (idempotent) on `channel`.
    pub(crate) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        declare_exchange(channel, &self.exchange).await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                field_table(&self.dead_letter_arguments()),
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
        let options = match self.delivery {
            Delivery::Durable => QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            // Gone with the connection, as in the original system.
            Delivery::Transient => QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        };
        channel
            .queue_declare(
                self.queue.as_str().into(),
                options,
                field_table(&self.queue_arguments()),
            )
            .await?;
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
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The routing key of a message of `message_type` for store `license_key`.
pub fn routing_key(license_key: &LicenseKey, message_type: &str) -> String {
    format!("license.{license_key}.{message_type}")
}

/// A queue argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Argument {
    Integer(i64),
    Text(String),
}

impl Argument {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Integer(v) => serde_json::Value::from(*v),
            Self::Text(v) => serde_json::Value::from(v.as_str()),
        }
    }
}

fn field_table(arguments: &[(&'static str, Argument)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            Argument::Integer(v) => AMQPValue::LongLongInt(*v),
            Argument::Text(v) => AMQPValue::LongString(v.as_str().into()),
        };
        table.insert((*key).into(), value);
    }
    table
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
