//! Consuming: the loop that takes a terminal's deliveries, applies them in
//! batches, settles each message as its outcome says, and holds what must
//! be tried again; and the subscription to its queue it reads from.

use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};

use crate::applier::{Applied, ApplierHandle};
use crate::config::BrokerConfig;
use crate::connection::{self, BrokerError};
use crate::dispatch::Outcome;
use crate::events;
use crate::in_process::InProcessInbox;
use crate::inbound::Inbound;
use crate::snapshot::{self, Asker, SnapshotContext, SnapshotError, SnapshotPlan};
use crate::status::{Reporter, State};
use crate::topology::TerminalTopology;

const PERSISTENT: u8 = 2;

/// How often a connected terminal renews its dead-letter queue's lease:
/// well within the shortest expiry (one day).
const RENEW_DEAD_LETTER_QUEUE_EVERY: Duration = Duration::from_secs(3600);

/// How often a live terminal counts the messages waiting in its queue.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(5);

/// How soon a message requeued from the quarantine (`possync quarantine
/// requeue`) is applied.
const REQUEUE_EVERY: Duration = Duration::from_secs(1);

/// How a consuming session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was asked for; the session settled everything and closed.
    Stopped,
    /// The connection failed; reconnect.
    Lost(BrokerError),
}

/// Receives, applies and settles batches until shutdown or connection loss.
///
/// A batch the database refuses (locked, full) is held and tried again in
/// place, never handed back to the broker: that would reorder it and count
/// against the queue's delivery limit. A message whose handler fails for
/// now is held the same way, with the messages behind it.
pub(crate) async fn consume(
    mut subscription: Inbox,
    applier: &ApplierHandle,
    reporter: &Reporter<'_>,
    batch_size: usize,
    snapshots: Option<&SnapshotContext>,
    verify_turn: &crate::verify::Turn,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> SessionEnd {
    let status = reporter.status();
    let mut plan = {
        let sync = status.sync();
        let empty = snapshots.is_some_and(|context| context.empty_at_start);
        SnapshotPlan::new(empty && sync.catalog.is_none() && sync.highest_applied == 0)
    };
    let mut depth_due = tokio::time::Instant::now();
    // Renewed at once too: a provisioned terminal declares nothing on
    // connecting, and its sessions may be short.
    let mut renew_due = tokio::time::Instant::now();
    let mut requeue_due = tokio::time::Instant::now();
    let mut idle = false;
    // Deliveries taken but not settled, to try again before anything else.
    let mut held: Vec<Inbound> = Vec::new();
    let mut stall: Option<Stall> = None;
    // The delivery tag of the message being tried again, and its tries.
    let mut retrying: Option<(u64, u32)> = None;
    loop {
        if tokio::time::Instant::now() >= renew_due {
            subscription.renew_dead_letter_queue().await;
            renew_due = tokio::time::Instant::now() + RENEW_DEAD_LETTER_QUEUE_EVERY;
        }
        if tokio::time::Instant::now() >= requeue_due {
            applier.requeue().await;
            requeue_due = tokio::time::Instant::now() + REQUEUE_EVERY;
        }
        // A snapshot runs between batches, with every delivery settled:
        // what arrives meanwhile waits in the queue.
        if held.is_empty()
            && let (Some(context), Inbox::Broker(broker)) = (snapshots, &subscription)
            && plan.due(&status.sync())
        {
            events::snapshot_started(&snapshot::reason(&status.sync()));
            let asker = Asker {
                follows: status.sync().catalog,
                ..broker.asker(context)
            };
            let taken = tokio::select! {
                () = shutdown.as_mut() => {
                    events::stopping();
                    subscription.close(&[]).await;
                    return SessionEnd::Stopped;
                }
                taken = snapshot::take(broker.connection(), &asker, context, applier) => taken,
            };
            match taken {
                Ok(sync) => {
                    plan.done();
                    status.set_sync(sync);
                }
                Err(err) => {
                    let retry = plan.failed(&err);
                    let given_up = matches!(err, SnapshotError::Incomplete(_));
                    events::snapshot_failed(
                        &err.to_string(),
                        retry.map(|d| d.as_millis()),
                        given_up,
                    );
                    if let SnapshotError::Broker(err) = err
                        && err.is_connection_failure()
                    {
                        return SessionEnd::Lost(err);
                    }
                }
            }
            continue;
        }
        let mut lost = None;
        let batch = if held.is_empty() {
            // Counted on connecting and every few seconds while busy.
            if !idle && tokio::time::Instant::now() >= depth_due {
                status.set_queue_depth(subscription.queue_depth().await);
                depth_due = tokio::time::Instant::now() + QUEUE_DEPTH_EVERY;
            }
            let first = tokio::select! {
                () = shutdown.as_mut() => {
                    events::stopping();
                    subscription.close(&[]).await;
                    return SessionEnd::Stopped;
                }
                next = subscription.next() => {
                    idle = false;
                    next
                }
                // A busy terminal renews at the top of the loop; this wakes an idle one.
                () = tokio::time::sleep_until(renew_due), if idle => continue,
                // The quarantine's requeued messages, busy or idle.
                () = tokio::time::sleep_until(requeue_due) => continue,
                // Idle with every delivery settled: the broker delivers whatever
                // arrives at once, so nothing waits, and there is time to write
                // the counters `possync status` shows. (Waiting for the next
                // message is cancel-safe.)
                () = tokio::time::sleep_until(depth_due), if !idle => {
                    status.set_queue_depth(Some(0));
                    applier.flush_progress().await;
                    idle = true;
                    continue;
                }
            };
            let mut batch: Vec<Inbound> = Vec::with_capacity(batch_size);
            match first {
                Some(Ok(inbound)) => batch.push(inbound),
                Some(Err(err)) => return SessionEnd::Lost(err),
                None => return SessionEnd::Lost(BrokerError::ConsumerCancelled),
            }
            // A checkpoint the verifier would compare now ends its batch:
            // it is compared with what the messages before it left, before
            // any after it apply. Others ride along (each cut is a commit).
            while batch.len() < batch_size
                && !batch
                    .last()
                    .is_some_and(|inbound| is_checkpoint(inbound) && verify_turn.due())
            {
                match subscription.try_next() {
                    Some(Ok(inbound)) => batch.push(inbound),
                    Some(Err(err)) => {
                        lost = Some(err);
                        break;
                    }
                    None => break,
                }
            }
            batch
        } else {
            std::mem::take(&mut held)
        };
        let started = Instant::now();
        let size = batch.len();
        let (mut batch, result) = applier.apply(batch).await;
        let wait = match result {
            Ok(Applied {
                outcomes,
                tally,
                sync,
            }) => {
                crate::failpoint::after_commit().await;
                events::batch_applied(size, tally.applied, started.elapsed().as_millis());
                let retry = match outcomes.last() {
                    Some(Outcome::Retry { reason }) => Some(reason.clone()),
                    _ => None,
                };
                if retry.is_some() {
                    // The message to retry and everything behind it stay here.
                    held = batch.split_off(outcomes.len() - 1);
                    for inbound in &mut held {
                        inbound.redelivered = true;
                    }
                }
                let settled = subscription.settle(&batch, &outcomes[..batch.len()]).await;
                // Counted once committed: a lost ack means a redelivery that changes nothing.
                status.count(&tally, sync);
                if let Err(err) = settled {
                    return SessionEnd::Lost(err);
                }
                // Live again only once the broker took the settlement too.
                if let Some(cleared) = stall.take() {
                    events::stall_cleared(cleared.since.elapsed().as_millis(), cleared.attempts);
                    reporter
                        .set(
                            State::Live {
                                since: SystemTime::now(),
                            },
                            None,
                        )
                        .await;
                }
                match (retry, held.first()) {
                    (Some(reason), Some(first)) => {
                        // Another message failing starts its own count.
                        let tries = match retrying {
                            Some((tag, tries)) if tag == first.tag => tries + 1,
                            _ => 1,
                        };
                        retrying = Some((first.tag, tries));
                        let delay = crate::backoff::HANDLER_RETRY.delay(tries);
                        events::message_retry(&first.routing_key, &reason, delay.as_millis());
                        Some(delay)
                    }
                    _ => {
                        retrying = None;
                        None
                    }
                }
            }
            Err(err) => {
                held = batch;
                let reason = err.to_string();
                let stalled = stall.get_or_insert_with(Stall::new);
                stalled.attempts += 1;
                let delay = crate::backoff::STALLED_BATCH.delay(stalled.attempts);
                let first = stalled.attempts == 1;
                // Loud at first and every few minutes, so a stall that never
                // ends is not one line lost in the night's log.
                let loud = first || stalled.said_at.elapsed() >= STALL_REMINDER_EVERY;
                if loud {
                    stalled.said_at = Instant::now();
                }
                events::stalled(
                    &reason,
                    delay.as_millis(),
                    loud,
                    stalled.since.elapsed().as_secs(),
                );
                if first || stalled.reason != reason {
                    stalled.reason.clone_from(&reason);
                    reporter
                        .set(
                            State::Stalled {
                                since: stalled.at,
                                reason,
                            },
                            None,
                        )
                        .await;
                }
                Some(delay)
            }
        };
        if let Some(err) = lost {
            return SessionEnd::Lost(err);
        }
        if let Some(delay) = wait {
            tokio::select! {
                () = shutdown.as_mut() => {
                    events::stopping();
                    subscription.close(&held).await;
                    return SessionEnd::Stopped;
                }
                () = tokio::time::sleep(delay) => {}
            }
            // The broker takes back what was held once the connection is
            // gone (or the consumer timed out): say Offline, not Stalled.
            if !subscription.is_connected() {
                return SessionEnd::Lost(BrokerError::ConnectionLost);
            }
        }
    }
}

/// Whether a delivery is the backend's checkpoint (by its routing key;
/// its envelope is checked when applied).
fn is_checkpoint(inbound: &Inbound) -> bool {
    inbound
        .routing_key
        .rsplit_once('.')
        .is_some_and(|(_, message_type)| message_type == crate::CHECKPOINT_TYPE)
}

/// A batch the database keeps refusing.
struct Stall {
    since: Instant,
    at: SystemTime,
    attempts: u32,
    reason: String,
    /// When the log last said so at error level.
    said_at: Instant,
}

/// How often a stall that goes on is logged at error level again.
const STALL_REMINDER_EVERY: Duration = Duration::from_secs(300);

impl Stall {
    fn new() -> Self {
        Self {
            said_at: Instant::now(),
            since: Instant::now(),
            at: SystemTime::now(),
            attempts: 0,
            reason: String::new(),
        }
    }
}

/// A live consumer on one terminal queue.
pub(crate) struct Subscription {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    dead_letters: Channel,
    topology: TerminalTopology,
    /// Publish dead letters ourselves, with the reason in a header. Users
    /// provisioned without write rights reject to the queue's dead-letter
    /// exchange instead.
    reasons_in_dead_letters: bool,
    url: String,
    timeout_secs: u64,
    /// For counting the queue's messages; a failed count closes its
    /// channel, so it is not one anything else uses.
    probe: Probe,
    queue_created: bool,
    alone: bool,
    heartbeat: u16,
}

#[derive(Debug)]
enum Probe {
    NotOpen,
    Open(Channel),
    /// A count failed: not asked again this session (logged once).
    GaveUp,
}

/// Where a terminal's messages come from: its RabbitMQ queue, or an
/// in-process queue (the demo without a broker, handler tests).
#[derive(Debug)]
pub(crate) enum Inbox {
    Broker(Box<Subscription>),
    InProcess(InProcessInbox),
}

impl Inbox {
    /// Whether the queue was made by this connection (an in-process one
    /// lives with the broker: never).
    pub(crate) fn queue_created(&self) -> bool {
        match self {
            Self::Broker(subscription) => subscription.queue_created(),
            Self::InProcess(_) => false,
        }
    }

    /// Whether no consumer was on the queue before this one (an in-process
    /// queue: always).
    pub(crate) fn alone(&self) -> bool {
        match self {
            Self::Broker(subscription) => subscription.alone(),
            Self::InProcess(_) => true,
        }
    }

    /// The heartbeat agreed with the broker, in seconds (0: none).
    pub(crate) fn heartbeat(&self) -> u16 {
        match self {
            Self::Broker(subscription) => subscription.heartbeat(),
            Self::InProcess(_) => 0,
        }
    }

    /// Waits for the next message; `None` when the broker ended the consumer.
    pub(crate) async fn next(&mut self) -> Option<Result<Inbound, BrokerError>> {
        match self {
            Self::Broker(subscription) => subscription.next().await,
            Self::InProcess(inbox) => Some(Ok(inbox.next().await)),
        }
    }

    /// The next message if one is already here.
    pub(crate) fn try_next(&mut self) -> Option<Result<Inbound, BrokerError>> {
        match self {
            Self::Broker(subscription) => subscription.try_next(),
            Self::InProcess(inbox) => inbox.try_next().map(Ok),
        }
    }

    /// Settles a batch after its commit.
    pub(crate) async fn settle(
        &mut self,
        batch: &[Inbound],
        outcomes: &[Outcome],
    ) -> Result<(), BrokerError> {
        match self {
            Self::Broker(subscription) => subscription.settle(batch, outcomes).await,
            Self::InProcess(inbox) => {
                inbox.settle(batch, outcomes);
                Ok(())
            }
        }
    }

    /// Messages waiting in the queue, not yet delivered; `None` when the
    /// broker would not say.
    pub(crate) async fn queue_depth(&mut self) -> Option<u64> {
        match self {
            Self::Broker(subscription) => subscription.queue_depth().await,
            Self::InProcess(inbox) => Some(inbox.depth()),
        }
    }

    /// Whether the connection still stands; a terminal holding deliveries
    /// (stalled, or waiting to retry one) reads no stream that would say.
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Self::Broker(subscription) => {
                subscription.connection.status().connected()
                    && subscription.channel.status().connected()
            }
            Self::InProcess(_) => true,
        }
    }

    /// Keeps the dead-letter queue from expiring while the terminal runs.
    pub(crate) async fn renew_dead_letter_queue(&mut self) {
        if let Self::Broker(subscription) = self {
            subscription.renew_dead_letter_queue().await;
        }
    }

    /// Stops consuming; `unsettled` (taken, not yet settled) and every
    /// other unacknowledged message return to the queue, in their order.
    pub(crate) async fn close(self, unsettled: &[Inbound]) {
        match self {
            // The broker returns every unacknowledged delivery of a closed channel.
            Self::Broker(subscription) => subscription.close().await,
            Self::InProcess(mut inbox) => inbox.requeue(unsettled),
        }
    }
}

