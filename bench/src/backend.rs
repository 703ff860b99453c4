//! `possync backend` in the loop: the service runs in this process over a
//! SQLite file, as `possync backend` runs it, and back office clients talk
//! to its HTTP API as any app would.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use possync_backend::{ServiceConfig, SqliteStorage, Storage};
use possync_core::{Delivery, QueueType, Registry};
use serde_json::json;
use tokio::sync::watch;

use crate::workload::{self, license, now_micros};
use crate::{Row, latency_text, paced, possync_side, progress};
use possync_core::LicenseKey;

/// A backend serving on loopback until dropped.
///
/// It runs on a runtime of its own, as `possync backend` runs in a process
/// of its own, and the back office clients on another: the clients block
/// a thread per request in flight, and on one shared blocking pool they
/// would hold the threads the backend's database work needs.
pub(crate) struct RunningBackend {
    base: String,
    token: String,
    pub(crate) storage: Arc<SqliteStorage>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), possync_backend::ServiceError>>,
    runtime: OwnRuntime,
    clients: OwnRuntime,
}

/// A runtime that shuts down without waiting when dropped: the benchmark
/// drops one inside its own runtime when a scenario fails, where waiting
/// would panic and hide the failure.
struct OwnRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl OwnRuntime {
    fn new(runtime: tokio::runtime::Runtime) -> Self {
        Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl RunningBackend {
    async fn start(url: &str, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(url, dir, |_| {}).await
    }

    /// Starts a backend whose settings `configure` changed first.
    pub(crate) async fn start_with(
        url: &str,
        dir: &Path,
        configure: impl FnOnce(&mut ServiceConfig),
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let storage = Arc::new(SqliteStorage::open(dir.join("backend.db")).await?);
        let token = possync_backend::token::create_token(storage.as_ref(), "bench", &[])
            .await?
            .token;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut config = ServiceConfig::default();
        config.service.listen = format!("127.0.0.1:{port}").parse()?;
        config.broker.urls = vec![url.to_owned()];
        config.direct.enabled = false;
        // A queue bound to `up.#` would outlive the run and take every
        // terminal's receipts; the upstream scenarios turn it on.
        config.upstream.enabled = false;
        config.upstream.store_databases = dir.join("stores");
        configure(&mut config);
        let registry = Arc::new(Registry::for_publishing(&config.plugins)?);
        let (stop, mut stopped) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("backend")
            .enable_all()
            .build()?;
        let clients = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("back-office-client")
            .enable_all()
            .build()?;
        let task = runtime.spawn(possync_backend::run_with(
            config,
            Arc::clone(&storage),
            registry,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        let base = format!("http://127.0.0.1:{port}");
        let health = format!("{base}/health");
        let probe: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (health, probe) = (health.clone(), probe.clone());
            let up = tokio::task::spawn_blocking(move || probe.get(&health).call().is_ok()).await?;
            if up {
                break;
            }
            if task.is_finished() {
                // Stopped before serving (its address taken, say): its own
                // error says why.
                task.await??;
                anyhow::bail!("the backend stopped before it served");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the backend did not serve within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            base,
            token,
            storage,
            stop,
            task,
            runtime: OwnRuntime::new(runtime),
            clients: OwnRuntime::new(clients),
        })
    }

    pub(crate) fn client(&self) -> Client {
        Client {
            base: self.base.clone(),
            runtime: self.clients.handle.clone(),
            agent: ureq::Agent::config_builder()
                // Each phase bounded instead of the whole call: with an
                // overall bound, ureq resolves the host on a thread of its
                // own per request, a thread started and ended each time.
                .timeout_connect(Some(Duration::from_secs(5)))
                .timeout_send_request(Some(Duration::from_secs(30)))
                .timeout_send_body(Some(Duration::from_secs(30)))
                .timeout_recv_response(Some(Duration::from_secs(30)))
                .timeout_recv_body(Some(Duration::from_secs(30)))
                // As many kept-alive connections as requests in flight: an
                // app does not open a connection per change.
                .max_idle_connections(64)
                // A refusal's body says why; read it instead of a bare status.
                .http_status_as_error(false)
                .max_idle_connections_per_host(64)
                .build()
                .into(),
            url: format!("{}/v1/changes", self.base),
            authorization: format!("Bearer {}", self.token),
        }
    }

    /// Waits until the relay has every change of every store confirmed.
    pub(crate) async fn wait_relayed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let heads = self.storage.heads().await?;
            if heads.iter().all(|h| h.unpublished == 0) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the relay did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        drop(self.clients);
        drop(self.runtime);
        Ok(())
    }
}

/// A back office app's connection to the API.
#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    runtime: tokio::runtime::Handle,
    agent: ureq::Agent,
    url: String,
    authorization: String,
}

impl Client {
    /// Submits `changes` in one request; returns once they are durable.
    pub(crate) async fn submit(&self, changes: Vec<serde_json::Value>) -> anyhow::Result<()> {
        self.post_changes(changes).await.map(drop)
    }

