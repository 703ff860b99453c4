//! The catalog's handlers against a real SQLite file: what each message
//! writes, stale and late changes that change nothing, tombstones, and the
//! move of an older database's tombstones.

use possync_catalog::{
    CategoryUpdate, MIGRATIONS, PriceUpdate, ProductDelete, ProductUpdate, apply_category,
    apply_price, apply_product, apply_product_delete,
};
use possync_sdk::{Envelope, Migration, Payload, Plugin, Settings};
use possync_testkit::{Applied, TestTerminal, message};
use serde_json::json;

/// The four catalog plugins as one, as a terminal with all four enabled
/// applies them.
fn catalog(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("catalog")
        .migrations(MIGRATIONS)
        .on::<PriceUpdate>(apply_price)
        .on::<ProductUpdate>(apply_product)
        .on::<ProductDelete>(apply_product_delete)
        .on::<CategoryUpdate>(apply_category))
}

fn till() -> TestTerminal {
    TestTerminal::new(catalog).expect("the catalog starts")
}

fn price(id: &str, new_price: f64) -> PriceUpdate {
    PriceUpdate {
        product_id: id.into(),
        new_price,
        product_name: None,
    }
}

fn product(id: &str, name: &str, price: f64) -> ProductUpdate {
    ProductUpdate {
        product_id: id.into(),
        product_name: name.into(),
        price,
        category_id: Some("C1".into()),
        icon_name: None,
    }
}

fn delete(id: &str) -> ProductDelete {
    ProductDelete {
        product_id: id.into(),
    }
}

fn products(till: &TestTerminal) -> Vec<serde_json::Value> {
    till.query("SELECT id, name, price, sync_version FROM products ORDER BY id")
        .expect("reads products")
}

fn tombstones(till: &TestTerminal) -> Vec<serde_json::Value> {
    till.query("SELECT entity, id, sync_version FROM possync_tombstones ORDER BY entity, id")
        .expect("reads tombstones")
}

#[test]
fn each_plugin_applies_its_own_type_on_the_shared_tables_and_no_other() {
    let category = CategoryUpdate {
        category_id: "C1".into(),
        category_name: "Tea".into(),
        icon_name: None,
    };
    let plugins: [(possync_sdk::PluginFn, Envelope, Envelope); 4] = [
        (
            possync_catalog::price_plugin,
            message(&price("P1", 1.0)),
            message(&delete("P1")),
        ),
        (
            possync_catalog::product_plugin,
            message(&product("P1", "Tea", 1.0)),
            message(&price("P1", 1.0)),
        ),
        (
            possync_catalog::product_delete_plugin,
            message(&delete("P1")),
            message(&category),
        ),
        (
            possync_catalog::category_plugin,
            message(&category),
            message(&product("P1", "Tea", 1.0)),
        ),
    ];
    for (plugin, own, other) in plugins {
        let mut till = TestTerminal::new(plugin).expect("starts");
        assert_eq!(till.apply(own), Ok(Applied::Changed));
        assert!(till.apply(other).is_err(), "one type per plugin");
    }
}

#[test]
fn a_price_update_creates_a_missing_product_and_changes_an_existing_one() {
    let mut till = till();
    let named = PriceUpdate {
        product_name: Some("Cappuccino".into()),
        ..price("P1", 3.2)
    };
    assert_eq!(
        till.apply(message(&named).with_version(10)),
        Ok(Applied::Changed)
    );
    assert_eq!(
        till.apply(message(&price("P1", 3.4)).with_version(20)),
        Ok(Applied::Changed)
    );
    assert_eq!(products(&till), [json!(["P1", "Cappuccino", 3.4, 20])]);
}

