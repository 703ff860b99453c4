//! What terminals tell the back office: delivery receipts, and what the
//! backend makes of them for `possync publish --wait-applied` and the API.

mod common;

use common::backend::Backend;
use common::*;

/// A publisher's config that submits through `backend`.
fn publisher_config(dir: &std::path::Path, backend: &Backend) -> std::path::PathBuf {
    let file = dir.join("publisher.toml");
    std::fs::write(
        &file,
        format!(
            "[backend]\nurl = \"http://127.0.0.1:{}\"\ntoken = \"{}\"\n",
            backend.api.port, backend.api.token
        ),
    )
    .expect("write the publisher's config");
    file
}

/// The price the terminal's database holds for `product`.
fn price(terminal: &RunningTerminal, product: &str) -> Option<f64> {
    terminal
        .db()
        .query_row(
            "SELECT price FROM products WHERE id = ?1",
            [product],
            |row| row.get(0),
        )
        .ok()
}

/// Waits until the backend knows `count` terminals of `store`.
async fn wait_known(backend: &Backend, store: &possync_core::LicenseKey, count: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = backend.api.call("GET", "/v1/fleet", None).await;
        assert_eq!(status, 200, "{body}");
        let known = body["stores"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["store"] == store.as_str())
            .and_then(|s| s["terminals"].as_array())
            .map_or(0, Vec::len);
        if known == count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backend knows {known} terminals of {store}, not {count}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_waits_until_every_terminal_applied_and_names_the_one_that_has_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("waits");
    let mut backend = Backend::with_upstream_for("waits", &[&store]);
    backend.start_upstream().await;
    let mut tills = Vec::new();
    for till in ["till-1", "till-2", "till-3"] {
        tills.push(RunningTerminal::start(terminal_config(dir.path(), &store, till)).await);
    }
    wait_known(&backend, &store, 3).await;
    let publisher = publisher_config(dir.path(), &backend);
    let publish = |price: &str, wait: &str| {
        possync(&[
            "publish",
            "--config",
            publisher.to_str().expect("utf-8"),
            "price-update",
            "--license",
            store.as_str(),
            "--product-id",
            "P1",
            "--new-price",
            price,
            &format!("--wait-applied={wait}"),
        ])
    };

    let output = tokio::task::block_in_place(|| publish("2.5", "30"));
    let said = text(&output.stdout);
    assert!(output.status.success(), "{said}{}", text(&output.stderr));
    assert!(
        said.contains("seq 1 applied by all 3 terminal(s) (till-1, till-2, till-3)"),
        "{said}"
    );
    // It returned only once the last of them had it.
    for till in &tills {
        assert_eq!(price(till, "P1"), Some(2.5), "{said}");
    }

    let stopped = tills.pop().expect("till-3");
    stopped.stop().await;
    let started = std::time::Instant::now();
    let output = tokio::task::block_in_place(|| publish("3.5", "3"));
    let waited = started.elapsed();
    let said = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{said}{}",
        text(&output.stderr)
    );
    assert!(
        said.contains("seq 2 not applied after 3 s by 1 of 3 terminal(s): till-3 (offline since")
            && said.contains("applied up to 1)"),
        "{said}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(3),
        "it waited the time given: {waited:?}"
    );
    for till in &tills {
        assert_eq!(price(till, "P1"), Some(3.5));
    }
    for till in tills {
        till.stop().await;
    }
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_needs_a_backend_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("direct.toml");
    std::fs::write(&file, "").expect("write config");
    let output = possync(&[
        "publish",
        "--config",
        file.to_str().expect("utf-8"),
        "price-update",
        "--license",
        "S1",
        "--product-id",
        "P1",
        "--new-price",
        "1",
        "--wait-applied",
    ]);
    assert!(!output.status.success());
    let said = text(&output.stderr);
    assert!(said.contains("--wait-applied needs a [backend]"), "{said}");
}

