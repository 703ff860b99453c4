//! Publishing changes to stores: persistent messages, publisher confirms,
//! and an error for anything the broker did not take responsibility for.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::FutureExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use possync_sdk::{Envelope, Payload};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Mutex;

use crate::config::{BrokerConfig, TerminalConfig};
use crate::connection::{self, BrokerError};
use crate::events;
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
    /// The body is larger than the terminals take: they would dead-letter it
    /// unread, so it is not sent.
    #[error(
        "the {message_type} message for {routing_key} is {size} bytes, over the terminals' limit of {limit} bytes (terminal.max_message_bytes); it was not sent: send a smaller one, or raise terminal.max_message_bytes on the terminals and in this publisher's config (and RabbitMQ's max_message_size above it)"
    )]
    TooLarge {
        /// The message's type.
        message_type: String,
        /// The message's routing key.
        routing_key: String,
        /// The encoded body's size.
        size: usize,
        /// `terminal.max_message_bytes`.
        limit: usize,
    },
    /// No queue is bound for the store: no terminal of it has ever started.
    #[error(
        "no terminal queue receives {routing_key}: no terminal of license {license_key} has started yet, so the broker dropped the message; start a terminal of that store first"
    )]
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

/// Publishes to `pos_license_events` with confirms, reconnecting (and
/// republishing what was not yet confirmed) when the connection drops.
#[derive(Debug)]
pub struct Publisher {
    broker: BrokerConfig,
    session: Mutex<Option<Session>>,
    versions: VersionClock,
    max_message_bytes: usize,
    unroutable_is_published: bool,
}

struct Session {
    connection: Connection,
    channel: Channel,
    url: String,
    /// Stamps the messages this session writes; see [`Stamp`].
    stamp: Stamp,
}

/// The `publisher_id` and `publisher_seq` a session stamps on each message
/// it writes: a fresh id per session, and 1, 2, ... in the exact order the
/// messages are written to its channel. A terminal drops a message whose
/// number is at or below the last it applied from that id, without a
/// record per message.
///
/// That is safe because a number is given when the message is handed to
/// the channel, under the session lock that orders the writes, and the
/// broker keeps a channel's order into each queue: a terminal sees one
/// session's numbers rising, a lower one only when it is a delivery again.
/// A message sent again after a reconnect is stamped anew by the new
/// session (it keeps its `message_id` and `version`), so its number is
/// never compared with the old session's: copies from two sessions may
/// both arrive, and the second changes nothing by its `version`, but no
/// interleaving of sessions can make a terminal drop a message it has not
/// applied. Keeping the old stamp would drop the copy exactly, but it
/// would also drop a message the broker refused while it took the next
/// one into the same queue, when the refusal was lost with the connection:
/// its copy would sit below the terminal's mark.
#[derive(Debug)]
struct Stamp {
    id: String,
    written: i64,
}

impl Stamp {
    /// A UUIDv7 (a millisecond clock and 74 random bits: no two sessions
    /// share one) in URL-safe base64, 22 characters instead of 36: it rides
    /// in every message the session writes.
    fn new() -> Self {
        Self {
            id: URL_SAFE_NO_PAD.encode(uuid::Uuid::now_v7().as_bytes()),
            written: 0,
        }
    }

    /// `body` (a JSON object) with the next number of this session.
    fn next(&mut self, body: &[u8]) -> Arc<[u8]> {
        self.written += 1;
        let mut stamped = Vec::with_capacity(body.len() + STAMP_BYTES);
        // The envelope serializes as an object: its last byte is the `}`.
        stamped.extend_from_slice(body.strip_suffix(b"}").unwrap_or(body));
        stamped.extend_from_slice(b",\"publisher_id\":\"");
        // URL-safe base64 needs no escaping.
        stamped.extend_from_slice(self.id.as_bytes());
        stamped.extend_from_slice(b"\",\"publisher_seq\":");
        stamped.extend_from_slice(self.written.to_string().as_bytes());
        stamped.push(b'}');
        stamped.into()
    }
}

/// The most a stamp adds to a body: the two fields, an id and a number.
const STAMP_BYTES: usize = 96;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// One message on its way: kept until confirmed, so it can be sent again
/// on a new connection.
struct Pending {
    routing_key: String,
    message_id: String,
    /// The body as the caller's envelope made it, before a session stamps it.
    body: Arc<[u8]>,
    /// Whether each session that writes it stamps it (see [`Stamp`]).
    stamped: bool,
    progress: Progress,
}

