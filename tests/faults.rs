//! Faults of the broker itself: connections closed under a running stream,
//! the broker application stopped and started. These tests disturb every
//! connection on the broker, so they run one at a time, in a test binary of
//! their own (`cargo test` runs test binaries one after another).

mod common;

use std::sync::Arc;

use common::*;
use possync_core::{LicenseKey, Publisher, QueueType, State};
use possync_sdk::Payload;

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

/// Publishes one last change, which changes nothing in `products`, and waits
/// until the terminal has applied it. The queue delivers in order,
/// redeliveries first, so by then every message ahead of it (redeliveries of
/// what a lost connection left unacknowledged, messages the publisher sent
/// again) has been delivered and handled: the counters the terminal stops
/// with are final. Counts as one applied message.
async fn apply_last_marker(publisher: &Publisher, terminal: &RunningTerminal, store: &LicenseKey) {
    let id = format!("{store}-last");
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
