//! The broker objects a terminal uses, and their names.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{Config, Delivery, QueueType};
use crate::events;
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

    /// How much the dead-letter queue keeps: dead letters are for people to
    /// read, kept as long as an idle queue lives, and bounded.
    fn dead_letter_limits(&self) -> Vec<(&'static str, Argument)> {
        vec![
            (
                "x-message-ttl",
                Argument::Integer(saturate(self.expires_ms)),
            ),
            ("x-max-length", Argument::Integer(100_000)),
        ]
    }

    /// The arguments of the dead-letter queue: its limits, and the expiry of
    /// the queue it belongs to, so an abandoned terminal's dead letters do
    /// not pile up forever. A queue expires only when unused: a terminal
    /// renews it by declaring it (a passive declare counts) within every
    /// expiry period, as nothing consumes from it.
    ///
    /// Beside quorum queues it is a quorum queue too: a classic queue lives
    /// on one node, and while that node is down no terminal could declare
    /// it, so none could start.
    pub(crate) fn dead_letter_arguments(&self) -> Vec<(&'static str, Argument)> {
        let mut arguments = self.dead_letter_limits();
        arguments.push(("x-expires", Argument::Integer(saturate(self.expires_ms))));
        if self.queue_type == QueueType::Quorum {
            arguments.push(("x-queue-type", Argument::Text("quorum".into())));
        }
        arguments
    }

    /// Declares everything (idempotent) on channels of its own on
    /// `connection`, the dead-letter queue with an expiry.
    ///
    /// RabbitMQ refuses to declare an existing queue with other arguments,
    /// and dead-letter queues made before they had an expiry have none: such
    /// a queue is used as it is (a passive declare) and logged with how to
    /// renew it, so a terminal upgraded in the field keeps working.
    pub(crate) async fn declare_on(&self, connection: &Connection) -> lapin::Result<()> {
        let mut channel = connection.create_channel().await?;
        self.declare_exchanges(&channel).await?;
        let declared = channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable(),
                field_table(&self.dead_letter_arguments()),
            )
            .await;
        match declared {
            Ok(_) => {}
            Err(err) if is_precondition_failed(&err) => {
                // The refusal closed that channel.
                channel = connection.create_channel().await?;
                channel
                    .queue_declare(
                        self.dead_letter_queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                events::dead_letter_queue_kept(&self.dead_letter_queue, &err.to_string());
            }
            Err(err) => return Err(err),
        }
        self.declare_rest(&channel).await?;
        channel.close(200, "declared".into()).await
    }

    async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
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
            .await
    }

    /// After the dead-letter queue: its binding, the terminal's queue and its binding.
    async fn declare_rest(&self, channel: &Channel) -> lapin::Result<()> {
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
            Delivery::Durable => durable(),
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

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Whether the broker refused a declare because the object exists with other settings.
pub(crate) fn is_precondition_failed(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
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

/// Whether `text` can be a message type: 1 to 64 of `a-z`, `0-9` and `_`,
/// one word of a routing key.
pub fn is_message_type(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
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

#[cfg(test)]
mod tests {
    use lapin::ConnectionProperties;

    use super::*;

    /// The broker the tests use, as in the integration tests.
    async fn broker() -> Connection {
        let url = std::env::var("POSSYNC_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|err| panic!("these tests need RabbitMQ ({err})"))
    }

    fn topology(label: &str) -> TerminalTopology {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let key = LicenseKey::new(format!("T-{label}-{}", &suffix[20..])).expect("valid");
        let mut config = Config::default();
        config.terminal.queue_expiry_days = 1;
        TerminalTopology::new(&config, &key, &TerminalId::new("till-1").expect("valid"))
    }

    /// Declares the dead-letter queue with `arguments` on a fresh channel.
    async fn redeclare(
        connection: &Connection,
        topology: &TerminalTopology,
        arguments: &[(&'static str, Argument)],
    ) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                topology.dead_letter_queue.as_str().into(),
                durable(),
                field_table(arguments),
            )
            .await
            .map(drop)
    }

    async fn delete_queues(connection: &Connection, topology: &TerminalTopology) {
        let channel = connection.create_channel().await.expect("channel");
        for queue in [&topology.queue, &topology.dead_letter_queue] {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }

    #[test]
    fn no_argument_that_rabbitmq_4_refuses() {
        // RabbitMQ 4.3 refuses `x-queue-mode` and `x-queue-version=1`, and
        // denies the master locator by default.
        let refused = ["x-queue-mode", "x-queue-version", "x-queue-master-locator"];
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            for delivery in [Delivery::Durable, Delivery::Transient] {
                let mut topology = topology("args");
                topology.queue_type = queue_type;
                topology.delivery = delivery;
                let arguments = topology
                    .queue_arguments()
                    .into_iter()
                    .chain(topology.dead_letter_arguments());
                for (key, _) in arguments {
                    assert!(
                        !refused.contains(&key),
                        "{key} on a {queue_type:?} {delivery:?} terminal"
                    );
                }
            }
        }
    }

    #[test]
    fn beside_quorum_queues_the_dead_letter_queue_is_replicated_too() {
        let mut topology = topology("dlq");
        topology.queue_type = QueueType::Quorum;
        assert!(
            topology
                .dead_letter_arguments()
                .contains(&("x-queue-type", Argument::Text("quorum".into()))),
            "a classic dead-letter queue would keep terminals from starting while its node is down"
        );
        topology.queue_type = QueueType::Classic;
        assert!(
            !topology
                .dead_letter_arguments()
                .iter()
                .any(|(key, _)| *key == "x-queue-type")
        );
    }

    #[tokio::test]
    async fn a_dead_letter_queue_gets_the_expiry_of_its_terminal_queue() {
        let connection = broker().await;
        let topology = topology("dlq-expiry");
        topology.declare_on(&connection).await.expect("declared");
        // The broker holds a queue to the arguments it was made with.
        redeclare(&connection, &topology, &topology.dead_letter_arguments())
            .await
            .expect("declared with its expiry");
        let err = redeclare(&connection, &topology, &topology.dead_letter_limits())
            .await
            .expect_err("it has an x-expires");
        assert!(err.to_string().contains("x-expires"), "{err}");
        assert!(
            topology
                .dead_letter_arguments()
                .contains(&("x-expires", Argument::Integer(86_400_000)))
        );
        delete_queues(&connection, &topology).await;
    }

    #[tokio::test]
    async fn an_old_dead_letter_queue_without_an_expiry_is_used_as_it_is() {
        let connection = broker().await;
        let topology = topology("dlq-old");
        redeclare(&connection, &topology, &topology.dead_letter_limits())
            .await
            .expect("an old-style dead-letter queue");
        topology
            .declare_on(&connection)
            .await
            .expect("the terminal's topology is declared all the same");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                topology.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(queue.is_ok(), "the terminal's queue exists: {queue:?}");
        redeclare(&connection, &topology, &topology.dead_letter_limits())
            .await
            .expect("the old queue is left as it was");
        delete_queues(&connection, &topology).await;
    }
}
