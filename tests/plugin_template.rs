//! The plugin template builds outside possync's crates, passes its own
//! tests, and a terminal loads it and applies its messages: the path
//! docs/writing-a-plugin.md walks a newcomer along.

mod common;

use std::path::Path;

use common::*;
use possync_core::{DynamicPlugin, PluginSetting, Publisher};
use possync_sdk::Envelope;

fn cargo_in_template(args: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::process::Command::new(env!("CARGO"))
        .args(args)
        .args([
            "--manifest-path",
            "examples/plugin-template/Cargo.toml",
            "--target-dir",
        ])
        .arg(root.join("target"))
        .current_dir(root)
        .output()
        .expect("run cargo")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plugin_template_builds_tests_loads_and_applies() {
    let tested = cargo_in_template(&["test"]);
    assert!(
        tested.status.success(),
        "the template's own tests: {}",
        text(&tested.stderr)
    );
    let built = cargo_in_template(&["build"]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    let library = plugin_library("possync-plugin-tables");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("template");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    let settings = [("max_seats".to_owned(), serde_json::json!(8))]
        .into_iter()
        .collect();
    config.plugins.insert(
        "tables".into(),
        PluginSetting::Dynamic(DynamicPlugin {
            path: library.clone(),
            enabled: true,
            settings,
        }),
    );
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let key = store.as_str();
    publisher
        .publish_envelopes(vec![
            Envelope::new(
                "table_update",
                key,
                serde_json::json!({ "table_id": "T1", "name": "Window", "seats": 4 }),
            ),
            Envelope::new(
                "table_update",
                key,
                serde_json::json!({ "table_id": "T2", "name": "Banquet", "seats": 20 }),
            ),
            Envelope::new(
                "table_update",
                key,
                serde_json::json!({ "table_id": "T3", "name": "Bar", "seats": 2 }),
            ),
            Envelope::new("table_delete", key, serde_json::json!({ "table_id": "T3" })),
        ])
        .await
        .expect("confirmed");
    terminal.wait_settled(3, 1).await;
    let db = terminal.db();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM restaurant_tables WHERE id = 'T1' AND seats = 4"
        ),
        1
    );
    assert_eq!(count(&db, "SELECT count(*) FROM restaurant_tables"), 1);
    assert!(quarantine_reasons(&db)[0].contains("seats must be 1 to 8, not 20"));
    publisher.close().await;

    // The binary knows nothing of tables: the plugin named in config gives
    // `possync publish` the command, its options and its checks.
    let publish = |args: &[&str]| {
        let mut full = vec!["publish", "table-update", "--license", key];
        full.extend_from_slice(args);
        possync_command(&full)
            .env("POSSYNC_PLUGINS__TABLES__PATH", &library)
            .output()
            .expect("run possync publish")
    };
    let help = publish(&["--help"]);
    assert!(
        text(&help.stdout).contains("--seats <INTEGER>")
            && text(&help.stdout).contains("How many guests it seats."),
        "{}",
        text(&help.stdout)
    );
    let refused = publish(&["--table-id", "T4", "--name", "Door", "--seats", "0"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("--seats"),
        "{}",
        text(&refused.stderr)
    );
    let sent = publish(&["--table-id", "0042", "--name", "Door", "--seats", "3"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    terminal.wait_settled(4, 1).await;
    assert_eq!(
        count(
            &terminal.db(),
            "SELECT count(*) FROM restaurant_tables WHERE id = '0042' AND seats = 3"
        ),
        1
    );
    terminal.stop().await;
}
