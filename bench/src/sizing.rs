//! `sizing`: what idle terminals cost RabbitMQ, object by object, on one
//! node and on a cluster of three, and how fast one terminal drains a
//! backlog with thousands of other terminals' queues on the node.
//!
//! Runs only when named (`--only sizing`). It needs root: it starts its own
//! brokers with `possync-rabbitmq-cluster` (one node in slot 2, three in
//! slot 1, a fresh broker for each count of terminals) and leaves the
//! machine's own broker alone.
//!
//! Each terminal's footprint is built with lapin directly, with the names
//! of [`TerminalTopology`] and the arguments its declare uses, one step at
//! a time; after each step the broker settles, every Erlang process is
//! garbage collected, and the sum over the nodes of the VM's resident
//! memory, open files and `erlang:memory(total)` is read.
//!
//! Environment: `POSSYNC_SIZING_TERMINALS` (default `1000,3000`),
//! `POSSYNC_SIZING_NODES` (`1,3`), `POSSYNC_SIZING_DRAIN` (changes in each
//! drain, `20000`; `0` skips the drains), `POSSYNC_SIZING_DRAIN_ROUNDS`
//! (`2`), `POSSYNC_SIZING_QUORUM_SECONDS` (the most a step declaring
//! quorum queues may take, `300`).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use possync_core::{Config, Delivery, QueueType, TerminalId, TerminalTopology};
use possync_rabbitmq_cluster::{Cluster, Slot};

use crate::workload::{self, Format, in_turn, license};
use crate::{Stopwatch, baseline, possync_side, progress};

/// Broker operations in flight at once while building footprints.
const IN_FLIGHT: usize = 50;
/// How long the broker is left alone before a reading.
const SETTLE: Duration = Duration::from_secs(2);
/// The frame size a terminal asks for (`connection::TERMINAL_FRAME_MAX`).
const FRAME_MAX: &str = "frame_max=16384";
/// Forces a full collection in every process, then reports the VM's memory.
const COLLECT_AND_COUNT: &str = "[garbage_collect(P) || P <- processes()], erlang:memory(total).";

/// What the sizing scenario is asked to do.
struct Plan {
    terminals: Vec<usize>,
    nodes: Vec<usize>,
    drain: usize,
    drain_rounds: usize,
    quorum_budget: Duration,
}

