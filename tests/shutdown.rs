//! `possync terminal` stops cleanly on SIGTERM: nothing applied but left
//! unacknowledged, nothing acknowledged but left unapplied.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use possync_core::Publisher;
use possync_sdk::Payload;

const MESSAGES: usize = 5000;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_settles_exactly_what_was_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("stop");
    let config = terminal_config(dir.path(), &store, "till-1");
    // Declare the terminal's queue, then stop it: the changes queue up meanwhile.
    RunningTerminal::start(config.clone()).await.stop().await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let envelopes = (0..MESSAGES).map(|i| {
        possync_catalog::ProductUpdate {
            product_id: format!("P{i:05}"),
            product_name: format!("Product {i}"),
            price: 1.0,
            category_id: None,
            icon_name: None,
        }
        .to_envelope(store.as_str())
        .expect("envelope")
    });
    publisher
        .publish_envelopes(envelopes)
        .await
        .expect("all confirmed");
    publisher.close().await;

    let file = dir.path().join("terminal.toml");
    std::fs::write(
        &file,
        format!(
            "[terminal]\nlicense_key = \"{store}\"\nterminal_id = \"till-1\"\ndatabase = \"{}\"\nbatch_size = 10\nprefetch = 50\nqueue_expiry_days = 1\n",
            config.terminal.database.display()
        ),
    )
    .expect("write config");
    let mut child = ChildLog::spawn(&mut possync_command(&[
        "terminal",
        "--config",
        file.to_str().expect("utf-8"),
    ]));
    child.wait_for_line("Live").await;
    let db = rusqlite::Connection::open(&config.terminal.database).expect("db");
    eventually("the terminal to apply some changes", || {
        count(&db, "SELECT count(*) FROM products") >= 300
    })
    .await;
    let status = possync(&["status", "--config", file.to_str().expect("utf-8")]);
    assert!(
        status.status.success(),
        "`possync status` exits 0 while live: {}",
        text(&status.stdout)
    );
    let shown = text(&status.stdout);
    assert!(shown.starts_with("Live since "), "{shown}");
    assert!(
        shown.contains(&format!("store         {store} (terminal till-1)")),
        "{shown}"
    );

    // On a fast machine the stream may be done by now: the guarantee is the
    // same either way.
    child.signal(Signal::SIGTERM);
    let (exit, stderr) = child.exit().await;
    assert!(exit.success(), "exit 0 on SIGTERM: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    let status = possync(&["status", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "`possync status` exits 1 when not live"
    );
    assert!(
        text(&status.stdout).starts_with("Stopped since "),
        "{}",
        text(&status.stdout)
    );

    let applied = usize::try_from(count(&db, "SELECT count(*) FROM products")).expect("count");
    // One publisher session numbered the changes in order: its mark is
    // the number of changes committed.
    assert_eq!(
        count(
            &db,
            "SELECT coalesce(sum(last_seq), 0) FROM possync_publishers"
        ),
        applied as i64,
        "the publisher's mark counts every row"
    );
    // The deliveries the closed channel left unacknowledged go back to the
    // queue after the connection closed, not at once. (A classic queue: the
    // broker counts it exactly.)
    let queue = wait_for_queue(
        &format!("possync.{store}.till-1"),
        "the stopped terminal's deliveries to return to the queue",
        |q| q.consumers == 0 && q.unacknowledged == 0,
    )
    .await;
    let waiting = usize::try_from(queue.ready).expect("count");
    assert_eq!(
        applied + waiting,
        MESSAGES,
        "every message is either applied and acked, or unapplied and still queued"
    );

    // The rest applies after a restart, and nothing applied before changes.
    let mut terminal = RunningTerminal::start(config).await;
    terminal.wait_applied(waiting as u64).await;
    assert_eq!(
        count(&terminal.db(), "SELECT count(*) FROM products"),
        MESSAGES as i64
    );
    terminal.stop().await;
}

#[test]
fn a_terminal_the_broker_refuses_exits_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("refused");
    let database = dir.path().join("t.db");
    let url = amqp_url().replacen("guest:guest", "guest:wrong-password", 1);
    let output = possync_command(&["terminal"])
        .env("POSSYNC_BROKER__URL", &url)
        .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
        .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
        .env("POSSYNC_TERMINAL__DATABASE", &database)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("refused access"), "{stderr}");
    assert!(
        !stderr.contains("wrong-password"),
        "the password is never printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_reconnecting_stops_at_once() {
    // A backoff this long cannot end between its log line and the signal,
    // on however slow a machine: stopping before it ends is stopping at once.
    const LONG_BACKOFF_MS: u64 = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("nobroker");
    let mut child = ChildLog::spawn(
        possync_command(&["terminal"])
            .env("POSSYNC_BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
            // Every retry and its wait, as JSON to read them reliably.
            .env("POSSYNC_LOG", "debug,lapin=off")
            .env("POSSYNC_LOG_FORMAT", "json"),
    );
    let line = child
        .wait_for_line_where(
            &format!("a backoff of {LONG_BACKOFF_MS} ms or more"),
            |line| {
                event(line).is_some_and(|e| {
                    e["event"] == "offline" && retry_in_ms(&e) >= Some(LONG_BACKOFF_MS)
                })
            },
        )
        .await;
    let backoff = Duration::from_millis(
        event(&line)
            .as_ref()
            .and_then(retry_in_ms)
            .expect("retry_in_ms"),
    );
    let started = std::time::Instant::now();
    child.signal(Signal::SIGTERM);
    let (exit, stderr) = child.exit().await;
    let stopped_in = started.elapsed();
    assert!(exit.success(), "{stderr}");
    assert!(
        stopped_in < backoff,
        "it does not wait out the backoff: stopped in {stopped_in:?}, the backoff was {backoff:?}"
    );
    let after = stderr
        .split_once(line.as_str())
        .map_or("", |(_, rest)| rest);
    assert!(
        !after
            .lines()
            .any(|l| event(l).is_some_and(|e| e["event"] == "connecting")),
        "it stopped during the backoff, before another connection attempt: {stderr}"
    );
    assert!(
        stderr.contains("Offline") && stderr.contains("stopped cleanly"),
        "{stderr}"
    );
}

/// A JSON log line as an object; `None` for anything else.
fn event(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

/// The wait an `offline` event announces (a u128 field, which the JSON log
/// may write as a string).
fn retry_in_ms(event: &serde_json::Value) -> Option<u64> {
    let field = &event["retry_in_ms"];
    field
        .as_u64()
        .or_else(|| field.as_str().and_then(|s| s.parse().ok()))
}

/// `possync-terminal`, the program a till runs (linked with options of its
/// own: build.rs), is the same terminal: it says what is wrong with a log
/// filter, goes Live, and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn the_till_program_goes_live_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("tillprogram");
    let mut child = ChildLog::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_possync-terminal"))
            .env("POSSYNC_BROKER__URL", amqp_url())
            .env_remove("POSSYNC_CONFIG")
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
            .env("POSSYNC_LOG", "debug=lapin"),
    );
    child.wait_for_line("is not a log filter").await;
    child.wait_for_line("Live").await;
    child.signal(Signal::SIGTERM);
    let (exit, stderr) = child.exit().await;
    assert!(exit.success(), "exit 0 on SIGTERM: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
}
