//! Nothing lost, nothing applied twice: offline catch-up, a crash between
//! commit and ack, poison messages, with classic and quorum queues.

mod common;

use std::process::Stdio;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use possync_core::{Publisher, QueueType};
use possync_sdk::{Context, Envelope, HandlerError, Payload, Plugin, Settings, Store};

/// A message that fails as it says, to make poison messages.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Fickle {
    #[serde(default)]
    mode: String,
    /// With `transient-once`: the product whose change was published after it.
    #[serde(default)]
    before: String,
}

impl Payload for Fickle {
    const TYPE: &'static str = "fickle";
}

fn apply_fickle(
    fickle: Fickle,
    _: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    match fickle.mode.as_str() {
        "panic" => panic!("fickle was told to panic"),
        // Fails its first try; on the next it checks that the change
        // published after it has not overtaken it.
        "transient-once" => {
            if !FAILED_ONCE.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err(HandlerError::transient("busy, just this once"));
            }
            let after = fickle.before.as_str();
            match store.query_row("SELECT price FROM products WHERE id = ?1", &[after.into()])? {
                Some(_) => Err(HandlerError::permanent("a later change applied first")),
                None => Ok(()),
            }
        }
        "transient" => Err(HandlerError::transient("the disk is always busy")),
        "permanent" => Err(HandlerError::permanent("this can never work")),
        _ => Ok(()),
    }
}

fn fickle_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("fickle").on::<Fickle>(apply_fickle))
}

possync_sdk::register_builtin!(fickle_plugin);

