//! `possync terminal` stops cleanly on SIGTERM: nothing applied but left
//! unacknowledged, nothing acknowledged but left unapplied.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use possync_core::Publisher;
use possync_sdk::WireMessage;

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
        possync_plugin_product::ProductUpdate {
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
    let child = possync_command(&["terminal", "--config", file.to_str().expect("utf-8")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start possync terminal");
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

    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "exit 0 on SIGTERM: {stderr}");
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
    assert!(
        applied < MESSAGES,
        "the terminal was stopped mid-stream ({applied} applied)"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM possync_applied"),
        applied as i64,
        "one applied id per row"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = queue_depth(&format!("possync.{store}.till-1")).await as usize;
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
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("nobroker");
    let child = possync_command(&["terminal"])
        .env("POSSYNC_BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
        .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
        .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it does not wait out the backoff"
    );
    assert!(
        stderr.contains("Offline") && stderr.contains("stopped cleanly"),
        "{stderr}"
    );
}
