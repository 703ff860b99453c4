//! `possync backend`, the catalog of record, against a real RabbitMQ: every
//! change it accepts reaches every terminal of its store exactly as the
//! catalog holds it, through crashes, clock skew, stores without terminals
//! and other publishers on the exchange.
//!
//! Each test runs the backend as a real `possync backend` process with its
//! own SQLite file, HTTP port and direct queue.

mod common;

use std::time::Duration;

use common::backend::{Backend, call};
use common::catalog::{BackendCatalog, assert_terminal_holds, terminal_catalog, wait_quiet};
use common::{
    RunningTerminal, catalog_changes, drain, possync_command, publish_raw, publish_raw_many,
    queue_counts, terminal_config, text, unique_license,
};
use possync_backend::ServiceConfig;
use possync_core::LicenseKey;
use serde_json::{Value, json};

/// A batch change of the HTTP API from an envelope.
fn batch_change(envelope: &possync_sdk::Envelope) -> Value {
    let payload: Value = serde_json::from_str(envelope.payload.get()).expect("a JSON payload");
    json!({
        "store": envelope.license_key,
        "type": envelope.message_type,
        "payload": payload,
    })
}

/// A deterministic pseudo-random sequence (xorshift64).
struct Dice(u64);

impl Dice {
    /// Seeded by `POSSYNC_TEST_SEED` if set, else by the clock; the seed is
    /// printed so that a failure can be run again with it.
    fn seeded() -> Self {
        let seed = std::env::var("POSSYNC_TEST_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("random seed: POSSYNC_TEST_SEED={seed}");
        Self(seed | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn the_example_config_runs_the_service() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/backend.toml");
    let config = ServiceConfig::load(Some(&path)).expect("config/backend.toml loads");
    assert_eq!(config.service.listen.to_string(), "127.0.0.1:8480");
    assert_eq!(config.broker.exchange, "pos_license_events");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_terminal_ends_on_the_catalogs_state_though_the_backend_is_killed_between_commit_and_confirm()
 {
    // The guarantee: a change the backend answered for is durable and
    // reaches every terminal of its store once, however often the backend
    // dies between its commit and the broker's confirm (a failpoint aborts
    // right after a confirm, before the row is marked) or anywhere else
    // (SIGKILL at random moments).
    const CHANGES: usize = 5_000;
    const BATCH: usize = 10;
    let store = unique_license("crash");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tills = Vec::new();
    for till in ["till-1", "till-2"] {
        tills.push(RunningTerminal::start(terminal_config(dir.path(), &store, till)).await);
    }
    let mut backend = Backend::new("crash", true);
    backend.start().await;

    let mut changes: Vec<Value> = (0..5)
        .map(|i| {
            json!({
                "store": store.as_str(),
                "type": "category_update",
                "payload": {"category_id": format!("C{i}"), "category_name": format!("Category {i}")},
            })
        })
        .collect();
    let (envelopes, model) = catalog_changes(&store, CHANGES, 0xC0FFEE);
    changes.extend(envelopes.iter().map(batch_change));
    let total = changes.len() as i64;

    let (done, mut finished) = tokio::sync::watch::channel(false);
    let submitter = {
        let batches: Vec<Vec<Value>> = changes.chunks(BATCH).map(<[Value]>::to_vec).collect();
        let client = backend.api.clone();
        tokio::spawn(async move {
            for (i, batch) in batches.into_iter().enumerate() {
                client
                    .submit_until_answered(batch, &format!("crash-batch-{i}"))
                    .await;
            }
            let _ = done.send(true);
        })
    };

    let mut dice = Dice::seeded();
    let (mut kills, mut aborts) = (0, 0);
    while !*finished.borrow() {
        // Up to 0.4 s alive, then SIGKILL unless the failpoint aborted it
        // first: short lives, so that a fast machine too sees each fault a
        // few times before every batch is answered.
        let alive = Duration::from_millis(30 + dice.below(400));
        tokio::select! {
            () = tokio::time::sleep(alive) => {}
            _ = finished.wait_for(|done| *done) => {}
        }
        if backend.kill().await {
            aborts += 1;
        } else {
            kills += 1;
        }
        // Two restarts in three abort after a confirm, early enough to fire.
        let env = if dice.below(3) > 0 {
            vec![(
                "POSSYNC_FAILPOINT_RELAY_ABORT_AFTER",
                (1 + dice.below(20)).to_string(),
            )]
        } else {
            Vec::new()
        };
        backend.start_with(&env).await;
    }
    submitter.await.expect("every batch was answered");
    backend.kill().await;
    backend.start().await;
    backend.wait_published(&store, total).await;
    assert!(
        kills >= 3 && aborts >= 3,
        "the backend was killed {kills} times and aborted after a confirm {aborts} times"
    );

    let catalog = backend.catalog(&store).await;
    assert_eq!(
        catalog.products, model.products,
        "the catalog holds the changes in the order they were answered"
    );
    for (i, till) in tills.iter_mut().enumerate() {
        // Anything applied twice shows once the last duplicate arrived.
        wait_quiet(till, total, &format!("till-{}", i + 1)).await;
    }
    for (i, till) in tills.into_iter().enumerate() {
        assert_terminal_holds(&till, &catalog, &format!("till-{}", i + 1));
        let status = till.stop().await;
        assert_eq!(
            status.applied,
            total as u64,
            "till-{}: every change applied exactly once ({} duplicates dropped)",
            i + 1,
            status.duplicates
        );
        // A copy let through by the seq marks would be stale, not applied:
        // none may reach the version check.
        assert_eq!(
            status.stale_by_type.values().sum::<u64>(),
            0,
            "till-{}: copies judged by version instead of seq: {:?}",
            i + 1,
            status.stale_by_type
        );
        assert_eq!(
            (status.sync.synced_up_to, status.sync.highest_applied),
            (total, total),
            "till-{}: synced up to the store's head, without a gap",
            i + 1
        );
    }
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_for_a_store_without_terminals_is_kept_in_the_catalog_and_counts_as_published() {
    // The guarantee: a store none of whose terminals has started yet (no
    // queue receives its messages) is no error: its change is accepted,
    // kept in the catalog, and the relay goes on.
    let store = unique_license("noterm");
    // Without the direct queue (bound to license.#), and on an exchange of
    // this test's own, so that no other test's queue receives it either,
    // nothing receives the message.
    let mut backend = Backend::new("noterm", false);
    let exchange = format!("possync.test.noterm.{}", uuid::Uuid::now_v7().simple());
    let mut config = std::fs::read_to_string(&backend.config).expect("the backend's config");
    config.push_str(&format!("\n[broker]\nexchange = {exchange:?}\n"));
    std::fs::write(&backend.config, config).expect("write the backend's config");
    backend.start().await;
    let (status, answer) = backend
        .api
        .call(
            "POST",
            &format!("/v1/stores/{store}/changes"),
            Some(
                json!({"type": "price_update", "payload": {"product_id": "P1", "new_price": 4.2}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changes"][0]["seq"], 1, "{answer}");
    backend.wait_published(&store, 1).await;
    let catalog = backend.catalog(&store).await;
    assert_eq!(catalog.products["P1"].1, 4.2);
    let log = backend.stop().await;
    assert!(!log.contains("relay_failed"), "{log}");
    let connection = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_terminal_ends_on_the_last_change_the_catalog_accepted_whatever_the_clients_clocks() {
    // The guarantee: the catalog's sequence orders a store's changes, not
    // the clients' clocks. Two clients 10 minutes apart submit interleaved
    // changes of one product; the later-submitted carries the older time.
    let store = unique_license("skew");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tills = Vec::new();
    for till in ["till-1", "till-2"] {
        tills.push(RunningTerminal::start(terminal_config(dir.path(), &store, till)).await);
    }
    let mut backend = Backend::new("skew", true);
    backend.start().await;
    let behind = backend.create_token("office-behind");
    let now = time::OffsetDateTime::now_utc();
    let rounds = 10;
    for round in 0..rounds {
        for (token, skew, price) in [
            (&backend.api.token, 0, 10.0 + round as f64),
            (&behind, -10, 20.0 + round as f64),
        ] {
            let timestamp = (now + time::Duration::minutes(skew) + time::Duration::seconds(round))
                .format(&time::format_description::well_known::Rfc3339)
                .expect("a timestamp");
            let url = format!(
                "http://127.0.0.1:{}/v1/stores/{store}/changes",
                backend.api.port
            );
            let (token, body) = (
                token.clone(),
                json!({"type": "price_update", "timestamp": timestamp,
                       "payload": {"product_id": "P1", "new_price": price}}),
            );
            let (status, answer) =
                tokio::task::spawn_blocking(move || call("POST", &url, &token, Some(body), None))
                    .await
                    .expect("ran")
                    .expect("answered");
            assert_eq!(status, 200, "{answer}");
        }
    }
    let head = 2 * rounds;
    backend.wait_published(&store, head).await;
    let catalog = backend.catalog(&store).await;
    let last = 20.0 + (rounds - 1) as f64;
    assert_eq!(catalog.products["P1"].1, last, "the last accepted change");
    for (i, mut till) in tills.into_iter().enumerate() {
        till.wait_applied(head as u64).await;
        assert_terminal_holds(&till, &catalog, &format!("till-{}", i + 1));
        let status = till.stop().await;
        assert_eq!(status.sync.synced_up_to, head, "till-{}", i + 1);
    }
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_straight_to_the_exchange_reaches_terminals_and_the_catalog_and_a_bad_one_is_dead_lettered()
 {
    // The guarantee: another publisher's messages (the original format, no
    // ids) still reach terminals directly, and the backend records them in
    // the catalog with a seq; a message the catalog refuses goes to the
    // backend's dead-letter queue with the reason, and the ones behind it
    // are still recorded.
    let store = unique_license("direct");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let mut backend = Backend::new("direct", true);
    backend.start_live().await;

    let original = |id: &str, price: f64| {
        json!({
            "type": "product_update",
            "license_key": store.as_str(),
            "payload": {"product_id": id, "product_name": format!("Product {id}"), "price": price, "category_id": "C1"},
            "timestamp": "2025-11-27T10:30:00Z",
        })
        .to_string()
        .into_bytes()
    };
    publish_raw(
        &format!("license.{store}.product_update"),
        &original("P1", 3.5),
    )
    .await;
    till.wait_applied(1).await;
    backend.wait_published(&store, 1).await;
    let catalog = backend.catalog(&store).await;
    assert_eq!(
        catalog.products["P1"],
        ("Product P1".into(), 3.5, Some("C1".into()))
    );
    assert_eq!(catalog.seqs["P1"], 1, "recorded with the store's first seq");

    publish_raw_many(&[
        (
            format!("license.{store}.price_update"),
            b"{not json".to_vec(),
        ),
        (
            format!("license.{store}.coupon_update"),
            json!({"type": "coupon_update", "license_key": store.as_str(), "payload": {}})
                .to_string()
                .into_bytes(),
        ),
        (
            format!("license.{store}.product_update"),
            original("P2", 7.0),
        ),
    ])
    .await;
    backend.wait_published(&store, 2).await;
    let catalog = backend.catalog(&store).await;
    assert_eq!(
        catalog.products["P2"].1, 7.0,
        "recorded behind the bad ones"
    );
    let dead = drain(&format!("{}.dead_letter", backend.direct_queue), 2).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|delivery| {
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            match headers.inner().get("x-possync-reason") {
                Some(lapin::types::AMQPValue::LongString(reason)) => reason.to_string(),
                other => panic!("a dead letter without its reason: {other:?}"),
            }
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not a possync message"), "{reasons:?}");
    assert!(reasons[1].contains("coupon_update"), "{reasons:?}");
    assert!(
        till.wait_for(|s| s.applied >= 2).await,
        "the two good messages reached the till as well: {:?}",
        till.status.borrow().applied
    );
    let log = backend.stop().await;
    assert!(log.contains("direct_refused"), "{log}");
    till.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_goes_through_a_running_backend() {
    let mut backend = Backend::new("demo", false);
    backend.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let output = possync_command(&["demo", "--dir"])
        .arg(dir.path())
        .env(
            "POSSYNC_BACKEND__URL",
            format!("http://127.0.0.1:{}", backend.api.port),
        )
        .env("POSSYNC_BACKEND__TOKEN", &backend.api.token)
        .output()
        .expect("run the demo");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(
        stdout.contains("the back office goes through the backend at http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("DEMO-CAFE: 7 changes committed by the backend"),
        "{stdout}"
    );
    assert!(stdout.contains("all terminals applied"), "{stdout}");
    let cafe = LicenseKey::new("DEMO-CAFE").expect("valid");
    let catalog = backend.catalog(&cafe).await;
    assert!(
        catalog.products.contains_key("CAP"),
        "the catalog keeps the demo's products"
    );
    backend.stop().await;
}

/// A RabbitMQ policy on one queue, removed when dropped.
struct QueuePolicy(String);

impl QueuePolicy {
    fn set(queue: &str, definition: &str) -> Self {
        let name = format!(
            "possync-test-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let output = std::process::Command::new("rabbitmqctl")
            .args([
                "set_policy",
                "-q",
                "--apply-to",
                "queues",
                "--priority",
                "100",
                &name,
                &format!("^{}$", regex_escape(queue)),
                definition,
            ])
            .output()
            .expect("run rabbitmqctl");
        assert!(output.status.success(), "{}", text(&output.stderr));
        Self(name)
    }
}

impl Drop for QueuePolicy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", "-q", &self.0])
            .output();
    }
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = !(c.is_ascii_alphanumeric() || c == '_' || c == '-');
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_the_broker_refuses_inside_the_relays_window_still_reaches_the_terminal() {
    // The guarantee: when the broker refuses a message (a full queue that
    // rejects publishes) while later ones of the same window get in, the
    // relay's publisher sends the refused one again and the terminal
    // applies it though it already applied later seqs: the terminal ends
    // equal to the catalog and synced up to the head, and the nacks were
    // logged.
    const CHANGES: usize = 300;
    let store = unique_license("refused");
    let dir = tempfile::tempdir().expect("tempdir");
    // A slow reader: the queue fills and empties while a window is in flight.
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.terminal.prefetch = 2;
    config.terminal.batch_size = 1;
    let mut till = RunningTerminal::start(config).await;
    let mut policy = Some(QueuePolicy::set(
        &till.topology.queue,
        r#"{"max-length":3,"overflow":"reject-publish"}"#,
    ));
    let mut backend = Backend::new("refused", false);
    backend.start().await;
    let changes: Vec<Value> = (0..CHANGES)
        .map(|i| {
            json!({
                "store": store.as_str(),
                "type": "product_update",
                "payload": {"product_id": format!("P{i}"), "product_name": format!("Product {i}"),
                    "price": i as f64, "category_id": "C1"},
            })
        })
        .collect();
    for (i, batch) in changes.chunks(100).enumerate() {
        backend
            .api
            .submit_until_answered(batch.to_vec(), &format!("refused-{i}"))
            .await;
    }
    backend
        .process
        .as_mut()
        .expect("running")
        .wait_for_line("(nack)")
        .await;
    // Some refused, some later ones applied: now let everything in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(policy.take());
    backend.wait_published(&store, CHANGES as i64).await;
    wait_quiet(&mut till, CHANGES as i64, "till-1").await;
    let catalog = backend.catalog(&store).await;
    assert_eq!(catalog.products.len(), CHANGES);
    assert_terminal_holds(&till, &catalog, "till-1");
    let status = till.stop().await;
    assert_eq!(status.applied, CHANGES as u64, "each change applied once");
    assert_eq!(
        status.stale_by_type.values().sum::<u64>(),
        0,
        "copies judged by version instead of seq: {:?}",
        status.stale_by_type
    );
    assert_eq!(
        (status.sync.synced_up_to, status.sync.highest_applied),
        (CHANGES as i64, CHANGES as i64)
    );
    let log = backend.stop().await;
    assert!(log.contains("refused") && log.contains("(nack)"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_follows_one_catalog_and_dead_letters_another_backends_sequence() {
    // The guarantee: two backends with their own databases on one exchange
    // both number the store's changes from 1; the terminal follows the
    // catalog of the first sequenced change it applied and dead-letters the
    // other's with a reason saying what happened, never dropping the real
    // catalog's changes as duplicates. Each backend's direct consumer logs
    // the other catalog as an error, and a message with a seq but no
    // catalog is dead-lettered by both.
    let store = unique_license("twocat");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let mut first = Backend::new("first", true);
    first.start_live().await;
    let mut second = Backend::new("second", true);
    second.start_live().await;
    let (first_id, second_id) = (first.catalog_id().await, second.catalog_id().await);
    assert_ne!(first_id, second_id, "each database has its own catalog id");
    let product = |id: &str, price: f64| {
        json!({"type": "product_update", "payload": {"product_id": id,
            "product_name": format!("Product {id}"), "price": price, "category_id": "C1"}})
    };
    let path = format!("/v1/stores/{store}/changes");
    let (status, answer) = first
        .api
        .call("POST", &path, Some(product("P1", 1.0)))
        .await;
    assert_eq!(status, 200, "{answer}");
    first.wait_published(&store, 1).await;
    till.wait_applied(1).await;
    let (status, answer) = second
        .api
        .call("POST", &path, Some(product("P2", 2.0)))
        .await;
    assert_eq!(status, 200, "{answer}");
    second.wait_published(&store, 1).await;
    assert!(
        till.wait_for(|s| s.quarantined >= 1).await,
        "the other catalog's seq 1 is dead-lettered"
    );
    let (status, answer) = first
        .api
        .call("POST", &path, Some(product("P3", 3.0)))
        .await;
    assert_eq!(status, 200, "{answer}");
    first.wait_published(&store, 2).await;
    till.wait_applied(2).await;
    // A seq without a catalog: refused by the terminal and by each backend.
    publish_raw(
        &format!("license.{store}.product_update"),
        json!({"type": "product_update", "license_key": store.as_str(), "seq": 3,
            "payload": {"product_id": "P4", "product_name": "Product P4", "price": 4.0, "category_id": "C1"}})
        .to_string()
        .as_bytes(),
    )
    .await;
    assert!(
        till.wait_for(|s| s.quarantined >= 2).await,
        "a seq without a catalog is dead-lettered"
    );
    let held = terminal_catalog(&till.db());
    assert_eq!(
        held.products.keys().collect::<Vec<_>>(),
        ["P1", "P3"],
        "the followed catalog's changes only"
    );
    let reasons: Vec<String> = till
        .db()
        .prepare("SELECT reason FROM possync_quarantine ORDER BY rowid")
        .expect("query")
        .query_map([], |row| row.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("reasons");
    assert!(
        reasons[0].contains(&second_id)
            && reasons[0].contains(&first_id)
            && reasons[0].contains("two backends publish to this store")
            && reasons[0].contains("database was replaced"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("names no catalog"), "{reasons:?}");
    for backend in [&first, &second] {
        let dead = drain(&format!("{}.dead_letter", backend.direct_queue), 1).await;
        assert_eq!(
            dead.len(),
            1,
            "the backend dead-letters the seq without a catalog"
        );
    }
    let status = till.stop().await;
    assert_eq!(status.sync.catalog.as_deref(), Some(first_id.as_str()));
    assert_eq!(status.sync.synced_up_to, 2);
    let first_log = first.stop().await;
    let second_log = second.stop().await;
    for (log, other) in [(&first_log, &second_id), (&second_log, &first_id)] {
        assert!(
            log.contains("direct_foreign_catalog")
                && log.contains(other.as_str())
                && log.contains(store.as_str()),
            "{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_on_the_direct_queue_is_recorded_in_order_and_a_refused_change_in_it_is_dead_lettered_alone()
 {
    // The guarantee: the direct consumer records what the broker delivered
    // together in one submission, and a change the catalog refuses among
    // them is dead-lettered alone: every other change is recorded once, in
    // the order it was sent.
    const CHANGES: usize = 200;
    let store = unique_license("dbatch");
    let mut backend = Backend::new("dbatch", true);
    backend.start_live().await;
    backend.stop().await;
    let mut messages: Vec<(String, Vec<u8>)> = (0..CHANGES)
        .map(|i| {
            (
                format!("license.{store}.price_update"),
                json!({"type": "price_update", "license_key": store.as_str(),
                    "message_id": format!("m-{i}"), "version": 1_000 + i,
                    "payload": {"product_id": format!("P{}", i % 10), "new_price": i as f64}})
                .to_string()
                .into_bytes(),
            )
        })
        .collect();
    messages.insert(
        CHANGES / 2,
        (
            format!("license.{store}.coupon_update"),
            json!({"type": "coupon_update", "license_key": store.as_str(),
                "message_id": "m-coupon", "payload": {}})
            .to_string()
            .into_bytes(),
        ),
    );
    // The same id again: recorded once.
    messages.push(messages[0].clone());
    publish_raw_many(&messages).await;
    backend.start_live().await;
    backend.wait_published(&store, CHANGES as i64).await;
    let catalog = backend.catalog(&store).await;
    for p in 0..10 {
        let last = (CHANGES - 10 + p) as f64;
        assert_eq!(catalog.products[&format!("P{p}")].1, last, "P{p}");
    }
    let dead_letters = format!("{}.dead_letter", backend.direct_queue);
    assert_eq!(drain(&dead_letters, 1).await.len(), 1, "the refused change");
    assert_eq!(queue_counts(&dead_letters).ready, 0, "and only it");
    backend.stop().await;
}
