//! Shared helpers for the integration tests: a real RabbitMQ, real SQLite
//! files, unique names per test so tests run in parallel.
#![allow(dead_code, unreachable_pub)]

pub mod backend;
pub mod browser;
pub mod catalog;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use possync_core::{
    Config, InProcessBroker, LicenseKey, Registry, State, Status, Terminal, TerminalId,
    TerminalSettings, TerminalTopology,
};
use tokio::sync::watch;

// Linked so its plugins register in the test binaries, as in `possync`.
use possync_catalog as _;
use possync_orders as _;

pub const WAIT: Duration = Duration::from_secs(30);

/// The broker the tests use: `POSSYNC_TEST_AMQP_URL`, else the local default.
pub fn amqp_url() -> String {
    std::env::var("POSSYNC_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Connects to the test broker. Without one the test fails: a skipped
/// broker test would hide a broken system.
pub async fn broker() -> Connection {
    match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(err) => panic!(
            "these tests need RabbitMQ at {} ({err}); start it with `rabbitmq-server -detached` or set POSSYNC_TEST_AMQP_URL",
            possync_core::redact_url(&amqp_url())
        ),
    }
}

/// Deletes a queue, as its expiry does while a till is off.
pub async fn delete_queue(queue: &str) {
    let channel = broker().await.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.into(), Default::default())
        .await
        .expect("queue deleted");
}

/// A license key no other test uses.
pub fn unique_license(label: &str) -> LicenseKey {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    LicenseKey::new(format!("T-{label}-{}", &suffix[20..])).expect("valid test license key")
}

/// A config for terminal `terminal` of `license`, its database under `dir`.
pub fn terminal_config(dir: &Path, license: &LicenseKey, terminal: &str) -> Config {
    let mut config = Config::default();
    config.broker.urls = vec![amqp_url()];
    config.terminal.license_key = Some(license.clone());
    config.terminal.terminal_id = Some(TerminalId::new(terminal).expect("valid terminal id"));
    config.terminal.database = dir.join(format!("{license}-{terminal}.db"));
    // Test queues vanish soon after the test.
    config.terminal.queue_expiry_days = 1;
    config
}

/// [`terminal_config`] for terminal `till-1` with a queue of `queue_type`.
pub fn queue_config(dir: &Path, store: &LicenseKey, queue_type: possync_core::QueueType) -> Config {
    let mut config = terminal_config(dir, store, "till-1");
    config.broker.queue_type = queue_type;
    config
}

/// A terminal running in this process.
pub struct RunningTerminal {
    pub database: PathBuf,
    pub topology: TerminalTopology,
    pub status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), possync_core::TerminalError>>,
}

impl RunningTerminal {
    /// Starts a terminal and waits until it is live.
    pub async fn start(config: Config) -> Self {
        Self::start_on(config, None).await
    }

    /// Starts a terminal on `broker`'s in-process queues instead of RabbitMQ.
    pub async fn start_in_process(config: Config, broker: &InProcessBroker) -> Self {
        Self::start_on(config, Some(broker.clone())).await
    }

    async fn start_on(config: Config, in_process: Option<InProcessBroker>) -> Self {
        let database = config.terminal.database.clone();
        let registry = Registry::from_config(&config.plugins).expect("built-in plugins");
        let settings = TerminalSettings::from_config(config).expect("a terminal's config");
        let terminal = Terminal::new(settings, registry).expect("terminal starts");
        let topology = terminal.topology().clone();
        let mut status = terminal.status();
        let (stop, mut stopped) = watch::channel(false);
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let task = match in_process {
            None => tokio::spawn(terminal.run(shutdown)),
            Some(broker) => {
                tokio::spawn(async move { terminal.run_in_process(&broker, shutdown).await })
            }
        };
        tokio::time::timeout(WAIT, status.wait_for(Status::is_live))
            .await
            .expect("terminal goes live in time")
            .expect("terminal status");
        Self {
            database,
            topology,
            status,
            stop,
            task,
        }
    }