impl Plan {
    fn from_env() -> Self {
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            std::env::var(name)
                .ok()
                .map(|text| {
                    text.split(',')
                        .filter_map(|n| n.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_else(|| default.to_vec())
        };
        let number = |name: &str, default: usize| -> usize {
            std::env::var(name)
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(default)
        };
        Self {
            terminals: list("POSSYNC_SIZING_TERMINALS", &[1000, 3000]),
            nodes: list("POSSYNC_SIZING_NODES", &[1, 3]),
            drain: number("POSSYNC_SIZING_DRAIN", 20_000),
            drain_rounds: number("POSSYNC_SIZING_DRAIN_ROUNDS", 2).max(1),
            quorum_budget: Duration::from_secs(number("POSSYNC_SIZING_QUORUM_SECONDS", 300) as u64),
        }
    }
}

/// The brokers' resources at one moment, summed over the nodes.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    resident: i64,
    open_files: i64,
    erlang: i64,
}

/// One step of building footprints, and the broker after it.
struct Step {
    label: String,
    /// What one object of this step is, for the summary; empty for steps
    /// that remove things.
    object: &'static str,
    objects: usize,
    took: Duration,
    reading: Reading,
}

/// One run: one broker, one count of terminals.
struct Run {
    nodes: usize,
    terminals: usize,
    steps: Vec<Step>,
    notes: Vec<String>,
}

/// One drain measured: possync's terminal and the broker alone.
struct Drained {
    footprints: String,
    queue_type: QueueType,
    possync: Vec<f64>,
    broker: Vec<f64>,
}

/// The objects one terminal holds on the broker, as a real one shows them.
struct Held {
    connections: usize,
    channels: usize,
    /// Channels on the connection with the most.
    busiest: usize,
    listing: String,
}

/// One terminal's objects on the broker, built by hand.
struct Footprint {
    topology: TerminalTopology,
    /// The node its connections go to.
    node: usize,
    connection: Connection,
    /// Declares, then consumes.
    channel: Channel,
    extra: Vec<Channel>,
    consumer: Option<lapin::Consumer>,
    uplink: Option<(Connection, Channel)>,
}

pub(crate) async fn run(dir: &Path) -> anyhow::Result<()> {
    let plan = Plan::from_env();
    let mut runs = Vec::new();
    let mut drains = Vec::new();
    let mut held = None;
    for &nodes in &plan.nodes {
        for &terminals in &plan.terminals {
            match one_run(&plan, dir, nodes, terminals, &mut held, &mut drains).await {
                Ok(run) => {
                    eprintln!("{}", run_table(&run));
                    runs.push(run);
                }
                Err(err) => progress(&format!(
                    "sizing, {nodes} node(s), {terminals} terminals: failed: {err:#}"
                )),
            }
        }
    }
    println!("{}", report(&runs, &drains, held.as_ref()));
    Ok(())
}

async fn one_run(
    plan: &Plan,
    dir: &Path,
    nodes: usize,
    terminals: usize,
    held: &mut Option<Held>,
    drains: &mut Vec<Drained>,
) -> anyhow::Result<Run> {
    let slot = if nodes == 1 { 2 } else { 1 };
    progress(&format!(
        "sizing: starting {nodes} RabbitMQ node(s) in slot {slot}"
    ));
    let started = Instant::now();
    let cluster = Arc::new(blocking(move || Cluster::start_in(Slot::new(slot), nodes)).await??);
    progress(&format!(
        "sizing: {nodes} node(s) up in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let result = build(plan, dir, &cluster, terminals, held, drains).await;
    // Dropping the cluster kills its nodes and removes its network.
    blocking(move || drop(cluster)).await?;
    result
}

async fn build(
    plan: &Plan,
    dir: &Path,
    cluster: &Arc<Cluster>,
    terminals: usize,
    held: &mut Option<Held>,
    drains: &mut Vec<Drained>,
) -> anyhow::Result<Run> {
    let nodes = cluster.nodes().len();
    let urls = cluster.urls(FRAME_MAX);
    let mut run = Run {
        nodes,
        terminals,
        steps: Vec::new(),
        notes: Vec::new(),
    };
    // On one node only: `list_connections` on a cluster has the other
    // nodes answer the CLI directly, which they cannot reach here.
    if held.is_none() && nodes == 1 {
        let found = what_a_terminal_holds(cluster, dir).await?;
        progress(&format!(
            "sizing: a real terminal holds {} connection(s), {} channel(s)",
            found.connections, found.channels
        ));
        *held = Some(found);
    }
    let per_connection = held.as_ref().map_or(3, |h| h.busiest.max(1));
    let setup = workload::connect(&urls[0]).await?;
    declare_exchanges(&setup).await?;
    let drain_url = cluster.urls("")[0].clone();
    let drains_here = nodes == 1 && plan.drain > 0;
    if drains_here {
        for drained in [QueueType::Classic, QueueType::Quorum] {
            try_drain(plan, dir, &drain_url, "none", drained, &mut run, drains).await;
        }
    }
    let record = |run: &mut Run,
                  label: String,
                  object: &'static str,
                  objects: usize,
                  took: Duration,
                  reading: Reading| {
        progress(&format!(
            "sizing, {nodes} node(s), {terminals}: {label} in {:.1} s: RSS {} MiB, {} fds, Erlang {} MiB",
            took.as_secs_f64(),
            reading_mib(reading.resident),
            reading.open_files,
            reading_mib(reading.erlang)
        ));
        run.steps.push(Step {
            label,
            object,
            objects,
            took,
            reading,
        });
    };
    record(
        &mut run,
        "baseline (exchanges, a setup connection)".into(),
        "",
        0,
        Duration::ZERO,
        read(cluster).await?,
    );

    let clock = Instant::now();
    let mut footprints = open_connections(&urls, terminals).await?;
    let took = clock.elapsed();
    record(
        &mut run,
        format!("+ {terminals} connections, one channel each"),
        "connection (with its first channel)",
        terminals,
        took,
        read(cluster).await?,
    );

    let more = per_connection.saturating_sub(1);
    if more > 0 {
        let clock = Instant::now();
        let opened = bounded(&footprints, "channels", None, |footprint| async move {
            let mut channels = Vec::new();
            for _ in 0..more {
                channels.push(footprint.connection.create_channel().await?);
            }
            Ok(channels)
        })
        .await;
        for (footprint, channels) in footprints.iter_mut().zip(opened) {
            footprint.extra = channels.unwrap_or_default();
        }
        let took = clock.elapsed();
        record(
            &mut run,
            format!("+ {more} more channel(s) per connection (a terminal's {per_connection})"),
            "channel",
            terminals * more,
            took,
            read(cluster).await?,
        );
    }

    let clock = Instant::now();
    let uplinks = bounded(&footprints, "uplink connections", None, |footprint| {
        let url = urls[footprint.node].clone();
        async move {
            let connection = Connection::connect(
                &url,
                ConnectionProperties::default().with_connection_name("sizing uplink".into()),
            )
            .await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok((connection, channel))
        }
    })
    .await;
    let mut opened = 0;
    for (footprint, uplink) in footprints.iter_mut().zip(uplinks) {
        footprint.uplink = uplink;
        opened += usize::from(footprint.uplink.is_some());
    }
    let took = clock.elapsed();
    record(
        &mut run,
        format!("+ {opened} uplink connections, one confirming channel each"),
        "uplink connection (with its channel)",
        opened,
        took,
        read(cluster).await?,
    );

    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let kind = type_name(queue_type);
        let budget = (queue_type == QueueType::Quorum).then_some(plan.quorum_budget);
        for (which, object) in [
            (
                Which::Queue,
                if queue_type == QueueType::Classic {
                    "classic queue (with its binding)"
                } else {
                    "quorum queue (with its binding)"
                },
            ),
            (
                Which::DeadLetter,
                if queue_type == QueueType::Classic {
                    "classic dead-letter queue (with its binding)"
                } else {
                    "quorum dead-letter queue (with its binding)"
                },
            ),
        ] {
            let clock = Instant::now();
            let label = format!("{kind} {}", which.name());
            let done = bounded(&footprints, &label, budget, |footprint| async move {
                declare(footprint, queue_type, which).await
            })
            .await;
            let declared = done.iter().filter(|d| d.is_some()).count();
            let took = clock.elapsed();
            if declared < terminals {
                run.notes.push(format!(
                    "{declared} of {terminals} {label}s declared in {:.0} s (the rest {}).",
                    took.as_secs_f64(),
                    if budget.is_some_and(|b| took >= b) {
                        "not tried: out of time"
                    } else {
                        "refused or failed"
                    }
                ));
            }
            run.notes.push(format!(
                "{declared} {label}s declared in {:.1} s ({:.0}/s, {IN_FLIGHT} in flight).",
                took.as_secs_f64(),
                declared as f64 / took.as_secs_f64()
            ));
            record(
                &mut run,
                format!("+ {declared} {label}s"),
                object,
                declared,
                took,
                read(cluster).await?,
            );
        }
        let clock = Instant::now();
        let prefetch = Config::default().terminal.prefetch;
        let consumers = bounded(&footprints, "consumers", None, |footprint| async move {
            footprint
                .channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            footprint
                .channel
                .basic_consume(
                    footprint.topology.queue.as_str().into(),
                    "possync terminal".into(),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        })
        .await;
        let mut started = 0;
        for (footprint, consumer) in footprints.iter_mut().zip(consumers) {
            started += usize::from(consumer.is_some());
            footprint.consumer = consumer;
        }
        let took = clock.elapsed();
        record(
            &mut run,
            format!("+ {started} consumers on the {kind} queues"),
            if queue_type == QueueType::Classic {
                "consumer (classic queue)"
            } else {
                "consumer (quorum queue)"
            },
            started,
            took,
            read(cluster).await?,
        );
        if drains_here {
            let present = format!("{terminals} idle terminals, {kind} queues");
            for drained in [QueueType::Classic, QueueType::Quorum] {
                try_drain(plan, dir, &drain_url, &present, drained, &mut run, drains).await;
            }
        }
        if queue_type == QueueType::Classic {
            let clock = Instant::now();
            bounded(&footprints, "deleting", None, |footprint| async move {
                if let Some(consumer) = &footprint.consumer {
                    footprint
                        .channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await?;
                }
                for queue in [
                    &footprint.topology.queue,
                    &footprint.topology.dead_letter_queue,
                ] {
                    footprint
                        .channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await?;
                }
                Ok(())
            })
            .await;
            for footprint in &mut footprints {
                footprint.consumer = None;
            }
            let took = clock.elapsed();
            record(
                &mut run,
                "- the consumers and classic queues deleted".into(),
                "",
                0,
                took,
                read(cluster).await?,
            );
        }
    }
    // The broker goes with its cluster: nothing to delete.
    drop(footprints);
    workload::close([setup]).await;
    Ok(run)
}

/// Which of a terminal's queues.
#[derive(Debug, Clone, Copy)]
enum Which {
    Queue,
    DeadLetter,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::DeadLetter => "dead-letter queue",
        }
    }
}

fn type_name(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    }
}

