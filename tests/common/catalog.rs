//! A store's catalog as the backend holds it and as a terminal holds it,
//! to compare the two.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use possync_backend::{SqliteStorage, Storage};
use possync_core::LicenseKey;
use serde_json::{Value, json};

use super::backend::Backend;
use super::{RunningTerminal, WAIT, queue_counts};

/// The store's catalog, read from the backend's database.
pub trait BackendCatalog {
    async fn catalog(&self, store: &LicenseKey) -> Catalog;
}

impl BackendCatalog for Backend {
    async fn catalog(&self, store: &LicenseKey) -> Catalog {
        let storage = SqliteStorage::open(&self.database)
            .await
            .expect("open the backend's database");
        let entries = storage.catalog(store.as_str()).await.expect("the catalog");
        let mut catalog = Catalog::default();
        for entry in entries {
            let field = |name: &str| entry.state.get(name).and_then(Value::as_str);
            match entry.entity.as_str() {
                "product" => {
                    catalog.products.insert(
                        entry.id.clone(),
                        (
                            field("product_name").unwrap_or_default().to_owned(),
                            entry
                                .state
                                .get("price")
                                .and_then(Value::as_f64)
                                .unwrap_or(0.0),
                            field("category_id").map(str::to_owned),
                        ),
                    );
                }
                "category" => {
                    catalog.categories.insert(
                        entry.id.clone(),
                        field("category_name").unwrap_or_default().to_owned(),
                    );
                }
                _ => {}
            }
            catalog.seqs.insert(entry.id, entry.seq);
        }
        catalog
    }
}

/// A store's products and categories, as the catalog or a terminal holds them.
#[derive(Debug, Default, PartialEq)]
pub struct Catalog {
    /// id -> (name, price, category_id)
    pub products: BTreeMap<String, (String, f64, Option<String>)>,
    /// id -> name
    pub categories: BTreeMap<String, String>,
    /// id -> the seq that last wrote it (the catalog's only)
    pub seqs: BTreeMap<String, i64>,
}

/// What a terminal's database holds, in the catalog's terms.
pub fn terminal_catalog(db: &rusqlite::Connection) -> Catalog {
    let products = db
        .prepare("SELECT id, name, price, category_id FROM products")
        .expect("query")
        .query_map([], |row| {
            Ok((row.get(0)?, (row.get(1)?, row.get(2)?, row.get(3)?)))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("products");
    let categories = db
        .prepare("SELECT id, name FROM categories")
        .expect("query")
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("categories");
    Catalog {
        products,
        categories,
        seqs: BTreeMap::new(),
    }
}

/// Asserts a terminal holds exactly the catalog's products and categories.
pub fn assert_terminal_holds(terminal: &RunningTerminal, catalog: &Catalog, who: &str) {
    assert_database_holds(&terminal.db(), catalog, who);
}

/// Asserts a terminal's database holds `catalog`, row by row.
pub fn assert_database_holds(db: &rusqlite::Connection, catalog: &Catalog, who: &str) {
    let held = terminal_catalog(db);
    assert_eq!(
        held.products.len(),
        catalog.products.len(),
        "{who}: number of products"
    );
    assert_eq!(held.products, catalog.products, "{who}: products");
    assert_eq!(held.categories, catalog.categories, "{who}: categories");
}

/// Waits until `db` holds `catalog`, row by row; then asserts it does.
pub async fn wait_until_holds(db: &rusqlite::Connection, catalog: &Catalog, who: &str) {
    let deadline = Instant::now() + WAIT * 2;
    let holds =
        |held: Catalog| held.products == catalog.products && held.categories == catalog.categories;
    while Instant::now() < deadline && !holds(terminal_catalog(db)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_database_holds(db, catalog, who);
}

/// Waits until `till` is quiet at the store's `head`: synced up to it
/// without a gap, and nothing waiting in or taken from its queue (the
/// relay's duplicates included), its applied count then stable.
pub async fn wait_quiet(till: &mut RunningTerminal, head: i64, who: &str) {
    let deadline = Instant::now() + WAIT * 2;
    let queue = till.topology.queue.clone();
    let mut last = None;
    loop {
        let status = till.status.borrow().clone();
        let counts = queue_counts(&queue);
        let quiet = status.sync.synced_up_to == head
            && status.sync.highest_applied == head
            && counts.ready == 0
            && counts.unacknowledged == 0;
        let now = (status.applied, status.duplicates);
        if quiet && last == Some(now) {
            return;
        }
        last = quiet.then_some(now);
        assert!(
            Instant::now() < deadline,
            "{who} is not quiet at head {head}: sync {:?}, queue {counts:?}",
            status.sync
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backend that answers `store`'s snapshot requests, started.
pub async fn backend_for(label: &str, store: &LicenseKey) -> Backend {
    let mut backend = Backend::with_upstream_for(label, &[store]);
    start_answering(&mut backend).await;
    backend
}

/// Starts `backend` and waits until it reads its upstream and snapshot
/// queues.
pub async fn start_answering(backend: &mut Backend) {
    backend.start_upstream().await;
    backend
        .process
        .as_mut()
        .expect("started")
        .wait_for_logged("snapshots_live")
        .await;
}

/// Submits `changes` in requests of 500; returns how many.
pub async fn submit(backend: &Backend, changes: Vec<Value>, label: &str) -> i64 {
    let count = changes.len();
    for (i, batch) in changes.chunks(500).enumerate() {
        backend
            .api
            .submit_until_answered(batch.to_vec(), &format!("{label}-{i}"))
            .await;
    }
    i64::try_from(count).expect("few")
}

/// A year of a store's history: `products` products in 5 categories,
/// every fourth repriced, every tenth deleted.
pub fn history(store: &LicenseKey, products: usize) -> Vec<Value> {
    let change = |kind: &str, payload: Value| json!({"store": store.as_str(), "type": kind, "payload": payload});
    let mut changes: Vec<Value> = (0..5)
        .map(|c| {
            change(
                "category_update",
                json!({"category_id": format!("C{c}"), "category_name": format!("Category {c}")}),
            )
        })
        .collect();
    changes.extend((0..products).map(|i| {
        change(
            "product_update",
            json!({"product_id": format!("P{i}"), "product_name": format!("Product {i}"),
                "price": 1.0 + (i % 100) as f64, "category_id": format!("C{}", i % 5)}),
        )
    }));
    changes.extend((0..products).step_by(4).map(|i| {
        change(
            "price_update",
            json!({"product_id": format!("P{i}"), "new_price": 0.5 + (i % 70) as f64}),
        )
    }));
    changes.extend(
        (0..products)
            .step_by(10)
            .map(|i| change("product_delete", json!({"product_id": format!("P{i}")}))),
    );
    changes
}

/// `count` price changes of products that exist (a price change of a
/// deleted product would make it again in the backend's catalog only).
pub fn repricing(store: &LicenseKey, count: usize, products: usize, round: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            let product = match (i * 7 + round) % products {
                deleted if deleted % 10 == 0 => deleted + 1,
                kept => kept,
            };
            json!({"store": store.as_str(), "type": "price_update", "payload":
                {"product_id": format!("P{product}"), "new_price": (round * 1000 + i) as f64 / 100.0}})
        })
        .collect()
}
