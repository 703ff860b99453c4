//! Bad input never stops the stream: it is dead-lettered with its reason,
//! recorded locally, and the messages behind it apply.

mod common;

use common::*;
use lapin::types::AMQPValue;

#[tokio::test(flavor = "multi_thread")]
async fn malformed_unknown_and_foreign_messages_are_dead_lettered_and_the_rest_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("bad");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let key = store.as_str();
    let good = |id: &str| {
        format!(
            r#"{{"type":"price_update","license_key":"{key}","payload":{{"product_id":"{id}","new_price":1.0}}}}"#
        )
    };
    let key_routing = format!("license.{key}.price_update");
    let cases: Vec<(String, String, &str)> = vec![
        (key_routing.clone(), good("before"), ""),
        (key_routing.clone(), "{not json".into(), "not a valid envelope"),
        (key_routing.clone(), format!(r#"{{"type":"price_update","license_key":"{key}"}}"#), "missing field `payload`"),
        (format!("license.{key}.teleport"), format!(r#"{{"type":"teleport","license_key":"{key}","payload":{{}}}}"#), "unknown message type"),
        (key_routing.clone(), r#"{"type":"price_update","license_key":"OTHER-STORE","payload":{"product_id":"X","new_price":9}}"#.into(), "is not this terminal's"),
        (key_routing.clone(), format!(r#"{{"type":"price_update","license_key":"{key}","payload":{{"product_id":"P","new_price":"cheap"}}}}"#), "invalid price_update payload"),
        (key_routing.clone(), good("after"), ""),
    ];
    for (routing_key, body, _) in &cases {
        publish_raw(routing_key, body.as_bytes()).await;
    }
    terminal.wait_settled(2, 5).await;
    // The counts alone do not prove both good messages applied: one without
    // a message id that the broker delivers again (a connection lost before
    // its ack arrived) applies again and is counted again.
    let db = terminal.db();
    eventually("both good messages to apply", || {
        count(
            &db,
            "SELECT count(*) FROM products WHERE id IN ('before', 'after')",
        ) == 2
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM products"),
        2,
        "nothing else was written"
    );
    let mut reasons: Vec<String> = quarantine_reasons(&db);
    assert_eq!(reasons.len(), 5);

    let dead = drain(&terminal.topology.dead_letter_queue, 5).await;
    assert_eq!(
        dead.len(),
        5,
        "every bad message is in the dead-letter queue"
    );
    for (delivery, (_, body, expected)) in dead.iter().zip(cases.iter().filter(|c| !c.2.is_empty()))
    {
        assert_eq!(
            String::from_utf8_lossy(&delivery.data),
            *body,
            "the body is kept as received"
        );
        let headers = delivery.properties.headers().clone().expect("headers");
        let reason = match headers.inner().get("x-possync-reason") {
            Some(AMQPValue::LongString(reason)) => reason.to_string(),
            other => panic!("no reason header: {other:?}"),
        };
        assert!(
            reason.contains(expected),
            "{reason:?} should say {expected:?}"
        );
        let local = reasons.remove(0);
        assert_eq!(
            local, reason,
            "the local quarantine table holds the same reason"
        );
    }
    assert_eq!(
        queue_depth(&terminal.topology.queue).await,
        0,
        "nothing is left unsettled"
    );
    terminal.stop().await;
}
