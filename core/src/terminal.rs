//! A terminal: keeps one store's catalog in the local database, live.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::applier::{Applied, Applier, ApplierHandle, Limits};
use crate::config::{Config, ConfigError};
use crate::connection::BrokerError;
use crate::consumer::{Inbox, Subscription};
use crate::dispatch::Outcome;
use crate::events;
use crate::in_process::InProcessBroker;
use crate::inbound::Inbound;
use crate::redact::redact_url;
use crate::registry::{Registry, RegistryError};
use crate::status::{State, Status, StatusSender};
use crate::store::{Database, DatabaseError, StateRecord, unix_now_ms};
use crate::topology::TerminalTopology;

/// A terminal that could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// The configuration is incomplete or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `[plugins]` is wrong.
    #[error(transparent)]
    Plugins(#[from] RegistryError),
    /// The database cannot be used.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// The broker refused this terminal; retrying will not help.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The status endpoint cannot listen.
    #[error("cannot serve the status page on {address}: {source}; change [status] port or address")]
    StatusListen {
        /// Where it tried.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The apply thread could not start.
    #[error("cannot start the apply thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// One terminal of one store, ready to run.
#[derive(Debug)]
pub struct Terminal {
    config: Config,
    topology: TerminalTopology,
    registry: Arc<Registry>,
    database: Database,
    connection_name: String,
    status: StatusSender,
}

/// How often a connected terminal renews its dead-letter queue's lease:
/// well within the shortest expiry (one day).
const RENEW_DEAD_LETTER_QUEUE_EVERY: Duration = Duration::from_secs(3600);

/// How often a live terminal counts the messages waiting in its queue.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(5);

/// How long a terminal that has not been live yet keeps trying while another
/// consumer holds its queue, before it gives up: three of RabbitMQ's default
/// 60 s heartbeats, after which the broker has dropped a dead connection.
const ALREADY_RUNNING_GRACE: Duration = Duration::from_secs(180);

/// What the status shows as the broker of an in-process terminal.
const IN_PROCESS: &str = "in-process (no broker)";

/// Where a terminal takes its messages from.
#[derive(Clone, Copy)]
enum Transport<'a> {
    Broker,
    InProcess(&'a InProcessBroker),
}

enum SessionEnd {
    /// Shutdown was asked for; the session settled everything and closed.
    Stopped,
    /// The connection failed; reconnect.
    Lost(BrokerError),
}

impl Terminal {
    /// Checks the config, opens the database and runs the plugins' migrations.
    pub fn new(config: Config, registry: Registry) -> Result<Self, TerminalError> {
        let license_key = config.license_key()?.clone();
        let terminal_id = config.terminal_id()?.clone();
        let topology = TerminalTopology::new(&config, &license_key, &terminal_id);
        let mut database = Database::open(&config.terminal.database)?;
        let ran = database.migrate(registry.migrations().iter())?;
        events::migrations_ran(&ran);
        if let Err(err) =
            database.prune_applied(i64::from(config.terminal.queue_expiry_days) * 24 * 3600)
        {
            events::startup_prune_failed(&err.to_string());
        }
        database.wait_briefly_for_locks()?;
        let (status, _) = StatusSender::new();
        Ok(Self {
            status,
            connection_name: format!("possync terminal {terminal_id} of {license_key}"),
            config,
            topology,
            registry: Arc::new(registry),
            database,
        })
    }

    /// Follows the terminal's state and counters while it runs.
    pub fn status(&self) -> tokio::sync::watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The broker objects this terminal uses.
    pub fn topology(&self) -> &TerminalTopology {
        &self.topology
    }

    /// Runs until `shutdown` completes, reconnecting whenever the broker goes
    /// away (trying each of `broker.url` in turn). On shutdown it stops taking
    /// messages, commits and acknowledges what it applied, and closes the
    /// connection.
    ///
    /// Fails at once if the broker refuses the terminal before it was ever
    /// live (wrong credentials, a conflicting queue): that needs an operator.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TerminalError> {
        self.run_on(Transport::Broker, shutdown).await
    }

    /// Runs as [`Terminal::run`] does, but on a queue of an in-process
    /// `broker` instead of RabbitMQ: for the demo on a machine without a
    /// broker, and for unit tests of handlers. Messages live in memory only.
    pub async fn run_in_process(
        self,
        broker: &InProcessBroker,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), TerminalError> {
        self.run_on(Transport::InProcess(broker), shutdown).await
    }

    async fn run_on(
        self,
        transport: Transport<'_>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), TerminalError> {
        let Self {
            config,
            topology,
            registry,
            database,
            connection_name,
            status,
        } = self;
        let identity = (
            config.license_key()?.to_string(),
            config.terminal_id()?.to_string(),
        );
        let plugins = registry.plugins();
        let mut server = None;
        let applier = ApplierHandle::spawn(Applier::new(
            database,
            registry,
            config.license_key()?.clone(),
            Limits::of(&config.terminal),
        ))?;
        if config.status.enabled {
            let address = std::net::SocketAddr::new(config.status.address, config.status.port);
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| TerminalError::StatusListen { address, source })?;
            events::status_page(&address.to_string());
            let view = crate::status_server::StatusView {
                status: status.subscribe(),
                license_key: identity.0.clone(),
                terminal_id: identity.1.clone(),
                database: config.terminal.database.clone(),
                plugins,
            };
            let endpoint = crate::status_server::StatusServer::new(
                listener,
                view,
                &config.status.allowed_hosts,
                crate::status_server::Limits::default(),
            )
            .map_err(|source| TerminalError::StatusListen { address, source })?;
            server = Some(tokio::spawn(endpoint.run()));
        }
        let reporter = Reporter {
            applier: &applier,
            status: &status,
            identity,
        };
        reporter.set(State::Connecting, None).await;
        let mut shutdown = pin!(shutdown);
        let urls = &config.broker.urls;
        let mut attempt: u32 = 0;
        let mut failures: u32 = 0;
        let mut ever_live = false;
        let mut twin_since: Option<Instant> = None;
        let mut offline_since = SystemTime::now();
        let result = loop {
            let url = match transport {
                Transport::Broker => urls[attempt as usize % urls.len()].as_str(),
                Transport::InProcess(_) => IN_PROCESS,
            };
            attempt = attempt.wrapping_add(1);
            events::connecting(&redact_url(url), failures + 1);
            let opened = tokio::select! {
                () = &mut shutdown => break Ok(()),
                opened = open(transport, &config, url, &topology, &connection_name) => opened,
            };
            let reason = match opened {
                Ok(subscription) => {
                    ever_live = true;
                    failures = 0;
                    events::live(&redact_url(url), &topology.queue, &topology.binding_key);
                    reporter
                        .set(
                            State::Live {
                                since: SystemTime::now(),
                            },
                            Some(url),
                        )
                        .await;
                    match consume(
                        subscription,
                        &applier,
                        &reporter,
                        config.terminal.batch_size,
                        &mut shutdown,
                    )
                    .await
                    {
                        SessionEnd::Stopped => break Ok(()),
                        SessionEnd::Lost(err) => err,
                    }
                }
                Err(err @ BrokerError::AlreadyRunning { .. }) if !ever_live => {
                    // The other consumer may be this till before a power cut,
                    // which the broker drops only when its heartbeats stop.
                    let refused_since = *twin_since.get_or_insert_with(Instant::now);
                    if refused_since.elapsed() >= ALREADY_RUNNING_GRACE {
                        break Err(err.into());
                    }
                    err
                }
                Err(err) if err.needs_operator() && !ever_live => break Err(err.into()),
                Err(err) => err,
            };
            failures += 1;
            status.set_queue_depth(None);
            let delay = crate::backoff::RECONNECT.delay(failures);
            let reason = reason.to_string();
            events::offline(&reason, delay.as_millis(), failures == 1);
            if failures == 1 {
                offline_since = SystemTime::now();
            }
            // The latest reason is what an operator needs (why it cannot
            // reconnect); `since` stays at the first failure.
            reporter
                .set(
                    State::Offline {
                        since: offline_since,
                        reason,
                    },
                    Some(url),
                )
                .await;
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        };
        reporter.set(State::Stopped, None).await;
        if let Some(server) = server {
            server.abort();
        }
        applier.shutdown();
        if result.is_ok() {
            events::stopped();
        }
        result
    }
}