    /// Waits until the terminal applied at least `count` messages.
    pub async fn wait_applied(&mut self, count: u64) {
        let reached = tokio::time::timeout(WAIT, self.status.wait_for(|s| s.applied >= count))
            .await
            .is_ok();
        assert!(
            reached,
            "terminal applied {} of {count} messages in time",
            self.status.borrow().applied
        );
    }

    /// Waits until the terminal handled `applied` messages and quarantined `quarantined`.
    pub async fn wait_settled(&mut self, applied: u64, quarantined: u64) {
        let reached = tokio::time::timeout(
            WAIT,
            self.status
                .wait_for(|s| s.applied >= applied && s.quarantined >= quarantined),
        )
        .await
        .is_ok();
        let now = self.status.borrow().clone();
        assert!(
            reached,
            "expected {applied} applied and {quarantined} quarantined, got {now:?}"
        );
    }

    /// Waits until the status satisfies `done`; false after [`WAIT`].
    pub async fn wait_for(&mut self, done: impl Fn(&Status) -> bool) -> bool {
        tokio::time::timeout(WAIT, self.status.wait_for(|s| done(s)))
            .await
            .is_ok()
    }

    /// Waits for the next status update after the last one seen and returns
    /// its state. While the terminal is offline only its connection attempts
    /// update the status, each reporting its outcome anew (Offline with the
    /// latest reason, even an unchanged one, or Live): so this is the next
    /// attempt's outcome.
    pub async fn next_report(&mut self) -> State {
        let changed = tokio::time::timeout(WAIT, self.status.changed())
            .await
            .expect("the terminal reports again in time");
        changed.expect("terminal status");
        self.status.borrow_and_update().state.clone()
    }

    /// Stops the terminal cleanly and returns its final status: every
    /// message it acknowledged is counted in it.
    pub async fn stop(self) -> Status {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("terminal task")
            .expect("terminal stops cleanly");
        self.status.borrow().clone()
    }

    /// Opens the terminal's database to look at it.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.database).expect("open database")
    }
}

/// Publishes `body` on the contract exchange with a plain AMQP client.
pub async fn publish_raw(routing_key: &str, body: &[u8]) {
    publish_raw_many(&[(routing_key.to_owned(), body.to_vec())]).await;
}

