//! A queue a backend consumes: its connection, its declaration with a
//! dead-letter queue, batches of deliveries, and settling them after the
//! commit. The direct consumer and the upstream consumer each have one.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use possync_core::{Backoff, BrokerConfig, BrokerError, QueueType};
use tokio::sync::watch;

use crate::events;
use crate::service::stopped;

const PERSISTENT: u8 = 2;

/// Reconnects wait from 250 ms up to 30 s (a broker restart).
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// What consumes a queue: which queue, what becomes of a batch, and what
/// the operator is told of the queue.
pub(crate) trait BatchConsumer: Sync {
    /// The broker.
    fn broker(&self) -> &BrokerConfig;
    /// The queue.
    fn spec(&self) -> QueueSpec;
    /// What to do with each delivery of `batch`, in order, once its work
    /// is committed; `None` if asked to stop meanwhile (the batch goes back
    /// to the queue). `channel` is the session's, for answers.
    fn handle_batch(
        &self,
        batch: &[Delivery],
        channel: &Channel,
        stop: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Option<Vec<Settle>>> + Send;
    /// The queue is read; it held `ready` messages when the consumer
    /// started.
    fn live(&self, ready: u32);
    /// The queue cannot be read; `first` of a stretch.
    fn offline(&self, reason: &str, retry_in_ms: u128, first: bool);
}

/// Consumes `consumer`'s queue until `stop` turns true, reconnecting with
/// backoff through each of the broker's URLs.
pub(crate) async fn consume<C: BatchConsumer>(consumer: &C, mut stop: watch::Receiver<bool>) {
    let broker = consumer.broker();
    let spec = consumer.spec();
    let mut attempt: u32 = 0;
    let mut offline_since: Option<Instant> = None;
    while !*stop.borrow() {
        let url = broker.urls[attempt as usize % broker.urls.len()].clone();
        let err = match Session::open(broker, &spec, &url).await {
            Ok(session) => {
                attempt = 0;
                offline_since = None;
                consumer.live(session.ready);
                match session.serve(consumer, &mut stop).await {
                    None => return,
                    Some(err) => err,
                }
            }
            Err(err) => err,
        };
        attempt = attempt.saturating_add(1);
        let delay = RECONNECT.delay(attempt);
        let first = offline_since.is_none();
        offline_since.get_or_insert_with(Instant::now);
        consumer.offline(&err.to_string(), delay.as_millis(), first);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Which queue, bound how.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    /// The queue; its dead-letter queue is `<queue>.dead_letter`.
    pub(crate) queue: String,
    /// Its bindings on the exchange.
    pub(crate) bindings: Vec<String>,
    /// Deliveries the broker may send ahead.
    pub(crate) prefetch: u16,
    /// Days the queue is kept once nothing reads it, and a dead letter;
    /// `None`: both are kept until deleted.
    pub(crate) expiry_days: Option<u32>,
    /// Whether one consumer at a time takes the queue's messages (several
    /// backend processes on one database): the order of the queue is the
    /// order recorded.
    pub(crate) single_active_consumer: bool,
    /// Milliseconds a message waits in the queue before the broker drops
    /// it (to the dead-letter queue); `None`: it waits until read.
    pub(crate) message_ttl_ms: Option<u32>,
    /// The connection's name in the broker's management UI.
    pub(crate) connection_name: &'static str,
    /// What is declared, for errors (`the backend's direct queue`).
    pub(crate) what: &'static str,
}

/// What to do with a delivery once it was handled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with (recorded, or nothing to record): acknowledge.
    Ack,
    /// It can never be recorded: dead-letter it with the reason.
    DeadLetter(String),
}

/// What the next wait for deliveries gave.
enum Next {
    /// Deliveries, and the error that ended the stream after them, if any.
    Batch(Vec<Delivery>, Option<BrokerError>),
    /// Asked to stop.
    Stopped,
    /// The broker went away or failed.
    Lost(BrokerError),
}

/// One connection to the broker: the consumer, and a channel with confirms
/// for dead letters.
struct Session {
    connection: Connection,
    channel: Channel,
    dead_letters: Channel,
    consumer: lapin::Consumer,
    dead_letter_exchange: String,
    dead_letter_queue: String,
    url: String,
    timeout_secs: u64,
    prefetch: u16,
    /// Messages ready in the queue just before the consumer started.
    ready: u32,
}

impl Session {
    async fn open(broker: &BrokerConfig, spec: &QueueSpec, url: &str) -> Result<Self, BrokerError> {
        let timeout = broker.confirm_timeout_secs;
        let connection = possync_core::connect_broker(broker, url, spec.connection_name).await?;
        let channel = within(
            timeout,
            "opening a channel",
            url,
            connection.create_channel(),
        )
        .await?;
        let dead_letter_exchange = format!("{}.dead_letter", broker.exchange);
        let dead_letter_queue = format!("{}.dead_letter", spec.queue);
        if broker.declare_topology {
            within(
                timeout,
                spec.what,
                url,
                declare(
                    &channel,
                    broker,
                    spec,
                    &dead_letter_exchange,
                    &dead_letter_queue,
                ),
            )
            .await?;
        }
        within(
            timeout,
            "setting the prefetch",
            url,
            channel.basic_qos(spec.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let dead_letters = within(
            timeout,
            "opening a channel",
            url,
            connection.create_channel(),
        )
        .await?;
        within(
            timeout,
            "enabling publisher confirms",
            url,
            dead_letters.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let ready = within(
            timeout,
            "counting the queue's messages",
            url,
            channel.queue_declare(
                spec.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?
        .message_count();
        // Not exclusive: backend processes sharing a database share the queue.
        let consumer = within(
            timeout,
            "starting the consumer",
            url,
            channel.basic_consume(
                spec.queue.as_str().into(),
                spec.connection_name.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Self {
            connection,
            channel,
            dead_letters,
            consumer,
            dead_letter_exchange,
            dead_letter_queue,
            url: url.to_owned(),
            timeout_secs: timeout,
            prefetch: spec.prefetch,
            ready,
        })
    }

    /// Hands batches to `consumer` and settles them until the broker goes
    /// away (the error) or `stop` turns true (`None`).
    async fn serve<C: BatchConsumer>(
        mut self,
        consumer: &C,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<BrokerError> {
        loop {
            let (batch, ended) = match self.next_batch(stop).await {
                Next::Batch(batch, ended) => (batch, ended),
                Next::Stopped => {
                    self.close().await;
                    return None;
                }
                Next::Lost(err) => return Some(err),
            };
            let Some(settles) = consumer.handle_batch(&batch, &self.channel, stop).await else {
                // Stopping with deliveries not recorded: they go back to the queue.
                self.close().await;
                return None;
            };
            if let Err(err) = self.settle_batch(&batch, settles).await {
                return Some(err);
            }
            if let Some(err) = ended {
                return Some(err);
            }
        }
    }

    /// Waits for the next deliveries: the first, then whatever else the
    /// broker delivered already, up to the prefetch.
    async fn next_batch(&mut self, stop: &mut watch::Receiver<bool>) -> Next {
        let next = tokio::select! {
            next = self.consumer.next() => next,
            () = stopped(stop) => return Next::Stopped,
        };
        let mut batch = match next {
            Some(Ok(delivery)) => vec![delivery],
            Some(Err(err)) => {
                return Next::Lost(BrokerError::from_lapin("receiving", &self.url, err));
            }
            None => return Next::Lost(BrokerError::ConsumerCancelled),
        };
        while batch.len() < usize::from(self.prefetch) {
            match self.consumer.next().now_or_never() {
                None => break,
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(err))) => {
                    let err = BrokerError::from_lapin("receiving", &self.url, err);
                    return Next::Batch(batch, Some(err));
                }
                Some(None) => return Next::Batch(batch, Some(BrokerError::ConsumerCancelled)),
            }
        }
        Next::Batch(batch, None)
    }

    /// Settles a batch after its commit: dead-letters each refused one
    /// with its reason (if the dead letter cannot be published, rejects
    /// the message to the queue's dead-letter exchange without a reason),
    /// then acknowledges the rest with one `multiple` ack.
    async fn settle_batch(
        &self,
        batch: &[Delivery],
        settles: Vec<Settle>,
    ) -> Result<(), BrokerError> {
        let mut last_ack = None;
        for (delivery, settle) in batch.iter().zip(settles) {
            if let Settle::DeadLetter(reason) = settle
                && let Err(err) = self.publish_dead_letter(delivery, &reason).await
            {
                events::dead_letter_fallback(&err);
                within(
                    self.timeout_secs,
                    "rejecting",
                    &self.url,
                    self.channel.basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: false,
                        },
                    ),
                )
                .await?;
                continue;
            }
            last_ack = Some(delivery.delivery_tag);
        }
        let Some(tag) = last_ack else {
            return Ok(());
        };
        // Every delivery up to `tag` is this batch's: the channel delivers in order.
        within(
            self.timeout_secs,
            "acknowledging",
            &self.url,
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await
    }

    /// Publishes the delivery to the dead-letter queue with the reason;
    /// the error says why it could not be.
    async fn publish_dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), String> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-possync-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-possync-routing-key".into(),
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let confirm = within(
            self.timeout_secs,
            "dead-lettering a message",
            &self.url,
            self.dead_letters.basic_publish(
                self.dead_letter_exchange.as_str().into(),
                self.dead_letter_queue.as_str().into(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            ),
        )
        .await
        .map_err(|err| err.to_string())?;
        let confirmation = within(
            self.timeout_secs,
            "dead-lettering a message",
            &self.url,
            confirm,
        )
        .await
        .map_err(|err| err.to_string())?;
        if confirmation.is_ack() {
            Ok(())
        } else {
            Err("the broker refused the dead letter".into())
        }
    }

    /// Closes the connection; an unacknowledged delivery returns to the queue.
    async fn close(self) {
        let _ = within(
            self.timeout_secs,
            "closing the connection",
            &self.url,
            self.connection.close(200, "backend stopping".into()),
        )
        .await;
    }
}

/// Declares the exchange, the dead-letter exchange and queue, and the
/// queue with its bindings.
async fn declare(
    channel: &Channel,
    broker: &BrokerConfig,
    spec: &QueueSpec,
    dead_letter_exchange: &str,
    dead_letter_queue: &str,
) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            broker.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            dead_letter_exchange.into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    let day_ms = 24 * 3600 * 1000;
    let expires_ms = spec.expiry_days.map(|days| i64::from(days) * day_ms);
    let mut limits = FieldTable::default();
    // Dead letters are for people to read, bounded like a terminal's. No
    // expiry of the queue itself: nothing consumes it to keep it alive.
    limits.insert("x-max-length".into(), AMQPValue::LongLongInt(100_000));
    // A queue kept until deleted (upstream: orders) keeps its dead letters
    // as long.
    if let Some(expires_ms) = expires_ms {
        limits.insert("x-message-ttl".into(), AMQPValue::LongLongInt(expires_ms));
    }
    channel
        .queue_declare(dead_letter_queue.into(), durable_queue, limits)
        .await?;
    channel
        .queue_bind(
            dead_letter_queue.into(),
            dead_letter_exchange.into(),
            dead_letter_queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dead_letter_exchange.into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead_letter_queue.into()),
    );
    if let Some(expires_ms) = expires_ms {
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires_ms));
    }
    if spec.single_active_consumer {
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if let Some(ttl_ms) = spec.message_ttl_ms {
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::from(ttl_ms)),
        );
    }
    if broker.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(spec.queue.as_str().into(), durable_queue, arguments)
        .await?;
    for binding in &spec.bindings {
        channel
            .queue_bind(
                spec.queue.as_str().into(),
                broker.exchange.as_str().into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Waits at most `seconds` for a broker operation: a broker that goes away
/// can leave one hanging (lapin #409).
async fn within<T>(
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
