//! possync on a RabbitMQ cluster of three nodes, each in a network
//! namespace the test makes (`possync-rabbitmq-cluster`): the node that
//! leads a terminal's quorum queue killed or cut off mid-stream, a rolling
//! restart, and every node restarting at once. Each time every change the
//! publisher was told is safe is applied, once, in order.
//!
//! They need root and a few minutes, and they start brokers of their own,
//! so a plain `cargo test` skips them; CI runs them as a step of its own:
//! `cargo test --test cluster -- --ignored --test-threads=1`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use possync_core::{Config, LicenseKey, Publisher, QueueType, Status};
use possync_rabbitmq_cluster::Cluster;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fault must be over, and the terminal Live again, within this.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// Three nodes, started for one test and removed after it. The
/// terminal's own log goes to the test's output, which CI shows for a
/// failed test.
fn three_nodes() -> Cluster {
    possync_core::init_logging("info", possync_core::LogFormat::Human);
    tokio::task::block_in_place(|| Cluster::start(3)).unwrap_or_else(|err| {
        panic!("a three-node RabbitMQ cluster (needs root, iproute2, rabbitmq-server): {err}")
    })
}

/// A terminal and a publisher on every node of `cluster`, in node order,
/// with heartbeats short enough that a silent node is noticed in seconds.
fn cluster_config(cluster: &Cluster, dir: &std::path::Path, store: &LicenseKey) -> Config {
    let mut config = queue_config(dir, store, QueueType::Quorum);
    config.broker.urls = cluster.urls("heartbeat=5");
    config.broker.connect_timeout_secs = 3;
    // The nodes' net_ticktime is 10 s: they notice a node gone within
    // 12.5 s of last hearing it.
    config.broker.node_down_after_secs = 15;
    // Long enough for a whole cluster to come back from a power cut.
    config.broker.publish_retry_secs = 300;
    // Counted exactly: a copy the publisher sent again would count twice
    // if collapsed.
    config.terminal.collapse_min_batch = 0;
    config
}

/// Changes published in paced chunks by possync's publisher on a task of
/// its own, so that a fault meets the publisher mid-stream as well.
struct Stream {
    store: LicenseKey,
    seed: u64,
    publisher: Arc<Publisher>,
    published: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<usize, possync_core::PublishError>>,
}

impl Stream {
    /// Publishes up to `total` changes, `per_tick` every `tick`, until
    /// all are published or [`Stream::stop`] is called.
    async fn start(
        config: &Config,
        store: &LicenseKey,
        total: usize,
        per_tick: usize,
        tick: Duration,
    ) -> Self {
        let seed = 7;
        let (changes, _) = catalog_changes(store, total, seed);
        let publisher = Arc::new(Publisher::connect(&config.broker).await.expect("publisher"));
        let published = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let publisher = Arc::clone(&publisher);
            let published = Arc::clone(&published);
            let stop = Arc::clone(&stop);
            async move {
                for chunk in changes.chunks(per_tick) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    publisher.publish_envelopes(chunk.to_vec()).await?;
                    published.fetch_add(chunk.len(), Ordering::SeqCst);
                    tokio::time::sleep(tick).await;
                }
                Ok(published.load(Ordering::SeqCst))
            }
        });
        Self {
            store: store.clone(),
            seed,
            publisher,
            published,
            stop,
            task,
        }
    }

    fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }

    /// Lets the chunk being published finish and publishes no more.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for the publisher (every chunk it took confirmed), then for
    /// the terminal to apply all of it and a last marker; asserts that
    /// the terminal's catalog is exactly what the confirmed changes make,
    /// each applied once.
    async fn finish(self, mut terminal: RunningTerminal) {
        let published = self
            .task
            .await
            .expect("publisher task")
            .expect("every change confirmed despite the fault");
        let (_, model) = catalog_changes(&self.store, published, self.seed);
        terminal.wait_applied(published as u64).await;
        apply_last_marker(&self.publisher, &terminal, &self.store).await;
        let db = terminal.db();
        if let Ok(publisher) = Arc::try_unwrap(self.publisher) {
            publisher.close().await;
        }
        let status = terminal.stop().await;
        assert_eq!(
            status.applied,
            published as u64 + 1,
            "every confirmed change and the marker, nothing applied twice (duplicates skipped: {})",
            status.duplicates
        );
        assert_matches_model(&db, &model);
        assert_eq!(status.quarantined, 0, "nothing dead-lettered");
    }
}