/// The broker's refusal of a second consumer (or, in transient mode, of a
/// second declaration of the connection's own queue), as the operator
/// needs to read it.
fn already_running(err: BrokerError, topology: &TerminalTopology) -> BrokerError {
    let refused = match &err {
        BrokerError::AccessRefused { detail, .. } => detail.contains("exclusive"),
        BrokerError::Protocol { source, .. } => matches!(
            source.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if amqp.kind() == &lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::RESOURCELOCKED)
        ),
        _ => false,
    };
    if !refused {
        return err;
    }
    already_running_as(topology)
}

fn already_running_as(topology: &TerminalTopology) -> BrokerError {
    events::already_running(&topology.queue);
    BrokerError::AlreadyRunning {
        queue: topology.queue.clone(),
    }
}

/// Consumers of this terminal's own that the queue may still count.
///
/// A quorum queue keeps counting the consumer of a cluster node that went
/// down (killed, cut off) until that node is back: after losing its
/// connection to such a node, the terminal would see itself as a twin and
/// refuse to start. Once the consumer can no longer be delivered to (see
/// [`LostSession`]) and the node still does not answer, that consumer is
/// certainly still counted, so one more is expected for each such node.
/// Before that, none is: taking the queue while the broker may still
/// deliver to the old consumer would let later changes overtake the ones it
/// holds. Those lost sessions are `waiting`, and a refusal they explain
/// says so instead of blaming a twin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Ghosts {
    expected: u32,
    waiting: Option<Waiting>,
}

