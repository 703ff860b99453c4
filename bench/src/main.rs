//! `possync-bench`: possync against the local RabbitMQ, each scenario run
//! twice in the same process: once with possync, once with a minimal
//! consumer written directly on lapin that does the same SQLite writes
//! (the baseline), so the ratio shows what the framework costs.
//!
//! cargo run --release -p possync-bench -- --help

mod backend;
mod baseline;
mod checkpoints;
mod feed;
mod footprint;
mod possync_side;
mod sizing;
mod snapshot;
mod upstream;
mod workload;

use std::time::{Duration, Instant};

use clap::Parser;
use possync_core::{Delivery, Publisher, QueueType};
use possync_sdk::Envelope;
use tokio::sync::watch;

// Linked so its plugins register, as in `possync`.
use possync_catalog as _;
// The `order` type the backend checks orders sent up against.
use possync_orders as _;

use crate::baseline::BaselineQueue;
use crate::workload::{Format, in_turn, license, price_update};

/// Benchmarks possync end to end against the local RabbitMQ, side by side
/// with a raw lapin baseline, and prints a table.
#[derive(Debug, Parser)]
#[command(max_term_width = 100)]
struct Args {
    /// The broker.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "POSSYNC_BENCH_AMQP_URL"
    )]
    url: String,
    /// Changes in the backlog-drain and live-throughput scenarios.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Seconds each latency rate runs.
    #[arg(long, default_value_t = 5)]
    latency_seconds: u64,
    /// Terminals of the one store in the first fan-out scenario.
    #[arg(long, default_value_t = 10)]
    terminals_per_store: usize,
    /// Stores (one terminal each) in the second fan-out scenario.
    #[arg(long, default_value_t = 1000)]
    stores: usize,
    /// Products in the catalog of the checkpoints scenario.
    #[arg(long, default_value_t = 20_000)]
    checkpoint_products: usize,
    /// Price changes after the catalog in the checkpoints scenario.
    #[arg(long, default_value_t = 60_000)]
    checkpoint_changes: usize,
    /// Products in the catalog the snapshot scenario sends to a new till.
    #[arg(long, default_value_t = 100_000)]
    snapshot_products: usize,
    /// Orders the orders-up scenario writes to one till's outbox.
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Orders the POS app commits at a time in orders-up.
    #[arg(long, default_value_t = 100)]
    orders_per_commit: usize,
    /// `uplink.poll_ms` of the till in orders-up (default: the terminal's).
    #[arg(long)]
    uplink_poll_ms: Option<u64>,
    /// `uplink.batch` of the till in orders-up (default: the terminal's).
    #[arg(long)]
    uplink_batch: Option<usize>,
    /// Seconds the applied-latency scenario submits changes for.
    #[arg(long, default_value_t = 20)]
    applied_seconds: u64,
    /// In applied-latency, no client asks `/v1/stores/{store}/applied`:
    /// only the fleet table is watched (to see what the asking costs).
    #[arg(long)]
    applied_fleet_only: bool,
    /// Changes a second the applied-latency scenario submits, one per request.
    #[arg(long, default_value_t = 100)]
    applied_rate: usize,
    /// Rounds of each drain, live and fan-out scenario; the table shows the round
    /// with the median ratio and the range over all rounds. A drain lasts
    /// seconds, so one round is easily off by 15% or more.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Changes in the backlog-collapse scenario.
    #[arg(long, default_value_t = 100_000)]
    collapse_messages: usize,
    /// Products those changes are spread over, at random.
    #[arg(long, default_value_t = 2_000)]
    collapse_products: usize,
    /// `terminal.batch_size` and `terminal.prefetch` of both collapse
    /// drains (default: the terminal's defaults).
    #[arg(long)]
    collapse_batch: Option<usize>,
    /// Scenarios to run: drain, collapse, live, latency, backend, feed,
    /// fanout, upstream, snapshot, checkpoints (default: all); backend-latency and backend-accept
    /// name the two halves of backend, feed-cost and feed-latency those of
    /// feed, receipts-cost, orders-up and applied-latency the three of
    /// upstream. `light` (a terminal process: start to Live, its memory idle
    /// and draining) runs only when named.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The binary the light scenario runs: `possync-terminal`, or `possync`
    /// (run as `possync terminal`). Default: `possync-terminal` of the
    /// `release-stripped` build of this workspace, made by `cargo build
    /// --profile release-stripped -p possync --bin possync-terminal`.
    #[arg(long, value_name = "PATH")]
    possync_binary: Option<std::path::PathBuf>,
    /// Changes in the backlog the light scenario's terminal drains.
    #[arg(long, default_value_t = 20_000)]
    light_changes: usize,
    /// Products of the store those changes describe.
    #[arg(long, default_value_t = 2_000)]
    light_products: usize,
    /// Seconds the light scenario's terminal is Live and idle before its
    /// memory is read.
    #[arg(long, default_value_t = 5)]
    light_idle_seconds: u64,
    /// Run one side of one scenario, once, then stop: for profiling one
    /// consumer alone. The scenario is the one `--only` names: `drain`
    /// (the default) or `live` (fed by the raw publisher). The measured
    /// phase starts and ends with a call to `phase_boundary`, so
    /// `valgrind --tool=callgrind --dump-before='*phase_boundary*'` writes
    /// it to a file of its own.
    #[arg(long, value_name = "SIDE")]
    profile: Option<Side>,
    /// The wire format of the backlog a profiled possync drain applies.
    #[arg(long, value_name = "FORMAT", default_value = "original")]
    profile_format: Format,
}