/// The orders the backend recorded for `store`, by order id, in order.
async fn orders(backend: &Backend, store: &possync_core::LicenseKey) -> Vec<String> {
    let (status, body) = backend
        .api
        .call(
            "GET",
            &format!("/v1/stores/{store}/upstream?type=order"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["payload"]["order_id"].as_str().map(str::to_owned))
        .collect()
}

/// The store's orders once the backend recorded at least `count`.
async fn wait_orders(
    backend: &Backend,
    store: &possync_core::LicenseKey,
    count: usize,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let recorded = orders(backend, store).await;
        if recorded.len() >= count {
            return recorded;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backend recorded {recorded:?}, not {count} orders"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn take_order(db: &rusqlite::Connection, order_id: &str, padding: usize) {
    let payload = serde_json::json!({
        "order_id": order_id,
        "lines": [{"product_id": "x".repeat(padding.max(1)), "quantity": 1, "unit_price": 1.0}],
        "total": 1.0,
    });
    db.execute(
        "INSERT INTO possync_outbox (type, payload) VALUES ('order', ?1)",
        [payload.to_string()],
    )
    .expect("the POS app writes an order");
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_taken_before_any_backend_listens_wait_in_the_outbox_and_go_up_once_it_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("nobackend");
    let mut till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let db = till.db();
    take_order(&db, "O-1", 1);
    take_order(&db, "O-2", 1);
    // No queue takes up.<store>.#: the broker returns the rows, which stay.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM possync_outbox"), 2);

    let mut backend = Backend::with_upstream_for("nobackend", &[&store]);
    backend.start_upstream().await;
    take_order(&db, "O-3", 1);
    assert_eq!(
        wait_orders(&backend, &store, 3).await,
        ["O-1", "O-2", "O-3"]
    );
    eventually("the outbox to empty", || {
        count(&db, "SELECT count(*) FROM possync_outbox") == 0
    })
    .await;
    let _ = till.wait_for(possync_core::Status::is_live).await;
    till.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_row_too_large_to_send_is_quarantined_and_the_rows_behind_it_go_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("toolarge");
    let mut backend = Backend::with_upstream_for("toolarge", &[&store]);
    backend.start_upstream().await;
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.uplink.max_message_bytes = 4096;
    let till = RunningTerminal::start(config).await;
    let db = till.db();
    take_order(&db, "O-1", 1);
    take_order(&db, "O-big", 5000);
    take_order(&db, "O-3", 1);
    assert_eq!(wait_orders(&backend, &store, 2).await, ["O-1", "O-3"]);
    let reasons = quarantine_reasons(&db);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("over uplink.max_message_bytes (4096)"),
        "{reasons:?}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM possync_outbox"), 0);
    till.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_its_plugin_refuses_stays_on_the_till_in_the_quarantine_and_bad_rows_are_refused_on_insert()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("badorder");
    let mut backend = Backend::with_upstream_for("badorder", &[&store]);
    backend.start_upstream().await;
    let till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let db = till.db();
    for refused in [
        // A type the backend reserves for receipts.
        "INSERT INTO possync_outbox (type, payload) VALUES ('receipt', '{}')",
        "INSERT INTO possync_outbox (type, payload) VALUES ('Order', '{}')",
        "INSERT INTO possync_outbox (type, payload) VALUES ('order', 'not json')",
        "INSERT INTO possync_outbox (type, payload, created_at) VALUES ('order', '{}', x'41')",
    ] {
        assert!(db.execute(refused, []).is_err(), "{refused}");
    }
    take_order(&db, "O-1", 1);
    db.execute(
        "INSERT INTO possync_outbox (type, payload) VALUES ('order', ?1)",
        [r#"{"order_id":"O-empty","lines":[],"total":0}"#],
    )
    .expect("the app writes it");
    db.execute(
        "INSERT INTO possync_outbox (type, payload) VALUES ('order', ?1)",
        [r#"{"order_id":"O-3","lines":[{"product_id":"P1","quantity":1,"unit_price":1}],"total":1,"customer":"walk-in"}"#],
    )
    .expect("a field the plugin does not know is kept");
    assert_eq!(wait_orders(&backend, &store, 2).await, ["O-1", "O-3"]);
    let reasons = quarantine_reasons(&db);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("at least one line") && reasons[0].contains("not sent"),
        "{reasons:?}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM possync_outbox"), 0);
    till.stop().await;
    backend.stop().await;
}