/// `terminals` connections, round robin over `urls`, each with a channel.
async fn open_connections(urls: &[String], terminals: usize) -> anyhow::Result<Vec<Footprint>> {
    let mut config = Config::default();
    config.terminal.delivery = Delivery::Durable;
    let terminal_id = TerminalId::new("t1")?;
    let urls_len = urls.len();
    let mut opened = futures_util::stream::iter((0..terminals).map(|i| {
        let url = urls[i % urls.len()].clone();
        let topology = TerminalTopology::new(&config, &license("size"), &terminal_id);
        async move {
            let connection = Connection::connect(
                &url,
                ConnectionProperties::default().with_connection_name("sizing terminal".into()),
            )
            .await?;
            let channel = connection.create_channel().await?;
            anyhow::Ok((
                i,
                Footprint {
                    topology,
                    node: i % urls_len,
                    connection,
                    channel,
                    extra: Vec::new(),
                    consumer: None,
                    uplink: None,
                },
            ))
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    let mut footprints = Vec::with_capacity(terminals);
    while let Some(next) = opened.next().await {
        footprints.push(next?);
        if footprints.len() % 500 == 0 {
            progress(&format!(
                "sizing: {} of {terminals} connections",
                footprints.len()
            ));
        }
    }
    footprints.sort_by_key(|(i, _)| *i);
    Ok(footprints.into_iter().map(|(_, f)| f).collect())
}

/// Runs `operation` on every footprint, [`IN_FLIGHT`] at a time, starting
/// none after `budget`; each one's result, `None` for a failure (counted
/// and the first shown) or one not started.
async fn bounded<'a, T, F, Fut>(
    footprints: &'a [Footprint],
    what: &str,
    budget: Option<Duration>,
    operation: F,
) -> Vec<Option<T>>
where
    F: Fn(&'a Footprint) -> Fut,
    Fut: Future<Output = lapin::Result<T>> + 'a,
{
    let started = Instant::now();
    let total = footprints.len();
    let mut results: Vec<Option<T>> = (0..total).map(|_| None).collect();
    let operation = &operation;
    let mut running = futures_util::stream::iter(footprints.iter().enumerate().map(
        |(i, footprint)| async move {
            if budget.is_some_and(|b| started.elapsed() >= b) {
                return (i, None);
            }
            (i, Some(operation(footprint).await))
        },
    ))
    .buffer_unordered(IN_FLIGHT);
    let (mut done, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    let mut last_report = Instant::now();
    while let Some((i, outcome)) = running.next().await {
        match outcome {
            Some(Ok(value)) => {
                results[i] = Some(value);
                done += 1;
            }
            Some(Err(err)) => {
                if failed == 0 {
                    progress(&format!("sizing: {what}: {err}"));
                }
                failed += 1;
            }
            None => skipped += 1,
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            progress(&format!(
                "sizing: {what}: {done} of {total} after {:.0} s",
                started.elapsed().as_secs_f64()
            ));
        }
    }
    if failed > 0 || skipped > 0 {
        progress(&format!(
            "sizing: {what}: {done} done, {failed} failed, {skipped} not started (out of time)"
        ));
    }
    results
}

/// The terminal's two exchanges, as `TerminalTopology` declares them.
async fn declare_exchanges(connection: &Connection) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            workload::EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            format!("{}.dead_letter", workload::EXCHANGE)
                .as_str()
                .into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel.close(200, "declared".into()).await?;
    Ok(())
}

/// Declares and binds one of a terminal's queues with the arguments
/// `TerminalTopology` gives it (restated here: they are the crate's own).
async fn declare(footprint: &Footprint, queue_type: QueueType, which: Which) -> lapin::Result<()> {
    let topology = &footprint.topology;
    let expires = i64::try_from(topology.expires_ms).unwrap_or(i64::MAX);
    let mut arguments = FieldTable::default();
    let mut set = |key: &str, value: AMQPValue| {
        arguments.insert(key.into(), value);
    };
    let text = |value: &str| AMQPValue::LongString(value.into());
    let (queue, exchange, key) = match which {
        Which::Queue => {
            set(
                "x-dead-letter-exchange",
                text(&topology.dead_letter_exchange),
            );
            set(
                "x-dead-letter-routing-key",
                text(&topology.dead_letter_queue),
            );
            set("x-expires", AMQPValue::LongLongInt(expires));
            if queue_type == QueueType::Quorum {
                set("x-queue-type", text("quorum"));
                set(
                    "x-delivery-limit",
                    AMQPValue::LongLongInt(i64::from(topology.delivery_limit)),
                );
            }
            (&topology.queue, &topology.exchange, &topology.binding_key)
        }
        Which::DeadLetter => {
            set("x-message-ttl", AMQPValue::LongLongInt(expires));
            set("x-max-length", AMQPValue::LongLongInt(100_000));
            set("x-expires", AMQPValue::LongLongInt(expires));
            if queue_type == QueueType::Quorum {
                set("x-queue-type", text("quorum"));
            }
            (
                &topology.dead_letter_queue,
                &topology.dead_letter_exchange,
                &topology.dead_letter_queue,
            )
        }
    };
    let channel = &footprint.channel;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Starts one real terminal (the code `possync terminal` runs) on node 0,
/// lets it settle, and lists what it holds on the broker.
async fn what_a_terminal_holds(cluster: &Arc<Cluster>, dir: &Path) -> anyhow::Result<Held> {
    let url = cluster.urls("")[0].clone();
    let key = license("held");
    let config = possync_side::config(&url, dir, &key, "t1", QueueType::Classic, Delivery::Durable);
    let terminal = possync_side::start(config).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let listed = {
        let cluster = Arc::clone(cluster);
        blocking(
            move || -> anyhow::Result<(String, String, String, String)> {
                let ask = |args: &[&str]| cluster.rabbitmqctl(0, args);
                Ok((
                    ask(&["list_connections", "name", "channels", "-q"])?,
                    ask(&[
                        "list_channels",
                        "name",
                        "confirm",
                        "consumer_count",
                        "prefetch_count",
                        "-q",
                    ])?,
                    ask(&[
                        "list_queues",
                        "name",
                        "type",
                        "consumers",
                        "arguments",
                        "-q",
                    ])?,
                    ask(&[
                        "list_bindings",
                        "source_name",
                        "destination_name",
                        "routing_key",
                        "-q",
                    ])?,
                ))
            },
        )
        .await??
    };
    let connection = workload::connect(&url).await?;
    terminal.stop_and_delete(&connection).await?;
    workload::close([connection]).await;
    let (connections, channels, queues, bindings) = listed;
    let counts: Vec<usize> = connections
        .lines()
        .filter_map(|line| line.rsplit('\t').next()?.trim().parse().ok())
        .collect();
    Ok(Held {
        connections: counts.len(),
        channels: counts.iter().sum(),
        busiest: counts.iter().copied().max().unwrap_or(0),
        listing: format!(
            "connections (name, channels):\n{connections}\nchannels (name, confirm, consumers, prefetch):\n{channels}\nqueues (name, type, consumers, arguments):\n{queues}\nbindings (source, destination, key):\n{bindings}"
        ),
    })
}

/// The most a drain may take, its rounds together.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// [`drain`], bounded by [`DRAIN_TIMEOUT`]; a failure is noted in `run`
/// and the run goes on.
async fn try_drain(
    plan: &Plan,
    dir: &Path,
    url: &str,
    present: &str,
    queue_type: QueueType,
    run: &mut Run,
    drains: &mut Vec<Drained>,
) {
    let outcome = tokio::time::timeout(
        DRAIN_TIMEOUT,
        drain(plan, dir, url, present.to_owned(), queue_type),
    )
    .await;
    let failure = match outcome {
        Ok(Ok(drained)) => {
            drains.push(drained);
            return;
        }
        Ok(Err(err)) => format!("{err:#}"),
        Err(_) => format!("no end within {} s", DRAIN_TIMEOUT.as_secs()),
    };
    let note = format!(
        "The drain into a {} queue with {present} present failed: {failure}",
        type_name(queue_type)
    );
    progress(&format!("sizing: {note}"));
    run.notes.push(note);
}

/// A backlog of `plan.drain` changes drained by one possync terminal,
/// then received by a raw lapin consumer that applies nothing.
async fn drain(
    plan: &Plan,
    dir: &Path,
    url: &str,
    footprints: String,
    queue_type: QueueType,
) -> anyhow::Result<Drained> {
    let n = plan.drain;
    let connection = workload::connect(url).await?;
    let mut drained = Drained {
        footprints,
        queue_type,
        possync: Vec::new(),
        broker: Vec::new(),
    };
    for _ in 0..plan.drain_rounds {
        let key = license("sizing-drain");
        let mut config = possync_side::config(url, dir, &key, "t1", queue_type, Delivery::Durable);
        config.terminal.collapse_min_batch = 0;
        possync_side::start(config.clone()).await?.stop().await?;
        workload::publish_backlog(
            &connection,
            &config.broker,
            &key,
            n,
            Format::Original,
            in_turn,
        )
        .await?;
        let stopwatch = Stopwatch::start();
        let mut terminal = possync_side::start(config).await?;
        terminal.wait_applied(n as u64).await?;
        drained
            .possync
            .push(crate::rate(n, stopwatch.stop().elapsed));
        terminal.stop_and_delete(&connection).await?;

        let key = license("sizing-raw");
        let queue = format!("bench.sizing.{key}");
        baseline::declare(&connection, &queue, &key, crate::baseline_kind(queue_type)).await?;
        workload::publish_price_updates(&connection, &key, n, 1000).await?;
        let stopwatch = Stopwatch::start();
        baseline::receive_only(&connection, &queue, n).await?;
        drained
            .broker
            .push(crate::rate(n, stopwatch.stop().elapsed));
        workload::delete_queues(&connection, &[queue]).await;
    }
    workload::close([connection]).await;
    progress(&format!(
        "sizing: drain of {n} into a {} queue with {} present: possync {} msg/s, broker alone {} msg/s",
        type_name(queue_type),
        drained.footprints,
        rates(&drained.possync),
        rates(&drained.broker)
    ));
    Ok(drained)
}

/// Reads every node after letting the broker settle and collecting garbage.
async fn read(cluster: &Arc<Cluster>) -> anyhow::Result<Reading> {
    tokio::time::sleep(SETTLE).await;
    let cluster = Arc::clone(cluster);
    blocking(move || {
        let nodes = cluster.nodes().len();
        let erlang = std::thread::scope(|scope| {
            let asked: Vec<_> = (0..nodes)
                .map(|i| {
                    let cluster = &cluster;
                    scope.spawn(move || cluster.rabbitmqctl(i, &["eval", COLLECT_AND_COUNT]))
                })
                .collect();
            let mut total = 0i64;
            for asked in asked {
                let answer = asked
                    .join()
                    .map_err(|_| anyhow::anyhow!("rabbitmqctl eval panicked"))??;
                total += answer.trim().parse::<i64>().map_err(|err| {
                    anyhow::anyhow!("erlang:memory(total) answered {answer:?}: {err}")
                })?;
            }
            anyhow::Ok(total)
        })?;
        // The collector hands memory back to the allocators, not at once to the system.
        std::thread::sleep(Duration::from_millis(500));
        let mut reading = Reading {
            erlang,
            ..Reading::default()
        };
        for node in cluster.nodes() {
            reading.resident += node.resident_bytes().map_or(0, |b| b as i64);
            reading.open_files += node.open_files().map_or(0, |f| f as i64);
        }
        anyhow::Ok(reading)
    })
    .await?
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(work).await?)
}

fn reading_mib(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn rates(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn median(rates: &[f64]) -> f64 {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Per object: the growth over the step before, divided by the objects.
fn per_object(steps: &[Step], index: usize) -> Option<(f64, f64, f64)> {
    let step = &steps[index];
    if step.objects == 0 || index == 0 {
        return None;
    }
    let before = steps[index - 1].reading;
    let n = step.objects as f64;
    Some((
        (step.reading.resident - before.resident) as f64 / n,
        (step.reading.erlang - before.erlang) as f64 / n,
        (step.reading.open_files - before.open_files) as f64 / n,
    ))
}

/// What one terminal with `queue_type` queues costs: the growth of every
/// step that added one of its objects, over the terminals.
fn per_terminal(run: &Run, queue_type: QueueType) -> (f64, f64, f64) {
    let kind = type_name(queue_type);
    let mut total = (0.0, 0.0, 0.0);
    for (index, step) in run.steps.iter().enumerate() {
        let shared = step.object.starts_with("connection")
            || step.object.starts_with("channel")
            || step.object.starts_with("uplink");
        if !(shared || step.object.contains(kind)) {
            continue;
        }
        if let Some((rss, erlang, fds)) = per_object(&run.steps, index) {
            let n = step.objects as f64 / run.terminals as f64;
            total.0 += rss * n;
            total.1 += erlang * n;
            total.2 += fds * n;
        }
    }
    total
}

fn nodes_name(nodes: usize) -> String {
    if nodes == 1 {
        "one node".into()
    } else {
        format!("{nodes} nodes")
    }
}

fn run_table(run: &Run) -> String {
    let mut text = format!(
        "\n#### {}, {} terminals\n\n| step | took | RSS Σ MiB | Erlang Σ MiB | fds Σ | RSS / object | Erlang / object | fds / object |\n|---|---|---|---|---|---|---|---|\n",
        nodes_name(run.nodes),
        run.terminals
    );
    for (index, step) in run.steps.iter().enumerate() {
        let (rss, erlang, fds) = per_object(&run.steps, index).map_or_else(
            || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            |(rss, erlang, fds)| {
                (
                    format!("{:.1} KiB", rss / 1024.0),
                    format!("{:.1} KiB", erlang / 1024.0),
                    format!("{fds:.2}"),
                )
            },
        );
        let _ = writeln!(
            text,
            "| {} | {:.1} s | {} | {} | {} | {rss} | {erlang} | {fds} |",
            step.label,
            step.took.as_secs_f64(),
            reading_mib(step.reading.resident),
            reading_mib(step.reading.erlang),
            step.reading.open_files
        );
    }
    for note in &run.notes {
        let _ = writeln!(text, "\n- {note}");
    }
    text
}

fn report(runs: &[Run], drains: &[Drained], held: Option<&Held>) -> String {
    let mut text = String::from("## Sizing\n");
    if let Some(held) = held {
        let _ = write!(
            text,
            "\nOne real terminal holds {} connection(s) and {} channel(s) (at most {} on one connection):\n\n```\n{}\n```\n",
            held.connections, held.channels, held.busiest, held.listing
        );
    }
    // Per object, each run a column: Erlang memory / RSS / fds.
    let mut objects: Vec<&'static str> = Vec::new();
    for run in runs {
        for step in &run.steps {
            if !step.object.is_empty() && !objects.contains(&step.object) {
                objects.push(step.object);
            }
        }
    }
    let _ = write!(
        text,
        "\n### Per object (Erlang memory · RSS · file descriptors, summed over the nodes)\n\n| object |"
    );
    for run in runs {
        let _ = write!(text, " {}, {} |", nodes_name(run.nodes), run.terminals);
    }
    let _ = write!(text, "\n|---|{}\n", "---|".repeat(runs.len()));
    for object in objects {
        let _ = write!(text, "| {object} |");
        for run in runs {
            let cell = run
                .steps
                .iter()
                .position(|s| s.object == object)
                .and_then(|index| per_object(&run.steps, index))
                .map_or_else(
                    || "-".to_owned(),
                    |(rss, erlang, fds)| {
                        format!(
                            "{:.1} KiB · {:.1} KiB · {fds:.2}",
                            erlang / 1024.0,
                            rss / 1024.0
                        )
                    },
                );
            let _ = write!(text, " {cell} |");
        }
        text.push('\n');
    }
    // A whole terminal: every object it holds, from the same steps.
    let _ = write!(
        text,
        "\n### Per terminal (2 connections, 4 channels, its queue, dead-letter queue and consumer)\n\n| queues |"
    );
    for run in runs {
        let _ = write!(text, " {}, {} |", nodes_name(run.nodes), run.terminals);
    }
    let _ = write!(text, "\n|---|{}\n", "---|".repeat(runs.len()));
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let _ = write!(text, "| {} |", type_name(queue_type));
        for run in runs {
            let (rss, erlang, fds) = per_terminal(run, queue_type);
            let _ = write!(
                text,
                " {:.1} KiB · {:.1} KiB · {fds:.2} |",
                erlang / 1024.0,
                rss / 1024.0
            );
        }
        text.push('\n');
    }
    text.push_str("\n### Each run\n");
    for run in runs {
        text.push_str(&run_table(run));
    }
    if !drains.is_empty() {
        text.push_str(
            "\n### Drain of one terminal's backlog with other terminals present (one node)\n\n| present on the node | drained queue | possync msg/s (median; each round) | broker alone msg/s (median; each round) |\n|---|---|---|---|\n",
        );
        for drained in drains {
            let _ = writeln!(
                text,
                "| {} | {} | {:.0} ({}) | {:.0} ({}) |",
                drained.footprints,
                type_name(drained.queue_type),
                median(&drained.possync),
                rates(&drained.possync),
                median(&drained.broker),
                rates(&drained.broker)
            );
        }
    }
    text
}