/// Which consumer a profiling run measures.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Side {
    /// possync's terminal.
    Possync,
    /// The raw lapin baseline.
    Baseline,
}

/// One line of the result table.
struct Row {
    scenario: String,
    possync: String,
    baseline: String,
    ratio: String,
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn rate_row(scenario: String, count: usize, possync: Duration, baseline: Duration) -> Row {
    let (p, b) = (rate(count, possync), rate(count, baseline));
    Row {
        scenario,
        possync: format!("{p:.0} msg/s"),
        baseline: format!("{b:.0} msg/s"),
        ratio: format!("{:.0}%", 100.0 * p / b),
    }
}

/// A phase's wall time and the CPU this process spent in it.
#[derive(Debug, Clone)]
struct Measured {
    elapsed: Duration,
    cpu_us: u64,
}

struct Stopwatch {
    started: Instant,
    cpu: u64,
}

impl Stopwatch {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu: workload::cpu_micros(),
        }
    }
    fn stop(&self) -> Measured {
        Measured {
            elapsed: self.started.elapsed(),
            cpu_us: workload::cpu_micros().saturating_sub(self.cpu),
        }
    }
}

/// One round of a throughput scenario: both sides, same work.
struct Trial {
    scenario: String,
    count: usize,
    possync: Measured,
    baseline: Measured,
    /// Resident memory per terminal, possync and baseline, in KiB: for the
    /// fan-out scenarios, where it is what the row reports beside the rate.
    memory_kib: Option<(u64, u64)>,
}

impl Trial {
    fn ratio(&self) -> f64 {
        self.baseline.elapsed.as_secs_f64() / self.possync.elapsed.as_secs_f64()
    }
}

