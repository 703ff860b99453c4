//! Idempotent, ordered apply: a redelivered or stale message changes
//! nothing, and a late update never brings a deleted product back.

mod common;

use common::*;
use possync_core::Publisher;
use possync_sdk::Envelope;

fn price(store: &str, id: &str, new_price: f64) -> Envelope {
    Envelope::new(
        "price_update",
        store,
        serde_json::json!({ "product_id": id, "new_price": new_price }),
    )
}

fn delete(store: &str, id: &str) -> Envelope {
    Envelope::new(
        "product_delete",
        store,
        serde_json::json!({ "product_id": id }),
    )
}

fn stale(status: &possync_core::Status, message_type: &str) -> u64 {
    status
        .stale_by_type
        .get(message_type)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_stale_updates_and_late_updates_after_a_delete_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("order");
    let key = store.as_str();
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let sequence = vec![
        price(key, "A", 5.0)
            .with_version(100)
            .with_message_id("m-1"),
        // The same message again (a publisher retry): skipped by id.
        price(key, "A", 5.0)
            .with_version(100)
            .with_message_id("m-1"),
        // Older than what the row holds: dropped.
        price(key, "A", 1.0).with_version(50).with_message_id("m-2"),
        // Another change at the same exact version: not newer, dropped.
        price(key, "A", 9.0)
            .with_version(100)
            .with_message_id("m-2b"),
        price(key, "B", 2.0)
            .with_version(100)
            .with_message_id("m-3"),
        delete(key, "B").with_version(200).with_message_id("m-4"),
        // Written before the delete, arriving after it: must not resurrect B.
        price(key, "B", 3.0)
            .with_version(150)
            .with_message_id("m-5"),
        // A change made after the delete brings it back.
        price(key, "C", 1.0)
            .with_version(100)
            .with_message_id("m-6"),
        delete(key, "C").with_version(200).with_message_id("m-7"),
        price(key, "C", 7.0)
            .with_version(300)
            .with_message_id("m-8"),
    ];
    publisher
        .publish_envelopes(sequence)
        .await
        .expect("confirmed");
    let settled = terminal
        .wait_for(|s| s.applied == 6 && s.duplicates == 1 && stale(s, "price_update") == 3)
        .await;
    let status = terminal.status.borrow().clone();
    assert!(
        settled,
        "6 applied, 1 duplicate, 3 stale price updates: {status:?}"
    );

    let db = terminal.db();
    assert_eq!(
        product(&db, "A").map(|p| p.1),
        Some(5.0),
        "a stale update changes nothing"
    );
    assert_eq!(
        product(&db, "B"),
        None,
        "a late update does not bring a deleted product back"
    );
    assert_eq!(
        product(&db, "C").map(|p| p.1),
        Some(7.0),
        "a newer update re-creates a deleted product"
    );
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_without_version_or_id_are_ordered_by_their_timestamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("legacy");
    let key = store.as_str();
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let legacy = |new_price: f64, timestamp: &str| {
        format!(
            r#"{{"type":"price_update","license_key":"{key}","payload":{{"product_id":"L","new_price":{new_price}}},"timestamp":"{timestamp}"}}"#
        )
    };
    let routing = format!("license.{key}.price_update");
    publish_raw(&routing, legacy(1.0, "2025-11-27T10:30:00Z").as_bytes()).await;
    // Same second: both apply in arrival order (legacy timestamps have second precision).
    publish_raw(&routing, legacy(2.0, "2025-11-27T10:30:00Z").as_bytes()).await;
    // Older: dropped.
    publish_raw(&routing, legacy(0.5, "2025-11-27T10:29:59Z").as_bytes()).await;
    let settled = terminal
        .wait_for(|s| s.applied == 2 && stale(s, "price_update") == 1)
        .await;
    assert!(settled, "two applied, the older one counted as stale");
    assert_eq!(product(&terminal.db(), "L").map(|p| p.1), Some(2.0));
    terminal.stop().await;
}