/// Lost sessions whose consumer may still be delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    count: u32,
    /// The node of the one that matures first, and when.
    node: String,
    matures: std::time::Instant,
}

/// A session that was Live and got lost: where, and from when its consumer
/// can no longer receive anything.
#[derive(Debug, Clone)]
pub(crate) struct LostSession {
    /// `host:port` of the node.
    pub(crate) address: String,
    matures: std::time::Instant,
}

impl LostSession {
    /// A session on `url` lost now by `cause`, on a connection whose
    /// heartbeat (agreed with the broker) was `heartbeat` seconds; `None`
    /// for a URL without an address.
    ///
    /// Its consumer is gone or unused once both have happened:
    /// - the cluster noticed its node down, `node_down_after` after the node
    ///   was last heard: two heartbeats before a missed heartbeat (lapin's
    ///   limit), and since the broker may stay silent a whole heartbeat, the
    ///   node may have lived one heartbeat past that;
    /// - a node that lives on but no longer hears this terminal (a link
    ///   broken on the till's side) dropped the connection itself, which
    ///   RabbitMQ does within three heartbeats of silence.
    pub(crate) fn now(
        url: &str,
        cause: &BrokerError,
        heartbeat: u16,
        node_down_after: std::time::Duration,
    ) -> Option<Self> {
        let now = std::time::Instant::now();
        let heartbeat = std::time::Duration::from_secs(u64::from(heartbeat));
        let (last_heard, unsure) = if cause.is_missed_heartbeat() {
            (now.checked_sub(2 * heartbeat).unwrap_or(now), heartbeat)
        } else {
            (now, std::time::Duration::ZERO)
        };
        let wait = node_down_after.max(3 * heartbeat).saturating_add(unsure);
        Some(Self {
            address: host_and_port(url)?,
            matures: last_heard.checked_add(wait)?,
        })
    }

