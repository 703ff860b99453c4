//! The baseline: a minimal consumer written directly on lapin that does the
//! same SQLite writes as possync's price handler, in batched transactions
//! with the same durability, acknowledging after the commit.

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use possync_core::LicenseKey;
use serde::Deserialize;
use tokio::sync::watch;

use crate::workload::{EXCHANGE, now_micros};

#[derive(Deserialize)]
struct Envelope {
    license_key: String,
    payload: Payload,
}

#[derive(Deserialize)]
struct Payload {
    product_id: String,
    new_price: f64,
    sent_at_us: i64,
}

/// How a baseline consumer's queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaselineQueue {
    Classic,
    Quorum,
    Transient,
}

/// Declares and binds a baseline queue for `license`.
pub(crate) async fn declare(
    connection: &Connection,
    queue: &str,
    license: &LicenseKey,
    kind: BaselineQueue,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    let options = match kind {
        BaselineQueue::Classic => QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        BaselineQueue::Quorum => {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            }
        }
        BaselineQueue::Transient => QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
    };
    channel.queue_declare(queue.into(), options, args).await?;
    channel
        .queue_bind(
            queue.into(),
            EXCHANGE.into(),
            format!("license.{license}.#").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if kind != BaselineQueue::Transient {
        let _ = channel.close(200, "done".into()).await;
    }
    Ok(())
}

/// A running baseline consumer; `applied` counts committed and acked messages.
pub(crate) struct Baseline {
    pub(crate) applied: watch::Receiver<u64>,
    pub(crate) latencies_us: Arc<Mutex<Vec<i64>>>,
    pub(crate) task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts consuming `queue` on `connection` into the database at `path`.
pub(crate) async fn start(
    connection: &Connection,
    queue: &str,
    license: &LicenseKey,
    path: &Path,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Baseline> {
    let batch_size = possync_core::Config::default().terminal.batch_size;
    let (channel, mut consumer) = consume(connection, queue).await?;
    let mut db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS products (id TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL DEFAULT '',
         price REAL NOT NULL DEFAULT 0, category_id TEXT, icon_name TEXT, updated_at TEXT, sync_version INTEGER NOT NULL DEFAULT 0)",
    )?;
    let (applied_tx, applied) = watch::channel(0u64);
    let latencies_us = Arc::new(Mutex::new(Vec::new()));
    let latencies = Arc::clone(&latencies_us);
    let license = license.to_string();
    let mut stop = stop;
    let task = tokio::spawn(async move {
        let mut total = 0u64;
        loop {
            let first = tokio::select! {
                next = consumer.next() => next,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first?];
            while batch.len() < batch_size {
                match consumer.next().now_or_never() {
                    Some(Some(delivery)) => batch.push(delivery?),
                    _ => break,
                }
            }
            let mut sent = Vec::with_capacity(batch.len());
            {
                let tx = db.transaction()?;
                {
                    let mut upsert = tx.prepare_cached(
                        "INSERT INTO products (id, name, price, updated_at) VALUES (?1, '', ?2, ?3)
                         ON CONFLICT (id) DO UPDATE SET price = excluded.price, updated_at = excluded.updated_at",
                    )?;
                    for delivery in &batch {
                        let Ok(envelope) = serde_json::from_slice::<Envelope>(&delivery.data)
                        else {
                            continue;
                        };
                        if envelope.license_key != license {
                            continue;
                        }
                        upsert.execute(rusqlite::params![
                            envelope.payload.product_id,
                            envelope.payload.new_price,
                            "2025-11-27T10:30:00Z"
                        ])?;
                        sent.push(envelope.payload.sent_at_us);
                    }
                }
                tx.commit()?;
            }
            if let Some(last) = batch.last() {
                channel
                    .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
            }
            let done = now_micros();
            if let Ok(mut all) = latencies.lock() {
                all.extend(sent.iter().map(|s| done - s));
            }
            total += batch.len() as u64;
            let _ = applied_tx.send(total);
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    });
    Ok(Baseline {
        applied,
        latencies_us,
        task,
    })
}

/// Receives `count` messages from `queue` and acknowledges them, as a
/// terminal would with its default prefetch and batch size, applying
/// nothing: how fast the broker alone delivers a backlog, the floor under
/// any consumer's drain.
pub(crate) async fn receive_only(
    connection: &Connection,
    queue: &str,
    count: usize,
) -> anyhow::Result<()> {
    let batch_size = possync_core::Config::default().terminal.batch_size;
    let (channel, mut consumer) = consume(connection, queue).await?;
    let mut received = 0;
    while received < count {
        let Some(delivery) = consumer.next().await else {
            anyhow::bail!("the consumer ended after {received} of {count} messages");
        };
        let delivery = delivery?;
        received += 1;
        if received % batch_size == 0 || received == count {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Consumes `queue` with a possync terminal's default prefetch.
async fn consume(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<(lapin::Channel, lapin::Consumer)> {
    let prefetch = possync_core::Config::default().terminal.prefetch;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}
