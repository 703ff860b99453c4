//! A `possync backend` process for tests: its own SQLite file, HTTP port
//! and queues, a token, and an HTTP client of its API.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use possync_backend::{SqliteStorage, Storage};
use possync_core::LicenseKey;
use serde_json::{Value, json};

use super::{ChildLog, WAIT, free_port, possync, possync_command, text};

/// A backend's files, its API client and its process while it runs.
pub struct Backend {
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub database: PathBuf,
    /// The folder of its store databases.
    pub stores: PathBuf,
    pub api: Client,
    pub direct_queue: String,
    pub upstream_queue: String,
    pub process: Option<ChildLog>,
}

/// A back office app: the backend's port and a token.
#[derive(Clone)]
pub struct Client {
    pub port: u16,
    pub token: String,
}

impl Backend {
    /// A backend's config and a token for it; not started.
    pub fn new(label: &str, direct: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = dir.path().join("backend.db");
        let stores = dir.path().join("stores");
        let port = free_port();
        let direct_queue = format!(
            "possync.test.{label}.{}.direct",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let upstream_queue = direct_queue.replace(".direct", ".upstream");
        let config = dir.path().join("backend.toml");
        // Upstream off unless a test turns it on: a queue bound to `up.#`
        // takes every test's receipts.
        std::fs::write(
            &config,
            format!(
                "[service]\nlisten = \"127.0.0.1:{port}\"\ndatabase = {database:?}\n\n[relay]\npoll_interval_ms = 100\n\n[direct]\nenabled = {direct}\nqueue = {direct_queue:?}\nqueue_expiry_days = 1\n\n[upstream]\nenabled = false\nqueue = {upstream_queue:?}\nqueue_expiry_days = 1\nstore_databases = {stores:?}\n",
                database = database.display().to_string(),
                stores = stores.display().to_string(),
            ),
        )
        .expect("write the backend's config");
        let mut backend = Self {
            _dir: dir,
            config,
            database,
            stores,
            api: Client {
                port,
                token: String::new(),
            },
            direct_queue,
            upstream_queue,
            process: None,
        };
        backend.api.token = backend.create_token("office");
        backend
    }

    /// A backend that also consumes its upstream queue (orders, receipts),
    /// trusting the tests' shared broker user; not started.
    pub fn with_upstream(label: &str) -> Self {
        let backend = Self::new(label, false);
        let config = std::fs::read_to_string(&backend.config).expect("the backend's config");
        let config = config.replace(
            "[upstream]\nenabled = false\n",
            "[upstream]\nverify_user = false\n",
        );
        std::fs::write(&backend.config, config).expect("write the backend's config");
        backend
    }

    /// A backend that consumes the upstream messages of `stores` and
    /// accepts each only from the broker user of the terminal it names;
    /// not started.
    pub fn verifying_upstream_for(label: &str, stores: &[&LicenseKey]) -> Self {
        let backend = Self::new(label, false);
        let config = std::fs::read_to_string(&backend.config).expect("the backend's config");
        std::fs::write(
            &backend.config,
            config.replace("[upstream]\nenabled = false\n", "[upstream]\n"),
        )
        .expect("write the backend's config");
        backend.bind_upstream(stores);
        backend
    }

    /// [`Backend::with_upstream`] whose queue takes the upstream messages
    /// of `stores` only, not those of every test running beside it.
    pub fn with_upstream_for(label: &str, stores: &[&LicenseKey]) -> Self {
        let backend = Self::with_upstream(label);
        backend.bind_upstream(stores);
        backend
    }

    /// Binds its upstream queue to `stores`' messages only.
    pub fn bind_upstream(&self, stores: &[&LicenseKey]) {
        let bindings: Vec<String> = stores.iter().map(|s| format!("\"up.{s}.#\"")).collect();
        let config = std::fs::read_to_string(&self.config).expect("the backend's config");
        let config = config.replace(
            "[upstream]\n",
            &format!("[upstream]\nbindings = [{}]\n", bindings.join(", ")),
        );
        std::fs::write(&self.config, config).expect("write the backend's config");
    }

    /// Appends `lines` to its config (a section and its keys).
    pub fn configure(&self, lines: &str) {
        let mut config = std::fs::read_to_string(&self.config).expect("the backend's config");
        config.push_str(lines);
        std::fs::write(&self.config, config).expect("write the backend's config");
    }

    /// Adds `lines` (keys) to the config's `[relay]` section, before it
    /// starts.
    pub fn configure_relay(&self, lines: &str) {
        let config = std::fs::read_to_string(&self.config).expect("the backend's config");
        let config = config.replacen("[relay]\n", &format!("[relay]\n{lines}"), 1);
        std::fs::write(&self.config, config).expect("write the backend's config");
    }

    /// A new token for client `name`, made with `possync backend token create`.
    pub fn create_token(&self, name: &str) -> String {
        let output = possync(&[
            "backend",
            "--config",
            self.config_path(),
            "token",
            "create",
            name,
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout).trim().to_owned()
    }

    pub fn config_path(&self) -> &str {
        self.config.to_str().expect("a UTF-8 path")
    }

    /// Starts `possync backend` with `env` set; returns once it serves.
    pub async fn start_with(&mut self, env: &[(&str, String)]) {
        let mut command = possync_command(&["backend", "--config", self.config_path()]);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut process = ChildLog::spawn(&mut command);
        process.wait_for_line("backend_started").await;
        self.process = Some(process);
    }

    /// Starts it and waits until it reads its upstream queue.
    pub async fn start_upstream(&mut self) {
        self.start().await;
        self.process
            .as_mut()
            .expect("started")
            .wait_for_line("upstream_live")
            .await;
    }

    pub async fn start(&mut self) {
        self.start_with(&[]).await;
    }

    /// The catalog id in the backend's database.
    pub async fn catalog_id(&self) -> String {
        SqliteStorage::open(&self.database)
            .await
            .expect("open the backend's database")
            .catalog_id()
            .await
            .expect("the catalog's id")
    }

    /// Starts it and waits until it relays and reads its direct queue.
    pub async fn start_live(&mut self) {
        self.start().await;
        let process = self.process.as_mut().expect("started");
        process.wait_for_line("relay_leading").await;
        process.wait_for_line("direct_live").await;
    }

    /// SIGKILLs the process (if it still runs) and reaps it; whether the
    /// failpoint had aborted it first.
    pub async fn kill(&mut self) -> bool {
        let Some(process) = self.process.take() else {
            return false;
        };
        process.signal(Signal::SIGKILL);
        let (_, log) = process.exit().await;
        log.contains("test hook fired")
    }

    /// Stops the process with SIGTERM; returns its log.
    pub async fn stop(&mut self) -> String {
        let process = self.process.take().expect("a running backend");
        process.signal(Signal::SIGTERM);
        let (status, log) = process.exit().await;
        assert!(status.success(), "the backend stops cleanly: {log}");
        log
    }

    /// The API's head of `store`; see [`Client::wait_published`].
    pub async fn wait_published(&self, store: &LicenseKey, head: i64) {
        self.api.wait_published(store, head).await;
    }
}

impl Client {
    /// `method path` with the backend's token and a JSON body: (status, body).
    pub async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let token = self.token.clone();
        tokio::task::spawn_blocking(move || call(method, &url, &token, body, None))
            .await
            .expect("the HTTP call ran")
            .expect("the backend answers")
    }

    /// Submits `changes` (a batch) until the backend answers, retrying with
    /// the same idempotency key while it is down or restarting.
    pub async fn submit_until_answered(&self, changes: Vec<Value>, key: &str) -> Value {
        let url = format!("http://127.0.0.1:{}/v1/changes", self.port);
        let body = json!({ "changes": changes });
        let deadline = Instant::now() + WAIT * 4;
        loop {
            let (url, token, body, key) = (
                url.clone(),
                self.token.clone(),
                body.clone(),
                key.to_owned(),
            );
            let answer = tokio::task::spawn_blocking(move || {
                call("POST", &url, &token, Some(body), Some(&key))
            })
            .await
            .expect("the HTTP call ran");
            match answer {
                Ok((200, answer)) => return answer,
                Ok((status, answer)) if status < 500 => {
                    panic!("the backend refused the batch: {status} {answer}")
                }
                _ => {
                    assert!(Instant::now() < deadline, "the backend never answered");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The store's (head, unpublished), as the API lists them.
    pub async fn head(&self, store: &LicenseKey) -> (i64, i64) {
        let (status, body) = self.call("GET", "/v1/stores", None).await;
        assert_eq!(status, 200, "{body}");
        body["stores"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["store"] == store.as_str())
            .map_or((0, 0), |s| {
                (
                    s["head"].as_i64().unwrap_or(0),
                    s["unpublished"].as_i64().unwrap_or(0),
                )
            })
    }

    /// Waits until every change of `store` up to `head` is confirmed by the broker.
    pub async fn wait_published(&self, store: &LicenseKey, head: i64) {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let now = self.head(store).await;
            if now == (head, 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{store}: (head, unpublished) is {now:?}, expected ({head}, 0)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Backend {
    /// The test's queues go with it: nothing else reads them, and a queue
    /// bound to `license.#` makes every store routable. The process
    /// goes first, or it would declare its queue again.
    fn drop(&mut self) {
        drop(self.process.take());
        for queue in [
            self.direct_queue.clone(),
            format!("{}.dead_letter", self.direct_queue),
            self.upstream_queue.clone(),
            format!("{}.dead_letter", self.upstream_queue),
            format!("{}.snapshots", self.upstream_queue),
            format!("{}.snapshots.dead_letter", self.upstream_queue),
        ] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_queue", "-q", &queue])
                .output();
        }
    }
}

/// A blocking HTTP call with a bearer token: (status, JSON body); `Err`
/// when nothing answers.
pub fn call(
    method: &str,
    url: &str,
    token: &str,
    body: Option<Value>,
    idempotency_key: Option<&str>,
) -> Result<(u16, Value), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let authorization = format!("Bearer {token}");
    let mut response = match (method, body) {
        ("GET", _) => agent
            .get(url)
            .header("Authorization", &authorization)
            .call()?,
        (_, body) => {
            let mut request = agent.post(url).header("Authorization", &authorization);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            request.send_json(body.unwrap_or(Value::Null))?
        }
    };
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}