/// The round with the median ratio, and the range of the ratio over all
/// rounds: one round on a shared two-core machine can be off by 15%.
fn median_row(mut trials: Vec<Trial>) -> Row {
    trials.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let low = trials.first().map_or(f64::NAN, Trial::ratio);
    let high = trials.last().map_or(f64::NAN, Trial::ratio);
    let rounds = trials.len();
    let Some(median) = trials.into_iter().nth(rounds / 2) else {
        return Row {
            scenario: "no rounds".into(),
            possync: String::new(),
            baseline: String::new(),
            ratio: String::new(),
        };
    };
    let count = median.count;
    let mut row = rate_row(
        median.scenario,
        count,
        median.possync.elapsed,
        median.baseline.elapsed,
    );
    let per = |m: &Measured| m.cpu_us as f64 / count as f64;
    row.possync = format!("{} · {:.0} µs CPU/msg", row.possync, per(&median.possync));
    row.baseline = format!("{} · {:.0} µs CPU/msg", row.baseline, per(&median.baseline));
    if let Some((possync_kib, baseline_kib)) = median.memory_kib {
        row.possync = format!("{} · {possync_kib} KiB/terminal", row.possync);
        row.baseline = format!("{} · {baseline_kib} KiB/consumer", row.baseline);
    }
    if rounds > 1 {
        row.ratio = format!(
            "{} ({:.0}–{:.0}% in {rounds} rounds)",
            row.ratio,
            100.0 * low,
            100.0 * high
        );
    }
    row
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

fn latency_text(mut latencies: Vec<i64>) -> String {
    latencies.sort_unstable();
    format!(
        "p50 {:.1} / p99 {:.1} / max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    )
}

fn progress(text: &str) {
    eprintln!("[bench] {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // possync's own events, for looking into a scenario: POSSYNC_LOG=debug.
    if std::env::var_os("POSSYNC_LOG").is_some() {
        possync_core::init_logging("warn", possync_core::LogFormat::Human);
    }
    let wants = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    if let Some(side) = args.profile {
        return profile(&args, dir.path(), side).await;
    }
    if wants("drain") {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let mut rounds = Vec::new();
            for round in 0..args.rounds as usize {
                rounds.push(drain(&args, dir.path(), queue_type, round).await?);
            }
            for row in drain_rows(args.messages, queue_type, &rounds) {
                report(row, &mut rows);
            }
        }
    }
    if wants("collapse") {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let (mut against_not_collapsing, mut against_broker) = (Vec::new(), Vec::new());
            for _ in 0..args.rounds {
                let (not_collapsing, broker) = collapse(&args, dir.path(), queue_type).await?;
                against_not_collapsing.push(not_collapsing);
                against_broker.push(broker);
            }
            report(median_row(against_not_collapsing), &mut rows);
            report(median_row(against_broker), &mut rows);
        }
    }
    if wants("live") {
        for feed in [Feed::Possync, Feed::Raw] {
            for delivery in [Delivery::Durable, Delivery::Transient] {
                let mut trials = Vec::new();
                for _ in 0..args.rounds {
                    trials.push(live(&args, dir.path(), delivery, feed).await?);
                }
                report(median_row(trials), &mut rows);
            }
        }
    }
    if wants("latency") {
        for per_second in [1000, 5000] {
            report(latency(&args, dir.path(), per_second).await?, &mut rows);
        }
    }
    if wants("backend") || wants("backend-latency") {
        report(
            backend::latency(
                &args.url,
                &dir.path().join("latency"),
                args.latency_seconds,
                1000,
            )
            .await?,
            &mut rows,
        );
    }
    if wants("backend") || wants("backend-accept") {
        let dir = dir.path();
        // First one change per request from 8 clients: how many a second
        // the backend takes when every change is a request of its own.
        for (batch, clients, total) in [
            (1, 8, 20_000),
            (100, 1, 100_000),
            (100, 2, 100_000),
            (500, 2, 100_000),
        ] {
            let scenario = dir.join(format!("accept-{batch}-{clients}"));
            report(
                backend::accept(&args.url, &scenario, total, batch, clients).await?,
                &mut rows,
            );
        }
    }
    if wants("feed") || wants("feed-cost") {
        let mut trials = Vec::new();
        for round in 0..args.rounds as usize {
            trials.push(feed::cost(&args.url, dir.path(), args.messages, round).await?);
        }
        report(median_row(trials), &mut rows);
    }
    if wants("feed") || wants("feed-latency") {
        report(
            feed::latency(&args.url, dir.path(), 10, 1000, args.latency_seconds).await?,
            &mut rows,
        );
    }
    if wants("upstream") || wants("receipts-cost") {
        let mut trials = Vec::new();
        for round in 0..args.rounds as usize {
            trials
                .push(upstream::receipts_cost(&args.url, dir.path(), args.messages, round).await?);
        }
        // Every round together, beside the median round: on a shared
        // machine one round can be far off either way.
        let total = |side: fn(&Trial) -> &Measured| {
            trials
                .iter()
                .fold((0usize, Duration::ZERO, 0u64), |(n, t, c), trial| {
                    let m = side(trial);
                    (n + trial.count, t + m.elapsed, c + m.cpu_us)
                })
        };
        let (n, on, on_cpu) = total(|t| &t.possync);
        let (_, off, off_cpu) = total(|t| &t.baseline);
        let each = trials
            .iter()
            .map(|t| format!("{:.0}%", 100.0 * t.ratio()))
            .collect::<Vec<_>>()
            .join(", ");
        let summary = Row {
            scenario: format!(
                "receipts cost, all {} rounds together (on / off per round: {each})",
                trials.len()
            ),
            possync: format!(
                "{:.0} msg/s · {:.1} µs CPU/msg",
                rate(n, on),
                on_cpu as f64 / n as f64
            ),
            baseline: format!(
                "{:.0} msg/s · {:.1} µs CPU/msg",
                rate(n, off),
                off_cpu as f64 / n as f64
            ),
            ratio: format!("{:.1}%", 100.0 * off.as_secs_f64() / on.as_secs_f64()),
        };
        report(median_row(trials), &mut rows);
        report(summary, &mut rows);
    }
    if wants("upstream") || wants("orders-up") {
        let mut trials = Vec::new();
        let mut notes = Vec::new();
        for _ in 0..args.rounds {
            let (trial, note) = upstream::orders_up(
                &args.url,
                dir.path(),
                args.orders,
                args.orders_per_commit,
                (args.uplink_poll_ms, args.uplink_batch),
            )
            .await?;
            progress(&format!(
                "orders up: {:.0} orders/s end to end · {note} | broker alone {:.0} msg/s",
                rate(trial.count, trial.possync.elapsed),
                rate(trial.count, trial.baseline.elapsed)
            ));
            notes.push(format!(
                "{:.0}/s: {note}",
                rate(trial.count, trial.possync.elapsed)
            ));
            trials.push(trial);
        }
        report(median_row(trials), &mut rows);
        for note in notes {
            report(
                Row {
                    scenario: "orders up, each round".into(),
                    possync: note,
                    baseline: "-".into(),
                    ratio: "-".into(),
                },
                &mut rows,
            );
        }
    }
    if wants("checkpoints") {
        let mut trials = Vec::new();
        let mut notes = Vec::new();
        for round in 0..args.rounds as usize {
            let (trial, note) = checkpoints::cost(
                &args.url,
                dir.path(),
                args.checkpoint_products,
                args.checkpoint_changes,
                round,
            )
            .await?;
            progress(&format!(
                "checkpoints: {note}; {:.0} changes/s with, {:.0} without",
                rate(trial.count, trial.possync.elapsed),
                rate(trial.count, trial.baseline.elapsed)
            ));
            notes.push(format!(
                "{note}: {:.0}/s with, {:.0}/s without",
                rate(trial.count, trial.possync.elapsed),
                rate(trial.count, trial.baseline.elapsed)
            ));
            trials.push(trial);
        }
        let (with, without, n) = trials.iter().fold(
            (Duration::ZERO, Duration::ZERO, 0usize),
            |(with, without, n), trial| {
                (
                    with + trial.possync.elapsed,
                    without + trial.baseline.elapsed,
                    n + trial.count,
                )
            },
        );
        let summary = Row {
            scenario: format!("checkpoints cost, all {} rounds together", trials.len()),
            possync: format!("{:.0} changes/s", rate(n, with)),
            baseline: format!("{:.0} changes/s", rate(n, without)),
            ratio: format!("{:.1}%", 100.0 * without.as_secs_f64() / with.as_secs_f64()),
        };
        report(median_row(trials), &mut rows);
        report(summary, &mut rows);
        for note in notes {
            report(
                Row {
                    scenario: "checkpoints, each round".into(),
                    possync: note,
                    baseline: "-".into(),
                    ratio: "-".into(),
                },
                &mut rows,
            );
        }
    }
    if wants("snapshot") {
        let mut trials = Vec::new();
        let mut notes = Vec::new();
        for _ in 0..args.rounds {
            let (trial, note) =
                snapshot::snapshot(&args.url, dir.path(), args.snapshot_products).await?;
            progress(&format!("snapshot: {note}"));
            notes.push(note);
            trials.push(trial);
        }
        report(median_row(trials), &mut rows);
        for note in notes {
            report(
                Row {
                    scenario: "snapshot, each round".into(),
                    possync: note,
                    baseline: "-".into(),
                    ratio: "-".into(),
                },
                &mut rows,
            );
        }
    }
    if wants("upstream") || wants("applied-latency") {
        for row in upstream::applied_latency(
            &args.url,
            dir.path(),
            args.terminals_per_store,
            args.applied_rate,
            args.applied_seconds,
            !args.applied_fleet_only,
        )
        .await?
        {
            report(row, &mut rows);
        }
    }
    // Broker memory and descriptors per terminal object; only when named:
    // it needs root, and starts RabbitMQ nodes of its own.
    if args.only.iter().any(|o| o == "sizing") {
        sizing::run(dir.path()).await?;
    }
    if args.only.iter().any(|o| o == "light") {
        let setup = footprint::Footprint {
            url: args.url.clone(),
            binary: args
                .possync_binary
                .clone()
                .unwrap_or_else(footprint::default_binary),
            changes: args.light_changes,
            products: args.light_products,
            idle: Duration::from_secs(args.light_idle_seconds),
        };
        let (dir, rounds) = (dir.path().to_owned(), args.rounds);
        // Blocking: it waits on a child process and reads /proc.
        let light = tokio::task::spawn_blocking(move || footprint::run(&setup, &dir, rounds));
        for row in light.await?? {
            report(row, &mut rows);
        }
    }
    if wants("fanout") {
        let mut one_store = Vec::new();
        let mut many_stores = Vec::new();
        for _ in 0..args.rounds {
            one_store.push(fanout(&args, dir.path(), 1, args.terminals_per_store).await?);
            many_stores.push(fanout(&args, dir.path(), args.stores, 1).await?);
        }
        // Memory from the first round: later rounds reuse what the
        // allocator kept from earlier ones, so their growth understates it.
        for trials in [&mut one_store, &mut many_stores] {
            let first = trials.first().and_then(|t| t.memory_kib);
            trials.iter_mut().for_each(|t| t.memory_kib = first);
        }
        report(median_row(one_store), &mut rows);
        report(median_row(many_stores), &mut rows);
    }
    print_table(&rows);
    Ok(())
}

/// Which scenario a profiling run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profiled {
    Drain,
    Live,
}

