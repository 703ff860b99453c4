//! A store's catalog as the backend holds it and as a terminal holds it,
//! to compare the two.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use possync_backend::{SqliteStorage, Storage};
use possync_core::LicenseKey;
use serde_json::Value;

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
    let held = terminal_catalog(&terminal.db());
    assert_eq!(
        held.products.len(),
        catalog.products.len(),
        "{who}: number of products"
    );
    assert_eq!(held.products, catalog.products, "{who}: products");
    assert_eq!(held.categories, catalog.categories, "{who}: categories");
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