/// `orders` in the backend's database of `store`: (id, total, lines), by id.
fn store_orders(backend: &Backend, store: &possync_core::LicenseKey) -> Vec<(String, f64, String)> {
    let path = backend.stores.join(format!("{store}.db"));
    let Ok(db) =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) = db.prepare("SELECT id, total, lines FROM orders ORDER BY id") else {
        return Vec::new();
    };
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .and_then(Iterator::collect)
        .unwrap_or_default()
}

/// Upstream messages the backend's plugins applied, since it started.
async fn applied_metric(backend: &Backend) -> u64 {
    let (_, metrics) = backend.api.call("GET", "/metrics", None).await;
    metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("possync_backend_upstream_applied_total{type=\"order\"} ")
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the store database of `store` holds `count` orders.
async fn wait_store_orders(
    backend: &Backend,
    store: &possync_core::LicenseKey,
    count: usize,
) -> Vec<(String, f64, String)> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let orders = store_orders(backend, store);
        if orders.len() >= count {
            return orders;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store database of {store} holds {} orders, not {count}",
            orders.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_order_plugin_applies_each_order_once_into_its_stores_database_which_rebuilds_from_the_record()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let shop = unique_license("storedb-a");
    let other = unique_license("storedb-b");
    let mut backend = Backend::with_upstream_for("storedb", &[&shop, &other]);
    backend.start_upstream().await;
    let till = RunningTerminal::start(terminal_config(dir.path(), &shop, "till-1")).await;
    let other_till = RunningTerminal::start(terminal_config(dir.path(), &other, "till-1")).await;
    let (shop_db, other_db) = (till.db(), other_till.db());
    for n in 0..200 {
        take_order(&shop_db, &format!("A-{n:03}"), 1);
    }
    for n in 0..50 {
        take_order(&other_db, &format!("B-{n:03}"), 1);
    }
    let applied = wait_store_orders(&backend, &shop, 200).await;
    let expected: Vec<String> = (0..200).map(|n| format!("A-{n:03}")).collect();
    let ids: Vec<String> = applied.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(
        ids, expected,
        "each store's database holds its own orders only"
    );
    assert_eq!(applied[0].1, 1.0);
    assert!(applied[0].2.contains("\"quantity\":1"), "{}", applied[0].2);
    assert_eq!(wait_store_orders(&backend, &other, 50).await.len(), 50);
    eventually_async("every order applied once", || async {
        applied_metric(&backend).await == 250
    })
    .await;

    // A restart that lost how far it had applied (killed before it saved
    // it) reads the record again and applies nothing twice: the only
    // order this process applies is the new one.
    backend.stop().await;
    std::fs::write(backend.stores.join("applied-up-to"), "0\n").expect("forget the progress");
    backend.start_upstream().await;
    take_order(&shop_db, "A-200", 1);
    wait_store_orders(&backend, &shop, 201).await;
    eventually_async("the new order counted", || async {
        applied_metric(&backend).await >= 1
    })
    .await;
    assert_eq!(applied_metric(&backend).await, 1, "nothing applied twice");

    // The folder deleted: rebuilt, whole, from the record.
    backend.stop().await;
    std::fs::remove_dir_all(&backend.stores).expect("delete the store databases");
    backend.start_upstream().await;
    assert_eq!(wait_store_orders(&backend, &shop, 201).await.len(), 201);
    assert_eq!(wait_store_orders(&backend, &other, 50).await.len(), 50);
    eventually_async("the rebuild to apply every order once", || async {
        applied_metric(&backend).await == 251
    })
    .await;

    till.stop().await;
    other_till.stop().await;
    backend.stop().await;
}