#[test]
fn an_older_price_is_stale_and_changes_nothing() {
    let mut till = till();
    till.apply(message(&price("P1", 3.4)).with_version(20))
        .expect("applies");
    let Ok(Applied::Stale(stale)) = till.apply(message(&price("P1", 1.0)).with_version(10)) else {
        panic!("an older price is stale");
    };
    assert_eq!((stale[0].id.as_str(), stale[0].stored), ("P1", 20));
    let twin = till.apply(message(&price("P1", 1.0)).with_version(20));
    assert!(
        matches!(twin, Ok(Applied::Stale(_))),
        "an equal exact version is the same change"
    );
    assert_eq!(products(&till), [json!(["P1", "", 3.4, 20])]);
}

#[test]
fn changes_ordered_by_a_legacy_timestamp_apply_in_arrival_order_within_a_second() {
    let mut till = till();
    let at = "2025-11-27T10:30:00Z";
    for new_price in [1.0, 2.0] {
        let update = message(&price("P1", new_price)).with_timestamp(at);
        assert_eq!(till.apply(update), Ok(Applied::Changed));
    }
    let earlier = message(&price("P1", 9.0)).with_timestamp("2025-11-27T10:29:59Z");
    assert!(matches!(till.apply(earlier), Ok(Applied::Stale(_))));
    assert_eq!(
        till.query("SELECT price, updated_at FROM products")
            .expect("reads"),
        [json!([2.0, at])]
    );
}

#[test]
fn a_delete_leaves_a_tombstone_that_keeps_late_updates_out_until_a_newer_one() {
    let mut till = till();
    till.apply(message(&product("P1", "Latte", 3.5)).with_version(10))
        .expect("applies");
    assert_eq!(
        till.apply(message(&delete("P1")).with_version(20)),
        Ok(Applied::Changed)
    );
    assert_eq!(products(&till), [] as [serde_json::Value; 0]);
    assert_eq!(tombstones(&till), [json!(["products", "P1", 20])]);
    for late in [
        message(&product("P1", "Latte", 3.5)).with_version(15),
        message(&price("P1", 3.0)).with_version(19),
    ] {
        assert!(matches!(till.apply(late), Ok(Applied::Stale(_))));
    }
    assert_eq!(products(&till), [] as [serde_json::Value; 0]);
    assert_eq!(
        till.apply(message(&price("P1", 4.0)).with_version(30)),
        Ok(Applied::Changed)
    );
    assert_eq!(products(&till), [json!(["P1", "", 4.0, 30])]);
    assert_eq!(
        tombstones(&till),
        [] as [serde_json::Value; 0],
        "the product is back"
    );
}

#[test]
fn a_change_without_an_order_applies_unconditionally_as_the_original_system_did() {
    let mut till = till();
    till.apply(message(&product("P1", "Latte", 3.5)).with_version(50))
        .expect("applies");
    till.apply(message(&delete("P1"))).expect("applies");
    assert_eq!(tombstones(&till), [json!(["products", "P1", 0])]);
    assert_eq!(till.apply(message(&price("P1", 1.0))), Ok(Applied::Changed));
    assert_eq!(products(&till), [json!(["P1", "", 1.0, 0])]);
}

#[test]
fn a_product_and_a_category_are_created_and_replaced_whole() {
    let mut till = till();
    let category = CategoryUpdate {
        category_id: "C1".into(),
        category_name: "Coffee".into(),
        icon_name: Some("cup".into()),
    };
    assert_eq!(till.apply(message(&category)), Ok(Applied::Changed));
    let renamed = CategoryUpdate {
        icon_name: None,
        ..category
    };
    assert_eq!(
        till.apply(message(&renamed).with_timestamp("2025-11-27T10:30:00Z")),
        Ok(Applied::Changed)
    );
    assert_eq!(
        till.query("SELECT id, name, icon_name, updated_at FROM categories")
            .expect("reads"),
        [json!(["C1", "Coffee", null, "2025-11-27T10:30:00Z"])]
    );
    let with_icon = ProductUpdate {
        icon_name: Some("cup".into()),
        ..product("P1", "Espresso", 2.2)
    };
    till.apply(message(&with_icon)).expect("applies");
    till.apply(message(&product("P1", "Espresso", 2.4)))
        .expect("applies");
    assert_eq!(
        till.query("SELECT name, price, category_id, icon_name FROM products")
            .expect("reads"),
        [json!(["Espresso", 2.4, "C1", null])]
    );
}

