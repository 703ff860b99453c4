//! `possync doctor` says what is right and, for each failure, what to do.

mod common;

use common::*;

fn config_file(dir: &std::path::Path, store: &str, url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{store}.toml"));
    let database = dir.join(format!("{store}.db"));
    std::fs::write(
        &path,
        format!(
            "[broker]\nurl = {url:?}\n\n[terminal]\nlicense_key = {store:?}\nterminal_id = \"till-1\"\ndatabase = {:?}\nqueue_expiry_days = 1\n{extra}",
            database.display().to_string()
        ),
    )
    .expect("write config");
    path
}

fn doctor(file: &std::path::Path) -> (bool, String) {
    let output = possync_command(&["doctor", "--config", file.to_str().expect("utf-8")])
        .env_remove("POSSYNC_BROKER__URL")
        .output()
        .expect("run");
    (output.status.success(), text(&output.stdout))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_setup_passes_every_check_and_says_where_values_came_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("doctor");
    let file = config_file(dir.path(), store.as_str(), &amqp_url(), "");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.terminal.database = dir.path().join(format!("{store}.db"));
    RunningTerminal::start(config).await.stop().await;
    let (ok, out) = doctor(&file);
    assert!(ok, "{out}");
    assert!(out.contains("ok   terminal queue: possync."), "{out}");
    assert!(
        out.contains(&format!("terminal.license_key = {store}  (TOML file")),
        "{out}"
    );
    assert!(
        out.contains("broker.exchange = pos_license_events  (default)"),
        "{out}"
    );
    assert!(
        out.contains("guest:***@"),
        "the password is redacted: {out}"
    );
    assert!(
        out.contains("all ") && out.contains("checks passed"),
        "{out}"
    );
}

#[test]
fn a_wrong_password_is_named_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = amqp_url().replacen("guest:guest", "guest:not-the-password", 1);
    let file = config_file(dir.path(), "DOCTOR-PW", &url, "");
    let (ok, out) = doctor(&file);
    assert!(!ok);
    assert!(
        out.contains("FAIL broker") && out.contains("refused access"),
        "{out}"
    );
    assert!(out.contains("fix: fix broker.url"), "{out}");
    assert!(!out.contains("not-the-password"), "{out}");
}

#[test]
fn a_missing_queue_says_how_to_get_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("noqueue");
    let file = config_file(dir.path(), store.as_str(), &amqp_url(), "");
    let (ok, out) = doctor(&file);
    assert!(!ok);
    assert!(
        out.contains("FAIL terminal queue") && out.contains("start the terminal once"),
        "{out}"
    );
}

#[test]
fn a_broken_plugin_path_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config_file(
        dir.path(),
        "DOCTOR-PLUGIN",
        &amqp_url(),
        "\n[plugins.images]\npath = \"/nowhere/libimages.so\"\n",
    );
    let (ok, out) = doctor(&file);
    assert!(!ok);
    assert!(
        out.contains("FAIL plugins") && out.contains("no file at /nowhere/libimages.so"),
        "{out}"
    );
}