/// Publishes each `(routing key, body)` in order on one channel, as another
/// back office would, and waits for every confirm.
pub async fn publish_raw_many(messages: &[(String, Vec<u8>)]) {
    let connection = broker().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::with_capacity(messages.len());
    for (routing_key, body) in messages {
        let confirm = channel
            .basic_publish(
                "pos_license_events".into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// Publishes `count` random catalog changes to `store` with possync's
/// publisher and checks that `terminal` ends holding exactly their catalog.
pub async fn sync_and_check(
    terminal: &mut RunningTerminal,
    store: &LicenseKey,
    count: usize,
    seed: u64,
) {
    let (changes, model) = catalog_changes(store, count, seed);
    let mut config = Config::default();
    config.broker.urls = vec![amqp_url()];
    let publisher = possync_core::Publisher::connect(&config.broker)
        .await
        .expect("publisher");
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(count as u64).await;
    assert_matches_model(&terminal.db(), &model);
    publisher.close().await;
}

/// Messages waiting in `queue`.
pub async fn queue_depth(queue: &str) -> u32 {
    let connection = broker().await;
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = connection.close(200, "bye".into()).await;
    declared.message_count()
}

/// `queue` as the broker itself counts it: a passive declare shows neither
/// the unacknowledged deliveries nor, after a consumer's connection closed,
/// whether they went back to the queue yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacknowledged: u64,
    pub consumers: u64,
}

/// The counts of `queue` from `rabbitmqctl list_queues`: exact for a classic
/// queue; a quorum queue's are refreshed only every few seconds.
pub fn queue_counts(queue: &str) -> QueueCounts {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .output()
        .expect("run rabbitmqctl");
    let listed = text(&output.stdout);
    assert!(
        output.status.success(),
        "rabbitmqctl list_queues: {}",
        text(&output.stderr)
    );
    let row = listed
        .lines()
        .map(|line| line.split('\t').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&queue))
        .unwrap_or_else(|| panic!("rabbitmqctl lists no queue {queue}:\n{listed}"));
    let number = |i: usize| -> u64 {
        row.get(i)
            .and_then(|field| field.trim().parse().ok())
            .unwrap_or_else(|| panic!("rabbitmqctl row for {queue}: {row:?}"))
    };
    QueueCounts {
        ready: number(1),
        unacknowledged: number(2),
        consumers: number(3),
    }
}

/// Polls the counts of `queue` until `done` holds, and returns them.
pub async fn wait_for_queue(
    queue: &str,
    what: &str,
    done: impl Fn(&QueueCounts) -> bool,
) -> QueueCounts {
    let mut last = None;
    eventually(what, || {
        let counts = queue_counts(queue);
        let reached = done(&counts);
        last = Some(counts);
        reached
    })
    .await;
    last.expect("counted at least once")
}

/// Takes up to `count` messages from `queue` (acknowledging them).
pub async fn drain(queue: &str, count: usize) -> Vec<lapin::message::Delivery> {
    let connection = broker().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut taken = Vec::new();
    while taken.len() < count {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(Ok(delivery))) => taken.push(delivery),
            _ => break,
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    taken
}

/// Runs the `possync` binary with the test broker configured.
pub fn possync(args: &[&str]) -> Output {
    possync_command(args).output().expect("run possync")
}

pub fn possync_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_possync"));
    command
        .args(args)
        .env("POSSYNC_BROKER__URL", amqp_url())
        .env_remove("POSSYNC_CONFIG");
    command
}

/// A child process whose stderr is read line by line as it is written, so
/// that a test can wait for the log line that proves a state (Live, Offline,
/// ...) before acting, and still see the whole log afterwards.
pub struct ChildLog {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl ChildLog {
    /// Starts `command` with its stderr piped here.
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the child process");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        // A thread, so that reading never blocks the test's runtime; it ends
        // when the process closes its stderr, which closes the channel.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                if sender.send(text(&line)).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("send the signal");
    }

