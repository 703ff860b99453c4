//! Upstream, terminal to back office: what the uplink (delivery receipts)
//! costs a drain, how many orders a second go from one till's outbox into
//! the backend, and how soon every terminal of a store reports a change
//! applied.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use possync_backend::{ServiceConfig, Storage};
use possync_core::{Delivery, LicenseKey, QueueType};

use crate::backend::{CpuUse, RunningBackend, price_change};
use crate::baseline;
use crate::workload::{self, license};
use crate::{Row, Stopwatch, Trial, possync_side, progress};

/// One round: the same backlog drained with the uplink off and on (in turn
/// first), as `Trial { baseline: off, possync: on }`.
pub(crate) async fn receipts_cost(
    url: &str,
    dir: &Path,
    count: usize,
    round: usize,
) -> anyhow::Result<Trial> {
    possync_side::drain_off_and_on(
        url,
        dir,
        count,
        round,
        "receipts-cost",
        format!(
            "backlog drain, {count} changes, classic queue: uplink on (receipts) / uplink off (baseline column: off)"
        ),
        |config, on| config.uplink.enabled = on,
    )
    .await
}

/// A backend that consumes an upstream queue of its own (deleted by
/// [`stop_backend`]), every terminal sharing the benchmark's broker user.
pub(crate) async fn start_backend(
    url: &str,
    dir: &Path,
) -> anyhow::Result<(RunningBackend, String)> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let queue = format!("bench.upstream.{}", &id[20..]);
    let name = queue.clone();
    let backend = RunningBackend::start_with(url, dir, move |config: &mut ServiceConfig| {
        config.upstream.enabled = true;
        config.upstream.queue = name;
        config.upstream.verify_user = false;
        // Gone a day after a failed run left it behind.
        config.upstream.queue_expiry_days = Some(1);
    })
    .await?;
    // Its queue declared before any terminal sends: an order no queue
    // takes waits on its terminal for seconds.
    let connection = workload::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        if declared.is_ok() {
            let _ = channel.close(200, "done".into()).await;
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backend did not declare {queue} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workload::close([connection]).await;
    Ok((backend, queue))
}

pub(crate) async fn stop_backend(
    url: &str,
    backend: RunningBackend,
    queue: &str,
) -> anyhow::Result<()> {
    backend.stop().await?;
    let connection = workload::connect(url).await?;
    workload::delete_queues(
        &connection,
        &[
            queue.to_owned(),
            format!("{queue}.dead_letter"),
            format!("{queue}.snapshots"),
            format!("{queue}.snapshots.dead_letter"),
        ],
    )
    .await;
    workload::close([connection]).await;
    Ok(())
}

/// The `i`th order a till takes: 1 to 6 lines, as the `order` type's
/// schema has them.
fn order_payload(i: usize, taken_at: &str) -> String {
    let lines = 1 + (i * 7 + i / 3) % 6;
    let mut total = 0.0;
    let mut text = String::new();
    for l in 0..lines {
        let product = (i * 31 + l * 17) % 2000;
        let quantity = 1 + (i + l) % 3;
        let unit_price = 0.5 + ((i * 13 + l * 29) % 400) as f64 / 20.0;
        total += quantity as f64 * unit_price;
        if l > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            r#"{{"product_id":"P{product:04}","quantity":{quantity},"unit_price":{unit_price}}}"#
        ));
    }
    let payment = if i.is_multiple_of(3) { "cash" } else { "card" };
    format!(
        r#"{{"order_id":"T1-{i:08}","lines":[{text}],"total":{total:.2},"currency":"EUR","payment":"{payment}","taken_at":"{taken_at}"}}"#
    )
}

/// Counts the store's orders the backend recorded, reading on from where
/// the last call stopped (the API's own read).
struct RecordedOrders {
    store: String,
    cursor: i64,
    count: usize,
}

impl RecordedOrders {
    async fn read_on(&mut self, backend: &RunningBackend) -> anyhow::Result<usize> {
        loop {
            let page = backend
                .storage
                .upstream_after(&self.store, Some("order"), self.cursor, 10_000)
                .await?;
            let Some(last) = page.last() else {
                return Ok(self.count);
            };
            self.cursor = last.cursor;
            self.count += page.len();
            if page.len() < 10_000 {
                return Ok(self.count);
            }
        }
    }
}

