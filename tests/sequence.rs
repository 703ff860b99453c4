//! The store's sequence on a terminal: changes with a `seq` order by it
//! and nothing else, duplicates are told by sequence marks without a record
//! per message, "synced up to N" survives restarts and stops at a gap, and
//! a collapsed backlog ends where an uncollapsed one does.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use nix::sys::signal::Signal;
use possync_core::{GapCause, LicenseKey, Publisher};
use possync_sdk::Version;

/// The catalog id the relayed messages of these tests name.
const CATALOG: &str = "0199a5c4-0000-7000-8000-00000000ca7a";

/// A `price_update` body as the backend's relay sends it.
fn relayed(store: &LicenseKey, seq: i64, product: &str, price: f64, clock: SystemTime) -> Vec<u8> {
    let micros = clock
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(0));
    serde_json::json!({
        "type": "price_update", "license_key": store.as_str(),
        "payload": {"product_id": product, "new_price": price},
        "timestamp": time_text(clock), "version": micros,
        "message_id": format!("{store}-{seq}"), "seq": seq, "catalog": CATALOG,
    })
    .to_string()
    .into_bytes()
}

/// A `price_update` body as possync's publisher stamps it in a session.
fn stamped(store: &LicenseKey, session: &str, number: i64, product: &str, price: f64) -> Vec<u8> {
    serde_json::json!({
        "type": "price_update", "license_key": store.as_str(),
        "payload": {"product_id": product, "new_price": price},
        "message_id": uuid::Uuid::now_v7().to_string(),
        "version": 1_000 + i64::from(price as i32),
        "publisher_id": session, "publisher_seq": number,
    })
    .to_string()
    .into_bytes()
}

