//! The change feed's two figures: what writing it costs a drain when no
//! POS app listens, and how soon ten listeners hear of a change.

use std::path::Path;
use std::time::{Duration, Instant};

use possync_catalog::PriceUpdate;
use possync_core::{Delivery, Publisher, QueueType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::workload::{self, license};
use crate::{Row, Trial, latency_text, possync_side, progress};

/// One round: the same backlog drained with the feed off and on (in turn
/// first), as `Trial { baseline: off, possync: on }`.
pub(crate) async fn cost(
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
        "feed-cost",
        format!(
            "backlog drain, {count} changes, classic queue: change feed on, no subscriber / feed off (baseline column: off)"
        ),
        |config, on| {
            if !on {
                config.terminal.feed_keep = 0;
            }
        },
    )
    .await
}

/// `subscribers` clients follow `/events` while changes are published at
/// `per_second`: the time from each publish to each client's event. The
/// time from commit to event is at most that; the row beside it (possync
/// alone, publish to commit) says how much of it the broker and the
/// commit take.
pub(crate) async fn latency(
    url: &str,
    dir: &Path,
    subscribers: usize,
    per_second: usize,
    seconds: u64,
) -> anyhow::Result<Row> {
    let total = per_second * usize::try_from(seconds).unwrap_or(5);
    progress(&format!(
        "feed latency: {subscribers} subscribers, {per_second} changes/s for {seconds} s"
    ));
    let key = license("feed-latency");
    let mut config =
        possync_side::config(url, dir, &key, "t1", QueueType::Classic, Delivery::Durable);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    config.status.enabled = true;
    config.status.port = port;
    let terminal = possync_side::start(config.clone()).await?;
    let published = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<Instant>; total]));
    let mut clients = Vec::new();
    for _ in 0..subscribers {
        let stream = subscribe(port).await?;
        clients.push(tokio::spawn(follow(
            stream,
            total,
            std::sync::Arc::clone(&published),
        )));
    }
    let publisher = Publisher::connect(&config.broker).await?;
    crate::paced(per_second, total, |i| {
        let change = PriceUpdate {
            product_id: format!("L{i}"),
            new_price: 1.0,
            product_name: None,
        };
        let (publisher, key, published) = (&publisher, &key, &published);
        async move {
            if let Ok(mut published) = published.lock() {
                published[i] = Some(Instant::now());
            }
            publisher
                .publish(std::slice::from_ref(key), &change)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    let mut latencies = Vec::with_capacity(total * subscribers);
    for client in clients {
        latencies.extend(tokio::time::timeout(Duration::from_secs(60), client).await???);
    }
    publisher.close().await;
    let connection = workload::connect(url).await?;
    terminal.stop_and_delete(&connection).await?;
    workload::close([connection]).await;
    Ok(Row {
        scenario: format!(
            "change feed: publish→event at each of {subscribers} /events subscribers, {per_second} changes/s"
        ),
        possync: latency_text(latencies),
        baseline: "-".into(),
        ratio: "-".into(),
    })
}

/// `/events` opened as a client that has seen nothing: HTTP/1.0, so the
/// body is the bare stream. Returns once the `ready` event arrived.
async fn subscribe(
    port: u16,
) -> anyhow::Result<tokio::io::Lines<BufReader<tokio::net::TcpStream>>> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /events HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut lines = BufReader::new(stream).lines();
    let mut ready = false;
    while let Some(line) = lines.next_line().await? {
        ready |= line.starts_with("event: ready");
        // The blank line that ends the ready event.
        if ready && line.is_empty() {
            return Ok(lines);
        }
    }
    anyhow::bail!("/events ended before it was ready")
}

/// Reads `total` change events; the time since each change's publish, in
/// microseconds.
async fn follow(
    mut lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    total: usize,
    published: std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
) -> anyhow::Result<Vec<i64>> {
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        let Some(line) = lines.next_line().await? else {
            anyhow::bail!("/events ended after {} changes", latencies.len());
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let arrived = Instant::now();
        let change: possync_core::Change = serde_json::from_str(data)?;
        let index: usize = change
            .id
            .as_deref()
            .and_then(|id| id.strip_prefix('L'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("a change of another product: {data}"))?;
        let sent = published
            .lock()
            .ok()
            .and_then(|published| published.get(index).copied().flatten())
            .ok_or_else(|| anyhow::anyhow!("an event before its publish: {data}"))?;
        latencies.push(i64::try_from(arrived.duration_since(sent).as_micros()).unwrap_or(i64::MAX));
    }
    Ok(latencies)
}