/// Where a pending message stands on the current connection.
enum Progress {
    /// Not sent on the current connection: send it (again) first.
    Unsent,
    /// Handed to lapin, in order; its frames may not be written yet.
    Sending(Sending),
    /// Written; the broker's confirm is awaited.
    Sent(PublisherConfirm),
}

/// A publish whose frames lapin queued at its first poll. Waiting for each
/// write before queueing the next would cost a round trip to lapin's I/O
/// thread per message.
type Sending = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

impl Publisher {
    /// Connects and declares the exchange.
    pub async fn connect(broker: &BrokerConfig) -> Result<Self, PublishError> {
        let mut session = Session::open(broker, 0).await;
        for attempt in 1..broker.urls.len() {
            match session {
                Err(PublishError::Broker(ref err)) if err.is_connection_failure() => {
                    session = Session::open(broker, u32::try_from(attempt).unwrap_or(0)).await;
                }
                _ => break,
            }
        }
        let session = session?;
        Ok(Self {
            broker: broker.clone(),
            session: Mutex::new(Some(session)),
            versions: VersionClock::default(),
            max_message_bytes: TerminalConfig::default().max_message_bytes,
            unroutable_is_published: false,
        })
    }

    /// Refuses, before sending, a body larger than `bytes`: the terminals'
    /// `terminal.max_message_bytes` (the default is theirs by default).
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Counts a message no queue received as published instead of failing
    /// with [`PublishError::Unroutable`]: for a publisher that keeps every
    /// change elsewhere (the backend's catalog), a store none of whose
    /// terminals has started yet is no error.
    #[must_use]
    pub fn unroutable_is_published(mut self) -> Self {
        self.unroutable_is_published = true;
        self
    }

