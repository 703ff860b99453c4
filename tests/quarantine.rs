//! `possync quarantine`: what a terminal could not apply, worked by its
//! operator while the terminal runs: listed, shown, requeued once its
//! plugin is enabled (and applied through the normal path), dropped from
//! the table and the dead-letter queue.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use possync_core::LicenseKey;

/// A terminal's config file; with `modifier_groups`, its plugin library.
fn config_file(dir: &Path, store: &LicenseKey, modifier_groups: bool) -> PathBuf {
    let file = dir.join("terminal.toml");
    let mut text = format!(
        "[terminal]\nlicense_key = \"{store}\"\nterminal_id = \"till-1\"\ndatabase = {:?}\nqueue_expiry_days = 1\n",
        dir.join("pos.db").display().to_string()
    );
    if modifier_groups {
        text.push_str(&format!(
            "\n[plugins.modifier_groups]\npath = {:?}\n",
            plugin_library("possync-plugin-modifier-groups")
                .display()
                .to_string()
        ));
    }
    std::fs::write(&file, text).expect("write the terminal's config");
    file
}

fn start_terminal(file: &Path) -> ChildLog {
    ChildLog::spawn(
        possync_command(&["terminal", "--config", file.to_str().expect("utf-8")])
            .env("POSSYNC_BROKER__URL", amqp_url()),
    )
}

/// `possync quarantine ARGS` against the terminal of `file`.
fn quarantine(file: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = possync_command(&["quarantine", "--config", file.to_str().expect("utf-8")]);
    command.args(args).env("POSSYNC_BROKER__URL", amqp_url());
    let output = command.output().expect("run possync quarantine");
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// A group as a backend relays it: with its store's `seq`, which the
/// terminal counts as settled once the message is quarantined.
fn group(store: &LicenseKey, id: &str, seq: i64) -> (String, Vec<u8>) {
    let envelope = serde_json::json!({
        "type": "modifier_group_update",
        "license_key": store.as_str(),
        "message_id": format!("group-{id}"),
        "seq": seq,
        "catalog": "quarantine-test-catalog",
        "payload": {
            "group_id": id, "group_name": format!("Group {id}"), "min_select": 0, "max_select": 2,
            "modifiers": [{"modifier_id": format!("{id}-M1"), "name": "Extra shot", "price_delta": 0.5}]
        }
    });
    (
        format!("license.{store}.modifier_group_update"),
        envelope.to_string().into_bytes(),
    )
}

/// The quarantine's ids, oldest first.
fn quarantined_ids(db: &rusqlite::Connection) -> Vec<i64> {
    let mut statement = db
        .prepare("SELECT id FROM possync_quarantine ORDER BY id")
        .expect("prepare");
    statement
        .query_map([], |row| row.get(0))
        .and_then(Iterator::collect)
        .expect("read the quarantine")
}

fn groups(db: &rusqlite::Connection) -> Vec<String> {
    let Ok(mut statement) = db.prepare("SELECT id FROM modifier_groups ORDER BY id") else {
        return Vec::new();
    };
    statement
        .query_map([], |row| row.get(0))
        .and_then(Iterator::collect)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_without_its_plugin_is_requeued_once_the_plugin_is_enabled_and_a_dropped_one_is_gone_everywhere()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("quarantine");
    let dead_letters = format!("possync.{store}.till-1.dead_letter");
    let file = config_file(dir.path(), &store, false);
    let mut terminal = start_terminal(&file);
    terminal.wait_for_line("\"live\"").await;
    let (first, second) = (group(&store, "G1", 1), group(&store, "G2", 2));
    publish_raw_many(&[first, second]).await;
    let db = rusqlite::Connection::open(dir.path().join("pos.db")).expect("database");
    eventually("both groups quarantined", || {
        quarantined_ids(&db).len() == 2
    })
    .await;
    wait_for_queue(&dead_letters, "2 dead letter(s)", |q| q.ready == 2).await;
    let ids = quarantined_ids(&db);
    let (g1, g2) = (ids[0].to_string(), ids[1].to_string());

    let (ok, listed, said) = quarantine(&file, &["list"]);
    assert!(ok, "{said}");
    assert!(
        listed.contains("group-G1") && listed.contains("group-G2"),
        "{listed}"
    );
    assert!(listed.contains("no plugin handles it"), "{listed}");
    let (ok, shown, said) = quarantine(&file, &["show", &g1]);
    assert!(ok, "{said}");
    assert!(
        shown.contains("group-G1") && shown.contains("\"group_id\": \"G1\""),
        "{shown}"
    );
    let (ok, _, said) = quarantine(&file, &["show", "999999"]);
    assert!(
        !ok && said.contains("no quarantined message has id 999999"),
        "{said}"
    );

    // The plugin enabled: the first group, requeued while the terminal
    // runs, applies through the normal path and leaves both places.
    terminal.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = terminal.exit().await;
    config_file(dir.path(), &store, true);
    let mut terminal = start_terminal(&file);
    terminal.wait_for_line("\"live\"").await;
    let (ok, requeued, said) = quarantine(&file, &["requeue", &g1]);
    assert!(ok, "{said}");
    assert!(
        requeued.contains("requeued 1 message(s)") && requeued.contains("took 1 copy(ies)"),
        "{requeued}"
    );
    eventually("the requeued group to apply", || groups(&db) == ["G1"]).await;
    assert_eq!(quarantined_ids(&db), [ids[1]], "only the second waits");
    wait_for_queue(&dead_letters, "1 dead letter(s)", |q| q.ready == 1).await;

    // Dropping needs the dead-letter queue: without a broker it drops
    // nothing and says how to drop from the table alone.
    let mut offline = possync_command(&["quarantine", "--config", file.to_str().expect("utf-8")]);
    offline
        .args(["drop", &g2])
        .env("POSSYNC_BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    let output = offline.output().expect("run possync quarantine");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--table-only"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(quarantined_ids(&db), [ids[1]]);

    let (ok, dropped, said) = quarantine(&file, &["drop", "--all"]);
    assert!(ok, "{said}");
    assert!(dropped.contains("dropped 1 message(s)"), "{dropped}");
    assert!(quarantined_ids(&db).is_empty());
    wait_for_queue(&dead_letters, "0 dead letter(s)", |q| q.ready == 0).await;
    assert_eq!(groups(&db), ["G1"], "a dropped message never applies");
    terminal.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = terminal.exit().await;
    assert!(status.success(), "{log}");
}
