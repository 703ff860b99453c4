//! `possync publish` through the backend: with a `[backend]` in its config,
//! a publish command submits to the backend's HTTP API (the catalog of
//! record sequences each change) instead of the broker, and says so.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;

use possync_backend::{Catalog, SqliteStorage, Storage};
use possync_catalog as _;
use possync_core::Registry;
use possync_notices as _;

/// A backend serving its API on loopback over SQLite in a temporary folder.
struct Backend {
    url: String,
    token: String,
    storage: Arc<SqliteStorage>,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Backend {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let storage = Arc::new(
            runtime
                .block_on(SqliteStorage::open(dir.path().join("backend.db")))
                .expect("the database opens"),
        );
        let token = runtime
            .block_on(possync_backend::token::create_token(
                &*storage,
                "office",
                &[],
            ))
            .expect("a token")
            .token;
        let registry = Registry::for_publishing(&BTreeMap::new()).expect("the plugins load");
        let router = possync_backend::api::router(Arc::new(Catalog::new(
            storage.clone(),
            Arc::new(registry),
        )));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        runtime.spawn(async move { axum::serve(listener, router).await });
        Self {
            url,
            token,
            storage,
            runtime,
            dir,
        }
    }

    /// Runs `possync` with a config whose `[backend]` names this backend,
    /// the token coming from the environment as an operator would set it.
    fn possync(&self, args: &[&str]) -> Output {
        let config = self.dir.path().join("publisher.toml");
        std::fs::write(&config, format!("[backend]\nurl = \"{}\"\n", self.url))
            .expect("the config is written");
        Command::new(env!("CARGO_BIN_EXE_possync"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("POSSYNC_BACKEND__TOKEN", &self.token)
            .env_remove("POSSYNC_CONFIG")
            .output()
            .expect("possync runs")
    }

    fn head(&self, store: &str) -> i64 {
        self.runtime
            .block_on(self.storage.heads())
            .expect("the heads")
            .into_iter()
            .find(|head| head.store == store)
            .map_or(0, |head| head.head)
    }
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_typed_publish_goes_through_the_backend_and_says_so_with_each_seq() {
    let backend = Backend::start();
    let output = backend.possync(&[
        "publish",
        "price-update",
        "--license",
        "S1",
        "--license",
        "S2",
        "--product-id",
        "P1",
        "--new-price",
        "3.5",
    ]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("via backend {}: store S1 seq 1 ", backend.url))
            && stdout.contains(&format!("via backend {}: store S2 seq 1 ", backend.url)),
        "{stdout}"
    );
    assert!(!stdout.contains(&backend.token) && !stderr.contains(&backend.token));
    assert_eq!((backend.head("S1"), backend.head("S2")), (1, 1));
}

#[test]
fn a_change_the_backend_refuses_fails_with_its_reason() {
    let backend = Backend::start();
    let output = backend.possync(&[
        "publish",
        "raw",
        "--license",
        "S1",
        "--type",
        "price_update",
        "--payload",
        r#"{"product_id": ""}"#,
    ]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("refused the changes (422)") && stderr.contains("new_price"),
        "{stderr}"
    );
    assert_eq!(backend.head("S1"), 0);
}

#[test]
fn bulk_goes_through_the_backend_in_batches_and_reports_each_store_s_head() {
    let backend = Backend::start();
    let file = backend.dir.path().join("catalog.jsonl");
    let lines: Vec<String> = (0..1_200)
        .map(|i| {
            format!(r#"{{"type": "price_update", "payload": {{"product_id": "P{i}", "new_price": {i}}}}}"#)
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("the file is written");
    let file = file.to_string_lossy().into_owned();
    let output = backend.possync(&[
        "publish",
        "bulk",
        "--license",
        "S1",
        "--license",
        "S2",
        "--file",
        &file,
    ]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "published 2400 change(s) to 2 store(s) via backend {} ",
            backend.url
        )) && stdout.contains("store S1 seq 1200, store S2 seq 1200"),
        "{stdout}"
    );
    assert_eq!((backend.head("S1"), backend.head("S2")), (1_200, 1_200));
}

#[test]
fn bulk_splits_large_changes_into_requests_under_the_api_s_body_limit() {
    let backend = Backend::start();
    let file = backend.dir.path().join("catalog.jsonl");
    // 300 changes of some 40 KB: 12 MB, three times the API's body limit,
    // in fewer changes than one batch counts.
    let name = "n".repeat(40_000);
    let lines: Vec<String> = (0..300)
        .map(|i| {
            format!(r#"{{"type": "product_update", "payload": {{"product_id": "P{i}", "product_name": "{name}", "price": 1.5}}}}"#)
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("the file is written");
    let file = file.to_string_lossy().into_owned();
    let output = backend.possync(&["publish", "bulk", "--license", "S1", "--file", &file]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("store S1 seq 300"), "{stdout}");
    assert_eq!(backend.head("S1"), 300);
}

#[test]
fn a_notice_goes_through_the_backend_and_one_without_text_is_refused() {
    let backend = Backend::start();
    let output = backend.possync(&[
        "publish",
        "raw",
        "--license",
        "S1",
        "--type",
        "notice",
        "--payload",
        r#"{"notice_id": "N1", "text": "Doors close at 20:00", "severity": "warning"}"#,
    ]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("store S1 seq 1 "), "{stdout}");
    let output = backend.possync(&[
        "publish",
        "raw",
        "--license",
        "S1",
        "--type",
        "notice",
        "--payload",
        r#"{"notice_id": "N2", "text": " "}"#,
    ]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("text must not be empty"), "{stderr}");
    assert_eq!(backend.head("S1"), 1);
}