/// Marks where the measured phase of a profiling run starts and ends.
#[inline(never)]
fn phase_boundary() {
    std::hint::black_box(());
}

/// One side of the drain or live scenario, alone; prints its rate.
async fn profile(args: &Args, dir: &std::path::Path, side: Side) -> anyhow::Result<()> {
    let scenario = match args.only.as_slice() {
        [] => Profiled::Drain,
        [only] if only == "drain" => Profiled::Drain,
        [only] if only == "live" => Profiled::Live,
        other => anyhow::bail!(
            "--profile measures one scenario: pass --only drain or --only live (got --only {})",
            other.join(",")
        ),
    };
    let n = args.messages;
    let key = license("profile");
    let connection = workload::connect(&args.url).await?;
    let publish = || workload::publish_price_updates(&connection, &key, n, 512);
    let took = match side {
        Side::Possync => {
            let mut config = possync_side::config(
                &args.url,
                dir,
                &key,
                "t1",
                QueueType::Classic,
                Delivery::Durable,
            );
            if scenario == Profiled::Drain {
                // As in the drain: every change applied, none collapsed.
                config.terminal.collapse_min_batch = 0;
                possync_side::start(config.clone()).await?.stop().await?;
                workload::publish_backlog(
                    &connection,
                    &config.broker,
                    &key,
                    n,
                    args.profile_format,
                    in_turn,
                )
                .await?;
            }
            phase_boundary();
            let stopwatch = Stopwatch::start();
            let mut terminal = possync_side::start(config).await?;
            if scenario == Profiled::Live {
                publish().await?;
            }
            terminal.wait_applied(n as u64).await?;
            let took = stopwatch.stop();
            phase_boundary();
            terminal.stop_and_delete(&connection).await?;
            took
        }
        Side::Baseline => {
            let queue = format!("bench.baseline.{key}");
            baseline::declare(&connection, &queue, &key, BaselineQueue::Classic).await?;
            if scenario == Profiled::Drain {
                publish().await?;
            }
            phase_boundary();
            let stopwatch = Stopwatch::start();
            let consumer_connection = workload::connect(&args.url).await?;
            let (stop, stopped) = watch::channel(false);
            let path = dir.join(format!("{key}.db"));
            let mut consumer =
                baseline::start(&consumer_connection, &queue, &key, &path, stopped).await?;
            if scenario == Profiled::Live {
                publish().await?;
            }
            consumer.applied.wait_for(|a| *a >= n as u64).await?;
            let took = stopwatch.stop();
            phase_boundary();
            let _ = stop.send(true);
            consumer.task.await??;
            workload::delete_queues(&connection, &[queue]).await;
            workload::close([consumer_connection]).await;
            took
        }
    };
    workload::close([connection]).await;
    println!(
        "{side:?}, {scenario:?}: {:.0} msg/s, {} µs CPU/msg",
        rate(n, took.elapsed),
        took.cpu_us / n as u64
    );
    Ok(())
}

