//! A terminal: keeps one store's catalog in the local database, live. This
//! is its lifecycle (open the database, connect and declare the topology,
//! start, reconnect, stop); consuming is the consumer's.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::applier::{Applier, ApplierHandle, Limits};
use crate::config::{Config, TerminalSettings};
use crate::connection::BrokerError;
use crate::consumer::{Ghosts, Inbox, LostSession, SessionEnd, Subscription, consume};
use crate::events;
use crate::gap::{AppliedMark, Gap, GapCause};
use crate::in_process::InProcessBroker;
use crate::redact::redact_url;
use crate::registry::{Registry, RegistryError};
use crate::status::{Reporter, State, Status, StatusSender};
use crate::store::{Database, DatabaseError, unix_now_ms};
use crate::topology::TerminalTopology;

/// A terminal that could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
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
    settings: TerminalSettings,
    topology: TerminalTopology,
    registry: Arc<Registry>,
    database: Database,
    connection_name: String,
    status: StatusSender,
}

/// How long a terminal that has not been live yet keeps trying while another
/// consumer holds its queue, before it gives up: three of RabbitMQ's default
/// 60 s heartbeats, after which the broker has dropped a dead connection.
const ALREADY_RUNNING_GRACE: Duration = Duration::from_secs(180);

/// How long a stopping terminal waits for its uplink's last receipt.
const UPLINK_STOP: Duration = Duration::from_secs(3);

/// The wait after failing to reach a cluster node this terminal lost its
/// session on: the other nodes are tried next, at once.
const LOST_NODE_RETRY: Duration = Duration::from_millis(250);

/// What the status shows as the broker of an in-process terminal.
const IN_PROCESS: &str = "in-process (no broker)";

/// Where a terminal takes its messages from.
#[derive(Clone, Copy)]
enum Transport<'a> {
    Broker,
    InProcess(&'a InProcessBroker),
}