    /// Publishes `message` to every store in `license_keys`; returns once
    /// the broker confirmed them all.
    pub async fn publish<M: Payload>(
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
    /// returns once the broker confirmed them all, or at the first message
    /// it kept refusing (a nack is sent again a few times first, as while
    /// a cluster elects a queue's leader; those before it are confirmed,
    /// those after it unknown).
    ///
    /// Each message goes out with `publisher_id` and `publisher_seq`, the
    /// connection's id and the message's number on it, by which terminals
    /// drop a copy without a record per message; a message whose caller
    /// chose its `message_id` (its retry key) or that carries a `seq` goes
    /// without them, and terminals record its id instead.
    ///
    /// If the connection drops, the publisher reconnects and sends every
    /// unconfirmed message again with its original `message_id` and
    /// `version`, numbered anew on the new connection: a message the broker
    /// had in fact received changes nothing the second time (its version is
    /// not newer), and no message is ever taken for a copy of another.
    pub async fn publish_envelopes(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Result<Vec<Published>, PublishError> {
        let mut guard = self.session.lock().await;
        let mut in_flight: VecDeque<Pending> = VecDeque::new();
        let mut published = Vec::new();
        let mut reconnects = Reconnects::new(&self.broker);
        // One wall-clock stamp per call: the exact order travels in `version`.
        let timestamp = now_rfc3339();
        for envelope in envelopes {
            while in_flight.len() >= WINDOW {
                self.settle_oldest(&mut guard, &mut in_flight, &mut published, &mut reconnects)
                    .await?;
            }
            let mut pending = match self.prepare(envelope, timestamp.as_deref()) {
                Ok(pending) => pending,
                Err(err) => {
                    // Those before it are confirmed, as for a message the broker refused.
                    while !in_flight.is_empty() {
                        self.settle_oldest(
                            &mut guard,
                            &mut in_flight,
                            &mut published,
                            &mut reconnects,
                        )
                        .await?;
                    }
                    return Err(err);
                }
            };
            loop {
                match send(&mut guard, &self.broker, &mut pending) {
                    Ok(()) => break,
                    Err(err) => {
                        self.recover(&mut guard, &mut in_flight, &mut reconnects, err)
                            .await?
                    }
                }
            }
            in_flight.push_back(pending);
        }
        while !in_flight.is_empty() {
            self.settle_oldest(&mut guard, &mut in_flight, &mut published, &mut reconnects)
                .await?;
        }
        Ok(published)
    }

    async fn settle_oldest(
        &self,
        session: &mut Option<Session>,
        in_flight: &mut VecDeque<Pending>,
        published: &mut Vec<Published>,
        reconnects: &mut Reconnects,
    ) -> Result<(), PublishError> {
        let Some(oldest) = in_flight.front_mut() else {
            return Ok(());
        };
        let url = session.as_ref().map_or("", |s| s.url.as_str());
        let confirm = match std::mem::replace(&mut oldest.progress, Progress::Unsent) {
            Progress::Sent(confirm) => confirm,
            // A broker that pushes back can hold a publish (lapin #409): bounded too.
            Progress::Sending(sending) => {
                let timeout = self.broker.confirm_timeout_secs;
                match connection::within(timeout, "publishing", url, sending).await {
                    Ok(confirm) => confirm,
                    Err(err) => return self.recover(session, in_flight, reconnects, err).await,
                }
            }
            Progress::Unsent => {
                // Sent on a connection that is gone: send everything again first.
                let err = BrokerError::ConnectionLost;
                return self.recover(session, in_flight, reconnects, err).await;
            }
        };
        let waited = connection::within(
            self.broker.confirm_timeout_secs,
            "waiting for the broker's confirm",
            url,
            confirm,
        )
        .await;
        match waited {
            Ok(Confirmation::Ack(Some(returned))) if !self.unroutable_is_published => {
                // lapin may attach a returned message to another confirm of
                // the same multiple-ack: name the message the broker returned.
                let routing_key = returned.delivery.routing_key.to_string();
                let license_key = routing_key.split('.').nth(1).unwrap_or_default().to_owned();
                Err(PublishError::Unroutable {
                    routing_key,
                    license_key,
                })
            }
            Ok(Confirmation::Ack(_)) => {
                if let Some(done) = in_flight.pop_front() {
                    published.push(Published {
                        routing_key: done.routing_key,
                        message_id: done.message_id,
                    });
                }
                reconnects.reset();
                Ok(())
            }
            Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => {
                // Not stored: a queue it goes to had no leader (a cluster
                // failing over) or refused it. Sent again with the rest, as
                // after a lost connection; copies are skipped by the tills.
                let routing_key = in_flight
                    .front()
                    .map(|d| d.routing_key.clone())
                    .unwrap_or_default();
                let err = BrokerError::Nacked { routing_key };
                if !reconnects.may_resend_nacked() {
                    return Err(err.into());
                }
                self.recover(session, in_flight, reconnects, err).await
            }
            Err(err) => self.recover(session, in_flight, reconnects, err).await,
        }
    }

    /// After a connection failure: reconnect and send every unconfirmed
    /// message again, or give up with the error when retrying cannot help
    /// or the retry time is spent.
    async fn recover(
        &self,
        session: &mut Option<Session>,
        in_flight: &mut VecDeque<Pending>,
        reconnects: &mut Reconnects,
        err: BrokerError,
    ) -> Result<(), PublishError> {
        let mut err = err;
        loop {
            if !err.is_connection_failure() || !reconnects.may_retry() {
                return Err(err.into());
            }
            events::publisher_reconnecting(&err.to_string(), in_flight.len());
            if let Some(old) = session.take() {
                old.close(1).await;
            }
            tokio::time::sleep(reconnects.next_delay()).await;
            match Session::open(&self.broker, reconnects.attempt).await {
                Ok(fresh) => *session = Some(fresh),
                Err(PublishError::Broker(next)) => {
                    err = next;
                    continue;
                }
                Err(other) => return Err(other),
            }
            let mut failed = None;
            for pending in in_flight.iter_mut() {
                if let Err(next) = send(session, &self.broker, pending) {
                    failed = Some(next);
                    break;
                }
            }
            match failed {
                None => return Ok(()),
                Some(next) => err = next,
            }
        }
    }

    fn prepare(
        &self,
        envelope: Envelope,
        timestamp: Option<&str>,
    ) -> Result<Pending, PublishError> {
        // A message id the caller chose is its promise that any copy is the
        // same change, a retry across calls and sessions included: only the
        // terminal's record of ids catches those, so such messages keep it.
        // So does a sequenced message, which is told apart by its `seq`.
        let stamped = envelope.message_id.is_none()
            && envelope.seq.is_none()
            && envelope.publisher_id.is_none();
        let encoded = encode(envelope, &self.versions, timestamp)?;
        let size = encoded.body.len() + if stamped { STAMP_BYTES } else { 0 };
        if size > self.max_message_bytes {
            return Err(PublishError::TooLarge {
                message_type: encoded.message_type,
                routing_key: encoded.routing_key,
                size,
                limit: self.max_message_bytes,
            });
        }
        Ok(Pending {
            routing_key: encoded.routing_key,
            message_id: encoded.message_id,
            body: encoded.body,
            stamped,
            progress: Progress::Unsent,
        })
    }

    /// The broker URLs, passwords redacted.
    pub fn broker(&self) -> String {
        self.broker.redacted_urls()
    }

    /// Closes the connection.
    pub async fn close(self) {
        if let Some(session) = self.session.into_inner() {
            session.close(self.broker.confirm_timeout_secs).await;
        }
    }
}

impl Session {
    /// Connects to the broker URLs in turn, starting with the one `attempt` picks.
    async fn open(broker: &BrokerConfig, attempt: u32) -> Result<Self, PublishError> {
        let url = broker.urls[attempt as usize % broker.urls.len()].clone();
        let timeout = broker.confirm_timeout_secs;
        let connection = connection::connect(broker, &url, "possync publisher").await?;
        let channel = connection::confirming_channel(&connection, timeout, &url).await?;
        if broker.declare_topology {
            connection::within(
                timeout,
                "declaring the exchange",
                &url,
                declare_exchange(&channel, &broker.exchange),
            )
            .await?;
        }
        Ok(Self {
            connection,
            channel,
            url,
            stamp: Stamp::new(),
        })
    }

    async fn close(self, timeout_secs: u64) {
        let _ = connection::within(
            timeout_secs,
            "closing",
            &self.url,
            self.connection.close(200, "done".into()),
        )
        .await;
    }
}

/// An envelope ready to go out.
pub(crate) struct Encoded {
    pub(crate) routing_key: String,
    pub(crate) message_id: String,
    pub(crate) message_type: String,
    pub(crate) body: Arc<[u8]>,
}

/// Checks an envelope's license key and type, fills in what the publisher
/// stamps (message id, version, timestamp) and serializes it.
pub(crate) fn encode(
    mut envelope: Envelope,
    versions: &VersionClock,
    timestamp: Option<&str>,
) -> Result<Encoded, PublishError> {
    let license_key = LicenseKey::new(envelope.license_key.clone())?;
    check_type(&envelope.message_type)?;
    let message_id = envelope
        .message_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    if envelope.version.is_none() {
        envelope.version = Some(versions.next());
    }
    if envelope.timestamp.is_none() {
        envelope.timestamp = timestamp.map(str::to_owned);
    }
    Ok(Encoded {
        routing_key: routing_key(&license_key, &envelope.message_type),
        message_id,
        body: serde_json::to_vec(&envelope)?.into(),
        message_type: envelope.message_type,
    })
}

/// The wall-clock stamp of a publish call, in whole seconds as the
/// original format has it: the exact order travels in `version`.
pub(crate) fn now_rfc3339() -> Option<String> {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&Rfc3339)
        .ok()
}

/// Versions for one publisher: microseconds since the epoch, strictly
/// increasing even if two messages fall in the same microsecond.
#[derive(Debug, Default)]
pub(crate) struct VersionClock(AtomicI64);

impl VersionClock {
    fn next(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .0
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

/// Queues `pending` on the current connection without waiting for the
/// write: lapin queues a publish's frames at its first poll, so the order
/// of `send` calls is the order on the wire.
fn send(
    session: &mut Option<Session>,
    broker: &BrokerConfig,
    pending: &mut Pending,
) -> Result<(), BrokerError> {
    let Some(session) = session.as_mut() else {
        return Err(BrokerError::ConnectionLost);
    };
    // Numbered here, in the order of `send` calls, which is the order on the wire.
    let body = if pending.stamped {
        session.stamp.next(&pending.body)
    } else {
        Arc::clone(&pending.body)
    };
    // The id and the type travel in the body, where terminals read them:
    // repeated as properties they would cost every queue and every
    // terminal their bytes and their parsing, for no reader.
    let properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into());
    let channel = session.channel.clone();
    let exchange = broker.exchange.as_str().into();
    let routing_key = pending.routing_key.as_str().into();
    let mut sending: Sending = Box::pin(async move {
        channel
            .basic_publish(
                exchange,
                routing_key,
                // mandatory: the broker tells us when no queue took the message.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
    });
    pending.progress = match (&mut sending).now_or_never() {
        Some(Ok(confirm)) => Progress::Sent(confirm),
        Some(Err(err)) => return Err(BrokerError::from_lapin("publishing", &session.url, err)),
        None => Progress::Sending(sending),
    };
    Ok(())
}

/// How long a publish keeps trying to get through a broker outage.
struct Reconnects {
    attempt: u32,
    budget: Duration,
    deadline: Instant,
    /// Nacks in a row: each within [`NACKS_APART`] of the one before,
    /// whatever was confirmed between them.
    nacks: u32,
    last_nack: Option<Instant>,
}

/// Nacks in a row after which a publish fails: an election is over within
/// the waits between them (4 to 8 s in all), while a queue that refuses
/// for good (`overflow: reject-publish`) would hold every publish behind it
/// for the whole `publish_retry_secs`.
const NACKS_AT_MOST: u32 = 6;

/// Nacks further apart than this are not in a row: the broker stored
/// messages for a while between them.
const NACKS_APART: Duration = Duration::from_secs(30);

impl Reconnects {
    fn new(broker: &BrokerConfig) -> Self {
        let budget = Duration::from_secs(broker.publish_retry_secs);
        Self {
            attempt: 0,
            budget,
            deadline: Instant::now() + budget,
            nacks: 0,
            last_nack: None,
        }
    }

    /// A confirm arrived: the next outage gets the full retry time. Nacks
    /// still count: a queue that refuses every other message is no outage.
    fn reset(&mut self) {
        self.attempt = 0;
        self.deadline = Instant::now() + self.budget;
    }

    /// A nack came: whether to send it again, or give up on a broker that
    /// keeps refusing.
    fn may_resend_nacked(&mut self) -> bool {
        let now = Instant::now();
        let in_a_row = self
            .last_nack
            .is_some_and(|last| now.duration_since(last) <= NACKS_APART);
        self.nacks = if in_a_row { self.nacks + 1 } else { 1 };
        self.last_nack = Some(now);
        // The wait before sending again grows with the nacks in a row, even
        // when confirms between them reset the reconnect count.
        self.attempt = self.attempt.max(self.nacks - 1);
        self.nacks < NACKS_AT_MOST
    }

    fn may_retry(&self) -> bool {
        Instant::now() < self.deadline
    }

    fn next_delay(&mut self) -> Duration {
        self.attempt += 1;
        crate::backoff::RECONNECT.delay(self.attempt)
    }
}

fn check_type(message_type: &str) -> Result<(), PublishError> {
    if crate::topology::is_message_type(message_type) {
        Ok(())
    } else {
        Err(PublishError::InvalidType(message_type.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nacks_in_a_row_give_up_even_with_confirms_between_them() {
        let mut reconnects = Reconnects::new(&BrokerConfig::default());
        for _ in 1..NACKS_AT_MOST {
            assert!(reconnects.may_resend_nacked());
            reconnects.reset();
        }
        assert!(!reconnects.may_resend_nacked(), "the sixth in a row");
    }

    #[test]
    fn nacks_far_apart_are_not_in_a_row() {
        let mut reconnects = Reconnects::new(&BrokerConfig::default());
        for _ in 0..2 * NACKS_AT_MOST {
            assert!(reconnects.may_resend_nacked());
            reconnects.last_nack = reconnects
                .last_nack
                .and_then(|last| last.checked_sub(NACKS_APART + Duration::from_secs(1)));
        }
    }

    #[test]
    fn a_session_stamps_its_id_and_numbers_in_the_order_it_writes() {
        let envelope = Envelope::new("price_update", "STORE-1", serde_json::json!({"a": 1}));
        let encoded = encode(envelope, &VersionClock::default(), None).expect("encodes");
        let mut stamp = Stamp::new();
        let first: Envelope = serde_json::from_slice(&stamp.next(&encoded.body)).expect("JSON");
        let second: Envelope = serde_json::from_slice(&stamp.next(&encoded.body)).expect("JSON");
        assert_eq!(first.publisher_id.as_deref(), Some(stamp.id.as_str()));
        assert_eq!(
            (first.publisher_seq, second.publisher_seq),
            (Some(1), Some(2))
        );
        assert_eq!(first.message_id, second.message_id, "the same message");
        let stamped = stamp.next(&encoded.body);
        assert!(stamped.len() <= encoded.body.len() + STAMP_BYTES);
        let again: Envelope =
            serde_json::from_slice(&Stamp::new().next(&encoded.body)).expect("JSON");
        assert_ne!(
            again.publisher_id, first.publisher_id,
            "a new session, a new id"
        );
        assert_eq!(again.publisher_seq, Some(1));
    }

    #[test]
    fn the_stamps_are_short_and_the_timestamp_has_whole_seconds() {
        let id = Stamp::new().id;
        assert_eq!(id.len(), 22, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        let timestamp = now_rfc3339().expect("formats");
        assert_eq!(timestamp.len(), "2025-11-27T10:30:00Z".len(), "{timestamp}");
        let envelope = Envelope::new("t", "STORE-1", serde_json::json!({}))
            .with_timestamp(timestamp)
            .with_version(42);
        assert_eq!(
            envelope.order().map(|v| v.micros),
            Some(42),
            "the version orders"
        );
    }
}