/// Prints a finished row at once, so a long run shows results as it goes.
fn report(row: Row, rows: &mut Vec<Row>) {
    eprintln!(
        "[bench] {}: possync {} | baseline {} | {}",
        row.scenario, row.possync, row.baseline, row.ratio
    );
    rows.push(row);
}

fn print_table(rows: &[Row]) {
    let widths = [
        rows.iter()
            .map(|r| r.scenario.len())
            .max()
            .unwrap_or(0)
            .max(8),
        rows.iter()
            .map(|r| r.possync.len())
            .max()
            .unwrap_or(0)
            .max(7),
        rows.iter()
            .map(|r| r.baseline.len())
            .max()
            .unwrap_or(0)
            .max(13),
    ];
    println!(
        "| {:<w0$} | {:<w1$} | {:<w2$} | possync / baseline |",
        "scenario",
        "possync",
        "lapin baseline",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2]
    );
    println!(
        "|{}|{}|{}|---|",
        "-".repeat(widths[0] + 2),
        "-".repeat(widths[1] + 2),
        "-".repeat(widths[2] + 2)
    );
    for row in rows {
        println!(
            "| {:<w0$} | {:<w1$} | {:<w2$} | {} |",
            row.scenario,
            row.possync,
            row.baseline,
            row.ratio,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
}

fn baseline_kind(queue_type: QueueType) -> BaselineQueue {
    match queue_type {
        QueueType::Classic => BaselineQueue::Classic,
        QueueType::Quorum => BaselineQueue::Quorum,
    }
}

/// One round of the drain scenario: the baseline and possync on each
/// format of the same changes.
struct DrainRound {
    baseline: Measured,
    possync: Vec<(Format, Measured)>,
}

/// The formats a drain measures, each against the same baseline.
const FORMATS: [Format; 3] = [Format::Original, Format::Publisher, Format::Sequenced];

/// N changes wait in the queue; the consumer starts; time until all are
/// applied and acknowledged: the raw baseline once, then possync on each
/// wire format (the formats in a different order each round, so that
/// drift over the run falls on each alike). Collapsing is off: the drain
/// measures what applying every change costs.
async fn drain(
    args: &Args,
    dir: &std::path::Path,
    queue_type: QueueType,
    round: usize,
) -> anyhow::Result<DrainRound> {
    let n = args.messages;
    let connection = workload::connect(&args.url).await?;
    progress(&format!("backlog drain, {queue_type:?} queue: baseline"));
    let key = license("drain-base");
    let queue = format!("bench.baseline.{key}");
    baseline::declare(&connection, &queue, &key, baseline_kind(queue_type)).await?;
    workload::publish_price_updates(&connection, &key, n, 1000).await?;
    let (stop, stopped) = watch::channel(false);
    // Both sides start from nothing: possync's terminal connects within its
    // stopwatch, so the baseline does too.
    let watch_baseline = Stopwatch::start();
    let consumer_connection = workload::connect(&args.url).await?;
    let mut consumer = baseline::start(
        &consumer_connection,
        &queue,
        &key,
        &dir.join(format!("{key}.db")),
        stopped,
    )
    .await?;
    consumer.applied.wait_for(|a| *a >= n as u64).await?;
    let baseline = watch_baseline.stop();
    let _ = stop.send(true);
    consumer.task.await??;
    workload::delete_queues(&connection, &[queue]).await;
    workload::close([consumer_connection]).await;

    let mut possync = Vec::new();
    for turn in 0..FORMATS.len() {
        let format = FORMATS[(turn + round) % FORMATS.len()];
        progress(&format!(
            "backlog drain, {queue_type:?} queue: possync, {}",
            format.name()
        ));
        let key = license("drain");
        let mut config =
            possync_side::config(&args.url, dir, &key, "t1", queue_type, Delivery::Durable);
        config.terminal.collapse_min_batch = 0;
        // Started once so that its queue exists and keeps what is published.
        possync_side::start(config.clone()).await?.stop().await?;
        workload::publish_backlog(&connection, &config.broker, &key, n, format, in_turn).await?;
        let stopwatch = Stopwatch::start();
        let mut terminal = possync_side::start(config).await?;
        terminal.wait_applied(n as u64).await?;
        possync.push((format, stopwatch.stop()));
        terminal.stop_and_delete(&connection).await?;
    }
    workload::close([connection]).await;
    Ok(DrainRound { baseline, possync })
}

/// The drain's rows: each format against the baseline, then possync's
/// publisher format and the sequenced format against the original one.
fn drain_rows(n: usize, queue_type: QueueType, rounds: &[DrainRound]) -> Vec<Row> {
    let queue = format!("{queue_type:?}").to_lowercase();
    let took = |round: &DrainRound, format: Format| {
        round
            .possync
            .iter()
            .find(|(f, _)| *f == format)
            .map(|(_, measured)| measured.clone())
    };
    let mut rows = Vec::new();
    for format in FORMATS {
        let trials = rounds
            .iter()
            .filter_map(|round| {
                Some(Trial {
                    scenario: format!(
                        "backlog drain, {n} changes, {queue} queue, {}",
                        format.name()
                    ),
                    count: n,
                    possync: took(round, format)?,
                    baseline: round.baseline.clone(),
                    memory_kib: None,
                })
            })
            .collect();
        rows.push(median_row(trials));
    }
    for format in [Format::Publisher, Format::Sequenced] {
        let trials = rounds
            .iter()
            .filter_map(|round| {
                Some(Trial {
                    scenario: format!(
                        "backlog drain, {queue} queue: {} / original format (both possync; baseline column: original)",
                        format.name()
                    ),
                    count: n,
                    possync: took(round, format)?,
                    baseline: took(round, Format::Original)?,
                    memory_kib: None,
                })
            })
            .collect();
        rows.push(median_row(trials));
    }
    rows
}

/// A backlog of `--collapse-messages` changes over `--collapse-products`
/// products in random order (sequenced, as the backend relays them), drained
/// with backlog collapse and without, by the same terminal settings, and
/// received by a consumer that applies nothing: the broker's own pace,
/// which no collapsing can beat.
async fn collapse(
    args: &Args,
    dir: &std::path::Path,
    queue_type: QueueType,
) -> anyhow::Result<(Trial, Trial)> {
    let n = args.collapse_messages;
    let products = args.collapse_products;
    let connection = workload::connect(&args.url).await?;
    let mut took = Vec::new();
    for collapsing in [true, false] {
        progress(&format!(
            "backlog collapse, {n} changes over {products} products: {}",
            if collapsing {
                "collapsing"
            } else {
                "not collapsing"
            }
        ));
        let key = license("collapse");
        let mut config =
            possync_side::config(&args.url, dir, &key, "t1", queue_type, Delivery::Durable);
        if !collapsing {
            config.terminal.collapse_min_batch = 0;
        }
        if let Some(batch) = args.collapse_batch {
            config.terminal.batch_size = batch;
            config.terminal.prefetch = u16::try_from(batch).unwrap_or(u16::MAX);
        }
        possync_side::start(config.clone()).await?.stop().await?;
        let order = workload::shuffled(products);
        workload::publish_backlog(
            &connection,
            &config.broker,
            &key,
            n,
            Format::Sequenced,
            order,
        )
        .await?;
        let stopwatch = Stopwatch::start();
        let mut terminal = possync_side::start(config).await?;
        terminal.wait_applied(n as u64).await?;
        took.push(stopwatch.stop());
        let collapsed = terminal.status.borrow().collapsed;
        progress(&format!("{collapsed} changes collapsed"));
        terminal.stop_and_delete(&connection).await?;
    }
    progress(&format!(
        "backlog collapse, {n} changes over {products} products: the broker alone"
    ));
    let key = license("collapse-broker");
    let queue = format!("bench.collapse.{key}");
    baseline::declare(&connection, &queue, &key, baseline_kind(queue_type)).await?;
    let config = possync_side::config(&args.url, dir, &key, "t1", queue_type, Delivery::Durable);
    workload::publish_backlog(
        &connection,
        &config.broker,
        &key,
        n,
        Format::Sequenced,
        workload::shuffled(products),
    )
    .await?;
    let stopwatch = Stopwatch::start();
    baseline::receive_only(&connection, &queue, n).await?;
    let broker = stopwatch.stop();
    workload::delete_queues(&connection, &[queue]).await;
    workload::close([connection]).await;
    let (Some(without), Some(with)) = (took.pop(), took.pop()) else {
        anyhow::bail!("both drains ran");
    };
    let queue_type = format!("{queue_type:?}").to_lowercase();
    Ok((
        Trial {
            scenario: format!(
                "backlog collapse, {n} changes over {products} products, {queue_type} queue (baseline column: possync without collapsing)"
            ),
            count: n,
            possync: with.clone(),
            baseline: without,
            memory_kib: None,
        },
        Trial {
            scenario: format!(
                "backlog collapse, {n} changes over {products} products, {queue_type} queue (baseline column: the broker alone, a consumer that receives and acknowledges, applying nothing)"
            ),
            count: n,
            possync: with,
            baseline: broker,
            memory_kib: None,
        },
    ))
}

/// What publishes to possync's terminal in the live scenario.
#[derive(Debug, Clone, Copy)]
enum Feed {
    /// possync's publisher: the whole framework, end to end.
    Possync,
    /// The baseline's raw lapin publisher: the terminal alone.
    Raw,
}

/// A publisher with confirms publishes as fast as it can to one terminal.
async fn live(
    args: &Args,
    dir: &std::path::Path,
    delivery: Delivery,
    feed: Feed,
) -> anyhow::Result<Trial> {
    let n = args.messages;
    progress(&format!(
        "live throughput, {delivery:?}, {feed:?} publisher: possync"
    ));
    let key = license("live");
    let config = possync_side::config(&args.url, dir, &key, "t1", QueueType::Classic, delivery);
    let mut terminal = possync_side::start(config.clone()).await?;
    let publisher = Publisher::connect(&config.broker).await?;
    let envelopes: Vec<Envelope> = (0..n)
        .map(|i| serde_json::from_slice(&price_update(&key, i, "price_update")).expect("envelope"))
        .collect();
    let watch_possync = Stopwatch::start();
    match feed {
        Feed::Possync => {
            publisher.publish_envelopes(envelopes).await?;
        }
        Feed::Raw => {
            let connection = workload::connect(&args.url).await?;
            workload::publish_price_updates(&connection, &key, n, 512).await?;
            workload::close([connection]).await;
        }
    }
    terminal.wait_applied(n as u64).await?;
    let possync_time = watch_possync.stop();
    publisher.close().await;
    let connection = workload::connect(&args.url).await?;
    terminal.stop_and_delete(&connection).await?;

    progress(&format!(
        "live throughput, {delivery:?}, {feed:?} publisher: baseline"
    ));
    let key = license("live-base");
    let queue = format!("bench.baseline.{key}");
    let consumer_connection = workload::connect(&args.url).await?;
    let kind = if delivery == Delivery::Transient {
        BaselineQueue::Transient
    } else {
        BaselineQueue::Classic
    };
    baseline::declare(&consumer_connection, &queue, &key, kind).await?;
    let (stop, stopped) = watch::channel(false);
    let mut consumer = baseline::start(
        &consumer_connection,
        &queue,
        &key,
        &dir.join(format!("{key}.db")),
        stopped,
    )
    .await?;
    let watch_baseline = Stopwatch::start();
    workload::publish_price_updates(&connection, &key, n, 512).await?;
    consumer.applied.wait_for(|a| *a >= n as u64).await?;
    let baseline_time = watch_baseline.stop();
    let _ = stop.send(true);
    consumer.task.await??;
    workload::delete_queues(&connection, &[queue]).await;
    workload::close([connection, consumer_connection]).await;
    let scenario = match feed {
        Feed::Possync => format!("live throughput, {n} changes, {delivery:?}"),
        Feed::Raw => format!("live, terminal alone (raw publisher), {n} changes, {delivery:?}"),
    };
    Ok(Trial {
        scenario: scenario.to_lowercase(),
        count: n,
        possync: possync_time,
        baseline: baseline_time,
        memory_kib: None,
    })
}

/// Publishes at a fixed rate; the time from publish to commit-and-ack.
async fn latency(args: &Args, dir: &std::path::Path, per_second: usize) -> anyhow::Result<Row> {
    let total = per_second * usize::try_from(args.latency_seconds).unwrap_or(5);
    progress(&format!("latency at {per_second}/s: possync"));
    let key = license("latency");
    let config = possync_side::config(
        &args.url,
        dir,
        &key,
        "t1",
        QueueType::Classic,
        Delivery::Durable,
    );
    let terminal = possync_side::start(config.clone()).await?;
    let collector = tokio::spawn(possync_side::collect_latencies(
        terminal.status.clone(),
        total as u64,
    ));
    let publisher = Publisher::connect(&config.broker).await?;
    paced(per_second, total, |i| {
        let envelope: Envelope =
            serde_json::from_slice(&price_update(&key, i, "bench_price_update")).expect("envelope");
        let publisher = &publisher;
        async move {
            publisher
                .publish_envelope(envelope)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    let possync_latencies = tokio::time::timeout(Duration::from_secs(60), collector).await??;
    publisher.close().await;
    let connection = workload::connect(&args.url).await?;
    terminal.stop_and_delete(&connection).await?;

    progress(&format!("latency at {per_second}/s: baseline"));
    let key = license("latency-base");
    let queue = format!("bench.baseline.{key}");
    baseline::declare(&connection, &queue, &key, BaselineQueue::Classic).await?;
    let consumer_connection = workload::connect(&args.url).await?;
    let (stop, stopped) = watch::channel(false);
    let mut consumer = baseline::start(
        &consumer_connection,
        &queue,
        &key,
        &dir.join(format!("{key}.db")),
        stopped,
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let routing_key = format!("license.{key}.price_update");
    paced(per_second, total, |i| {
        let body = price_update(&key, i, "price_update");
        let (channel, routing_key) = (&channel, &routing_key);
        async move {
            let confirm = channel
                .basic_publish(
                    workload::EXCHANGE.into(),
                    routing_key.as_str().into(),
                    Default::default(),
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            anyhow::ensure!(confirm.await?.is_ack(), "nack");
            Ok(())
        }
    })
    .await?;
    consumer.applied.wait_for(|a| *a >= total as u64).await?;
    let _ = stop.send(true);
    consumer.task.await??;
    let baseline_latencies = consumer
        .latencies_us
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    workload::delete_queues(&connection, &[queue]).await;
    workload::close([connection, consumer_connection]).await;
    Ok(Row {
        scenario: format!("latency publish→commit+ack at {per_second}/s, persistent + confirms"),
        possync: latency_text(possync_latencies),
        baseline: latency_text(baseline_latencies),
        ratio: "-".into(),
    })
}

/// Calls `publish(i)` for i in 0..total, `per_second` a second, one
/// millisecond tick at a time.
async fn paced<F, Fut>(per_second: usize, total: usize, mut publish: F) -> anyhow::Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / per_second as f64);
        tokio::time::sleep_until(due.into()).await;
        publish(i).await?;
    }
    Ok(())
}

/// Many terminals at once, all in this process: `stores` stores with
/// `per_store` terminals each.
async fn fanout(
    args: &Args,
    dir: &std::path::Path,
    stores: usize,
    per_store: usize,
) -> anyhow::Result<Trial> {
    let label = if stores == 1 {
        "one store"
    } else {
        "many stores"
    };
    let terminals = stores * per_store;
    // About `--messages` deliveries in all, so that a run lasts long
    // enough to measure; at least 100 changes per store.
    let per_terminal = (args.messages / terminals).max(100);
    progress(&format!(
        "fan-out, {label}: starting {terminals} possync terminals"
    ));
    let keys: Vec<_> = (0..stores).map(|_| license("fan")).collect();
    let rss_before = workload::rss_kib();
    let mut running = Vec::new();
    for chunk in keys
        .iter()
        .flat_map(|k| (0..per_store).map(move |t| (k.clone(), t)))
        .collect::<Vec<_>>()
        .chunks(50)
    {
        let starts = chunk.iter().map(|(key, t)| {
            possync_side::start(possync_side::config(
                &args.url,
                dir,
                key,
                &format!("t{t}"),
                QueueType::Classic,
                Delivery::Durable,
            ))
        });
        for started in futures_util::future::join_all(starts).await {
            running.push(started?);
        }
    }
    let possync_kib = (workload::rss_kib().saturating_sub(rss_before)) / terminals as u64;
    let connection = workload::connect(&args.url).await?;
    progress(&format!(
        "fan-out, {label}: publishing {per_terminal} changes per store"
    ));
    let stopwatch = Stopwatch::start();
    for key in &keys {
        workload::publish_price_updates(&connection, key, per_terminal, 512).await?;
    }
    for terminal in &mut running {
        terminal.wait_applied(per_terminal as u64).await?;
    }
    let possync_time = stopwatch.stop();
    let mut queues = Vec::new();
    for terminal in running {
        queues.push(terminal.queue.clone());
        queues.push(terminal.dead_letter_queue.clone());
        terminal.stop().await?;
    }
    workload::delete_queues(&connection, &queues).await;

    progress(&format!(
        "fan-out, {label}: starting {terminals} baseline consumers"
    ));
    let keys: Vec<_> = (0..stores).map(|_| license("fan-base")).collect();
    let rss_before = workload::rss_kib();
    let (stop, stopped) = watch::channel(false);
    let mut consumers = Vec::new();
    let mut connections = Vec::new();
    let mut queues = Vec::new();
    for key in &keys {
        for t in 0..per_store {
            let consumer_connection = workload::connect(&args.url).await?;
            let queue = format!("bench.baseline.{key}.{t}");
            baseline::declare(&consumer_connection, &queue, key, BaselineQueue::Classic).await?;
            consumers.push(
                baseline::start(
                    &consumer_connection,
                    &queue,
                    key,
                    &dir.join(format!("{key}-{t}.db")),
                    stopped.clone(),
                )
                .await?,
            );
            connections.push(consumer_connection);
            queues.push(queue);
        }
    }
    let baseline_kib = (workload::rss_kib().saturating_sub(rss_before)) / terminals as u64;
    let stopwatch = Stopwatch::start();
    for key in &keys {
        workload::publish_price_updates(&connection, key, per_terminal, 512).await?;
    }
    for consumer in &mut consumers {
        consumer
            .applied
            .wait_for(|a| *a >= per_terminal as u64)
            .await?;
    }
    let baseline_time = stopwatch.stop();
    let _ = stop.send(true);
    for consumer in consumers {
        consumer.task.await??;
    }
    workload::delete_queues(&connection, &queues).await;
    connections.push(connection);
    workload::close(connections).await;
    Ok(Trial {
        scenario: format!("fan-out, {label}: {terminals} terminals × {per_terminal} changes"),
        count: terminals * per_terminal,
        possync: possync_time,
        baseline: baseline_time,
        memory_kib: Some((possync_kib, baseline_kib)),
    })
}