impl Terminal {
    /// Opens the database and runs the plugins' migrations.
    pub fn new(settings: TerminalSettings, registry: Registry) -> Result<Self, TerminalError> {
        let config = settings.config();
        let (license_key, terminal_id) = (settings.license_key(), settings.terminal_id());
        let topology = TerminalTopology::new(config, license_key, terminal_id);
        let mut database = Database::open(&config.terminal.database)?;
        let ran = database.migrate(registry.migrations().iter())?;
        events::migrations_ran(&ran);
        if let Err(err) =
            database.prune_applied(i64::from(config.terminal.queue_expiry_days) * 24 * 3600)
        {
            events::startup_prune_failed(&err.to_string());
        }
        database.wait_briefly_for_locks()?;
        let mut sync = database.sync_state(license_key.as_str())?;
        let mark = AppliedMark::beside(database.path(), license_key.as_str());
        if sync.gap.is_none_or(|gap| gap.cause.closes_when_filled())
            && let Some(gap) = mark.check(license_key.as_str(), &sync, unix_now_ms())
        {
            sync = database.record_gap(license_key.as_str(), &gap)?;
            events::gap_found(&gap.cause);
        }
        let (status, _) = StatusSender::new(sync);
        Ok(Self {
            status,
            connection_name: format!("possync terminal {terminal_id} of {license_key}"),
            topology,
            registry: Arc::new(registry),
            database,
            settings,
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
            settings,
            topology,
            registry,
            database,
            connection_name,
            status,
        } = self;
        // Read before anything applies: a first start asks for a snapshot
        // only into an empty database.
        let empty_at_start = database.holds_no_catalog().unwrap_or(false);
        let config = settings.config();
        let identity = (
            settings.license_key().to_string(),
            settings.terminal_id().to_string(),
        );
        let plugins = registry.plugins();
        let uplink_registry = Arc::clone(&registry);
        // Snapshots are asked for over the terminal's upstream identity.
        let snapshots = config
            .uplink
            .enabled
            .then(|| crate::snapshot::SnapshotContext {
                license_key: settings.license_key().clone(),
                terminal_id: settings.terminal_id().clone(),
                registry: Arc::clone(&registry),
                database: config.terminal.database.clone(),
                empty_at_start,
            });
        let mut server = None;
        let feed = crate::feed::channel();
        let applier = Applier::new(
            database,
            registry,
            settings.license_key().clone(),
            Limits::of(&config.terminal),
            feed.clone(),
        );
        let verify_turn = applier.verify_turn();
        let applier = ApplierHandle::spawn(applier)?;
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
                feed,
                feed_on: config.terminal.feed_keep > 0,
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
        let (stop_uplink, uplink_stop) = tokio::sync::watch::channel(false);
        let uplink = (matches!(transport, Transport::Broker) && config.uplink.enabled).then(|| {
            tokio::spawn(
                crate::uplink::Uplink {
                    broker: config.broker.clone(),
                    config: config.uplink.clone(),
                    license_key: settings.license_key().clone(),
                    terminal_id: settings.terminal_id().clone(),
                    database: config.terminal.database.clone(),
                    status: status.subscribe(),
                    max_message_bytes: config.uplink.max_message_bytes,
                    quarantine_max_rows: config.terminal.quarantine_max_rows,
                    registry: uplink_registry,
                }
                .run(uplink_stop),
            )
        });
        let reporter = Reporter::new(&applier, &status, identity);
        reporter.set(State::Connecting, None).await;
        let mut shutdown = pin!(shutdown);
        let urls = &config.broker.urls;
        let mut attempt: u32 = 0;
        let mut failures: u32 = 0;
        let mut ever_live = false;
        let mut twin_since: Option<Instant> = None;
        let mut offline_since = SystemTime::now();
        // Sessions that were Live and got lost: each may have left a
        // consumer on a node that is down since.
        let mut lost: Vec<LostSession> = Vec::new();
        let node_down_after = Duration::from_secs(config.broker.node_down_after_secs);
        let result = loop {
            let url = match transport {
                Transport::Broker => urls[attempt as usize % urls.len()].as_str(),
                Transport::InProcess(_) => IN_PROCESS,
            };
            attempt = attempt.wrapping_add(1);
            events::connecting(&redact_url(url), failures + 1);
            let opened = tokio::select! {
                () = &mut shutdown => break Ok(()),
                opened = async {
                    let ghosts = Ghosts::after_losing(&mut lost, url).await;
                    open(transport, config, url, &topology, &connection_name, ghosts).await
                } => opened,
            };
            let reason = match opened {
                Ok(subscription) => {
                    ever_live = true;
                    failures = 0;
                    if subscription.alone() {
                        lost.clear();
                    }
                    let heartbeat = subscription.heartbeat();
                    let sync = status.subscribe().borrow().sync.clone();
                    // Made again while this terminal had followed its store:
                    // what was published meanwhile never reached it.
                    if subscription.queue_created() && sync.catalog.is_some() {
                        let gap = Gap {
                            cause: GapCause::QueueRecreated,
                            since_ms: unix_now_ms(),
                        };
                        if let Some(sync) = applier.record_gap(gap).await {
                            status.set_sync(sync);
                        }
                    }
                    reporter
                        .set(
                            State::Live {
                                since: SystemTime::now(),
                            },
                            Some(url),
                        )
                        .await;
                    // After the record: `possync status` run on this line says Live.
                    events::live(&redact_url(url), &topology.queue, &topology.binding_key);
                    match consume(
                        subscription,
                        &applier,
                        &reporter,
                        config.terminal.batch_size,
                        snapshots.as_ref(),
                        &verify_turn,
                        &mut shutdown,
                    )
                    .await
                    {
                        SessionEnd::Stopped => break Ok(()),
                        SessionEnd::Lost(err) => {
                            if let Some(session) =
                                LostSession::now(url, &err, heartbeat, node_down_after)
                            {
                                lost.retain(|known| known.address != session.address);
                                lost.push(session);
                            }
                            err
                        }
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
            let mut delay = crate::backoff::RECONNECT.delay(failures);
            if let Some(matures) = LostSession::next_maturing(&lost) {
                let until = matures.saturating_duration_since(Instant::now());
                delay = delay.min(until + Duration::from_millis(100));
            }
            // Another node may take this terminal now; with every node lost,
            // the usual backoff.
            if LostSession::is_lost_node(&lost, url)
                && urls
                    .iter()
                    .any(|other| !LostSession::is_lost_node(&lost, other))
            {
                delay = delay.min(LOST_NODE_RETRY);
            }
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
        let _ = stop_uplink.send(true);
        if let Some(mut uplink) = uplink {
            // Its last receipt says the terminal stops; bounded, as the
            // broker may be gone, and gone with the terminal either way.
            if tokio::time::timeout(UPLINK_STOP, &mut uplink)
                .await
                .is_err()
            {
                uplink.abort();
                let _ = uplink.await;
            }
        }
        if let Some(server) = server {
            server.abort();
            // Gone with its port and its connections before this returns: a
            // terminal started again in this process binds the same port.
            let _ = server.await;
        }
        applier.shutdown();
        if result.is_ok() {
            events::stopped();
        }
        result
    }
}

async fn open(
    transport: Transport<'_>,
    config: &Config,
    url: &str,
    topology: &TerminalTopology,
    connection_name: &str,
    ghosts: Ghosts,
) -> Result<Inbox, BrokerError> {
    match transport {
        Transport::Broker => {
            let prefetch = config.terminal.prefetch;
            Subscription::open(
                &config.broker,
                url,
                topology,
                prefetch,
                connection_name,
                ghosts,
            )
            .await
            .map(|subscription| Inbox::Broker(Box::new(subscription)))
        }
        Transport::InProcess(broker) => Ok(Inbox::InProcess(broker.subscribe(topology))),
    }
}