/// The node the terminal's quorum queue is led by, asked of any node up.
fn leader(cluster: &Cluster, queue: &str) -> usize {
    for ask in 0..cluster.nodes().len() {
        if let Ok(Some(leader)) = tokio::task::block_in_place(|| cluster.leader_of(queue, ask)) {
            return leader;
        }
    }
    panic!("no node names a leader of {queue}");
}

/// Waits until the terminal has left Live and is Live again; how long
/// that took from `since`. On failure, what the nodes still up say of the
/// queue and its consumers.
async fn back_live(
    terminal: &mut RunningTerminal,
    cluster: &Cluster,
    since: Instant,
    what: &str,
) -> Duration {
    let left = tokio::time::timeout(FAILOVER_LIMIT, async {
        terminal
            .status
            .wait_for(|status| !status.is_live())
            .await
            .is_ok()
    })
    .await;
    assert!(left.is_ok(), "the terminal noticed {what}");
    let remaining = FAILOVER_LIMIT.saturating_sub(since.elapsed());
    let live = tokio::time::timeout(remaining, async {
        terminal.status.wait_for(Status::is_live).await.is_ok()
    })
    .await;
    let took = since.elapsed();
    if live.is_err() {
        let state = terminal.status.borrow().state.clone();
        panic!(
            "the terminal is not Live again within {FAILOVER_LIMIT:?} of {what}: {state:?}\n{}",
            tokio::task::block_in_place(|| describe(cluster, &terminal.topology.queue))
        );
    }
    eprintln!("from {what} to Live again: {took:?}");
    took
}

/// What each node that answers says of `queue` and its consumers.
fn describe(cluster: &Cluster, queue: &str) -> String {
    let mut said = String::new();
    for (index, node) in cluster.nodes().iter().enumerate() {
        for args in [
            &[
                "list_queues",
                "--timeout",
                "10",
                "name",
                "leader",
                "online",
                "consumers",
            ][..],
            &[
                "list_consumers",
                "--timeout",
                "10",
                "queue_name",
                "channel_pid",
            ][..],
            &[
                "list_unresponsive_queues",
                "--queue-timeout",
                "5000",
                "name",
                "pid",
            ][..],
        ] {
            let answer = cluster
                .rabbitmqctl(index, args)
                .unwrap_or_else(|err| err.to_string());
            let lines: Vec<&str> = answer
                .lines()
                .filter(|line| line.contains(queue) || !line.contains("possync."))
                .collect();
            said.push_str(&format!(
                "{} {}:\n{}\n",
                node.name(),
                args[0],
                lines.join("\n")
            ));
        }
    }
    said
}

