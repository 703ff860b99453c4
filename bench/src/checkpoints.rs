//! What the backend's checkpoints cost a terminal: the same backlog (a
//! store's catalog of products and categories, then repricing across it),
//! sequenced and relayed by a real backend, drained once with the relay's
//! checkpoints among the changes (one every 1,000) and once without,
//! alternately. With them the terminal compares its catalog's checksums
//! at each checkpoint it stands at, as rationed.

use std::path::Path;

use possync_core::{Delivery, LicenseKey, QueueType};
use serde_json::{Value, json};

use crate::backend::RunningBackend;
use crate::snapshot::{CATEGORIES, category, product};
use crate::workload::{self, license, shuffled};
use crate::{Stopwatch, Trial, possync_side, progress};

/// Changes between two checkpoints, the backend's default.
const EVERY: u64 = 1_000;

/// The backlog: the catalog, then `repricing` price changes, each product
/// picked at random and each price new.
fn backlog(store: &LicenseKey, products: usize, repricing: usize) -> Vec<Value> {
    let pick = shuffled(products);
    (0..CATEGORIES)
        .map(|i| category(store, i))
        .chain((0..products).map(|i| product(store, i)))
        .chain((0..repricing).map(|i| {
            json!({"store": store.as_str(), "type": "price_update", "payload":
                {"product_id": format!("SKU-{:07}", pick(i)), "new_price": 1.0 + i as f64 / 100.0}})
        }))
        .collect()
}

/// One round: drains with checkpoints (possync column) and without
/// (baseline column); the note says how many checkpoints the queue held.
pub(crate) async fn cost(
    url: &str,
    dir: &Path,
    products: usize,
    repricing: usize,
    round: usize,
) -> anyhow::Result<(Trial, String)> {
    let connection = workload::connect(url).await?;
    let mut took = [None, None];
    let mut checkpoints = 0;
    let mut count = 0;
    for turn in 0..2 {
        let on = (turn + round) % 2 == 1;
        let turn_dir = tempfile::tempdir_in(dir)?;
        let key = license("checkpoints");
        let mut config = possync_side::config(
            url,
            turn_dir.path(),
            &key,
            "t1",
            QueueType::Classic,
            Delivery::Durable,
        );
        // No backend answers snapshots here: the drain alone is measured.
        config.uplink.enabled = false;
        let declaring = possync_side::start(config.clone()).await?;
        let queue = declaring.queue.clone();
        declaring.stop().await?;
        let backend = RunningBackend::start_with(url, &turn_dir.path().join("backend"), |c| {
            c.relay.checkpoint_every_changes = if on { EVERY } else { 0 };
            c.relay.checkpoint_every_secs = 0;
        })
        .await?;
        let changes = backlog(&key, products, repricing);
        count = changes.len();
        progress(&format!(
            "checkpoints: {count} changes through the backend, checkpoints {}",
            if on { "on" } else { "off" }
        ));
        let client = backend.client();
        for batch in changes.chunks(500) {
            client.submit(batch.to_vec()).await?;
        }
        backend.wait_relayed().await?;
        backend.stop().await?;
        let queued = queued(&connection, &queue).await?;
        if on {
            checkpoints = queued.saturating_sub(count);
        }
        let stopwatch = Stopwatch::start();
        let mut terminal = possync_side::start(config).await?;
        terminal.wait_applied(count as u64).await?;
        took[usize::from(on)] = Some(stopwatch.stop());
        terminal.stop_and_delete(&connection).await?;
    }
    workload::close([connection]).await;
    let [Some(off), Some(on)] = took else {
        anyhow::bail!("a checkpoints drain did not run");
    };
    Ok((
        Trial {
            scenario: format!(
                "checkpoints cost: backlog drain of a {products}-product catalog and {repricing} price changes, relayed by the backend, with a checkpoint every {EVERY} changes (baseline column: the same without checkpoints)"
            ),
            count,
            possync: on,
            baseline: off,
            memory_kib: None,
        },
        format!("{checkpoints} checkpoints in the queue"),
    ))
}

/// Messages ready in `queue`.
async fn queued(connection: &lapin::Connection, queue: &str) -> anyhow::Result<usize> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "counted".into()).await;
    Ok(usize::try_from(declared.message_count())?)
}