fn time_text(clock: SystemTime) -> String {
    let secs = clock.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn routed(store: &LicenseKey, body: Vec<u8>) -> (String, Vec<u8>) {
    (format!("license.{store}.price_update"), body)
}

fn price(db: &rusqlite::Connection, id: &str) -> Option<f64> {
    product(db, id).map(|(_, price, _, _)| price)
}

#[tokio::test(flavor = "multi_thread")]
async fn sequenced_changes_order_by_seq_even_when_clocks_are_ten_minutes_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-order");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    // Two back offices, one's clock ten minutes behind, take turns; the
    // catalog of record numbers their changes in the order it accepted them.
    let now = SystemTime::now();
    let behind = now - Duration::from_secs(600);
    let messages: Vec<_> = [(now, 1.0), (behind, 2.0), (now, 3.0), (behind, 4.0)]
        .into_iter()
        .enumerate()
        .map(|(i, (clock, value))| {
            let seq = i64::try_from(i).expect("small") + 1;
            routed(&store, relayed(&store, seq, "A", value, clock))
        })
        .collect();
    publish_raw_many(&messages).await;
    terminal.wait_applied(4).await;
    let db = terminal.db();
    assert_eq!(price(&db, "A"), Some(4.0), "the last change accepted wins");
    let stored: i64 = db
        .query_row(
            "SELECT sync_version FROM products WHERE id = 'A'",
            [],
            |row| row.get(0),
        )
        .expect("row");
    assert_eq!(
        Version::seq_of(stored),
        Some(4),
        "the row keeps the seq that wrote it"
    );
    assert_eq!(
        terminal.status.borrow().stale_by_type.len(),
        0,
        "nothing was stale"
    );

    // A change sent straight to the exchange after a sequenced one, even
    // with a newer clock, is stale on purpose: the backend relays it with a seq.
    publish_raw(
        &format!("license.{store}.price_update"),
        &serde_json::to_vec(&serde_json::json!({
            "type": "price_update", "license_key": store.as_str(),
            "payload": {"product_id": "A", "new_price": 9.0},
            "timestamp": time_text(now + Duration::from_secs(3600)),
        }))
        .expect("json"),
    )
    .await;
    assert!(
        terminal
            .wait_for(|s| s.stale_by_type.get("price_update") == Some(&1))
            .await
    );
    assert_eq!(price(&terminal.db(), "A"), Some(4.0));
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_without_any_order_does_not_let_an_older_seq_overwrite_a_newer_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-unordered");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let now = SystemTime::now();
    // Neither a timestamp nor a version: a change nothing orders.
    let unordered = serde_json::to_vec(&serde_json::json!({
        "type": "price_update", "license_key": store.as_str(),
        "payload": {"product_id": "A", "new_price": 9.0},
    }))
    .expect("json");
    for (seq, value) in [(1, 1.0), (3, 3.0)] {
        let (key, body) = routed(&store, relayed(&store, seq, "A", value, now));
        publish_raw(&key, &body).await;
    }
    publish_raw(&format!("license.{store}.price_update"), &unordered).await;
    // seq 2 comes late, as the relay sends a row again after a refusal.
    let (key, body) = routed(&store, relayed(&store, 2, "A", 2.0, now));
    publish_raw(&key, &body).await;
    terminal.wait_applied(2).await;
    assert!(
        terminal
            .wait_for(|s| s.stale_by_type.get("price_update") == Some(&2))
            .await,
        "the unordered change and seq 2 are both older than seq 3: {:?}",
        terminal.status.borrow().stale_by_type
    );
    assert_eq!(price(&terminal.db(), "A"), Some(3.0), "seq 3 stands");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sequenced_and_publisher_numbered_duplicates_are_dropped_without_a_record_per_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-dup");
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let now = SystemTime::now();
    let first: Vec<_> = (1..=5)
        .map(|seq| routed(&store, relayed(&store, seq, &format!("P{seq}"), 1.0, now)))
        .collect();
    publish_raw_many(&first).await;
    terminal.wait_applied(5).await;
    // The relay sends seq 2 and 5 again after a crash (other prices would
    // show if they applied).
    let again =
        [2, 5].map(|seq| routed(&store, relayed(&store, seq, &format!("P{seq}"), 7.0, now)));
    publish_raw_many(&again).await;
    assert!(terminal.wait_for(|s| s.duplicates == 2).await);
    let db = terminal.db();
    assert_eq!((price(&db, "P2"), price(&db, "P5")), (Some(1.0), Some(1.0)));

    // possync's publisher: numbered per session, no record either.
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let envelopes = (0..50).map(|i| {
        possync_sdk::Envelope::new(
            "price_update",
            store.as_str(),
            serde_json::json!({"product_id": format!("Q{i}"), "new_price": 2.0}),
        )
    });
    publisher
        .publish_envelopes(envelopes)
        .await
        .expect("confirmed");
    publisher.close().await;
    terminal.wait_applied(55).await;
    let db = terminal.db();
    assert_eq!(count(&db, "SELECT count(*) FROM possync_applied"), 0);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM possync_publishers WHERE last_seq = 50"
        ),
        1
    );
    let status = terminal.stop().await;
    assert_eq!((status.applied, status.duplicates), (55, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_of_two_publisher_sessions_interleave_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-sessions");
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    // Session x's numbers reach the queue between session y's; a message of
    // x sent again after a reconnect is numbered anew by session z.
    let messages = [
        stamped(&store, "x", 1, "A", 1.0),
        stamped(&store, "y", 1, "B", 1.0),
        stamped(&store, "x", 2, "C", 1.0),
        stamped(&store, "y", 2, "D", 1.0),
        stamped(&store, "x", 3, "E", 1.0),
        stamped(&store, "z", 1, "C", 1.0),
        stamped(&store, "y", 3, "F", 1.0),
    ]
    .map(|body| routed(&store, body));
    publish_raw_many(&messages).await;
    assert!(
        terminal
            .wait_for(|s| s.applied + s.stale_by_type.values().sum::<u64>() == 7)
            .await
    );
    let db = terminal.db();
    for id in ["A", "B", "C", "D", "E", "F"] {
        assert_eq!(price(&db, id), Some(1.0), "{id} applied");
    }

    // Two real publishers, calls interleaved.
    let one = Publisher::connect(&config.broker).await.expect("publisher");
    let two = Publisher::connect(&config.broker).await.expect("publisher");
    for round in 0..10 {
        for (publisher, name) in [(&one, "one"), (&two, "two")] {
            let envelopes = (0..5).map(|i| {
                possync_sdk::Envelope::new(
                    "price_update",
                    store.as_str(),
                    serde_json::json!({"product_id": format!("{name}-{round}-{i}"), "new_price": 3.0}),
                )
            });
            publisher
                .publish_envelopes(envelopes)
                .await
                .expect("confirmed");
        }
    }
    one.close().await;
    two.close().await;
    terminal.wait_applied(6 + 100).await;
    let db = terminal.db();
    assert_eq!(
        count(&db, "SELECT count(*) FROM products WHERE price = 3.0"),
        100,
        "every message of both sessions applied"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM possync_applied"), 0);
    assert_eq!(terminal.stop().await.duplicates, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn synced_up_to_survives_a_restart_and_shows_in_status_and_on_the_status_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-synced");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let now = SystemTime::now();
    // The relay sent 1 to 5 in one round that ended at 12 (6 to 12 are
    // still on their way): those name the head.
    let messages: Vec<_> = (1..=10)
        .map(|seq| {
            let mut body: serde_json::Value =
                serde_json::from_slice(&relayed(&store, seq, "A", seq as f64, now)).expect("JSON");
            if seq <= 5 {
                body["head"] = 12.into();
            }
            routed(&store, body.to_string().into_bytes())
        })
        .collect();
    publish_raw_many(&messages).await;
    assert!(terminal.wait_for(|s| s.sync.synced_up_to == 10).await);
    let (code, body) = http_get(port, "/status").await;
    assert_eq!(code, 200);
    let shown: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(shown["sync"]["synced_up_to"], 10);
    assert_eq!(shown["sync"]["highest_applied"], 10);
    assert_eq!(shown["sync"]["head"], 12, "the head the relay named");
    assert!(shown["sync"]["last_change_at"].is_string(), "{body}");
    let (_, metrics) = http_get(port, "/metrics").await;
    assert!(metrics.contains("possync_synced_up_to_seq{"), "{metrics}");
    assert!(metrics.contains("possync_head_seq{"), "{metrics}");
    terminal.stop().await;

    let status = possync_command(&["status"])
        .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
        .output()
        .expect("status");
    let shown = text(&status.stdout);
    assert!(
        shown.contains("synced up to  seq 10 of at least 12; last change "),
        "{shown}"
    );

    let restarted = RunningTerminal::start(config).await;
    assert_eq!(
        restarted.status.borrow().sync.synced_up_to,
        10,
        "kept across the restart"
    );
    assert_eq!(
        restarted.status.borrow().sync.gap,
        None,
        "its queue kept what came while it was stopped: no gap"
    );
    restarted.stop().await;
}

fn possync_status(config: &possync_core::Config) -> String {
    text(
        &possync_command(&["status"])
            .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
            .output()
            .expect("status")
            .stdout,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_made_again_while_the_terminal_was_away_is_a_gap_until_healed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("gap-queue");
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    assert_eq!(terminal.status.borrow().sync.gap, None, "a first start");
    let now = SystemTime::now();
    let first: Vec<_> = [1, 2, 3, 5]
        .map(|seq| routed(&store, relayed(&store, seq, "A", seq as f64, now)))
        .into_iter()
        .collect();
    publish_raw_many(&first).await;
    assert!(terminal.wait_for(|s| s.sync.highest_applied == 5).await);
    assert_eq!(
        terminal.status.borrow().sync.gap.map(|gap| gap.cause),
        Some(GapCause::Jump {
            expected: 4,
            received: 5
        })
    );
    let queue = terminal.topology.queue.clone();
    terminal.stop().await;
    // Expired while the till was off: what came meanwhile is gone with it.
    delete_queue(queue.as_str()).await;
    publish_raw_many(&[routed(&store, relayed(&store, 4, "A", 4.0, now))]).await;

    let mut terminal = RunningTerminal::start(config.clone()).await;
    let gap = terminal.status.borrow().sync.gap;
    assert_eq!(
        gap.map(|gap| gap.cause),
        Some(GapCause::QueueRecreated),
        "found on connecting, before it says Live, in place of the jump"
    );
    let late: Vec<_> = [4, 6]
        .map(|seq| routed(&store, relayed(&store, seq, "A", seq as f64, now)))
        .into_iter()
        .collect();
    publish_raw_many(&late).await;
    assert!(terminal.wait_for(|s| s.sync.highest_applied == 6).await);
    assert_eq!(
        terminal.status.borrow().sync.gap.map(|gap| gap.cause),
        Some(GapCause::QueueRecreated),
        "the jump filling does not make up for what the lost queue held"
    );
    terminal.stop().await;
    let shown = possync_status(&config);
    assert!(
        shown.contains("gap           the terminal's queue was gone when it connected"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_put_back_from_an_older_copy_is_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("gap-restored");
    let config = terminal_config(dir.path(), &store, "till-1");
    let database = config.terminal.database.clone();
    let now = SystemTime::now();
    let change = |seq: i64| routed(&store, relayed(&store, seq, "A", seq as f64, now));
    let mut terminal = RunningTerminal::start(config.clone()).await;
    publish_raw_many(&[change(1), change(2)]).await;
    assert!(terminal.wait_for(|s| s.sync.synced_up_to == 2).await);
    terminal.stop().await;
    let backup = dir.path().join("backup.db");
    std::fs::copy(&database, &backup).expect("backup");

    let mut terminal = RunningTerminal::start(config.clone()).await;
    publish_raw_many(&[change(3), change(4), change(5)]).await;
    assert!(terminal.wait_for(|s| s.sync.synced_up_to == 5).await);
    assert_eq!(terminal.stop().await.sync.gap, None);

    std::fs::copy(&backup, &database).expect("restored");
    let terminal = RunningTerminal::start(config.clone()).await;
    assert_eq!(
        terminal.status.borrow().sync.gap.map(|gap| gap.cause),
        Some(GapCause::DatabaseBehind {
            found: 2,
            recorded: 5
        })
    );
    terminal.stop().await;
    let shown = possync_status(&config);
    assert!(
        shown.contains(
            "gap           the database holds changes up to 2, but this terminal had applied up to 5"
        ),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_in_the_sequence_is_logged_once_and_synced_up_to_stops_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-gap");
    let config = terminal_config(dir.path(), &store, "till-1");
    RunningTerminal::start(config.clone()).await.stop().await;
    let mut child = ChildLog::spawn(
        possync_command(&["terminal", "--log-format", "json"])
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
            .env("POSSYNC_TERMINAL__QUEUE_EXPIRY_DAYS", "1")
            .stdout(Stdio::null()),
    );
    child.wait_for_line("\"event\":\"live\"").await;
    let now = SystemTime::now();
    let messages: Vec<_> = [1, 2, 3, 6, 7, 8]
        .map(|seq| routed(&store, relayed(&store, seq, &format!("P{seq}"), 1.0, now)))
        .into_iter()
        .collect();
    publish_raw_many(&messages).await;
    let line = child.wait_for_line("\"event\":\"sequence_gap\"").await;
    assert!(
        line.contains("\"expected\":4") && line.contains("\"received\":6"),
        "{line}"
    );
    eventually("the last change applied", || {
        possync_core::Database::open_read_only(&config.terminal.database)
            .and_then(|db| db.sync_state(store.as_str()))
            .is_ok_and(|sync| sync.highest_applied == 8)
    })
    .await;
    child.signal(Signal::SIGTERM);
    let (_, log) = child.exit().await;
    assert_eq!(
        log.matches("\"event\":\"sequence_gap\"").count(),
        1,
        "{log}"
    );
    let status = text(
        &possync_command(&["status"])
            .env("POSSYNC_TERMINAL__DATABASE", &config.terminal.database)
            .output()
            .expect("status")
            .stdout,
    );
    assert!(
        status.contains("synced up to  seq 3 (highest applied 8: change 4 never arrived"),
        "{status}"
    );
    assert!(
        status.contains("gap           changes 4 to 5 never arrived: 6 came after 3"),
        "{status}"
    );

    // The relay sends them late: the gap closes.
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let late: Vec<_> = [4, 5]
        .map(|seq| routed(&store, relayed(&store, seq, &format!("P{seq}"), 1.0, now)))
        .into_iter()
        .collect();
    publish_raw_many(&late).await;
    assert!(terminal.wait_for(|s| s.sync.synced_up_to == 8).await);
    assert_eq!(terminal.stop().await.sync.gap, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_drained_collapsing_ends_as_one_drained_change_by_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("seq-collapse");
    let mut collapsing = terminal_config(dir.path(), &store, "till-1");
    collapsing.terminal.collapse_min_batch = 2;
    let mut plain = terminal_config(dir.path(), &store, "till-2");
    plain.terminal.collapse_min_batch = 0;
    for config in [&collapsing, &plain] {
        RunningTerminal::start(config.clone()).await.stop().await;
    }
    let now = SystemTime::now();
    let mut messages: Vec<_> = (1..=300)
        .map(|seq| {
            routed(
                &store,
                relayed(&store, seq, &format!("P{}", seq % 7), seq as f64, now),
            )
        })
        .collect();
    // The last change of P0 cannot apply: it overwrites the one before it
    // in the batch, which must apply all the same.
    messages.push((
        format!("license.{store}.price_update"),
        serde_json::to_vec(&serde_json::json!({
            "type": "price_update", "license_key": store.as_str(), "seq": 301, "catalog": CATALOG,
            "payload": {"product_id": "P0", "new_price": "unreadable"},
        }))
        .expect("json"),
    ));
    publish_raw_many(&messages).await;
    let mut collapsed = RunningTerminal::start(collapsing).await;
    collapsed.wait_settled(300, 1).await;
    let mut each = RunningTerminal::start(plain).await;
    each.wait_settled(300, 1).await;
    let rows = |terminal: &RunningTerminal| {
        let db = terminal.db();
        (0..7)
            .map(|i| price(&db, &format!("P{i}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(rows(&collapsed), rows(&each));
    assert_eq!(
        price(&collapsed.db(), "P0"),
        Some(294.0),
        "P0's last readable change"
    );
    let (collapsed, each) = (collapsed.stop().await, each.stop().await);
    assert_eq!(each.collapsed, 0);
    assert!(
        collapsed.collapsed > 0,
        "the backlog collapsed: {collapsed:?}"
    );
    assert_eq!(collapsed.sync.synced_up_to, 300, "the dead letter stops it");
}
