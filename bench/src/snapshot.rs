//! A new till converging from a snapshot: the backend holds a catalog of
//! products and categories; a terminal that never ran starts, asks for
//! the store's catalog and swaps it in. Timed from the terminal's start
//! until it is synced up to the store's head.

use std::path::Path;
use std::time::Duration;

use possync_core::{Delivery, LicenseKey, QueueType};
use serde_json::{Value, json};

use crate::backend::CpuUse;
use crate::upstream::{broker_alone, start_backend, stop_backend};
use crate::workload::{self, license};
use crate::{Stopwatch, Trial, possync_side, progress};

/// Categories in the catalog.
pub(crate) const CATEGORIES: usize = 12;

/// A product as back offices send it, as a submission to the backend.
pub(crate) fn product(store: &LicenseKey, i: usize) -> Value {
    json!({"store": store.as_str(), "type": "product_update", "payload": product_payload(i)})
}

/// A product's payload as back offices send it: a name of a few words, a
/// price, a category, an icon for one in four.
pub(crate) fn product_payload(i: usize) -> Value {
    let mut payload = json!({
        "product_id": format!("SKU-{i:07}"),
        "product_name": format!("Product {i} {} {}g", ["Bio", "Classic", "Family pack", "Light"][i % 4], 50 + i % 950),
        "price": 0.49 + (i % 5000) as f64 / 100.0,
        "category_id": format!("CAT-{:02}", i % CATEGORIES),
    });
    if i.is_multiple_of(4) {
        payload["icon_name"] = json!(format!("icon-{}", i % 300));
    }
    payload
}

pub(crate) fn category(store: &LicenseKey, i: usize) -> Value {
    json!({"store": store.as_str(), "type": "category_update",
        "payload": {"category_id": format!("CAT-{i:02}"), "category_name": format!("Category {i}")}})
}

/// One round; the note says where the time went.
pub(crate) async fn snapshot(
    url: &str,
    dir: &Path,
    products: usize,
) -> anyhow::Result<(Trial, String)> {
    let round_dir = tempfile::tempdir_in(dir)?;
    let dir = round_dir.path();
    let (backend, queue) = start_backend(url, &dir.join("backend")).await?;
    let key = license("snapshot");
    progress(&format!(
        "snapshot: {products} products and {CATEGORIES} categories into the backend's catalog"
    ));
    let changes: Vec<Value> = (0..CATEGORIES)
        .map(|i| category(&key, i))
        .chain((0..products).map(|i| product(&key, i)))
        .collect();
    let client = backend.client();
    for batch in changes.chunks(1_000) {
        client.submit(batch.to_vec()).await?;
    }
    backend.wait_relayed().await?;
    let head = i64::try_from(changes.len())?;

    progress("snapshot: a new till starts and converges");
    let config = possync_side::config(url, dir, &key, "t1", QueueType::Classic, Delivery::Durable);
    let database = config.terminal.database.clone();
    let cpu = CpuUse::start();
    let stopwatch = Stopwatch::start();
    let mut terminal = possync_side::start(config).await?;
    let live = stopwatch.started.elapsed();
    tokio::time::timeout(
        Duration::from_secs(300),
        terminal.status.wait_for(|s| s.sync.synced_up_to >= head),
    )
    .await??;
    let possync = stopwatch.stop();
    let cpu = cpu.per_change(products);
    let held: i64 = rusqlite::Connection::open(&database)?.query_row(
        "SELECT count(*) FROM products",
        [],
        |row| row.get(0),
    )?;
    anyhow::ensure!(
        usize::try_from(held)? == products,
        "the till holds {held} products, the catalog {products}"
    );
    let connection = workload::connect(url).await?;
    terminal.stop_and_delete(&connection).await?;
    stop_backend(url, backend, &queue).await?;

    progress(&format!(
        "snapshot: the broker alone, the same {} changes as messages, published with confirms and consumed",
        changes.len()
    ));
    let bodies: Vec<Vec<u8>> = changes
        .iter()
        .map(|change| {
            json!({"type": change["type"], "license_key": key.as_str(), "payload": change["payload"]})
                .to_string()
                .into_bytes()
        })
        .collect();
    let broker = broker_alone(url, connection, &format!("snapshot.{key}"), bodies).await?;
    let note = format!(
        "{:.2} s end to end ({:.0} products/s), live after {} ms · {cpu}",
        possync.elapsed.as_secs_f64(),
        products as f64 / possync.elapsed.as_secs_f64(),
        live.as_millis()
    );
    Ok((
        Trial {
            scenario: format!(
                "snapshot of {products} products and {CATEGORIES} categories to a new till, from its start until synced up to the head (baseline column: the broker alone moving the same changes as messages, published with confirms and consumed)"
            ),
            count: products,
            possync,
            baseline: broker,
            memory_kib: None,
        },
        note,
    ))
}