    /// Whether `url` is the node of one of `lost`: a node that went down
    /// under this terminal, which a failed attempt on it says nothing new
    /// about.
    pub(crate) fn is_lost_node(lost: &[Self], url: &str) -> bool {
        host_and_port(url).is_some_and(|here| lost.iter().any(|session| session.address == here))
    }

    /// The next moment one of `lost` may count as a ghost: a terminal
    /// refused meanwhile tries again then, not after its whole backoff.
    pub(crate) fn next_maturing(lost: &[Self]) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        lost.iter()
            .map(|session| session.matures)
            .filter(|matures| *matures > now)
            .min()
    }
}

impl Ghosts {
    /// What to expect connecting to `url` after losing the sessions in
    /// `lost`. A quick look whether each node still takes connections; one
    /// that does has dropped its consumer, or soon will, and is forgotten.
    pub(crate) async fn after_losing(lost: &mut Vec<LostSession>, url: &str) -> Self {
        let here = host_and_port(url);
        let mut ghosts = Self::default();
        let mut answered = Vec::new();
        for (index, session) in lost.iter().enumerate() {
            if here.as_deref() == Some(session.address.as_str()) {
                continue;
            }
            let probe = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::net::TcpStream::connect(session.address.as_str()),
            )
            .await;
            if matches!(probe, Ok(Ok(_))) {
                answered.push(index);
            } else if session.matures <= std::time::Instant::now() {
                ghosts.expected += 1;
            } else {
                let waiting = ghosts.waiting.get_or_insert_with(|| Waiting {
                    count: 0,
                    node: session.address.clone(),
                    matures: session.matures,
                });
                waiting.count += 1;
                if session.matures < waiting.matures {
                    waiting.node.clone_from(&session.address);
                    waiting.matures = session.matures;
                }
            }
        }
        for index in answered.into_iter().rev() {
            lost.remove(index);
        }
        ghosts
    }

    /// The error for a queue with `counted` consumers where at most
    /// `expected` were allowed: still waiting on a lost session that
    /// explains them, or another process.
    fn refusal(&self, counted: Option<u32>, topology: &TerminalTopology) -> BrokerError {
        match &self.waiting {
            Some(waiting) if counted <= Some(self.expected + waiting.count) => {
                let seconds = waiting
                    .matures
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs()
                    + 1;
                events::waiting_for_lost_node(&waiting.node, seconds);
                BrokerError::LostNodeConsumer {
                    node: waiting.node.clone(),
                    seconds,
                }
            }
            _ => already_running_as(topology),
        }
    }
}