/// The leader of the terminal's queue goes away mid-stream by `fault`;
/// the terminal, connected to it, fails over within the limit, and the
/// node comes back by `recover`.
async fn leader_lost_mid_stream(
    label: &str,
    fault: impl FnOnce(&mut Cluster, usize),
    recover: impl FnOnce(&mut Cluster, usize),
) {
    const CHANGES: usize = 10_000;
    let mut cluster = three_nodes();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license(label);
    let config = cluster_config(&cluster, dir.path(), &store);
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let queue = terminal.topology.queue.clone();
    // The terminal connected to the first URL, which declared its queue
    // there: that node leads it, so the fault takes both at once.
    let led_by = leader(&cluster, &queue);
    assert_eq!(led_by, 0, "the queue is led where the terminal declared it");

    let stream = Stream::start(&config, &store, CHANGES, 100, Duration::from_millis(20)).await;
    eventually("the stream to be under way", || {
        stream.published() >= 3_000 && terminal.status.borrow().applied >= 1_000
    })
    .await;
    eprintln!(
        "{label}: node {} leads the queue; the fault now",
        led_by + 1
    );
    let published_before = stream.published();
    let at = Instant::now();
    tokio::task::block_in_place(|| fault(&mut cluster, led_by));
    assert!(
        published_before < CHANGES,
        "the publisher is still publishing when the node goes, so it fails over too"
    );
    let took = back_live(&mut terminal, &cluster, at, label).await;
    // Sooner, the broker could still deliver to the consumer on the lost
    // node, and later changes would overtake the ones it holds.
    let wait = Duration::from_secs(config.broker.node_down_after_secs);
    assert!(
        took >= wait,
        "the terminal took its queue over {took:?} after the fault, before the cluster noticed the node gone ({wait:?})"
    );
    let new_leader = leader(&cluster, &queue);
    assert_ne!(new_leader, led_by, "another node leads the queue now");

    tokio::task::block_in_place(|| recover(&mut cluster, led_by));
    stream.finish(terminal).await;
    tokio::task::block_in_place(|| cluster.wait_joined(Duration::from_secs(120)))
        .expect("the node rejoins the cluster");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts a RabbitMQ cluster of its own (root); CI runs it: cargo test --test cluster -- --ignored"]
async fn the_node_leading_a_terminals_queue_killed_mid_stream_loses_nothing_and_fails_over_in_time()
{
    let _serial = SERIAL.lock().await;
    leader_lost_mid_stream(
        "killed",
        |cluster, node| cluster.kill_node(node).expect("SIGKILL the node"),
        |cluster, node| cluster.start_node(node).expect("the node starts again"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts a RabbitMQ cluster of its own (root); CI runs it: cargo test --test cluster -- --ignored"]
async fn the_node_leading_a_terminals_queue_cut_off_mid_stream_loses_nothing_and_heals() {
    let _serial = SERIAL.lock().await;
    leader_lost_mid_stream(
        "cut",
        |cluster, node| cluster.cut_off(node).expect("cut the node off"),
        |cluster, node| cluster.heal(node).expect("connect the node again"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts a RabbitMQ cluster of its own (root); CI runs it: cargo test --test cluster -- --ignored"]
async fn a_rolling_restart_of_every_node_during_a_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = three_nodes();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("rolling");
    let config = cluster_config(&cluster, dir.path(), &store);
    let terminal = RunningTerminal::start(config.clone()).await;
    // Paced to last longer than the restarts; stopped after them.
    let stream = Stream::start(&config, &store, 60_000, 50, Duration::from_millis(50)).await;
    eventually("the stream to be under way", || stream.published() >= 1_000).await;
    for node in 0..3 {
        tokio::task::block_in_place(|| {
            cluster.stop_node(node).expect("rabbitmqctl stop");
            cluster.start_node(node).expect("the node starts again");
            cluster
                .wait_joined(Duration::from_secs(120))
                .expect("the node rejoins the cluster");
        });
        eprintln!(
            "node {} restarted; {} changes published so far",
            node + 1,
            stream.published()
        );
    }
    let before_stop = stream.published();
    eventually("the stream to go on after the last restart", || {
        stream.published() >= before_stop + 500
    })
    .await;
    stream.stop();
    stream.finish(terminal).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts a RabbitMQ cluster of its own (root); CI runs it: cargo test --test cluster -- --ignored"]
async fn every_node_losing_power_at_once_mid_stream_keeps_every_confirmed_change() {
    let _serial = SERIAL.lock().await;
    let mut cluster = three_nodes();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("power");
    let config = cluster_config(&cluster, dir.path(), &store);
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let stream = Stream::start(&config, &store, 10_000, 100, Duration::from_millis(20)).await;
    eventually("the stream to be under way", || {
        stream.published() >= 3_000 && terminal.status.borrow().applied >= 1_000
    })
    .await;
    let at = Instant::now();
    tokio::task::block_in_place(|| {
        for node in 0..3 {
            cluster.kill_node(node).expect("SIGKILL the node");
        }
    });
    let offline = terminal.wait_for(|status| !status.is_live()).await;
    assert!(offline, "the terminal noticed the cluster gone");
    tokio::task::block_in_place(|| {
        cluster.start_all().expect("every node starts again");
        cluster
            .wait_joined(Duration::from_secs(180))
            .expect("the nodes form the cluster again");
    });
    eprintln!("the cluster was back after {:?}", at.elapsed());
    stream.finish(terminal).await;
}