/// One round of orders up: `count` orders written to one till's outbox by
/// a POS app (its own SQLite connection, transactions of `per_commit`),
/// timed from the first insert until the backend recorded the last; then
/// the broker alone carrying the same bodies, published with confirms and
/// consumed at once. `Trial { possync, baseline: broker }`.
pub(crate) async fn orders_up(
    url: &str,
    dir: &Path,
    count: usize,
    per_commit: usize,
    (poll_ms, batch): (Option<u64>, Option<usize>),
) -> anyhow::Result<(Trial, String)> {
    let round_dir = tempfile::tempdir_in(dir)?;
    let dir = round_dir.path();
    progress(&format!(
        "orders up: {count} orders from one till into the backend"
    ));
    let (backend, queue) = start_backend(url, &dir.join("backend")).await?;
    let key = license("orders-up");
    let mut config =
        possync_side::config(url, dir, &key, "t1", QueueType::Classic, Delivery::Durable);
    if let Some(poll_ms) = poll_ms {
        config.uplink.poll_ms = poll_ms;
    }
    if let Some(batch) = batch {
        config.uplink.batch = batch;
    }
    let uplink = format!(
        "uplink.poll_ms {}, uplink.batch {}",
        config.uplink.poll_ms, config.uplink.batch
    );
    let database = config.terminal.database.clone();
    let watched = database.clone();
    let terminal = possync_side::start(config).await?;
    let taken_at = "2026-12-02T14:00:00Z";
    let payloads: Vec<String> = (0..count).map(|i| order_payload(i, taken_at)).collect();
    let bodies = upstream_bodies(&key, &payloads);
    let mut recorded = RecordedOrders {
        store: key.to_string(),
        cursor: 0,
        count: 0,
    };
    let cpu = CpuUse::start();
    let stopwatch = Stopwatch::start();
    let app = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut db = rusqlite::Connection::open(&database)?;
        db.busy_timeout(Duration::from_secs(30))?;
        db.pragma_update(None, "synchronous", "FULL")?;
        for chunk in payloads.chunks(per_commit) {
            let tx = db.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO possync_outbox (type, payload) VALUES ('order', ?1)",
                )?;
                for payload in chunk {
                    insert.execute([payload])?;
                }
            }
            tx.commit()?;
        }
        Ok(started.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    // Where the orders are every half second: still in the outbox (not
    // yet confirmed by the broker), or recorded by the backend; those
    // between are in the broker's queue or the backend's hands.
    let watcher = rusqlite::Connection::open_with_flags(
        &watched,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut trace = Vec::new();
    let mut traced = Instant::now();
    while recorded.read_on(&backend).await? < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backend recorded {} of {count} orders in 300 s",
            recorded.count
        );
        if traced.elapsed() >= Duration::from_millis(500) {
            traced = Instant::now();
            let outbox: i64 = watcher
                .query_row("SELECT count(*) FROM possync_outbox", [], |row| row.get(0))
                .unwrap_or(-1);
            trace.push(format!(
                "{:.1}s: outbox {outbox}, recorded {}",
                stopwatch.started.elapsed().as_secs_f64(),
                recorded.count
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let possync = stopwatch.stop();
    // The order plugin applies each into the store's database after it is
    // recorded: timed too, from the same start.
    let store_database = dir.join("backend").join("stores").join(format!("{key}.db"));
    let in_store_database = loop {
        let applied: i64 = rusqlite::Connection::open_with_flags(
            &store_database,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|db| db.query_row("SELECT count(*) FROM orders", [], |row| row.get(0)))
        .unwrap_or(0);
        if usize::try_from(applied).unwrap_or(0) >= count {
            break stopwatch.started.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the store database holds {applied} of {count} orders in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    progress(&format!(
        "orders up, where the orders were: {}",
        trace.join(" · ")
    ));
    let cpu = cpu.per_change(count);
    let inserted = app.await??;
    anyhow::ensure!(
        recorded.count == count,
        "the backend recorded {} orders, {count} were written",
        recorded.count
    );
    let connection = workload::connect(url).await?;
    terminal.stop_and_delete(&connection).await?;
    stop_backend(url, backend, &queue).await?;

    progress(&format!(
        "orders up: the broker alone, {count} bodies published with confirms and consumed"
    ));
    let broker = broker_alone(url, connection, &format!("orders.{key}"), bodies).await?;
    let inserted_rate = count as f64 / inserted.as_secs_f64();
    Ok((
        Trial {
            scenario: format!(
                "orders up, {count} orders from one till's outbox (app commits of {per_commit}; {uplink}) until all recorded by the backend (baseline column: the broker alone, same bodies published with confirms and consumed)"
            ),
            count,
            possync,
            baseline: broker,
            memory_kib: None,
        },
        format!(
            "app wrote all {count} in {:.2} s ({inserted_rate:.0}/s) · all applied to the store database after {:.2} s ({:.0}/s) · {cpu}",
            inserted.as_secs_f64(),
            in_store_database.as_secs_f64(),
            count as f64 / in_store_database.as_secs_f64()
        ),
    ))
}

/// The broker alone moving `bodies`: published with confirms (500 in
/// flight) to a durable queue of its own and consumed at once by a raw
/// consumer; closes `connection`.
pub(crate) async fn broker_alone(
    url: &str,
    connection: lapin::Connection,
    name: &str,
    bodies: Vec<Vec<u8>>,
) -> anyhow::Result<crate::Measured> {
    let count = bodies.len();
    let queue = format!("bench.{name}");
    let routing_key = format!("bench-{name}");
    declare_bound(&connection, &queue, &routing_key).await?;
    let stopwatch = Stopwatch::start();
    let consumer = {
        let (url, queue) = (url.to_owned(), queue.clone());
        tokio::spawn(async move {
            let connection = workload::connect(&url).await?;
            baseline::receive_only(&connection, &queue, count).await?;
            workload::close([connection]).await;
            anyhow::Ok(())
        })
    };
    workload::publish_raw(&connection, &routing_key, bodies.into_iter(), 500).await?;
    consumer.await??;
    let broker = stopwatch.stop();
    workload::delete_queues(&connection, &[queue]).await;
    workload::close([connection]).await;
    Ok(broker)
}

/// The bodies the uplink sends for these payloads.
fn upstream_bodies(key: &LicenseKey, payloads: &[String]) -> Vec<Vec<u8>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            format!(
                r#"{{"type":"order","license_key":"{key}","terminal_id":"t1","message_id":"{:032x}","created_at":"2026-12-02T14:00:00.000Z","payload":{payload}}}"#,
                i as u128 + 0x1234_5678_9abc_def0_1234_5678_0000_0000
            )
            .into_bytes()
        })
        .collect()
}

/// A durable classic queue bound to `routing_key` on the exchange.
pub(crate) async fn declare_bound(
    connection: &lapin::Connection,
    queue: &str,
    routing_key: &str,
) -> anyhow::Result<()> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            workload::EXCHANGE.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Publish-to-all-applied: a backend and `terminals` terminals of one
/// store; single changes submitted through the API at `per_second` for
/// `seconds`; for each, the time from its submit until
/// `GET /v1/stores/{store}/applied?seq=N` says complete, and until the
/// fleet table (read every 10 ms) shows every terminal at `seq` or past it.
pub(crate) async fn applied_latency(
    url: &str,
    dir: &Path,
    terminals: usize,
    per_second: usize,
    seconds: u64,
    ask_api: bool,
) -> anyhow::Result<Vec<Row>> {
    let total = per_second * usize::try_from(seconds).unwrap_or(20);
    let round_dir = tempfile::tempdir_in(dir)?;
    let dir = round_dir.path();
    progress(&format!(
        "publish→all applied: {terminals} terminals of one store, {per_second} changes/s for {seconds} s"
    ));
    let (backend, queue) = start_backend(url, &dir.join("backend")).await?;
    let store = license("applied");
    let mut running = Vec::new();
    for t in 0..terminals {
        running.push(
            possync_side::start(possync_side::config(
                url,
                dir,
                &store,
                &format!("t{t}"),
                QueueType::Classic,
                Delivery::Durable,
            ))
            .await?,
        );
    }
    // Every terminal known to the backend (each sends a receipt at start).
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend.storage.fleet(Some(store.as_str())).await?.len() < terminals {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backend did not hear from all {terminals} terminals in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = backend.client();
    let submitted: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn(watch_fleet(
        Arc::clone(&backend.storage),
        store.to_string(),
        terminals,
        Arc::clone(&submitted),
        total,
    ));
    let cpu = CpuUse::start();
    let mut waits = tokio::task::JoinSet::new();
    crate::paced(per_second, total, |i| {
        let change = price_change(store.as_str(), i, "price_update", 0);
        let (client, store, submitted) =
            (client.clone(), store.to_string(), Arc::clone(&submitted));
        waits.spawn(async move {
            let started = Instant::now();
            let seq = client.submit_one(change).await?;
            let accepted = started.elapsed();
            if let Ok(mut submitted) = submitted.lock() {
                submitted.push((seq, started));
            }
            if ask_api {
                while !client.applied(&store, seq, 30).await? {}
            }
            anyhow::Ok((accepted, started.elapsed()))
        });
        async { Ok(()) }
    })
    .await?;
    let mut api = Vec::with_capacity(total);
    let mut accepted = Vec::with_capacity(total);
    while let Some(done) = waits.join_next().await {
        let (submit, all_applied) = done??;
        accepted.push(micros(submit));
        api.push(micros(all_applied));
    }
    let fleet = tokio::time::timeout(Duration::from_secs(60), watcher).await???;
    let cpu = cpu.per_change(total);
    let connection = workload::connect(url).await?;
    for terminal in running {
        terminal.stop_and_delete(&connection).await?;
    }
    workload::close([connection]).await;
    stop_backend(url, backend, &queue).await?;
    let mut rows = Vec::new();
    if ask_api {
        rows.push(Row {
            scenario: format!(
                "publish→all applied, {terminals} terminals of one store, {per_second} changes/s for {seconds} s: submit until GET /v1/stores/{{store}}/applied?seq=N&wait=30 says complete"
            ),
            possync: format!("{} · {cpu}", percentiles(api)),
            baseline: "-".into(),
            ratio: "-".into(),
        });
    } else {
        rows.push(Row {
            scenario: format!(
                "publish→all applied, {terminals} terminals of one store, {per_second} changes/s for {seconds} s, no client asking /applied: the CPU of the run"
            ),
            possync: cpu,
            baseline: "-".into(),
            ratio: "-".into(),
        });
    }
    rows.extend([
        Row {
            scenario: format!(
                "publish→all applied, same run: submit until the fleet table (read every 10 ms) has all {terminals} at seq N or past it"
            ),
            possync: percentiles(fleet),
            baseline: "-".into(),
            ratio: "-".into(),
        },
        Row {
            scenario: "publish→all applied, same run: the submit alone (POST /v1/changes answered, durable)".into(),
            possync: percentiles(accepted),
            baseline: "-".into(),
            ratio: "-".into(),
        },
    ]);
    Ok(rows)
}

fn micros(elapsed: Duration) -> i64 {
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

/// Reads the store's fleet every 10 ms; for each submitted `seq`, the time
/// from its submit until every terminal's `applied_up_to` reached it.
async fn watch_fleet(
    storage: Arc<possync_backend::SqliteStorage>,
    store: String,
    terminals: usize,
    submitted: Arc<Mutex<Vec<(i64, Instant)>>>,
    total: usize,
) -> anyhow::Result<Vec<i64>> {
    let mut latencies = Vec::with_capacity(total);
    let mut waiting: Vec<(i64, Instant)> = Vec::new();
    while latencies.len() < total {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let fleet = storage.fleet(Some(&store)).await?;
        let now = Instant::now();
        if let Ok(mut submitted) = submitted.lock() {
            waiting.append(&mut submitted);
        }
        if fleet.len() < terminals {
            continue;
        }
        let all = fleet.iter().map(|t| t.applied_up_to).min().unwrap_or(0);
        waiting.retain(|(seq, started)| {
            if *seq <= all {
                latencies.push(micros(now.duration_since(*started)));
                false
            } else {
                true
            }
        });
    }
    Ok(latencies)
}

fn percentiles(mut latencies: Vec<i64>) -> String {
    latencies.sort_unstable();
    format!(
        "p50 {:.0} / p90 {:.0} / p99 {:.0} / max {:.0} ms ({} changes)",
        crate::percentile(&latencies, 0.5),
        crate::percentile(&latencies, 0.9),
        crate::percentile(&latencies, 0.99),
        crate::percentile(&latencies, 1.0),
        latencies.len()
    )
}