#[test]
fn ids_may_be_integers_and_payloads_the_terminal_would_drop_are_refused() {
    let mut till = till();
    let numeric = Envelope::new(
        "product_update",
        "TEST-STORE",
        json!({"product_id": 42, "product_name": "Tea", "price": 1.5, "category_id": 7}),
    );
    assert_eq!(till.apply(numeric), Ok(Applied::Changed));
    assert_eq!(
        till.query("SELECT id, category_id FROM products")
            .expect("reads"),
        [json!(["42", "7"])]
    );
    for (message_type, payload, reason) in [
        (
            "price_update",
            json!({"product_id": " ", "new_price": 1.0}),
            "product_id must not be empty",
        ),
        (
            "product_delete",
            json!({"product_id": ""}),
            "product_id must not be empty",
        ),
        (
            "category_update",
            json!({"category_id": "", "category_name": "x"}),
            "category_id must not be empty",
        ),
        (
            "price_update",
            json!({"product_id": "P1"}),
            "missing field `new_price`",
        ),
        (
            "product_update",
            json!({"product_id": 1.5, "product_name": "x", "price": 1}),
            "a string or an integer",
        ),
    ] {
        let envelope = Envelope::new(message_type, "TEST-STORE", payload);
        let refused = till.check(&envelope).expect_err(reason);
        assert!(refused.to_string().contains(reason), "{refused}");
    }
    let infinite = price("P1", f64::INFINITY).validate();
    assert_eq!(infinite, Err("new_price must be a finite number".into()));
    // A negative price applies on a terminal, as it always did; publishers
    // refuse it by the schema.
    assert_eq!(
        till.apply(message(&price("P2", -1.0))),
        Ok(Applied::Changed)
    );
}

#[test]
fn the_schemas_tell_publishers_prices_are_never_negative() {
    for (schema, field) in [
        (schemars::schema_for!(PriceUpdate), "new_price"),
        (schemars::schema_for!(ProductUpdate), "price"),
    ] {
        let schema = serde_json::Value::from(schema);
        assert_eq!(schema["properties"][field]["minimum"], json!(0), "{schema}");
    }
}

#[test]
fn an_older_database_keeps_its_tombstones_in_the_shared_table() {
    let folder = tempfile::tempdir().expect("tempdir");
    let path = folder.path().join("till.db");
    // The catalog as it was before its tombstones moved: catalog/1 only.
    fn before(_: &Settings) -> Result<Plugin, String> {
        const CATALOG_1: &[Migration] = &[MIGRATIONS[1]];
        Ok(Plugin::new("catalog").migrations(CATALOG_1))
    }
    let settings = || Settings::new("catalog", json!({}));
    let old = TestTerminal::open(&path, before, settings()).expect("an old database");
    old.connection()
        .execute_batch(
            "INSERT INTO catalog_tombstones (entity, id, sync_version) VALUES
                ('products', 'P1', 20), ('categories', 'C1', 30);",
        )
        .expect("tombstones of the old kind");
    drop(old);

    let mut till = TestTerminal::open(&path, catalog, settings()).expect("upgrades");
    assert_eq!(
        tombstones(&till),
        [
            json!(["categories", "C1", 30]),
            json!(["products", "P1", 20])
        ]
    );
    let gone = till.query("SELECT name FROM sqlite_master WHERE name = 'catalog_tombstones'");
    assert_eq!(gone.expect("reads"), [] as [serde_json::Value; 0]);
    let late = till.apply(message(&price("P1", 1.0)).with_version(10));
    assert!(matches!(late, Ok(Applied::Stale(_))), "{late:?}");
}