    /// Submits one change; returns its sequence number once it is durable.
    pub(crate) async fn submit_one(&self, change: serde_json::Value) -> anyhow::Result<i64> {
        let answer: serde_json::Value =
            serde_json::from_slice(&self.post_changes(vec![change]).await?)?;
        answer["changes"][0]["seq"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("no sequence number in {answer}"))
    }

    /// `POST /v1/changes` with `changes`: the answer's body.
    async fn post_changes(&self, changes: Vec<serde_json::Value>) -> anyhow::Result<Vec<u8>> {
        let client = self.clone();
        self.runtime
            .spawn_blocking(move || {
                let body = serde_json::to_vec(&json!({ "changes": changes }))?;
                let response = client
                    .agent
                    .post(&client.url)
                    .header("Authorization", &client.authorization)
                    .header("Content-Type", "application/json")
                    .send(&body[..])?;
                read_ok(response)
            })
            .await?
    }

    /// `GET /v1/stores/{store}/applied?seq=..&wait=..`: whether every
    /// known terminal of the store reported `seq` applied.
    pub(crate) async fn applied(&self, store: &str, seq: i64, wait: u64) -> anyhow::Result<bool> {
        let client = self.clone();
        let url = format!(
            "{}/v1/stores/{store}/applied?seq={seq}&wait={wait}",
            self.base
        );
        let answer = self
            .runtime
            .spawn_blocking(move || {
                let response = client
                    .agent
                    .get(&url)
                    .header("Authorization", &client.authorization)
                    .call()?;
                read_ok(response)
            })
            .await??;
        let answer: serde_json::Value = serde_json::from_slice(&answer)?;
        answer["complete"]
            .as_bool()
            .ok_or_else(|| anyhow::anyhow!("no `complete` in {answer}"))
    }
}

/// The body of a 200 answer, else an error with its status and body. Read
/// to the end, as an app reads its answer: only then does the connection
/// go back to the pool for the next request.
fn read_ok(response: ureq::http::Response<ureq::Body>) -> anyhow::Result<Vec<u8>> {
    let status = response.status();
    let answer = response.into_body().read_to_vec()?;
    anyhow::ensure!(
        status == 200,
        "answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
    Ok(answer)
}

/// The CPU a phase cost: this process (backend, its clients and, where
/// there is one, the terminal) and the broker beside it.
pub(crate) struct CpuUse {
    here: u64,
    broker: u64,
}

impl CpuUse {
    pub(crate) fn start() -> Self {
        Self {
            here: workload::cpu_micros(),
            broker: workload::broker_cpu_micros(),
        }
    }

    pub(crate) fn per_change(self, changes: usize) -> String {
        let per = |micros: u64| micros as f64 / changes.max(1) as f64;
        format!(
            "{:.0} µs CPU/change here + {:.0} µs in the broker",
            per(workload::cpu_micros().saturating_sub(self.here)),
            per(workload::broker_cpu_micros().saturating_sub(self.broker))
        )
    }
}

pub(crate) fn price_change(
    store: &str,
    i: usize,
    message_type: &str,
    sent_at_us: i64,
) -> serde_json::Value {
    json!({
        "store": store,
        "type": message_type,
        "payload": {
            "product_id": format!("P{}", i % 2000),
            "product_name": format!("Product {}", i % 2000),
            "new_price": 1.0 + (i % 1000) as f64 / 100.0,
            "sent_at_us": sent_at_us,
        },
    })
}

/// Publishes `count` price changes to `license` as the backend does: each
/// submitted to a backend (its own SQLite file, its relay) in batches of
/// 500, then published by its relay; returns once the broker confirmed all.
/// `payload(i)` is the `i`th change's payload.
pub(crate) async fn relay_backlog(
    url: &str,
    license: &LicenseKey,
    count: usize,
    payload: impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = RunningBackend::start(url, dir.path()).await?;
    let client = backend.client();
    for start in (0..count).step_by(500) {
        let batch = (start..count.min(start + 500))
            .map(|i| {
                let payload: serde_json::Value = serde_json::from_str(&payload(i))?;
                Ok(json!({ "store": license.as_str(), "type": "price_update", "payload": payload }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        client.submit(batch).await?;
    }
    backend.wait_relayed().await?;
    // The drains wait for every change: each must have been sequenced and
    // relayed (a change without a clock of its own is never stale).
    let head = backend
        .storage
        .heads()
        .await?
        .into_iter()
        .find(|h| h.store == license.as_str())
        .map_or(0, |h| h.head);
    anyhow::ensure!(
        head == i64::try_from(count)?,
        "the backend sequenced {head} of the {count} changes of {license}"
    );
    backend.stop().await
}

/// Submit-to-applied latency: each change submitted alone, as a back
/// office app does when a user saves a price, `per_second` a second, each
/// from its own request in flight; measured from the submit to the
/// terminal's commit and ack of the change the relay published.
pub(crate) async fn latency(
    url: &str,
    dir: &Path,
    seconds: u64,
    per_second: usize,
) -> anyhow::Result<Row> {
    let total = per_second * usize::try_from(seconds).unwrap_or(5);
    progress(&format!("backend submit→applied latency at {per_second}/s"));
    let backend = RunningBackend::start(url, dir).await?;
    let store = license("backend-latency");
    let config = possync_side::config(
        url,
        dir,
        &store,
        "t1",
        QueueType::Classic,
        Delivery::Durable,
    );
    let terminal = possync_side::start(config).await?;
    let collector = tokio::spawn(possync_side::collect_latencies(
        terminal.status.clone(),
        total as u64,
    ));
    let client = backend.client();
    let cpu = CpuUse::start();
    let mut requests = tokio::task::JoinSet::new();
    paced(per_second, total, |i| {
        let change = price_change(store.as_str(), i, "bench_price_update", now_micros());
        let client = client.clone();
        requests.spawn(async move { client.submit(vec![change]).await });
        async { Ok(()) }
    })
    .await?;
    while let Some(answered) = requests.join_next().await {
        answered??;
    }
    let latencies = tokio::time::timeout(Duration::from_secs(60), collector).await??;
    let cpu = cpu.per_change(total);
    let connection = workload::connect(url).await?;
    terminal.stop_and_delete(&connection).await?;
    workload::close([connection]).await;
    backend.stop().await?;
    Ok(Row {
        scenario: format!(
            "latency submit→applied through the backend at {per_second}/s, one change per request (SQLite, synchronous=FULL)"
        ),
        possync: format!("{} · {cpu}", latency_text(latencies)),
        baseline: "-".into(),
        ratio: "-".into(),
    })
}

/// How many changes a second the backend takes, each durable before its
/// answer, from `clients` apps each sending batches of `batch`; beside
/// it the rate at which the relay then had them all confirmed by the broker.
pub(crate) async fn accept(
    url: &str,
    dir: &Path,
    total: usize,
    batch: usize,
    clients: usize,
) -> anyhow::Result<Row> {
    progress(&format!(
        "backend accepts {total} changes in batches of {batch} from {clients} clients"
    ));
    let backend = RunningBackend::start(url, dir).await?;
    let stores: Vec<String> = (0..10)
        .map(|i| license(&format!("backend-accept-{i}")).to_string())
        .collect();
    let per_client = total / clients;
    let cpu = CpuUse::start();
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for c in 0..clients {
        let client = backend.client();
        let stores = stores.clone();
        senders.spawn(async move {
            let mut sent = 0;
            while sent < per_client {
                let changes = (sent..(sent + batch).min(per_client))
                    .map(|i| {
                        let n = c * per_client + i;
                        price_change(&stores[n % stores.len()], n, "price_update", 0)
                    })
                    .collect::<Vec<_>>();
                sent += changes.len();
                client.submit(changes).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    let accepted = started.elapsed();
    backend.wait_relayed().await?;
    let relayed = started.elapsed();
    let count = per_client * clients;
    let cpu = cpu.per_change(count);
    backend.stop().await?;
    let rate = |elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    Ok(Row {
        scenario: format!(
            "backend accepts {count} changes, batches of {batch} from {clients} clients (SQLite, durable before the answer)"
        ),
        possync: format!(
            "{:.0} changes/s accepted · all relayed and confirmed at {:.0} changes/s · {cpu}",
            rate(accepted),
            rate(relayed)
        ),
        baseline: "-".into(),
        ratio: "-".into(),
    })
}
