//! How many changes per second the backend's storage accepts, each batch
//! answered only once durable. Not a test: run it by hand, in release mode,
//!
//! ```sh
//! cargo run --release -p possync-backend --example storage_throughput -- [CHANGES] [BATCH...]
//! ```
//!
//! On a fresh SQLite file in a temporary folder (on the disk that holds the
//! system's temporary folder: set `TMPDIR` to measure another), and also on
//! PostgreSQL when `POSSYNC_BENCH_POSTGRES_URL` names an empty database of
//! its own. Every change sets the price of a product no earlier change
//! touched, across four stores, from one submitter, and moves its store's
//! product checksum.

use std::time::Instant;

use possync_backend::{NewChange, PostgresStorage, SqliteStorage, Storage};
use possync_core::{ChangeKind, ChecksumSpec, EntityChange};
use serde_json::json;

fn batch(first: usize, size: usize) -> Vec<NewChange> {
    (first..first + size)
        .map(|n| {
            let id = format!("P{n}");
            let fields = json!({ "price": n as f64 / 100.0 })
                .as_object()
                .cloned()
                .unwrap_or_default();
            NewChange {
                store: format!("STORE-{}", n % 4),
                message_type: "price_update".into(),
                payload: json!({ "product_id": id, "new_price": n as f64 / 100.0 }).to_string(),
                timestamp: "2025-11-27T10:30:00Z".into(),
                message_id: uuid::Uuid::now_v7().to_string(),
                entity: Some(EntityChange {
                    entity: "product".into(),
                    id,
                    kind: ChangeKind::Merge,
                    fields,
                }),
                clock: None,
            }
        })
        .collect()
}

/// Checksums of products, as the catalog plugin keeps them.
fn spec() -> ChecksumSpec {
    let fields = [
        "product_id",
        "product_name",
        "price",
        "category_id",
        "icon_name",
    ]
    .map(String::from);
    ChecksumSpec::new([("product", fields.as_slice())])
}

async fn measure<S: Storage>(name: &str, storage: &S, changes: usize, size: usize, offset: usize) {
    let spec = spec();
    storage
        .sync_checksums(&spec)
        .await
        .expect("the checksums are computed");
    let start = Instant::now();
    let mut done = 0;
    while done < changes {
        let size = size.min(changes - done);
        storage
            .submit(batch(offset + done, size), None, &spec)
            .await
            .expect("the batch is stored");
        done += size;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{name}: {changes} changes in batches of {size}: {seconds:.2} s, {:.0} changes/s",
        changes as f64 / seconds
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let changes: usize = args
        .next()
        .map(|n| n.parse().expect("CHANGES is a number"))
        .unwrap_or(50_000);
    let mut sizes: Vec<usize> = args
        .map(|n| n.parse().expect("BATCH is a number"))
        .collect();
    if sizes.is_empty() {
        sizes = vec![1, 100, 500];
    }
    let dir = tempfile::tempdir().expect("a temporary folder");
    let sqlite = SqliteStorage::open(dir.path().join("backend.db"))
        .await
        .expect("SQLite opens");
    let postgres = match std::env::var("POSSYNC_BENCH_POSTGRES_URL") {
        Ok(url) => Some(
            PostgresStorage::connect(&url)
                .await
                .expect("PostgreSQL connects"),
        ),
        Err(_) => None,
    };
    for (round, &size) in sizes.iter().enumerate() {
        // Batches of one are slow by design (one fsync each): fewer of them.
        let count = if size == 1 { changes / 50 } else { changes };
        let offset = round * changes;
        measure("sqlite", &sqlite, count, size, offset).await;
        if let Some(postgres) = &postgres {
            measure("postgres", postgres, count, size, offset).await;
        }
    }
}
