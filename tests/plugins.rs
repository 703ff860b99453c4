//! Built-in handlers register at link time, and config turns them on and off.

mod common;

use common::*;
use possync_catalog::{PriceUpdate, ProductDelete};

#[test]
fn the_binary_has_every_built_in_handler_registered() {
    let output = possync(&["plugins", "list"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let listing = text(&output.stdout);
    for (name, message_type) in [
        ("price", "price_update"),
        ("product", "product_update"),
        ("product_delete", "product_delete"),
        ("category", "category_update"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"));
        assert!(
            line.contains(message_type) && line.contains("yes") && line.contains("built-in"),
            "{line}"
        );
    }
}

#[test]
fn config_switches_a_plugin_off_and_unknown_plugin_names_are_errors() {
    let output = possync_command(&["plugins", "list"])
        .env("POSSYNC_PLUGINS__PRICE", "false")
        .output()
        .expect("run");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let listing = text(&output.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with("price "))
        .expect("price listed");
    assert!(line.contains(" no "), "{line}");

    let output = possync_command(&["plugins", "list"])
        .env("POSSYNC_PLUGINS__PRICES", "false")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("\"prices\"")
            && stderr.contains("available: category, notices, orders, price"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_of_a_disabled_plugin_are_acknowledged_and_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("off");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config
        .plugins
        .insert("price".into(), possync_core::PluginSetting::Toggle(false));
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = possync_core::Publisher::connect(&config.broker)
        .await
        .expect("publisher");
    let stores = [store.clone()];
    publisher
        .publish(
            &stores,
            &PriceUpdate {
                product_id: "P1".into(),
                new_price: 1.0,
                product_name: None,
            },
        )
        .await
        .expect("confirmed");
    publisher
        .publish(
            &stores,
            &ProductDelete {
                product_id: "P0".into(),
            },
        )
        .await
        .expect("confirmed");
    terminal.wait_applied(1).await;

    let db = terminal.db();
    assert_eq!(
        count(&db, "SELECT count(*) FROM products"),
        0,
        "the price_update was not applied"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM possync_quarantine"),
        0,
        "nor quarantined"
    );
    assert_eq!(
        queue_depth(&terminal.topology.queue).await,
        0,
        "but acknowledged"
    );
    assert_eq!(queue_depth(&terminal.topology.dead_letter_queue).await, 0);
    publisher.close().await;
    terminal.stop().await;
}

#[test]
fn every_shipped_type_declares_the_entity_it_changes() {
    use possync_core::{ChangeKind, EntityRule, Registry};
    use possync_plugin_modifier_groups::{ModifierGroupDelete, ModifierGroupUpdate};
    use possync_plugin_product_images::{ImageDelete, ImageUpdate};

    let registry = Registry::for_publishing(&Default::default()).expect("built-ins build");
    let declared = |message_type: &str| {
        registry
            .entity_rule(message_type)
            .map(|rule| (rule.entity.clone(), rule.id.clone(), rule.change))
    };
    let product = |change| Some(("product".to_owned(), "product_id".to_owned(), change));
    assert_eq!(declared("price_update"), product(ChangeKind::Merge));
    assert_eq!(declared("product_update"), product(ChangeKind::Replace));
    assert_eq!(declared("product_delete"), product(ChangeKind::Delete));
    assert_eq!(
        declared("category_update"),
        Some(("category".into(), "category_id".into(), ChangeKind::Replace))
    );
    let price = registry.entity_rule("price_update").expect("declared");
    assert_eq!(
        price.fields.get("new_price").map(String::as_str),
        Some("price")
    );

    fn rule<T: schemars::JsonSchema>(message_type: &str) -> (String, ChangeKind) {
        let schema = serde_json::to_value(schemars::schema_for!(T)).expect("a schema is JSON");
        let rule = EntityRule::from_schema(message_type, &schema)
            .expect("valid declaration")
            .expect("declared");
        (rule.entity, rule.change)
    }
    assert_eq!(
        rule::<ModifierGroupUpdate>("modifier_group_update"),
        ("modifier_group".into(), ChangeKind::Replace)
    );
    assert_eq!(
        rule::<ModifierGroupDelete>("modifier_group_delete"),
        ("modifier_group".into(), ChangeKind::Delete)
    );
    assert_eq!(
        rule::<ImageUpdate>("image_update"),
        ("product_image".into(), ChangeKind::Replace)
    );
    assert_eq!(
        rule::<ImageDelete>("image_delete"),
        ("product_image".into(), ChangeKind::Delete)
    );
}
