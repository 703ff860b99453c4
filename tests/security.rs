//! Tenant isolation enforced by the broker: provisioned users, topic
//! permissions, revocation, TLS, and secrets kept out of every output.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use possync_core::{Config, LicenseKey, Publisher, State};

/// Runs `possync admin provision-terminal` and returns its config file.
fn provision_terminal(dir: &Path, store: &LicenseKey, terminal: &str) -> PathBuf {
    let output_file = dir.join(format!("{store}-{terminal}.toml"));
    let database = dir.join(format!("{store}-{terminal}.db"));
    let output = possync(&[
        "admin",
        "provision-terminal",
        "--license",
        store.as_str(),
        "--terminal-id",
        terminal,
        "--output",
        output_file.to_str().expect("utf-8"),
        "--database",
        database.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let password = password_in(&output_file);
    assert!(
        !text(&output.stdout).contains(&password) && !text(&output.stderr).contains(&password),
        "the password is never printed"
    );
    output_file
}

/// The password in a provisioned config file.
fn password_in(file: &Path) -> String {
    let config = Config::load(Some(file))
        .expect("provisioned config loads")
        .config;
    let url = config.broker.url().to_owned();
    let userinfo = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .expect("userinfo");
    userinfo.split(':').nth(1).expect("password").to_owned()
}

fn url_in(file: &Path) -> String {
    Config::load(Some(file))
        .expect("config")
        .config
        .broker
        .url()
        .to_owned()
}

fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, lapin::Error>) {
    let err = result.expect_err(what).to_string();
    assert!(
        err.contains("ACCESS_REFUSED") || err.contains("ACCESS-REFUSED"),
        "{what}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioned_terminal_reads_its_own_store_and_the_broker_refuses_it_everything_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mine, other) = (unique_license("mine"), unique_license("other"));
    let my_file = provision_terminal(dir.path(), &mine, "till-1");
    provision_terminal(dir.path(), &other, "till-1");
    let my_queue = format!("possync.{mine}.till-1");
    let other_queue = format!("possync.{other}.till-1");

    let connection = Connection::connect(&url_in(&my_file), ConnectionProperties::default())
        .await
        .expect("the terminal's user may connect");
    for binding in [
        "license.#".to_owned(),
        "license.*.#".to_owned(),
        format!("license.{other}.#"),
    ] {
        let channel = connection.create_channel().await.expect("channel");
        let bound = channel
            .queue_bind(
                my_queue.as_str().into(),
                "pos_license_events".into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_refused(&format!("binding {binding}"), bound);
    }
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            "sneaky".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_refused("declaring a queue of its own", declared);
    let channel = connection.create_channel().await.expect("channel");
    let consumed = channel
        .basic_consume(
            other_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_refused("consuming another terminal's queue", consumed);
    let channel = connection.create_channel().await.expect("channel");
    let purged = channel
        .queue_purge(other_queue.as_str().into(), QueuePurgeOptions::default())
        .await;
    assert_refused("purging another terminal's queue", purged);
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let published = async {
        channel
            .basic_publish(
                "pos_license_events".into(),
                format!("license.{other}.price_update").as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await?
            .await
    }
    .await;
    assert_refused("publishing", published);
    let _ = connection.close(200, "bye".into()).await;

    // With the same credentials, possync works and receives its own store.
    let mut config = Config::load(Some(&my_file)).expect("config").config;
    config.terminal.database = dir.path().join("mine.db");
    let mut terminal = RunningTerminal::start(config).await;
    let publisher = Publisher::connect(&terminal_config(dir.path(), &mine, "x").broker)
        .await
        .expect("publisher");
    let (changes, model) = catalog_changes(&mine, 30, 4);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(30).await;
    assert_matches_model(&terminal.db(), &model);

    // A message it can never apply still dead-letters without write rights.
    publish_raw(
        &format!("license.{mine}.teleport"),
        format!(r#"{{"type":"teleport","license_key":"{mine}","payload":{{}}}}"#).as_bytes(),
    )
    .await;
    terminal.wait_settled(30, 1).await;
    eventually_async_depth(&terminal.topology.dead_letter_queue, 1).await;
    publisher.close().await;
    terminal.stop().await;
}

async fn eventually_async_depth(queue: &str, depth: u32) {
    let deadline = std::time::Instant::now() + WAIT;
    while queue_depth(queue).await != depth {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} never held {depth} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `possync admin provision-terminal` for `store`'s till-1, writing `output`.
fn provision_to(store: &LicenseKey, output: &Path) -> std::process::Output {
    possync(&[
        "admin",
        "provision-terminal",
        "--license",
        store.as_str(),
        "--terminal-id",
        "till-1",
        "--output",
        output.to_str().expect("utf-8"),
    ])
}

/// Deletes the broker user of `store`'s till-1, and its queues with `delete_queue`.
fn revoke_till_1(store: &LicenseKey, delete_queue: bool) -> std::process::Output {
    let mut args = vec![
        "admin",
        "revoke-terminal",
        "--license",
        store.as_str(),
        "--terminal-id",
        "till-1",
    ];
    if delete_queue {
        args.push("--delete-queue");
    }
    possync(&args)
}

async fn assert_can_connect(what: &str, url: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|err| panic!("{what}: the terminal's password still works: {err}"));
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_again_refuses_an_unusable_output_before_it_changes_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("again");
    let file = provision_terminal(dir.path(), &store, "till-1");
    let url = url_in(&file);
    let written = std::fs::read_to_string(&file).expect("config");

    let output = provision_to(&store, &file);
    assert!(!output.status.success(), "an existing file is not replaced");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("it exists"), "{stderr}");
    assert_can_connect("after a re-run onto the same file", &url).await;
    assert_eq!(std::fs::read_to_string(&file).expect("config"), written);

    let missing = dir.path().join("no-such-folder").join("till-1.toml");
    let output = provision_to(&store, &missing);
    assert!(!output.status.success(), "a missing folder is refused");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("no-such-folder"), "{stderr}");
    assert_can_connect("after a re-run into a missing folder", &url).await;

    let fresh = dir.path().join("fresh.toml");
    let output = provision_to(&store, &fresh);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_ne!(url_in(&fresh), url, "a new file gets a new password");
    revoke_till_1(&store, true);
}

#[test]
fn a_provisioned_config_holds_every_broker_url_and_the_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("cluster");
    let admin_config = dir.path().join("admin.toml");
    std::fs::write(
        &admin_config,
        "[broker]\n\
         url = [\"amqps://guest:guest@node-1.example:5671/%2f\", \"amqps://guest:guest@node-2.example:5671/%2f\"]\n\
         tls_ca_file = \"/etc/possync/ca.pem\"\n\
         tls_client_cert_file = \"/etc/possync/till \u{e9}.pem\"\n\
         tls_client_key_file = \"/etc/possync/till.key\"\n",
    )
    .expect("write");
    let output_file = dir.path().join("till-1.toml");
    let output = possync_command(&[
        "admin",
        "provision-terminal",
        "--config",
        admin_config.to_str().expect("utf-8"),
        "--license",
        store.as_str(),
        "--terminal-id",
        "till-1",
        "--output",
        output_file.to_str().expect("utf-8"),
    ])
    .env_remove("POSSYNC_BROKER__URL")
    .output()
    .expect("run");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let broker = Config::load(Some(&output_file))
        .expect("the provisioned config loads")
        .config
        .broker;
    let user = format!("possync.terminal.{store}.till-1");
    assert_eq!(broker.urls.len(), 2, "{:?}", broker.urls);
    for (url, host) in broker.urls.iter().zip(["node-1.example", "node-2.example"]) {
        assert!(url.starts_with(&format!("amqps://{user}:")), "{url}");
        assert!(url.ends_with(&format!("@{host}:5671/%2f")), "{url}");
    }
    assert_eq!(broker.urls[0], broker.urls[1].replace("node-2", "node-1"));
    assert_eq!(broker.tls_ca_file, Some("/etc/possync/ca.pem".into()));
    assert_eq!(
        broker.tls_client_cert_file,
        Some("/etc/possync/till \u{e9}.pem".into())
    );
    assert_eq!(
        broker.tls_client_key_file,
        Some("/etc/possync/till.key".into())
    );
    revoke_till_1(&store, true);
}

/// The arguments RabbitMQ holds for `queue`, as `rabbitmqctl` lists them.
fn queue_arguments(queue: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ])
        .output()
        .expect("run rabbitmqctl");
    text(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{queue}\t")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no queue {queue}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioned_dead_letter_queue_expires_like_its_queue_and_an_old_one_without_stops_nothing()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let fresh = unique_license("dlq-new");
    provision_terminal(dir.path(), &fresh, "till-1");
    let thirty_days = "2592000000";
    let arguments = queue_arguments(&format!("possync.{fresh}.till-1.dead_letter"));
    assert!(
        arguments.contains(&format!("{{\"x-expires\",{thirty_days}}}")),
        "{arguments}"
    );
    assert!(
        queue_arguments(&format!("possync.{fresh}.till-1"))
            .contains(&format!("{{\"x-expires\",{thirty_days}}}")),
        "the same expiry as its terminal queue"
    );

    // A dead-letter queue as possync declared it before it had an expiry.
    let old = unique_license("dlq-old");
    let dead_letters = format!("possync.{old}.till-1.dead_letter");
    let connection = broker().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut limits = FieldTable::default();
    limits.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(2_592_000_000),
    );
    limits.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(100_000),
    );
    channel
        .queue_declare(
            dead_letters.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            limits,
        )
        .await
        .expect("an old-style dead-letter queue");
    let _ = connection.close(200, "bye".into()).await;
    let output_file = dir.path().join("old.toml");
    let output = provision_to(&old, &output_file);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "rabbitmqctl delete_queue {dead_letters} --if-empty"
        )),
        "says how to give it an expiry: {stderr}"
    );
    assert!(!queue_arguments(&dead_letters).contains("x-expires"));

    let mut config = Config::load(Some(&output_file)).expect("config").config;
    config.terminal.database = dir.path().join("old.db");
    let mut terminal = RunningTerminal::start(config).await;
    publish_raw(
        &format!("license.{old}.teleport"),
        format!(r#"{{"type":"teleport","license_key":"{old}","payload":{{}}}}"#).as_bytes(),
    )
    .await;
    terminal.wait_settled(0, 1).await;
    eventually_async_depth(&dead_letters, 1).await;
    terminal.stop().await;
    revoke_till_1(&fresh, true);
    revoke_till_1(&old, true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioned_publisher_may_only_publish_well_formed_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("pub");
    let terminal_file = provision_terminal(dir.path(), &store, "till-1");
    let publisher_file = dir.path().join("publisher.toml");
    let name = format!("bo-{}", &store.as_str()[store.as_str().len() - 8..]);
    let output = possync(&[
        "admin",
        "provision-publisher",
        "--name",
        &name,
        "--output",
        publisher_file.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    let mut config = Config::load(Some(&terminal_file)).expect("config").config;
    config.terminal.database = dir.path().join("t.db");
    let mut terminal = RunningTerminal::start(config).await;
    let output = possync(&[
        "publish",
        "--config",
        publisher_file.to_str().expect("utf-8"),
        "price-update",
        "--license",
        store.as_str(),
        "--product-id",
        "P1",
        "--price",
        "2.5",
    ]);
    assert!(
        output.status.success(),
        "a well-formed key is accepted: {}",
        text(&output.stderr)
    );
    terminal.wait_applied(1).await;

    let connection = Connection::connect(&url_in(&publisher_file), ConnectionProperties::default())
        .await
        .expect("connect");
    for key in [
        "license.#",
        &format!("license.{store}"),
        &format!("license.{store}.price_update.extra"),
        "license.*.price_update",
        "other.key",
    ] {
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let published = async {
            channel
                .basic_publish(
                    "pos_license_events".into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await?
                .await
        }
        .await;
        assert_refused(&format!("publishing with key {key}"), published);
    }
    let channel = connection.create_channel().await.expect("channel");
    let consumed = channel
        .basic_consume(
            format!("possync.{store}.till-1").as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_refused("a publisher reading a terminal's queue", consumed);
    let _ = connection.close(200, "bye".into()).await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_terminal_is_disconnected_and_cannot_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("revoked");
    let file = provision_terminal(dir.path(), &store, "till-1");
    let mut config = Config::load(Some(&file)).expect("config").config;
    config.terminal.database = dir.path().join("t.db");
    let mut terminal = RunningTerminal::start(config).await;

    let output = revoke_till_1(&store, false);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("deleted broker user"),
        "{}",
        text(&output.stdout)
    );
    let offline = terminal
        .wait_for(|s| matches!(s.state, State::Offline { .. }))
        .await;
    assert!(offline, "the terminal is cut off");
    // The attempt after the cut: it tries again, and is refused.
    match terminal.next_report().await {
        State::Offline { reason, .. } => assert!(
            reason.contains("refused access"),
            "the reconnects are refused: {reason}"
        ),
        other => panic!("a revoked terminal came back: {other:?}"),
    }
    terminal.stop().await;
}

/// A TLS terminator in front of the broker, with a certificate made here.
struct TlsFront {
    port: u16,
    ca_pem: PathBuf,
}

fn make_ca(dir: &Path, name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("possync test CA {name}"));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("CA");
    let path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&path, cert.pem()).expect("write CA");
    (rcgen::Issuer::new(params, key), path)
}

async fn tls_front(dir: &Path) -> TlsFront {
    use tokio_rustls::rustls;
    let (issuer, ca_pem) = make_ca(dir, "good");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .extended_key_usages
        .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    TlsFront { port, ca_pem }
}

#[tokio::test(flavor = "multi_thread")]
async fn terminals_connect_over_tls_and_refuse_a_certificate_their_ca_did_not_sign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let front = tls_front(dir.path()).await;
    let store = unique_license("tls");
    let tls_url = format!("amqps://guest:guest@localhost:{}/%2f", front.port);

    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.broker.urls = vec![tls_url.clone()];
    config.broker.tls_ca_file = Some(front.ca_pem.clone());
    let mut terminal = RunningTerminal::start(config).await;
    let publisher = Publisher::connect(&terminal_config(dir.path(), &store, "x").broker)
        .await
        .expect("publisher");
    let (changes, model) = catalog_changes(&store, 20, 8);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(20).await;
    assert_matches_model(&terminal.db(), &model);
    publisher.close().await;
    terminal.stop().await;

    let (_, wrong_ca) = make_ca(dir.path(), "wrong");
    let output = possync_command(&["terminal"])
        .env("POSSYNC_BROKER__URL", &tls_url)
        .env("POSSYNC_BROKER__TLS_CA_FILE", &wrong_ca)
        .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
        .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-2")
        .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("wrong.db"))
        .output()
        .expect("run");
    assert!(
        !output.status.success(),
        "a certificate the CA did not sign is refused"
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("TLS with amqps://guest:***@localhost"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest:guest"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_setting_with_an_amqp_url_never_connects_in_clear_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, ca) = make_ca(dir.path(), "clear");
    let store = unique_license("clear");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.broker.tls_ca_file = Some(ca);
    // Built in code, this config never went through `Config::load`'s checks.
    let err = Publisher::connect(&config.broker)
        .await
        .expect_err("no clear-text connection")
        .to_string();
    assert!(
        err.contains("broker.tls_ca_file") && err.contains("amqps://"),
        "{err}"
    );
    assert!(!err.contains("guest:guest"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_shown_for_debugging_hides_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = terminal_config(dir.path(), &unique_license("debug"), "x");
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let shown = format!("{publisher:?}");
    assert!(shown.contains("guest:***@"), "{shown}");
    assert!(!shown.contains("guest:guest"), "{shown}");
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_appear_in_no_log_line_or_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("secret");
    let file = provision_terminal(dir.path(), &store, "till-1");
    let password = password_in(&file);
    let path = file.to_str().expect("utf-8");

    let mut outputs = Vec::new();
    for args in [
        vec!["config", "show", "--config", path],
        vec!["plugins", "list", "--config", path],
        vec!["--help"],
    ] {
        let output = possync(&args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        outputs.push((args.join(" "), text(&output.stdout) + &text(&output.stderr)));
    }
    assert!(
        outputs[0].1.contains(":***@"),
        "config show redacts: {}",
        outputs[0].1
    );

    // A terminal's own log, at debug level, while it connects and stops.
    let mut child = ChildLog::spawn(
        possync_command(&["terminal", "--config", path])
            .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
            .env("POSSYNC_LOG", "debug"),
    );
    child.wait_for_line("Live").await;
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let (exit, log) = child.exit().await;
    assert!(exit.success(), "{log}");
    outputs.push(("terminal".into(), log));

    // Revoked, the next start is refused: the error must not show it either.
    revoke_till_1(&store, true);
    let output = possync_command(&["terminal", "--config", path])
        .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
        .output()
        .expect("run");
    assert!(!output.status.success());
    outputs.push(("refused terminal".into(), text(&output.stderr)));

    for (what, shown) in outputs {
        assert!(
            !shown.contains(&password),
            "{what} shows the password:\n{shown}"
        );
    }
}

#[test]
fn a_config_file_with_a_password_that_others_can_read_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("open.toml");
    std::fs::write(
        &file,
        "[broker]\nurl = \"amqp://shop:hunter2@127.0.0.1:5672/%2f\"\n",
    )
    .expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = possync(&["plugins", "list", "--config", file.to_str().expect("utf-8")]);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("others can read it: chmod 600"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let output = possync(&["plugins", "list", "--config", file.to_str().expect("utf-8")]);
    assert!(!text(&output.stderr).contains("chmod 600"));
}

/// Passwords that a URL parser or figment's environment syntax would read as
/// something other than a password.
const AWKWARD_PASSWORDS: &[&str] = &[
    "98765432109",
    "true",
    "-42.5",
    "pa/ss-W0rd",
    "p@ss:W0rd",
    "pa%2Fss-W0rd",
    "p#ss?W0rd",
    "pässwörd€-W0rd",
    "[W0rd]",
];

/// `text` with every byte but letters and digits percent-encoded.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Asserts that `shown` holds `password` in none of the ways it could be spelled.
fn assert_hidden(what: &str, password: &str, shown: &str) {
    if password == "true" {
        // Printed config holds `true` anyway: this one is checked for loading only.
        return;
    }
    let decoded = password.replace("%2F", "/");
    for spelling in [password, &percent_encoded(password), &decoded] {
        assert!(
            !shown.contains(spelling),
            "{what} shows the password {password:?}:\n{shown}"
        );
    }
}

#[test]
fn awkward_passwords_in_the_environment_appear_in_no_error_or_printed_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("awkward");
    let run = |args: &[&str], variable: &str, value: &str| {
        let output = possync_command(args)
            .env(variable, value)
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__DATABASE", dir.path().join("t.db"))
            .output()
            .expect("run possync");
        let shown = text(&output.stdout) + &text(&output.stderr);
        (output.status.success(), shown)
    };
    for &password in AWKWARD_PASSWORDS {
        let (ok, shown) = run(&["config", "show"], "POSSYNC_ADMIN__PASSWORD", password);
        assert!(ok, "{password:?} is a password like any other:\n{shown}");
        assert!(shown.contains("password = \"***\""), "{shown}");
        assert_hidden("config show", password, &shown);
        let (_, shown) = run(&["doctor"], "POSSYNC_ADMIN__PASSWORD", password);
        assert_hidden("doctor", password, &shown);

        // As typed into the URL, and percent-encoded as it should be; the
        // broker has no such user, so the connection is refused.
        for url in [
            format!("amqp://possync-nobody:{password}@127.0.0.1:5672/%2f"),
            format!(
                "amqp://possync-nobody:{}@127.0.0.1:5672/%2f",
                percent_encoded(password)
            ),
        ] {
            for args in [&["config", "show"][..], &["doctor"], &["terminal"]] {
                let (_, shown) = run(args, "POSSYNC_BROKER__URL", &url);
                assert_hidden(&format!("{args:?} with {url}"), password, &shown);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_with_an_awkward_password_shows_it_in_no_log_status_or_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("awkward-live");
    let user = format!("possync-test-{store}");
    let password = "p@ss:w/rd%2F€-98765";
    rabbitmqctl(&["add_user", &user, password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let url = format!(
        "amqp://{user}:{}@127.0.0.1:5672/%2f",
        percent_encoded(password)
    );
    let (port, database) = (free_port(), dir.path().join("t.db"));
    let configure = |args: &[&str]| {
        let mut command = possync_command(args);
        command
            .env("POSSYNC_BROKER__URL", &url)
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__DATABASE", &database)
            .env("POSSYNC_TERMINAL__QUEUE_EXPIRY_DAYS", "1")
            .env("POSSYNC_STATUS__ENABLED", "true")
            .env("POSSYNC_STATUS__PORT", port.to_string());
        command
    };

    let mut terminal = configure(&["terminal"]);
    terminal.env("POSSYNC_LOG", "trace");
    let mut terminal = ChildLog::spawn(&mut terminal);
    terminal.wait_for_line("Live").await;
    let mut shown = Vec::new();
    for path in ["/", "/status", "/metrics"] {
        shown.push((format!("status page {path}"), http_get(port, path).await.1));
    }
    for args in [&["status"][..], &["doctor"], &["config", "show"]] {
        let output = configure(args).output().expect("run possync");
        // Whether doctor passes is not this test's business; what it prints is.
        assert!(
            output.status.success() || args == ["doctor"],
            "{args:?}: {}",
            text(&output.stdout)
        );
        shown.push((
            format!("{args:?}"),
            text(&output.stdout) + &text(&output.stderr),
        ));
    }
    terminal.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, log) = terminal.exit().await;
    shown.push(("terminal log".into(), log));
    rabbitmqctl(&["delete_user", &user]);
    for (what, shown) in shown {
        assert_hidden(&what, password, &shown);
    }
}

/// Publishes `body` on `routing_key` as the user of `url`, with `user_id`
/// set when given, and waits for the broker's confirm.
async fn publish_upstream_as(
    url: &str,
    routing_key: &str,
    user_id: Option<&str>,
    body: &[u8],
) -> Result<lapin::Confirmation, lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(user) = user_id {
        properties = properties.with_user_id(user.into());
    }
    let confirmed = async {
        channel
            .basic_publish(
                "pos_license_events".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    confirmed
}

/// An upstream body as a terminal sends it.
fn order_body(store: &LicenseKey, terminal: &str, message_id: &str, order_id: &str) -> Vec<u8> {
    serde_json::json!({
        "type": "order",
        "license_key": store.as_str(),
        "terminal_id": terminal,
        "message_id": message_id,
        "created_at": "2026-12-02T10:00:00Z",
        "payload": {
            "order_id": order_id,
            "lines": [{"product_id": "P1", "quantity": 1, "unit_price": 2.5}],
            "total": 2.5
        }
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_speaks_upstream_only_as_itself_and_the_backend_refuses_a_forged_sender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, other) = (unique_license("up"), unique_license("upother"));
    let file = provision_terminal(dir.path(), &store, "till-1");
    provision_terminal(dir.path(), &store, "till-2");
    let url = url_in(&file);
    let user = possync_core::expected_user(store.as_str(), "till-1");

    // The broker refuses every key but the terminal's own upstream keys.
    for key in [
        format!("up.{store}.till-2.order"),
        format!("up.{other}.till-1.order"),
        format!("license.{store}.price_update"),
        format!("up.{store}.till-1.order.extra"),
        "up.#".to_owned(),
    ] {
        let body = order_body(&store, "till-1", "m-refused", "O-refused");
        let published = publish_upstream_as(&url, &key, Some(&user), &body).await;
        assert_refused(&format!("publishing on {key}"), published);
    }
    // RabbitMQ checks user_id against the connection's user.
    let forged = publish_upstream_as(
        &url,
        &format!("up.{store}.till-1.order"),
        Some(&possync_core::expected_user(store.as_str(), "till-2")),
        &order_body(&store, "till-1", "m-forged", "O-forged"),
    )
    .await;
    let err = forged.expect_err("a user_id of another user").to_string();
    assert!(
        err.contains("PRECONDITION_FAILED") || err.contains("user_id"),
        "{err}"
    );

    // A backend that verifies senders records the terminal's own order
    // and refuses, counts and dead-letters one sent under the shared user.
    let mut backend = common::backend::Backend::verifying_upstream_for("verify", &[&store]);
    backend.start_upstream().await;
    let mine = publish_upstream_as(
        &url,
        &format!("up.{store}.till-1.order"),
        Some(&user),
        &order_body(&store, "till-1", "m-mine", "O-mine"),
    )
    .await
    .expect("the terminal's own key, as itself");
    assert!(mine.is_ack());
    let shared = publish_upstream_as(
        &amqp_url(),
        &format!("up.{store}.till-1.order"),
        Some("guest"),
        &order_body(&store, "till-1", "m-shared", "O-shared"),
    )
    .await
    .expect("the shared user may publish anywhere");
    assert!(shared.is_ack());

    let path = format!("/v1/stores/{store}/upstream?type=order");
    let deadline = std::time::Instant::now() + WAIT;
    let recorded = loop {
        let (status, body) = backend.api.call("GET", &path, None).await;
        assert_eq!(status, 200, "{body}");
        let recorded = body["messages"].as_array().cloned().unwrap_or_default();
        if !recorded.is_empty() || std::time::Instant::now() > deadline {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["message_id"], "m-mine");
    let dead = drain(&format!("{}.dead_letter", backend.upstream_queue), 1).await;
    assert_eq!(dead.len(), 1, "the forged one is dead-lettered");
    let reason = dead[0]
        .properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("x-possync-reason") {
            Some(lapin::types::AMQPValue::LongString(reason)) => Some(reason.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    assert!(
        reason.contains("\"guest\"") && reason.contains(&user),
        "the reason names who sent it and who may: {reason}"
    );
    assert!(
        reason.contains("upstream.verify_user"),
        "a terminal on the backend's own credentials is told what to do: {reason}"
    );
    let (_, metrics) = backend.api.call("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("possync_backend_upstream_refused_total{reason=\"identity\"} 1"),
        "{metrics}"
    );
    backend.stop().await;
}

/// The backend's answer to a snapshot request sent by `url`'s user as
/// till-1 of `store`, if one comes within 3 s.
async fn ask_snapshot_as(url: &str, store: &LicenseKey, user_id: &str) -> Option<Vec<u8>> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("direct reply-to");
    let body = serde_json::json!({
        "type": "snapshot", "license_key": store.as_str(), "terminal_id": "till-1",
        "message_id": "forged-1", "created_at": "2026-12-02T10:00:00Z",
        "payload": {"seq": null, "after": null, "limit": 100},
    });
    channel
        .basic_publish(
            "pos_license_events".into(),
            format!("up.{store}.till-1.snapshot").as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_user_id(user_id.into())
                .with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .expect("published");
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        futures_util::StreamExt::next(&mut replies),
    )
    .await
    .ok()
    .flatten()
    .and_then(Result::ok)
    .map(|delivery| delivery.data);
    let _ = connection.close(200, "bye".into()).await;
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioned_terminal_takes_its_own_snapshot_and_a_forged_request_gets_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-prov");
    let mut backend = common::backend::Backend::verifying_upstream_for("snap-prov", &[&store]);
    common::catalog::start_answering(&mut backend).await;
    let products: Vec<serde_json::Value> = (0..200)
        .map(|i| {
            serde_json::json!({"store": store.as_str(), "type": "product_update", "payload":
                {"product_id": format!("P{i}"), "product_name": format!("Product {i}"), "price": 1.5}})
        })
        .collect();
    backend.api.submit_until_answered(products, "history").await;
    backend.wait_published(&store, 200).await;

    // Provisioned after the history: its queue never held it.
    let file = provision_terminal(dir.path(), &store, "till-1");
    let config = Config::load(Some(&file)).expect("config").config;
    let mut till = RunningTerminal::start(config).await;
    assert!(
        till.wait_for(|s| s.sync.synced_up_to == 200).await,
        "the snapshot came to the provisioned terminal, verified as itself"
    );
    assert_eq!(count(&till.db(), "SELECT count(*) FROM products"), 200);
    till.stop().await;

    // The shared user speaking for till-1 gets nothing, and the request
    // is not kept where refused orders wait.
    assert_eq!(ask_snapshot_as(&amqp_url(), &store, "guest").await, None);
    let refused_orders = queue_counts(&format!("{}.dead_letter", backend.upstream_queue));
    assert_eq!(refused_orders.ready, 0, "{refused_orders:?}");
    let log = backend.stop().await;
    assert!(
        log.lines().any(|line| line.contains("\"snapshot_refused\"")
            && line.contains("sent by broker user \"guest\"")),
        "{log}"
    );
}
