//! The four core message types travel from a publisher through RabbitMQ
//! into each terminal's SQLite database, as the contract says.

mod common;

use common::*;
use possync_catalog::{CategoryUpdate, PriceUpdate, ProductDelete, ProductUpdate};
use possync_core::{Publisher, routing_key};

#[tokio::test(flavor = "multi_thread")]
async fn each_core_type_published_with_the_library_lands_in_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("lib");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let publisher = Publisher::connect(&terminal_config(dir.path(), &store, "x").broker)
        .await
        .expect("publisher");
    let stores = [store.clone()];

    publisher
        .publish(
            &stores,
            &CategoryUpdate {
                category_id: "C1".into(),
                category_name: "Coffee".into(),
                icon_name: Some("cup".into()),
            },
        )
        .await
        .expect("category_update confirmed");
    publisher
        .publish(
            &stores,
            &ProductUpdate {
                product_id: "P1".into(),
                product_name: "Cappuccino".into(),
                price: 3.2,
                category_id: Some("C1".into()),
                icon_name: Some("coffee".into()),
            },
        )
        .await
        .expect("product_update confirmed");
    publisher
        .publish(
            &stores,
            &PriceUpdate {
                product_id: "P1".into(),
                new_price: 3.4,
                product_name: None,
            },
        )
        .await
        .expect("price_update confirmed");
    publisher
        .publish(
            &stores,
            &PriceUpdate {
                product_id: "P2".into(),
                new_price: 1.5,
                product_name: Some("Water".into()),
            },
        )
        .await
        .expect("price_update of a new product confirmed");
    publisher
        .publish(
            &stores,
            &ProductUpdate {
                product_id: "P3".into(),
                product_name: "Old scone".into(),
                price: 2.0,
                category_id: None,
                icon_name: None,
            },
        )
        .await
        .expect("product_update confirmed");
    publisher
        .publish(
            &stores,
            &ProductDelete {
                product_id: "P3".into(),
            },
        )
        .await
        .expect("product_delete confirmed");
    terminal.wait_applied(6).await;

    let db = terminal.db();
    assert_eq!(
        db.query_row(
            "SELECT name, icon_name FROM categories WHERE id = 'C1'",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        )
        .expect("category row"),
        ("Coffee".into(), "cup".into())
    );
    assert_eq!(
        product(&db, "P1"),
        Some((
            "Cappuccino".into(),
            3.4,
            Some("C1".into()),
            Some("coffee".into())
        ))
    );
    assert_eq!(
        product(&db, "P2"),
        Some(("Water".into(), 1.5, None, None)),
        "a price_update creates a missing product"
    );
    assert_eq!(product(&db, "P3"), None, "product_delete removes the row");
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_core_type_published_with_the_cli_lands_in_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("cli");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let key = store.as_str();
    let commands: [&[&str]; 5] = [
        &[
            "publish",
            "category-update",
            "--license",
            key,
            "--category-id",
            "C1",
            "--name",
            "Tea",
            "--icon-name",
            "leaf",
        ],
        &[
            "publish",
            "product-update",
            "--license",
            key,
            "--product-id",
            "P1",
            "--name",
            "Green tea",
            "--price",
            "2.5",
            "--category-id",
            "C1",
        ],
        &[
            "publish",
            "price-update",
            "--license",
            key,
            "--product-id",
            "P1",
            "--price",
            "2.75",
            "--product-name",
            "Green tea (large)",
        ],
        &[
            "publish",
            "product-update",
            "--license",
            key,
            "--product-id",
            "P2",
            "--name",
            "Gone",
            "--price",
            "1",
            "--category-id",
            "C1",
        ],
        &[
            "publish",
            "product-delete",
            "--license",
            key,
            "--product-id",
            "P2",
        ],
    ];
    for args in commands {
        let output = possync(args);
        assert!(
            output.status.success(),
            "{args:?} failed: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stdout).contains(&format!("confirmed license.{key}.")),
            "{}",
            text(&output.stdout)
        );
    }
    terminal.wait_applied(5).await;

    let db = terminal.db();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM categories WHERE id = 'C1' AND name = 'Tea' AND icon_name = 'leaf'"
        ),
        1
    );
    assert_eq!(
        product(&db, "P1"),
        Some(("Green tea (large)".into(), 2.75, Some("C1".into()), None))
    );
    assert_eq!(product(&db, "P2"), None);
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_original_wire_json_from_a_plain_amqp_client_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("wire");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let key = store.as_str();
    // Exactly the shape of DESIGN.md, plus a field this version does not know.
    let price = format!(
        r#"{{"type":"price_update","license_key":"{key}","payload":{{"product_id":"PROD-001","product_name":"Cappuccino","new_price":12.99}},"timestamp":"2025-11-27T10:30:00Z"}}"#
    );
    let category = format!(
        r#"{{"type":"category_update","license_key":"{key}","payload":{{"category_id":7,"category_name":"Drinks"}},"timestamp":"2025-11-27T10:30:01Z","extra":true}}"#
    );
    publish_raw(&format!("license.{key}.price_update"), price.as_bytes()).await;
    publish_raw(
        &format!("license.{key}.category_update"),
        category.as_bytes(),
    )
    .await;
    terminal.wait_applied(2).await;

    let db = terminal.db();
    assert_eq!(
        product(&db, "PROD-001"),
        Some(("Cappuccino".into(), 12.99, None, None))
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM categories WHERE id = '7' AND name = 'Drinks'"
        ),
        1
    );
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_stores_never_see_each_others_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cafe, bakery) = (unique_license("cafe"), unique_license("bakery"));
    let mut cafe_till = RunningTerminal::start(terminal_config(dir.path(), &cafe, "till-1")).await;
    let mut bakery_till =
        RunningTerminal::start(terminal_config(dir.path(), &bakery, "till-1")).await;
    let publisher = Publisher::connect(&terminal_config(dir.path(), &cafe, "x").broker)
        .await
        .expect("publisher");

    for i in 0..20 {
        let (store, name) = if i % 2 == 0 {
            (&cafe, "cafe")
        } else {
            (&bakery, "bakery")
        };
        let update = PriceUpdate {
            product_id: format!("{name}-{i}"),
            new_price: f64::from(i),
            product_name: None,
        };
        publisher
            .publish(std::slice::from_ref(store), &update)
            .await
            .expect("confirmed");
    }
    cafe_till.wait_applied(10).await;
    bakery_till.wait_applied(10).await;

    let (cafe_db, bakery_db) = (cafe_till.db(), bakery_till.db());
    assert_eq!(count(&cafe_db, "SELECT count(*) FROM products"), 10);
    assert_eq!(
        count(
            &cafe_db,
            "SELECT count(*) FROM products WHERE id NOT LIKE 'cafe-%'"
        ),
        0
    );
    assert_eq!(count(&bakery_db, "SELECT count(*) FROM products"), 10);
    assert_eq!(
        count(
            &bakery_db,
            "SELECT count(*) FROM products WHERE id NOT LIKE 'bakery-%'"
        ),
        0
    );
    publisher.close().await;
    cafe_till.stop().await;
    bakery_till.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_terminals_of_one_store_both_get_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("pair");
    let mut first = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let mut second = RunningTerminal::start(terminal_config(dir.path(), &store, "till-2")).await;
    assert_ne!(
        first.topology.queue, second.topology.queue,
        "each terminal has its own queue"
    );
    let publisher = Publisher::connect(&terminal_config(dir.path(), &store, "x").broker)
        .await
        .expect("publisher");

    let updates: Vec<_> = (0..50)
        .map(|i| {
            possync_sdk::Payload::to_envelope(
                &PriceUpdate {
                    product_id: format!("P{i}"),
                    new_price: f64::from(i) / 4.0,
                    product_name: None,
                },
                store.as_str(),
            )
            .expect("envelope")
        })
        .collect();
    publisher
        .publish_envelopes(updates)
        .await
        .expect("all confirmed");
    first.wait_applied(50).await;
    second.wait_applied(50).await;

    for terminal in [&first, &second] {
        let db = terminal.db();
        assert_eq!(count(&db, "SELECT count(*) FROM products"), 50);
        assert_eq!(product(&db, "P49").map(|p| p.1), Some(12.25));
    }
    assert_eq!(
        routing_key(&store, "price_update"),
        format!("license.{store}.price_update")
    );
    publisher.close().await;
    first.stop().await;
    second.stop().await;
}

/// On a current-thread runtime the applier cannot borrow the consumer's
/// worker, so it runs on a thread of its own; the result is the same.
#[tokio::test(flavor = "current_thread")]
async fn a_terminal_on_a_current_thread_runtime_applies_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("single");
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let (changes, model) = catalog_changes(&store, 200, 12);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(200).await;
    assert_matches_model(&terminal.db(), &model);
    publisher.close().await;
    terminal.stop().await;
}