/// Publishes state changes to watchers and to the database.
struct Reporter<'a> {
    applier: &'a ApplierHandle,
    status: &'a StatusSender,
    identity: (String, String),
}

impl Reporter<'_> {
    async fn set(&self, state: State, broker: Option<&str>) {
        let since_ms = state
            .since()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(unix_now_ms, |d| {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            });
        // Watchers first: recording waits for the database, which may be
        // the very thing that is stuck.
        self.status.set_state(state.clone());
        self.applier
            .record_state(StateRecord {
                license_key: self.identity.0.clone(),
                terminal_id: self.identity.1.clone(),
                state: state.name(),
                since_ms,
                reason: state.reason().map(str::to_owned),
                broker: broker.map(redact_url),
            })
            .await;
    }
}

async fn open(
    transport: Transport<'_>,
    config: &Config,
    url: &str,
    topology: &TerminalTopology,
    connection_name: &str,
) -> Result<Inbox, BrokerError> {
    match transport {
        Transport::Broker => {
            let prefetch = config.terminal.prefetch;
            Subscription::open(&config.broker, url, topology, prefetch, connection_name)
                .await
                .map(|subscription| Inbox::Broker(Box::new(subscription)))
        }
        Transport::InProcess(broker) => Ok(Inbox::InProcess(broker.subscribe(topology))),
    }
}

/// Receives, applies and settles batches until shutdown or connection loss.
///
/// A batch the database refuses (locked, full) is held and tried again in
/// place, never handed back to the broker: that would reorder it and count
/// against the queue's delivery limit. A message whose handler fails for
/// now is held the same way, with the messages behind it.
async fn consume(
    mut subscription: Inbox,
    applier: &ApplierHandle,
    reporter: &Reporter<'_>,
    batch_size: usize,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> SessionEnd {
    let status = reporter.status;
    let mut depth_due = tokio::time::Instant::now();
    // Renewed at once too: a provisioned terminal declares nothing on
    // connecting, and its sessions may be short.
    let mut renew_due = tokio::time::Instant::now();
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
            while batch.len() < batch_size {
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
            Ok(Applied { outcomes, tally }) => {
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
                status.count(&tally);
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
