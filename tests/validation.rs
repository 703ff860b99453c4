//! License keys, terminal ids and config are checked wherever they enter,
//! with errors that say what is wrong and what to do.

mod common;

use common::*;
use possync_core::{Config, Publisher};
use possync_sdk::Envelope;

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("possync.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn config_refuses_license_keys_and_terminal_ids_that_would_widen_a_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, value) in [
        ("license_key", "#"),
        ("license_key", "A.B"),
        ("terminal_id", "till*1"),
        ("license_key", ""),
    ] {
        let path = write_config(dir.path(), &format!("[terminal]\n{key} = \"{value}\"\n"));
        let err = Config::load(Some(&path)).expect_err("refused").to_string();
        assert!(err.contains("is not valid"), "{err}");
        assert!(
            err.contains(&format!("terminal.{key}")),
            "names the key: {err}"
        );
        assert!(err.contains("possync.toml"), "names the file: {err}");
    }
}

#[test]
fn unknown_keys_are_errors_that_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "[terminal]\nlicense_kee = \"ABC\"\n");
    let err = Config::load(Some(&path)).expect_err("refused").to_string();
    assert!(err.contains("license_kee"), "{err}");
    assert!(err.contains("possync.toml"), "{err}");
}

#[test]
fn a_missing_config_file_is_an_error_not_an_empty_config() {
    let err =
        Config::load(Some(std::path::Path::new("/nonexistent/possync.toml"))).expect_err("refused");
    assert!(
        err.to_string().contains("/nonexistent/possync.toml"),
        "{err}"
    );
}

#[test]
fn the_environment_overrides_the_file_and_is_checked_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "[terminal]\nlicense_key = \"FROM-FILE\"\nterminal_id = \"t1\"\n",
    );
    let output = possync_command(&["terminal", "--config", path.to_str().expect("utf-8 path")])
        .env("POSSYNC_TERMINAL__LICENSE_KEY", "A.#")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("license key \"A.#\" is not valid"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TERMINAL.LICENSE_KEY") && stderr.contains("`POSSYNC_` environment"),
        "names the variable: {stderr}"
    );
}

#[test]
fn a_terminal_without_a_license_key_says_how_to_set_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "[terminal]\nterminal_id = \"t1\"\n");
    let output = possync(&["terminal", "--config", path.to_str().expect("utf-8 path")]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("terminal.license_key is not set"),
        "{stderr}"
    );
    assert!(stderr.contains("POSSYNC_TERMINAL__LICENSE_KEY"), "{stderr}");
}