/// The `transient-once` message has had its failure.
static FAILED_ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn offline_terminal_catches_up(queue_type: QueueType) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("offline");
    let config = queue_config(dir.path(), &store, queue_type);
    RunningTerminal::start(config.clone()).await.stop().await;

    let (changes, model) = catalog_changes(&store, 1000, 7);
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(changes)
        .await
        .expect("all confirmed while the terminal is off");
    publisher.close().await;

    let mut terminal = RunningTerminal::start(config).await;
    terminal.wait_applied(1000).await;
    assert_matches_model(&terminal.db(), &model);
    assert_eq!(terminal.status.borrow().applied, 1000);
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_terminal_applies_every_change_when_it_returns_classic() {
    offline_terminal_catches_up(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_terminal_applies_every_change_when_it_returns_quorum() {
    offline_terminal_catches_up(QueueType::Quorum).await;
}

async fn killed_between_commit_and_ack(queue_type: QueueType) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("kill");
    let config = queue_config(dir.path(), &store, queue_type);
    RunningTerminal::start(config.clone()).await.stop().await;
    let (changes, model) = catalog_changes(&store, 500, 11);
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    publisher.close().await;

    let marker = dir.path().join("committed");
    let queue_type_name = if queue_type == QueueType::Quorum {
        "quorum"
    } else {
        "classic"
    };
    let mut child = possync_command(&["terminal"])
        .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
        .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
        .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
        .env("POSSYNC_TERMINAL__QUEUE_EXPIRY_DAYS", "1")
        .env("POSSYNC_TERMINAL__BATCH_SIZE", "50")
        .env("POSSYNC_BROKER__QUEUE_TYPE", queue_type_name)
        .env("POSSYNC_FAILPOINT_PAUSE_AFTER_COMMIT", &marker)
        .stderr(Stdio::null())
        .spawn()
        .expect("start possync terminal");
    eventually("a committed, unacknowledged batch", || marker.exists()).await;
    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("SIGKILL");
    child.wait().expect("reap the killed terminal");
    let status = possync_command(&["status"])
        .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
        .output()
        .expect("status");
    assert!(
        text(&status.stdout).contains("gone without a clean stop"),
        "{}",
        text(&status.stdout)
    );
    // One publisher session numbered the messages 1, 2, ... in order: its
    // mark is how many were committed, without a record per message.
    let db = rusqlite::Connection::open(&config.terminal.database).expect("db");
    let committed = count(
        &db,
        "SELECT coalesce(sum(last_seq), 0) FROM possync_publishers",
    );
    assert!(committed > 0, "a batch was committed before the kill");
    assert_eq!(count(&db, "SELECT count(*) FROM possync_publishers"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM possync_applied"), 0);
    drop(db);

    let mut terminal = RunningTerminal::start(config).await;
    let redelivered = u64::try_from(committed).expect("count");
    terminal.wait_settled(500 - redelivered, 0).await;
    eventually("the redelivered batch to be skipped", || {
        terminal.status.borrow().duplicates >= redelivered
    })
    .await;
    let status = terminal.status.borrow().clone();
    assert_eq!(
        status.applied,
        500 - redelivered,
        "the redelivered messages were not applied again"
    );
    assert_eq!(status.duplicates, redelivered);
    assert_matches_model(&terminal.db(), &model);
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_killed_between_commit_and_ack_applies_nothing_twice_classic() {
    killed_between_commit_and_ack(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_killed_between_commit_and_ack_applies_nothing_twice_quorum() {
    killed_between_commit_and_ack(QueueType::Quorum).await;
}

async fn poison_is_quarantined(queue_type: QueueType) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("poison");
    let mut config = queue_config(dir.path(), &store, queue_type);
    config.terminal.max_attempts = 3;
    config.terminal.max_message_bytes = 4096;
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let (all, model) = catalog_changes(&store, 200, 3);
    let fickle = |mode: &str| {
        Envelope::new(
            "fickle",
            store.as_str(),
            serde_json::json!({ "mode": mode }),
        )
    };
    let oversize = Envelope::new(
        "product_update",
        store.as_str(),
        serde_json::json!({ "product_id": "BIG", "product_name": "x".repeat(5000), "price": 1.0 }),
    );
    let mut stream: Vec<Envelope> = all[..100].to_vec();
    stream.extend([
        fickle("panic"),
        fickle("transient"),
        fickle("permanent"),
        oversize,
        fickle("fine"),
    ]);
    stream.extend(all[100..].iter().cloned());
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(stream)
        .await
        .expect("confirmed");
    publisher.close().await;

    terminal.wait_settled(201, 4).await;
    let db = terminal.db();
    assert_matches_model(&db, &model);
    let reasons: Vec<String> = quarantine_reasons(&db);
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("failed 3 times")
                && r.contains("panicked: fickle was told to panic")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("failed 3 times") && r.contains("always busy")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("this can never work")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("over the limit of 4096")),
        "{reasons:?}"
    );
    assert!(
        terminal.status.borrow().is_live(),
        "a panicking handler never takes the terminal down"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM possync_attempts"),
        0,
        "settled messages leave no retry count"
    );
    let dead = drain(&terminal.topology.dead_letter_queue, 4).await;
    assert_eq!(dead.len(), 4);
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_quarantined_and_the_stream_flows_on_classic() {
    poison_is_quarantined(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_quarantined_and_the_stream_flows_on_quorum() {
    poison_is_quarantined(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_fails_for_now_is_tried_again_before_the_changes_behind_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("retry");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let publisher = Publisher::connect(&terminal_config(dir.path(), &store, "x").broker)
        .await
        .expect("publisher");
    let stream = vec![
        Envelope::new(
            "fickle",
            store.as_str(),
            serde_json::json!({ "mode": "transient-once", "before": "BEHIND" }),
        ),
        Envelope::new(
            "price_update",
            store.as_str(),
            serde_json::json!({ "product_id": "BEHIND", "new_price": 2.5 }),
        ),
    ];
    publisher
        .publish_envelopes(stream)
        .await
        .expect("confirmed");
    terminal.wait_applied(2).await;
    let db = terminal.db();
    assert_eq!(
        quarantine_reasons(&db),
        Vec::<String>::new(),
        "in order, nothing dead-lettered"
    );
    assert_eq!(product(&db, "BEHIND").map(|p| p.1), Some(2.5));
    assert_eq!(
        count(&db, "SELECT count(*) FROM possync_attempts"),
        0,
        "the retry count is gone once it applied"
    );
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terminals_and_publishers_try_each_broker_url_in_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("cluster");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    // A cluster node that is down, then one that answers.
    config.broker.urls = vec!["amqp://guest:guest@127.0.0.1:1/%2f".into(), amqp_url()];
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker)
        .await
        .expect("the publisher skips the dead node");
    let (changes, model) = catalog_changes(&store, 20, 1);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(20).await;
    assert_matches_model(&terminal.db(), &model);
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_mode_applies_live_changes_and_keeps_nothing_while_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("transient");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.terminal.delivery = possync_core::Delivery::Transient;
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let (changes, model) = catalog_changes(&store, 50, 9);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(50).await;
    assert_matches_model(&terminal.db(), &model);
    terminal.stop().await;

    let (later, _) = catalog_changes(&store, 1, 10);
    let err = publisher
        .publish_envelopes(later)
        .await
        .expect_err("nobody receives it while the terminal is off");
    assert!(
        matches!(err, possync_core::PublishError::Unroutable { .. }),
        "{err}"
    );
    publisher.close().await;
}
