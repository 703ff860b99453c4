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
        stderr.contains("\"prices\"") && stderr.contains("available: category, price"),
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