    /// Waits until the process logs a line containing `needle`; returns it.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        self.wait_for_line_where(&format!("a line with {needle:?}"), |line| {
            line.contains(needle)
        })
        .await
    }

    /// Waits until the process has logged a line containing `needle`,
    /// among the lines already waited for or the next ones.
    pub async fn wait_for_logged(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|line| line.contains(needle)) {
            return line.clone();
        }
        self.wait_for_line(needle).await
    }

    /// Waits until the process logs a line for which `found` holds; returns it.
    pub async fn wait_for_line_where(
        &mut self,
        what: &str,
        found: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "the process closed its log without {what}:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "no {what} logged within {WAIT:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its exit status and the whole
    /// log, the lines already waited for included.
    pub async fn exit(mut self) -> (ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => break,
                Err(_) => panic!(
                    "the process did not exit within {WAIT:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        // Its stderr closed: the process has exited (possync keeps it open).
        let status = self.child.wait().expect("reap the process");
        (status, self.seen.join("\n"))
    }
}

impl Drop for ChildLog {
    /// A test that fails half-way leaves no process behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `probe` until it returns true.
pub async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`], for a probe that awaits (an HTTP call).
pub async fn eventually_async<F: Future<Output = bool>>(what: &str, mut probe: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One row of `products`: (name, price, category_id, icon_name).
pub fn product(
    db: &rusqlite::Connection,
    id: &str,
) -> Option<(String, f64, Option<String>, Option<String>)> {
    db.query_row(
        "SELECT name, price, category_id, icon_name FROM products WHERE id = ?1",
        [id],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
    )
    .ok()
}

pub fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |row| row.get(0))
        .expect("count query")
}

/// The catalog a sequence of changes must leave behind, computed without
/// possync: each test compares the terminal's database against it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Model {
    /// id -> (name, price, category_id)
    pub products: std::collections::BTreeMap<String, (String, f64, Option<String>)>,
}

/// `count` random catalog changes for `store` over a few dozen products
/// (updates, price changes, deletes), and the catalog they produce in order.
pub fn catalog_changes(
    store: &LicenseKey,
    count: usize,
    seed: u64,
) -> (Vec<possync_sdk::Envelope>, Model) {
    use possync_sdk::Payload;
    let mut state = seed.max(1);
    let mut next = move |bound: u64| {
        // xorshift64: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let mut model = Model::default();
    let mut envelopes = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("P{:03}", next(60));
        let envelope = match next(10) {
            0..=4 => {
                let name = format!("Product {id} v{i}");
                let price = (next(10_000) as f64) / 100.0;
                let category = format!("C{}", next(5));
                model
                    .products
                    .insert(id.clone(), (name.clone(), price, Some(category.clone())));
                possync_catalog::ProductUpdate {
                    product_id: id,
                    product_name: name,
                    price,
                    category_id: Some(category),
                    icon_name: None,
                }
                .to_envelope(store.as_str())
            }
            5..=7 => {
                let price = (next(10_000) as f64) / 100.0;
                let entry = model
                    .products
                    .entry(id.clone())
                    .or_insert((String::new(), 0.0, None));
                entry.1 = price;
                possync_catalog::PriceUpdate {
                    product_id: id,
                    new_price: price,
                    product_name: None,
                }
                .to_envelope(store.as_str())
            }
            _ => {
                model.products.remove(&id);
                possync_catalog::ProductDelete { product_id: id }.to_envelope(store.as_str())
            }
        };
        envelopes.push(envelope.expect("envelope"));
    }
    (envelopes, model)
}

/// Publishes one last change, which changes nothing in `products`, and waits
/// until the terminal has applied it. The queue delivers in order,
/// redeliveries first, so by then every message ahead of it (redeliveries of
/// what a lost connection left unacknowledged, messages the publisher sent
/// again) has been delivered and handled: the counters the terminal stops
/// with are final. Counts as one applied message.
pub async fn apply_last_marker(
    publisher: &possync_core::Publisher,
    terminal: &RunningTerminal,
    store: &LicenseKey,
) {
    let id = format!("{store}-last");
    use possync_sdk::Payload;
    let marker = possync_catalog::ProductDelete {
        product_id: "LAST".into(),
    }
    .to_envelope(store.as_str())
    .expect("envelope")
    .with_message_id(id.clone());
    publisher
        .publish_envelopes([marker])
        .await
        .expect("the marker confirmed");
    let db = terminal.db();
    eventually("the last marker to be applied", || {
        db.query_row(
            "SELECT count(*) FROM possync_applied WHERE message_id = ?1",
            [&id],
            |row| row.get::<_, i64>(0),
        )
        .expect("query")
            == 1
    })
    .await;
}

/// Asserts that the database holds exactly the model's products.
pub fn assert_matches_model(db: &rusqlite::Connection, model: &Model) {
    let mut statement = db
        .prepare("SELECT id, name, price, category_id FROM products ORDER BY id")
        .expect("query");
    let actual: std::collections::BTreeMap<String, (String, f64, Option<String>)> = statement
        .query_map([], |row| {
            Ok((row.get(0)?, (row.get(1)?, row.get(2)?, row.get(3)?)))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("products");
    assert_eq!(actual.len(), model.products.len(), "number of products");
    assert_eq!(
        actual, model.products,
        "the database equals the expected catalog"
    );
}

/// Runs `rabbitmqctl` (the tests run as root on the broker's machine).
pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        text(&output.stderr)
    );
}

/// The reasons in `possync_quarantine`, oldest first.
pub fn quarantine_reasons(db: &rusqlite::Connection) -> Vec<String> {
    db.prepare("SELECT reason FROM possync_quarantine ORDER BY id")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("reasons")
}

/// The plugin libraries the tests load, built on first use with the same
/// compiler and profile as the tests (`cargo test` does not build cdylibs).
///
/// The plugins export themselves only with their feature `dynamic` (their
/// rlibs, linked into the tests for their payload types, must not).
/// `possync-fixture-layout-changed` is built on its own, with its feature
/// that turns on the SDK's test-only layout change: cargo unifies features
/// across the packages of one build, so built beside the others it would
/// change their layout too.
pub fn plugin_library(package: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let packages = [
            "possync-plugin-modifier-groups",
            "possync-plugin-product-images",
            "possync-fixture-panicky",
            "possync-fixture-old-sdk",
            "possync-fixture-newer-sdk",
            "possync-fixture-old-format",
            "possync-fixture-not-a-plugin",
            "possync-fixture-compatible",
            "possync-fixture-prerelease-sdk",
        ];
        let mut together = Command::new(env!("CARGO"));
        together.arg("build");
        for package in packages {
            together.args(["-p", package]);
        }
        together.args([
            "--features",
            "possync-plugin-modifier-groups/dynamic,possync-plugin-product-images/dynamic",
        ]);
        let mut alone = Command::new(env!("CARGO"));
        alone.args([
            "build",
            "-p",
            "possync-fixture-layout-changed",
            "--features",
            "possync-fixture-layout-changed/changed",
        ]);
        for mut command in [together, alone] {
            let output = command
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .expect("run cargo build for the plugins");
            assert!(
                output.status.success(),
                "building the plugins failed:\n{}",
                text(&output.stderr)
            );
        }
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    target.join("debug").join(file)
}

/// A `[plugins.<name>]` table for the library of `package`.
pub fn dynamic_plugin(package: &str, settings: serde_json::Value) -> possync_core::PluginSetting {
    let settings = match settings {
        serde_json::Value::Object(map) => map.into_iter().collect(),
        _ => Default::default(),
    };
    possync_core::PluginSetting::Dynamic(possync_core::DynamicPlugin {
        path: plugin_library(package),
        enabled: true,
        settings,
    })
}

/// A free loopback port for a status page.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `GET path` on the status page at `port`: (status code, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the status page");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A config whose terminal serves its status page on a free port.
pub fn with_status_page(mut config: Config) -> (Config, u16) {
    let port = free_port();
    config.status.enabled = true;
    config.status.port = port;
    (config, port)
}

/// Checks what `possync demo --dir DIR` left: each store's terminals hold
/// that store's catalog, with the demo's later changes applied, and nothing
/// of the other store.
pub fn assert_demo_databases(dir: &Path) {
    for till in ["demo-cafe-till-1.db", "demo-cafe-till-2.db"] {
        let db = rusqlite::Connection::open(dir.join(till)).expect("open demo database");
        assert_eq!(product(&db, "CAP").map(|p| p.1), Some(3.40), "{till}");
        assert_eq!(product(&db, "LAT"), None, "{till}: the latte was deleted");
        assert_eq!(count(&db, "SELECT count(*) FROM products"), 2, "{till}");
        assert_eq!(product(&db, "SOU"), None, "{till}: no bakery product");
    }
    let db = rusqlite::Connection::open(dir.join("demo-bakery-till-1.db")).expect("open");
    assert_eq!(product(&db, "BAG").map(|p| p.1), Some(2.50));
    assert_eq!(count(&db, "SELECT count(*) FROM products"), 2);
    assert_eq!(product(&db, "CAP"), None, "no cafe product");
}

/// `url` as headless Chromium renders it (the DOM after loading), with
/// `flags` added to its command line.
pub fn rendered_url(url: &str, flags: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("this test needs Chromium (Debian: apt-get install chromium); .ci/run installs it");
    text(&output.stdout)
}