/// The most of a dead letter's reason its header carries: the headers
/// travel in one frame, which a terminal's connection keeps small (16 KiB),
/// and a frame over that closes the connection. The whole reason stays in
/// `possync_quarantine`.
const MAX_REASON_HEADER_BYTES: usize = 2048;

/// `reason`, cut at a character boundary to fit a header.
fn header_text(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_HEADER_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_HEADER_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// `host:port` of an AMQP URL.
fn host_and_port(url: &str) -> Option<String> {
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    Some(format!("{}:{}", uri.authority.host, uri.authority.port))
}

/// The consumers of `queue`, by a passive declare on a channel of its own;
/// `None` when the broker would not say (the exclusive consumer still
/// guards a classic queue).
async fn consumers(connection: &Connection, timeout: u64, url: &str, queue: &str) -> Option<u32> {
    let channel = connection::within(
        timeout,
        "opening a channel",
        url,
        connection.create_channel(),
    )
    .await
    .ok()?;
    let declared = passive_declare(
        &channel,
        queue,
        timeout,
        url,
        "counting the queue's consumers",
    )
    .await
    .ok()?;
    let _ = channel.close(200, "counted".into()).await;
    Some(declared.consumer_count())
}

/// What the broker says of `queue` (messages, consumers), without declaring it.
pub(crate) async fn passive_declare(
    channel: &Channel,
    queue: &str,
    timeout: u64,
    url: &str,
    during: &'static str,
) -> Result<lapin::Queue, BrokerError> {
    connection::within(
        timeout,
        during,
        url,
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("queue", &self.topology.queue)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Connects, declares the topology and starts consuming. `ghosts` is
    /// how many consumers of this very terminal a down cluster node may
    /// still hold on a quorum queue (see [`Ghosts`]).
    pub(crate) async fn open(
        broker: &BrokerConfig,
        url: &str,
        topology: &TerminalTopology,
        prefetch: u16,
        name: &str,
        ghosts: Ghosts,
    ) -> Result<Self, BrokerError> {
        let timeout = broker.confirm_timeout_secs;
        let connection =
            connection::connect_framed(broker, url, name, Some(connection::TERMINAL_FRAME_MAX))
                .await?;
        let channel = connection::within(
            timeout,
            "opening a channel",
            url,
            connection.create_channel(),
        )
        .await?;
        let mut queue_created = false;
        if broker.declare_topology {
            // On a channel of its own: the broker closes it if the queue is gone.
            let look = connection::within(
                timeout,
                "opening a channel",
                url,
                connection.create_channel(),
            )
            .await?;
            match passive_declare(
                &look,
                &topology.queue,
                timeout,
                url,
                "looking for the queue",
            )
            .await
            {
                Ok(_) => {}
                Err(BrokerError::NotFound { .. }) => queue_created = true,
                // An exclusive queue another process holds, among others.
                Err(err) => return Err(already_running(err, topology)),
            }
            // Closed by the broker already if the queue was not found.
            if look.status().connected() {
                let _ = connection::within(
                    timeout,
                    "closing a channel",
                    url,
                    look.close(200, "looked".into()),
                )
                .await;
            }
            connection::within(
                timeout,
                "declaring the terminal's queue",
                url,
                topology.declare_on(&connection),
            )
            .await
            .map_err(|err| already_running(err, topology))?;
        }
        connection::within(
            timeout,
            "setting the prefetch",
            url,
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let dead_letters = connection::confirming_channel(&connection, timeout, url).await?;
        // One process per terminal: a second one with this identity (a
        // cloned disk, a copied config) must not take half the stream. An
        // exclusive consumer does that on a classic queue; a quorum queue
        // ignores exclusivity, so the consumers are also counted, before
        // (a twin already there) and after (one that started the same moment).
        let before = consumers(&connection, timeout, url, &topology.queue).await;
        if before > Some(ghosts.expected) {
            return Err(ghosts.refusal(before, topology));
        }
        let consumer = connection::within(
            timeout,
            "starting the consumer",
            url,
            channel.basic_consume(
                topology.queue.as_str().into(),
                name.into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|err| already_running(err, topology))?;
        let after = consumers(&connection, timeout, url, &topology.queue).await;
        if after > Some(1 + ghosts.expected) {
            // Closing returns whatever was delivered here, unacknowledged.
            let _ = connection
                .close(200, "another process runs as this terminal".into())
                .await;
            return Err(ghosts.refusal(after.map(|count| count.saturating_sub(1)), topology));
        }
        let heartbeat = connection.configuration().heartbeat();
        Ok(Self {
            connection,
            channel,
            consumer,
            dead_letters,
            topology: topology.clone(),
            reasons_in_dead_letters: broker.declare_topology,
            url: url.to_owned(),
            timeout_secs: timeout,
            probe: Probe::NotOpen,
            queue_created,
            // No consumer at all: whatever a lost node held is gone.
            alone: before == Some(0),
            heartbeat,
        })
    }

    /// The connection, for a snapshot's own channel.
    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Who asks for this terminal's snapshots, on this connection.
    pub(crate) fn asker(&self, context: &SnapshotContext) -> Asker {
        Asker {
            license_key: context.license_key.clone(),
            terminal_id: context.terminal_id.clone(),
            exchange: self.topology.exchange.clone(),
            user: crate::uplink::broker_user(&self.url),
            url: self.url.clone(),
            timeout_secs: self.timeout_secs,
            follows: None,
        }
    }

    /// Whether the terminal's queue did not exist before this connection
    /// declared it.
    pub(crate) fn queue_created(&self) -> bool {
        self.queue_created
    }

    /// Whether the queue counted no consumer before this one: none of a
    /// lost session is left (a consumer gone stays gone).
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }

    /// The heartbeat agreed with the broker, in seconds (0: none).
    pub(crate) fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    /// The queue's ready messages.
    async fn queue_depth(&mut self) -> Option<u64> {
        let queue = self.topology.queue.clone();
        self.look_at(&queue, "counting the queue's messages")
            .await
            .map(u64::from)
    }

    /// Keeps the dead-letter queue from expiring while this terminal lives:
    /// nothing consumes from it, and a declare renews its lease.
    async fn renew_dead_letter_queue(&mut self) {
        let queue = self.topology.dead_letter_queue.clone();
        self.look_at(&queue, "renewing the dead-letter queue").await;
    }

    /// A passive declare of `queue` on a channel of its own: its ready
    /// messages. A failure closes that channel, so after one it stops
    /// asking for the rest of the session (logged once).
    async fn look_at(&mut self, queue: &str, during: &'static str) -> Option<u32> {
        if matches!(self.probe, Probe::NotOpen) {
            let opened = connection::within(
                self.timeout_secs,
                "opening a channel",
                &self.url,
                self.connection.create_channel(),
            )
            .await;
            self.probe = match opened {
                Ok(channel) => Probe::Open(channel),
                Err(err) => {
                    events::queue_probe_failed(&err.to_string());
                    Probe::GaveUp
                }
            };
        }
        let Probe::Open(probe) = &self.probe else {
            return None;
        };
        match passive_declare(probe, queue, self.timeout_secs, &self.url, during).await {
            Ok(queue) => Some(queue.message_count()),
            Err(err) => {
                events::queue_probe_failed(&err.to_string());
                self.probe = Probe::GaveUp;
                None
            }
        }
    }

    /// Waits for the next message; `None` when the broker ended the consumer.
    pub(crate) async fn next(&mut self) -> Option<Result<Inbound, BrokerError>> {
        let next = self.consumer.next().await?;
        Some(self.convert(next))
    }

    /// The next message if one is already here. The end of the stream
    /// (the broker cancelled the consumer) is reported as an error: lapin
    /// sends that end once, so it must not be mistaken for "nothing yet".
    pub(crate) fn try_next(&mut self) -> Option<Result<Inbound, BrokerError>> {
        match self.consumer.next().now_or_never()? {
            Some(next) => Some(self.convert(next)),
            None => Some(Err(BrokerError::ConsumerCancelled)),
        }
    }

    fn convert(
        &self,
        delivery: lapin::Result<lapin::message::Delivery>,
    ) -> Result<Inbound, BrokerError> {
        let delivery =
            delivery.map_err(|err| BrokerError::from_lapin("receiving", &self.url, err))?;
        Ok(Inbound {
            tag: delivery.delivery_tag,
            routing_key: delivery.routing_key.into(),
            redelivered: delivery.redelivered,
            requeued: false,
            body: delivery.data,
        })
    }

    /// Settles a batch after its commit: dead letters first, one by one,
    /// then one ack for the rest, because an ack with `multiple` settles
    /// every earlier delivery still open. Messages to try again are not in
    /// `batch`: the terminal holds them.
    pub(crate) async fn settle(
        &mut self,
        batch: &[Inbound],
        outcomes: &[Outcome],
    ) -> Result<(), BrokerError> {
        let mut ack_through = None;
        let mut pending = Vec::new();
        for (inbound, outcome) in batch.iter().zip(outcomes) {
            if let Outcome::DeadLetter { reason, .. } = outcome {
                if !self.reasons_in_dead_letters {
                    self.nack(inbound.tag, false).await?;
                    continue;
                }
                match self.publish_dead_letter(inbound, reason).await {
                    Ok(confirm) => pending.push((inbound, confirm)),
                    Err(err) => {
                        events::dead_letter_fallback(&err.to_string());
                        self.nack(inbound.tag, false).await?;
                    }
                }
            }
        }
        let mut dead_lettered = std::collections::HashSet::new();
        for (inbound, confirm) in pending {
            let confirmed = connection::within(
                self.timeout_secs,
                "dead-lettering a message",
                &self.url,
                confirm,
            )
            .await;
            match confirmed {
                Ok(confirmation) if confirmation.is_ack() => {
                    dead_lettered.insert(inbound.tag);
                }
                Ok(_) => {
                    events::dead_letter_fallback("the broker refused the dead letter");
                    self.nack(inbound.tag, false).await?;
                }
                Err(err) => {
                    events::dead_letter_fallback(&err.to_string());
                    self.nack(inbound.tag, false).await?;
                }
            }
        }
        for (inbound, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::DeadLetter { .. } if !dead_lettered.contains(&inbound.tag) => {}
                _ => ack_through = Some(inbound.tag),
            }
        }
        if let Some(tag) = ack_through {
            connection::within(
                self.timeout_secs,
                "acknowledging",
                &self.url,
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple: true }),
            )
            .await?;
        }
        Ok(())
    }

    async fn nack(&self, tag: u64, requeue: bool) -> Result<(), BrokerError> {
        connection::within(
            self.timeout_secs,
            "rejecting",
            &self.url,
            self.channel.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue,
                },
            ),
        )
        .await
    }

    async fn publish_dead_letter(
        &self,
        inbound: &Inbound,
        reason: &str,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-possync-reason".into(),
            AMQPValue::LongString(header_text(reason).into()),
        );
        headers.insert(
            "x-possync-routing-key".into(),
            AMQPValue::LongString(inbound.routing_key.as_str().into()),
        );
        headers.insert(
            "x-possync-queue".into(),
            AMQPValue::LongString(self.topology.queue.as_str().into()),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_headers(headers);
        connection::within(
            self.timeout_secs,
            "dead-lettering a message",
            &self.url,
            self.dead_letters.basic_publish(
                self.topology.dead_letter_exchange.as_str().into(),
                self.topology.dead_letter_queue.as_str().into(),
                BasicPublishOptions::default(),
                &inbound.body,
                properties,
            ),
        )
        .await
    }

    /// Stops consuming and closes the connection; unacknowledged messages
    /// return to the queue.
    pub(crate) async fn close(self) {
        let timeout = self.timeout_secs;
        let tag = self.consumer.tag();
        let _ = connection::within(
            timeout,
            "cancelling the consumer",
            &self.url,
            self.channel
                .basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
        let _ = connection::within(
            timeout,
            "closing the connection",
            &self.url,
            self.connection.close(200, "terminal stopping".into()),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_dead_letters_reason_header_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_HEADER_BYTES);
        let cut = header_text(&long);
        assert!(cut.len() <= MAX_REASON_HEADER_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(header_text("short"), "short");
    }

    /// A session on `address` whose consumer stops being delivered to
    /// `matures_in` from now (past when negative).
    fn lost(address: &str, matures_in: i64) -> LostSession {
        let now = std::time::Instant::now();
        let by = Duration::from_secs(matures_in.unsigned_abs());
        LostSession {
            address: address.into(),
            matures: if matures_in >= 0 {
                now + by
            } else {
                now.checked_sub(by).unwrap_or(now)
            },
        }
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        address
    }

    #[tokio::test]
    async fn a_down_nodes_consumer_is_expected_only_once_it_can_no_longer_be_delivered_to() {
        let down = closed_port();
        let url = "amqp://guest:guest@127.0.0.1:1/%2f";
        let mut sessions = vec![lost(&down, 30)];
        let ghosts = Ghosts::after_losing(&mut sessions, url).await;
        assert_eq!(ghosts.expected, 0, "the broker may still deliver to it");
        let waiting = ghosts.waiting.clone().expect("waiting on it");
        assert_eq!((waiting.count, waiting.node.as_str()), (1, down.as_str()));
        let mut sessions = vec![lost(&down, -1)];
        let ghosts = Ghosts::after_losing(&mut sessions, url).await;
        assert_eq!((ghosts.expected, ghosts.waiting), (1, None));
        assert_eq!(sessions.len(), 1, "kept while its node is down");
    }

    #[tokio::test]
    async fn a_refusal_a_lost_session_explains_says_how_long_and_one_it_does_not_blames_a_twin() {
        let down = closed_port();
        let url = "amqp://guest:guest@127.0.0.1:1/%2f";
        let topology = TerminalTopology::new(
            &crate::Config::default(),
            &crate::LicenseKey::new("ghosts").expect("key"),
            &crate::TerminalId::new("till-1").expect("id"),
        );
        let mut sessions = vec![lost(&down, 30)];
        let ghosts = Ghosts::after_losing(&mut sessions, url).await;
        match ghosts.refusal(Some(1), &topology) {
            BrokerError::LostNodeConsumer { node, seconds } => {
                assert_eq!(node, down);
                assert!((29..=31).contains(&seconds), "{seconds}");
            }
            other => panic!("{other}"),
        }
        assert!(matches!(
            ghosts.refusal(Some(2), &topology),
            BrokerError::AlreadyRunning { .. }
        ));
    }

    #[tokio::test]
    async fn a_node_that_answers_again_holds_no_consumer_and_is_forgotten() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up = listener.local_addr().expect("address").to_string();
        let mut sessions = vec![lost(&up, -1)];
        let url = "amqp://guest:guest@127.0.0.1:1/%2f";
        let ghosts = Ghosts::after_losing(&mut sessions, url).await;
        assert_eq!(ghosts, Ghosts::default());
        assert!(sessions.is_empty());
    }

    fn matures_in(session: &LostSession) -> Duration {
        session
            .matures
            .saturating_duration_since(std::time::Instant::now())
    }

    #[test]
    fn a_lost_consumer_is_waited_for_until_the_cluster_noticed_and_the_node_dropped_it() {
        let url = "amqp://guest:guest@10.0.0.1:5672/%2f";
        let silent = BrokerError::Protocol {
            during: "receiving",
            source: lapin::ErrorKind::MissingHeartbeatError.into(),
        };
        let noticed = Duration::from_secs(15);
        // Last heard two heartbeats ago, perhaps alive one more: 15 + 5 - 10.
        let session = LostSession::now(url, &silent, 5, noticed).expect("an address");
        assert!(
            (9..=10).contains(&matures_in(&session).as_secs()),
            "{session:?}"
        );
        // A node alive on the other side of a broken link drops the
        // connection three heartbeats after it last heard the till, at
        // most a heartbeat after the till last heard it: 4 × 60 - 120.
        let session = LostSession::now(url, &silent, 60, noticed).expect("an address");
        assert!(
            (119..=120).contains(&matures_in(&session).as_secs()),
            "{session:?}"
        );
        // A connection that ended now: 15, or three heartbeats.
        let reset =
            LostSession::now(url, &BrokerError::ConnectionLost, 5, noticed).expect("an address");
        assert!((14..=15).contains(&matures_in(&reset).as_secs()));
        let reset =
            LostSession::now(url, &BrokerError::ConnectionLost, 10, noticed).expect("an address");
        assert!((29..=30).contains(&matures_in(&reset).as_secs()));
        let without = LostSession::now(url, &silent, 0, noticed).expect("an address");
        assert!((14..=15).contains(&matures_in(&without).as_secs()));
        assert!(LostSession::is_lost_node(
            &[reset],
            "amqp://u:p@10.0.0.1:5672/x"
        ));
    }

    #[tokio::test]
    async fn the_node_connected_to_now_is_not_counted() {
        let down = closed_port();
        let url = format!("amqp://guest:guest@{down}/%2f");
        let mut sessions = vec![lost(&down, -1)];
        let ghosts = Ghosts::after_losing(&mut sessions, &url).await;
        assert_eq!(ghosts, Ghosts::default());
    }
}
