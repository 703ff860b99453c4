//! Faults of the broker itself: connections closed under a running stream,
//! the broker application stopped and started. These tests disturb every
//! connection on the broker, so they run one at a time, in a test binary of
//! their own (`cargo test` runs test binaries one after another).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use possync_core::{LicenseKey, Publisher, QueueType, State};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the broker application again even if the test fails half-way.
struct AppRestarter;

impl Drop for AppRestarter {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

async fn connections_closed_mid_stream(queue_type: QueueType) {
    const CHANGES: usize = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("closed");
    let mut config = queue_config(dir.path(), &store, queue_type);
    // Counted exactly: a copy the publisher sent again after a close is
    // stale, while collapsed it would count as applied a second time.
    config.terminal.collapse_min_batch = 0;
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let (changes, model) = catalog_changes(&store, CHANGES, 42);
    let publisher = Arc::new(Publisher::connect(&config.broker).await.expect("publisher"));
    let publishing = tokio::spawn({
        let publisher = Arc::clone(&publisher);
        async move { publisher.publish_envelopes(changes).await.map(|p| p.len()) }
    });

    for threshold in [1_000, 4_000, 7_000] {
        eventually("the stream to progress", || {
            terminal.status.borrow().applied >= threshold
        })
        .await;
        rabbitmqctl(&["close_all_connections", "possync fault test"]);
    }
    let published = publishing
        .await
        .expect("publisher task")
        .expect("every change confirmed despite the closes");
    assert_eq!(published, CHANGES);
    terminal.wait_applied(CHANGES as u64).await;
    apply_last_marker(&publisher, &terminal, &store).await;

    let live = terminal.wait_for(possync_core::Status::is_live).await;
    assert!(
        live,
        "the terminal ends Live: {:?}",
        terminal.status.borrow().state
    );
    let db = terminal.db();
    if let Ok(publisher) = Arc::try_unwrap(publisher) {
        publisher.close().await;
    }
    let status = terminal.stop().await;
    assert_eq!(
        status.applied,
        CHANGES as u64 + 1,
        "the changes and the marker, nothing applied twice (duplicates skipped: {})",
        status.duplicates
    );
    assert_matches_model(&db, &model);
    // The publisher's numbers told the copies apart: only the marker,
    // whose id the test chose, has a record of its own.
    assert_eq!(count(&db, "SELECT count(*) FROM possync_applied"), 1);
    assert!(count(&db, "SELECT count(*) FROM possync_publishers") >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_all_connections_mid_stream_loses_nothing_and_applies_nothing_twice_classic() {
    let _serial = SERIAL.lock().await;
    connections_closed_mid_stream(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_all_connections_mid_stream_loses_nothing_and_applies_nothing_twice_quorum() {
    let _serial = SERIAL.lock().await;
    connections_closed_mid_stream(QueueType::Quorum).await;
}

async fn broker_restarted_mid_stream(queue_type: QueueType) {
    const CHANGES: usize = 4_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("restart");
    let config = queue_config(dir.path(), &store, queue_type);
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let (changes, model) = catalog_changes(&store, CHANGES, 99);
    let (first, second) = changes.split_at(CHANGES / 2);
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(first.to_vec())
        .await
        .expect("first half confirmed");

    eventually("the stream to progress", || {
        terminal.status.borrow().applied >= 200
    })
    .await;
    let restarter = AppRestarter;
    rabbitmqctl(&["stop_app"]);
    let offline = terminal
        .wait_for(|s| matches!(s.state, State::Offline { .. }))
        .await;
    assert!(
        offline,
        "the terminal shows Offline while the broker is down"
    );
    let status = possync_command(&["status"])
        .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
        .output()
        .expect("status");
    let shown = text(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{shown}");
    assert!(
        shown.starts_with("Offline since ") && shown.contains("reason "),
        "{shown}"
    );
    // Down until a reconnect has failed: the recovery below follows failed
    // attempts, as after a real outage.
    let retried = terminal.next_report().await;
    assert!(
        matches!(retried, State::Offline { .. }),
        "no reconnect succeeds while the broker is down: {retried:?}"
    );
    rabbitmqctl(&["start_app"]);
    drop(restarter);

    let live = terminal.wait_for(possync_core::Status::is_live).await;
    assert!(live, "the terminal recovers by itself");
    publisher
        .publish_envelopes(second.to_vec())
        .await
        .expect("second half confirmed after the restart");
    terminal.wait_applied(CHANGES as u64).await;
    apply_last_marker(&publisher, &terminal, &store).await;

    let db = terminal.db();
    publisher.close().await;
    let status = terminal.stop().await;
    assert_eq!(
        status.applied,
        CHANGES as u64 + 1,
        "the changes and the marker: nothing lost, nothing applied twice"
    );
    assert_matches_model(&db, &model);
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_and_starting_the_broker_mid_stream_the_terminal_recovers_and_catches_up_classic()
{
    let _serial = SERIAL.lock().await;
    broker_restarted_mid_stream(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_and_starting_the_broker_mid_stream_the_terminal_recovers_and_catches_up_quorum() {
    let _serial = SERIAL.lock().await;
    broker_restarted_mid_stream(QueueType::Quorum).await;
}

/// The status page as headless Chromium renders it.
fn rendered_page(port: u16) -> String {
    rendered_url(&format!("http://127.0.0.1:{port}/"), &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_badge_turns_offline_when_the_broker_goes_and_live_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("badge");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let mut terminal = RunningTerminal::start(config).await;
    let page = tokio::task::spawn_blocking(move || rendered_page(port))
        .await
        .expect("chromium");
    assert!(page.contains("id=\"badge\">Live sync<"), "{page}");

    let restarter = AppRestarter;
    rabbitmqctl(&["stop_app"]);
    assert!(
        terminal
            .wait_for(|s| matches!(s.state, State::Offline { .. }))
            .await
    );
    let page = tokio::task::spawn_blocking(move || rendered_page(port))
        .await
        .expect("chromium");
    assert!(page.contains("id=\"badge\">Offline since "), "{page}");
    rabbitmqctl(&["start_app"]);
    drop(restarter);

    assert!(
        terminal.wait_for(possync_core::Status::is_live).await,
        "the terminal recovers"
    );
    let page = tokio::task::spawn_blocking(move || rendered_page(port))
        .await
        .expect("chromium");
    assert!(page.contains("id=\"badge\">Live sync<"), "{page}");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_stopped_the_demo_runs_in_process_and_says_so() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let restarter = AppRestarter;
    rabbitmqctl(&["stop_app"]);
    let mut demo = possync_command(&["demo", "--dir"]);
    demo.arg(dir.path());
    let output = tokio::task::spawn_blocking(move || demo.output())
        .await
        .expect("demo task")
        .expect("run the demo");
    rabbitmqctl(&["start_app"]);
    drop(restarter);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("no broker answers at amqp://"), "{stdout}");
    assert!(stdout.contains("in-process transport"), "{stdout}");
    assert!(stdout.contains("published in-process"), "{stdout}");
    assert_demo_databases(dir.path());
}

/// The orders a store's terminals sent, as the backend recorded them:
/// (order id, message id), in the order recorded.
fn recorded_orders(
    backend: &common::backend::Backend,
    store: &LicenseKey,
) -> Vec<(String, String)> {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        &backend.database,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return Vec::new();
    };
    let Ok(mut statement) = db.prepare(
        "SELECT json_extract(payload, '$.order_id'), message_id FROM upstream
         WHERE store = ?1 AND message_type = 'order' ORDER BY cursor",
    ) else {
        return Vec::new();
    };
    statement
        .query_map([store.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
        .and_then(Iterator::collect)
        .unwrap_or_default()
}

/// Till-1 of `store`'s config file in `dir`: (its database, the file).
fn till_config(
    dir: &std::path::Path,
    store: &LicenseKey,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let database = dir.join("till-1.db");
    let file = dir.join("terminal.toml");
    std::fs::write(
        &file,
        format!(
            "[terminal]\nlicense_key = \"{store}\"\nterminal_id = \"till-1\"\ndatabase = {:?}\nqueue_expiry_days = 1\n",
            database.display().to_string()
        ),
    )
    .expect("write the terminal's config");
    (database, file)
}

/// Runs `possync terminal` as a process of its own, which the test can kill.
fn spawn_terminal(file: &std::path::Path) -> ChildLog {
    ChildLog::spawn(
        possync_command(&["terminal", "--config", file.to_str().expect("utf-8")])
            .env("POSSYNC_BROKER__URL", amqp_url()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_reach_the_backend_once_each_in_order_through_closed_connections_and_a_killed_terminal()
 {
    const ORDERS: usize = 1_000;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("orders");
    let mut backend = common::backend::Backend::with_upstream_for("orders", &[&store]);
    backend.start_upstream().await;

    let (database, file) = till_config(dir.path(), &store);
    // Killed once in the one window nothing outside reaches: after the
    // broker confirmed a round of orders, before they left the outbox.
    let paused = dir.path().join("paused");
    let mut terminal = ChildLog::spawn(
        possync_command(&["terminal", "--config", file.to_str().expect("utf-8")])
            .env("POSSYNC_BROKER__URL", amqp_url())
            .env("POSSYNC_FAILPOINT_PAUSE_AFTER_UPLINK_CONFIRM", &paused),
    );
    terminal.wait_for_line("uplink_live").await;

    // The POS app: orders one after another, in transactions of its own,
    // whatever the terminal is doing.
    let app = std::thread::spawn({
        let database = database.clone();
        move || {
            let db = rusqlite::Connection::open(&database).expect("the POS app opens the database");
            db.busy_timeout(Duration::from_secs(10))
                .expect("busy timeout");
            for n in 0..ORDERS {
                let payload = serde_json::json!({
                    "order_id": format!("O-{n:04}"),
                    "lines": [{"product_id": format!("P{}", n % 17), "quantity": 1 + n % 3, "unit_price": 2.5}],
                    "total": 2.5 * (1 + n % 3) as f64,
                });
                db.execute(
                    "INSERT INTO possync_outbox (type, payload) VALUES ('order', ?1)",
                    [payload.to_string()],
                )
                .expect("the POS app writes an order");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });

    let reached = |threshold: usize| {
        let backend = &backend;
        let store = &store;
        async move {
            let deadline = std::time::Instant::now() + WAIT * 2;
            while recorded_orders(backend, store).len() < threshold {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the backend never recorded {threshold} orders"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    eventually("the uplink to pause after a confirm", || paused.exists()).await;
    let sent_before_the_kill = recorded_orders(&backend, &store).len();
    terminal.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = terminal.exit().await;
    let mut terminal = spawn_terminal(&file);
    terminal.wait_for_line("uplink_live").await;
    reached(sent_before_the_kill.max(1) + 150).await;
    rabbitmqctl(&["close_all_connections", "possync fault test"]);
    reached(sent_before_the_kill.max(1) + 350).await;
    rabbitmqctl(&["close_all_connections", "possync fault test"]);
    reached(sent_before_the_kill.max(1) + 500).await;
    rabbitmqctl(&["close_all_connections", "possync fault test"]);
    app.join().expect("the POS app wrote every order");
    reached(ORDERS).await;
    // Anything sent twice would be recorded by now: the outbox is empty.
    let db = rusqlite::Connection::open(&database).expect("database");
    eventually("the outbox to empty", || {
        count(&db, "SELECT count(*) FROM possync_outbox") == 0
    })
    .await;
    // The round confirmed before the kill went up again after it: the
    // backend saw it twice, and recorded it once.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, metrics) = backend.api.call("GET", "/metrics", None).await;
        let duplicates = metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("possync_backend_upstream_duplicates_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if duplicates >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the round confirmed before the kill never came again: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let recorded = recorded_orders(&backend, &store);
    let expected: Vec<String> = (0..ORDERS).map(|n| format!("O-{n:04}")).collect();
    let order_ids: Vec<String> = recorded.iter().map(|(order, _)| order.clone()).collect();
    assert_eq!(
        order_ids.len(),
        ORDERS,
        "exactly the orders taken, none twice"
    );
    assert_eq!(order_ids, expected, "in the order the POS app took them");
    let ids: std::collections::HashSet<&String> = recorded.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), ORDERS, "one message id per order");
    // The order plugin applied each into the store's database, once.
    let store_db = backend.stores.join(format!("{store}.db"));
    eventually("the store database to hold every order", || {
        rusqlite::Connection::open(&store_db).ok().and_then(|db| {
            db.query_row("SELECT count(*) FROM orders", [], |row| {
                row.get::<_, i64>(0)
            })
            .ok()
        }) == Some(ORDERS as i64)
    })
    .await;
    let applied = format!("possync_backend_upstream_applied_total{{type=\"order\"}} {ORDERS}");
    eventually_async("the backend to count each order applied once", || async {
        let (_, metrics) = backend.api.call("GET", "/metrics", None).await;
        metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .any(|line| line == applied)
    })
    .await;
    terminal.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = terminal.exit().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_cut_off_twice_by_closed_connections_starts_again_and_ends_identical() {
    const PRODUCTS: usize = 20_000;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-cut");
    let backend = common::catalog::backend_for("snap-cut", &store).await;
    let head = common::catalog::submit(
        &backend,
        common::catalog::history(&store, PRODUCTS),
        "history",
    )
    .await;
    backend.wait_published(&store, head).await;

    let (database, file) = till_config(dir.path(), &store);
    let mut terminal = spawn_terminal(&file);
    for _ in 0..2 {
        terminal.wait_for_line("snapshot_started").await;
        rabbitmqctl(&["close_all_connections", "possync fault test"]);
    }
    terminal.wait_for_line("snapshot_applied").await;
    eventually("the till synced up to the head", || {
        possync_core::Database::open_read_only(&database)
            .and_then(|db| db.sync_state(store.as_str()))
            .is_ok_and(|sync| sync.synced_up_to == head && sync.gap.is_none())
    })
    .await;
    let catalog = common::catalog::BackendCatalog::catalog(&backend, &store).await;
    let db = rusqlite::Connection::open(&database).expect("the till's database");
    common::catalog::assert_database_holds(&db, &catalog, "the till");
    terminal.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, log) = terminal.exit().await;
    assert_eq!(
        log.matches("\"snapshot_failed\"").count(),
        2,
        "each cut-off snapshot was dropped: {log}"
    );
    assert!(
        !dir.path().join("till-1.db-snapshot").exists(),
        "no staging database left behind"
    );
}