#[test]
fn the_cli_refuses_invalid_license_keys_before_publishing() {
    for key in ["#", "A.B", "*", "store 1"] {
        let output = possync(&[
            "publish",
            "product-delete",
            "--license",
            key,
            "--product-id",
            "P1",
        ]);
        assert_eq!(output.status.code(), Some(2), "usage error for {key:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains("is not valid"), "{stderr}");
        assert!(stderr.contains("letters, digits"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_publish_api_refuses_invalid_license_keys() {
    let _broker = broker().await;
    let mut config = Config::default();
    config.broker.urls = vec![amqp_url()];
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    for key in ["#", "license.#", "A.B", ""] {
        let envelope = Envelope::new(
            "price_update",
            key,
            serde_json::json!({"product_id": "P", "new_price": 1}),
        );
        let err = publisher
            .publish_envelope(envelope)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("is not valid"), "{err}");
    }
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_to_a_store_without_terminals_is_an_error_not_a_silent_loss() {
    let _broker = broker().await;
    let store = unique_license("nobody");
    let output = possync(&[
        "publish",
        "product-delete",
        "--license",
        store.as_str(),
        "--product-id",
        "P1",
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("no terminal queue receives"), "{stderr}");
}

#[test]
fn help_lists_every_command() {
    let output = possync(&["--help"]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for command in ["terminal", "publish", "plugins", "demo"] {
        assert!(help.contains(command), "{help}");
    }
    let output = possync(&["publish", "--help"]);
    let help = text(&output.stdout);
    for command in [
        "price-update",
        "product-update",
        "product-delete",
        "category-update",
        "raw",
    ] {
        assert!(help.contains(command), "{help}");
    }
}

#[test]
fn the_example_configs_load() {
    for file in [
        "config/terminal.toml",
        "config/publisher.toml",
        "config/demo.toml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let loaded = Config::load(Some(&path)).unwrap_or_else(|err| panic!("{file}: {err}"));
        assert_eq!(
            loaded.config.broker.exchange, "pos_license_events",
            "{file}"
        );
    }
    let backend = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/backend.toml");
    let service =
        possync_backend::ServiceConfig::load(Some(&backend)).expect("config/backend.toml");
    assert_eq!(service.broker.exchange, "pos_license_events");
}

#[test]
fn broker_urls_and_queue_expiry_are_checked_before_anything_connects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "[broker]\nurl = \"http://localhost\"\n");
    let err = Config::load(Some(&path)).expect_err("refused").to_string();
    assert!(
        err.contains("not a valid AMQP URL") && err.contains("amqp://user:password@host"),
        "{err}"
    );
    let path = write_config(dir.path(), "[broker]\nurl = \"amqp://u:secret@[bad\"\n");
    let err = Config::load(Some(&path)).expect_err("refused").to_string();
    assert!(
        !err.contains("secret"),
        "the password is not printed: {err}"
    );
    let path = write_config(dir.path(), "[terminal]\nqueue_expiry_days = 60\n");
    let err = Config::load(Some(&path)).expect_err("refused").to_string();
    assert!(err.contains("from 1 to 49"), "{err}");
}

#[test]
fn a_secret_of_the_wrong_type_in_a_config_file_is_named_but_never_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    for text in [
        "[admin]\npassword = 98765432109\n",
        "[admin]\npassword = 9876.54321\n",
        "[admin]\npassword = true\n",
        "[broker]\nurl = 98765432109\n",
        "[broker]\nurl = [\"amqp://shop:98765432109@host\", 98765432109]\n",
    ] {
        let path = write_config(dir.path(), text);
        let err = Config::load(Some(&path)).expect_err("refused").to_string();
        for secret in ["98765432109", "9876.54321", "true"] {
            assert!(!err.contains(secret), "{text}: {err}");
        }
        assert!(err.contains("possync.toml"), "names the file: {err}");
    }
}

#[test]
fn a_broker_url_that_cannot_be_read_is_refused_without_its_password_in_any_spelling() {
    let dir = tempfile::tempdir().expect("tempdir");
    for url in [
        "amqp://shop:pa/ss-W0rd@127.0.0.1:5672/%2f",
        "amqp://shop:p#ss?W0rd@127.0.0.1:5672/%2f",
        "amqp://shop:p@ss:W0rd@127.0.0.1:99999/%2f",
        "amqp:shop:pa55-W0rd@127.0.0.1",
        "amqp://shop:pa%2Fss-W0rd@[bad",
    ] {
        let path = write_config(dir.path(), &format!("[broker]\nurl = {url:?}\n"));
        let err = Config::load(Some(&path)).expect_err("refused").to_string();
        assert!(err.contains("not a valid AMQP URL"), "{url}: {err}");
        assert!(!err.contains("W0rd"), "{url}: {err}");
    }
}

#[test]
fn a_tls_setting_with_an_amqp_url_is_an_error_that_names_both_not_clear_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    for key in ["tls_ca_file", "tls_client_cert_file", "tls_client_key_file"] {
        let path = write_config(
            dir.path(),
            &format!(
                "[broker]\nurl = [\"amqps://shop:s3cret-W0rd@node-1:5671/%2f\", \"amqp://shop:s3cret-W0rd@node-2:5672/%2f\"]\n{key} = \"/etc/possync/x.pem\"\n"
            ),
        );
        let err = Config::load(Some(&path)).expect_err("refused").to_string();
        assert!(err.contains(&format!("broker.{key}")), "{err}");
        assert!(err.contains("amqp://shop:***@node-2"), "{err}");
        assert!(err.contains("amqps://"), "says what to use: {err}");
        assert!(!err.contains("W0rd"), "{err}");
    }
    let path = write_config(
        dir.path(),
        "[broker]\nurl = \"AMQPS://shop:pw@node-1:5671/%2f\"\ntls_ca_file = \"/etc/possync/ca.pem\"\n",
    );
    Config::load(Some(&path)).expect("amqps:// with a CA is what TLS looks like");
}

#[test]
fn the_cli_refuses_a_price_that_is_not_a_finite_amount_of_zero_or_more() {
    for price in [
        "NaN", "nan", "inf", "-inf", "infinity", "1e999", "-1", "-0.01",
    ] {
        for command in [
            // `--price` is the name price-update's option had before its
            // options came from the plugin's schema; it still works.
            &["price-update", "--product-id", "P1", "--price", price][..],
            &["price-update", "--product-id", "P1", "--new-price", price],
            &[
                "product-update",
                "--product-id",
                "P1",
                "--name",
                "Tea",
                "--category-id",
                "C1",
                "--price",
                price,
            ],
        ] {
            let mut args = vec!["publish"];
            args.extend_from_slice(command);
            args.extend_from_slice(&["--license", "STORE-1"]);
            let output = possync(&args);
            let stderr = text(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains("must be a finite number of 0 or more"),
                "{args:?}: {stderr}"
            );
        }
    }
}

#[test]
fn a_bulk_file_with_prices_that_are_not_finite_amounts_of_zero_or_more_names_each_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("catalog.csv");
    std::fs::write(
        &csv,
        "type,product_id,new_price,price\nprice_update,P1,NaN,\nprice_update,P2,-1,\nproduct_update,P3,,inf\nprice_update,P4,2.5,\n",
    )
    .expect("write");
    let jsonl = dir.path().join("catalog.jsonl");
    std::fs::write(
        &jsonl,
        "{\"type\":\"price_update\",\"payload\":{\"product_id\":\"P1\",\"new_price\":-0.5}}\n{\"type\":\"product_update\",\"payload\":{\"product_id\":\"P2\",\"price\":-3}}\n{\"type\":\"price_update\",\"payload\":{\"product_id\":\"P3\",\"new_price\":1}}\n",
    )
    .expect("write");
    for (file, bad) in [(&csv, &[2, 3, 4][..]), (&jsonl, &[1, 2])] {
        let path = file.to_str().expect("utf-8");
        let output = possync(&[
            "publish",
            "bulk",
            "--stop-on-error",
            "--file",
            path,
            "--license",
            "STORE-1",
        ]);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        for line in bad {
            assert!(
                stderr.contains(&format!("{path}:{line}: ")),
                "line {line}: {stderr}"
            );
        }
        assert_eq!(
            stderr
                .matches("must be a finite number of 0 or more")
                .count(),
            bad.len(),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("{} bad line(s)", bad.len())),
            "{stderr}"
        );
    }
}

#[test]
fn a_typed_publish_command_shows_the_fields_its_plugin_describes() {
    let output = possync(&["publish", "price-update", "--help"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let help = text(&output.stdout);
    for option in [
        "--license <KEY>",
        "--product-id <TEXT>",
        "--new-price <NUMBER>",
        "--product-name <TEXT>",
    ] {
        assert!(help.contains(option), "{option} in:\n{help}");
    }
    assert!(
        help.contains("The new price."),
        "field docs are the help:\n{help}"
    );
    let output = possync(&["publish", "types"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("product-delete --product-id TEXT"));
}

#[test]
fn a_payload_its_plugin_refuses_is_not_sent_and_says_why() {
    for (args, reason) in [
        (
            &["price-update", "--product-id", " ", "--new-price", "1"][..],
            "invalid price_update payload: product_id must not be empty",
        ),
        (
            &["product-update", "--product-id", "P1", "--price", "1"],
            "--product-name <TEXT>",
        ),
        (
            &[
                "price-update",
                "--payload",
                r#"{"product_id":"P1","new_price":-2}"#,
            ],
            "new_price -2: must be a finite number of 0 or more",
        ),
        (
            &["no-such-type", "--product-id", "P1"],
            "no plugin here handles message type \"no-such-type\"",
        ),
    ] {
        let mut command = vec!["publish"];
        command.extend_from_slice(args);
        command.extend_from_slice(&["--license", "STORE-1"]);
        // No broker is named: a refused payload never gets as far as connecting.
        let output = possync_command(&command)
            .env("POSSYNC_BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .output()
            .expect("run possync");
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains(reason), "{command:?}: {stderr}");
    }
}

#[test]
fn a_bulk_line_of_a_type_no_plugin_knows_or_that_its_plugin_refuses_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("catalog.jsonl");
    std::fs::write(
        &file,
        "{\"type\":\"table_update\",\"payload\":{\"table_id\":\"T1\"}}\n{\"type\":\"price_update\",\"payload\":{\"product_id\":\"\",\"new_price\":1}}\n{\"type\":\"category_update\",\"payload\":{\"category_id\":\"C1\"}}\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf-8");
    let output = possync(&[
        "publish",
        "bulk",
        "--stop-on-error",
        "--file",
        path,
        "--license",
        "STORE-1",
    ]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for (line, reason) in [
        (1, "no plugin here handles message type \"table_update\""),
        (2, "product_id must not be empty"),
        (3, "missing field `category_name`"),
    ] {
        assert!(
            stderr.contains(&format!("{path}:{line}: ")) && stderr.contains(reason),
            "line {line}: {stderr}"
        );
    }
}

#[test]
fn a_config_named_after_the_message_type_is_the_one_used() {
    let output = possync(&[
        "publish",
        "price-update",
        "--license",
        "STORE-1",
        "--config",
        "/no/such/publisher.toml",
        "--product-id",
        "P1",
        "--price",
        "1",
    ]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("/no/such/publisher.toml"), "{stderr}");
}

#[test]
fn a_back_office_shell_may_set_the_backend_s_and_the_publisher_s_variables_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = dir.path().join("catalog.db");
    let both = |command: &mut std::process::Command| {
        command
            .env("POSSYNC_SERVICE__DATABASE", &database)
            .env("POSSYNC_BACKEND__URL", "http://127.0.0.1:8480")
            .env("POSSYNC_BACKEND__TOKEN", "possync_not-a-real-token")
            .env("POSSYNC_TERMINAL__LICENSE_KEY", "STORE-1")
            .output()
            .expect("run")
    };
    let publisher = both(&mut possync_command(&["config", "show"]));
    assert!(publisher.status.success(), "{}", text(&publisher.stderr));
    assert!(text(&publisher.stdout).contains("http://127.0.0.1:8480"));
    let backend = both(&mut possync_command(&["backend", "token", "list"]));
    assert!(backend.status.success(), "{}", text(&backend.stderr));
    assert!(
        database.exists(),
        "the backend used POSSYNC_SERVICE__DATABASE"
    );
    // A misspelt section is still an error on either side.
    let typo = possync_command(&["config", "show"])
        .env("POSSYNC_TERMNAL__LICENSE_KEY", "STORE-1")
        .output()
        .expect("run");
    assert!(!typo.status.success());
    assert!(
        text(&typo.stderr).contains("TERMNAL"),
        "{}",
        text(&typo.stderr)
    );
}

#[test]
fn token_commands_say_which_database_holds_the_tokens_and_when_they_made_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = || {
        possync_command(&["backend", "token", "list"])
            .current_dir(dir.path())
            .env_remove("POSSYNC_SERVICE__DATABASE")
            .output()
            .expect("run")
    };
    let database = std::fs::canonicalize(dir.path())
        .expect("the folder")
        .join("possync-backend.db");
    let first = run();
    assert!(first.status.success(), "{}", text(&first.stderr));
    let stderr = text(&first.stderr);
    assert!(
        stderr.contains(&format!(
            "created a new catalog database at {}",
            database.display()
        )) || stderr.contains(&format!(
            "created a new catalog database at {}",
            dir.path().join("possync-backend.db").display()
        )),
        "{stderr}"
    );
    let again = run();
    let stderr = text(&again.stderr);
    assert!(
        stderr.contains("tokens in the catalog database") && stderr.contains("possync-backend.db"),
        "{stderr}"
    );
    assert!(!stderr.contains("created"), "{stderr}");
}

#[test]
fn a_config_for_the_other_command_is_refused_with_a_hint_naming_the_right_one() {
    let config = |name: &str| format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"));
    let backend = possync_command(&["backend", "--config", &config("terminal.toml")])
        .output()
        .expect("run");
    assert!(!backend.status.success());
    let stderr = text(&backend.stderr);
    assert!(
        stderr.contains("`terminal`")
            && stderr.contains("hint")
            && stderr.contains("config/backend.toml"),
        "{stderr}"
    );
    let show = possync_command(&["config", "show", "--config", &config("backend.toml")])
        .output()
        .expect("run");
    assert!(!show.status.success());
    let stderr = text(&show.stderr);
    assert!(
        stderr.contains("hint") && stderr.contains("possync backend --config"),
        "{stderr}"
    );
}
