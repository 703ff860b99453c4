//! Handlers tested without a broker: the in-process transport routes by
//! `license.<KEY>.<type>` as RabbitMQ does, so a handler's author can check
//! what it writes to a real SQLite file in a unit test. Delivery and
//! reliability are tested against RabbitMQ (`delivery.rs`, `faults.rs`).

mod common;

use common::*;
use possync_catalog::PriceUpdate;
use possync_core::{InProcessBroker, PublishError};
use possync_sdk::{Envelope, Payload};

fn price(store: &str, id: &str, new_price: f64) -> Envelope {
    PriceUpdate {
        product_id: id.into(),
        new_price,
        product_name: None,
    }
    .to_envelope(store)
    .expect("envelope")
}

#[tokio::test(flavor = "multi_thread")]
async fn each_store_s_terminal_applies_only_its_own_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::new();
    let (cafe, bakery) = (unique_license("cafe"), unique_license("bakery"));
    let mut cafe_till =
        RunningTerminal::start_in_process(terminal_config(dir.path(), &cafe, "till-1"), &broker)
            .await;
    let mut bakery_till =
        RunningTerminal::start_in_process(terminal_config(dir.path(), &bakery, "till-1"), &broker)
            .await;

    let published = broker
        .publish_envelopes([
            price(cafe.as_str(), "CAP", 3.40),
            price(bakery.as_str(), "BAG", 2.50),
            price(cafe.as_str(), "CAP", 3.60),
        ])
        .expect("routed");
    assert_eq!(
        published[0].routing_key,
        format!("license.{cafe}.price_update")
    );
    cafe_till.wait_applied(2).await;
    bakery_till.wait_applied(1).await;

    assert_eq!(product(&cafe_till.db(), "CAP").map(|p| p.1), Some(3.60));
    assert_eq!(product(&cafe_till.db(), "BAG"), None);
    assert_eq!(product(&bakery_till.db(), "BAG").map(|p| p.1), Some(2.50));
    assert_eq!(product(&bakery_till.db(), "CAP"), None);
    cafe_till.stop().await;
    bakery_till.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_a_handler_refuses_is_dead_lettered_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::new();
    let store = unique_license("refused");
    let mut till =
        RunningTerminal::start_in_process(terminal_config(dir.path(), &store, "till-1"), &broker)
            .await;
    broker
        .publish_envelopes([
            price(store.as_str(), "", 1.0),
            price(store.as_str(), "OK", 1.0),
        ])
        .expect("routed");
    till.wait_settled(1, 1).await;

    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("product_id must not be empty"),
        "{dead:?}"
    );
    assert_eq!(quarantine_reasons(&till.db()), vec![dead[0].reason.clone()]);
    assert_eq!(product(&till.db(), "OK").map(|p| p.1), Some(1.0));
    assert!(
        till.status.borrow().queue_depth.is_some(),
        "the queue is counted"
    );
    till.stop().await;
}

#[test]
fn a_change_for_a_store_with_no_terminal_is_an_error_as_on_rabbitmq() {
    let broker = InProcessBroker::new();
    let err = broker
        .publish_envelopes([price("NOBODY", "CAP", 1.0)])
        .expect_err("unroutable");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("start a terminal of that store first"),
        "{err}"
    );
}
