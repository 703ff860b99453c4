//! The catalog's tables, shared by its four plugins, and the rules their
//! payloads share.

use possync_sdk::{Context, Migration, TOMBSTONES, Value, Versioned};

/// The catalog schema, listed by each of the four plugins (each id runs
/// once per database). Released migrations never change; a change of
/// schema is a new one.
pub const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
        "catalog/1",
        "CREATE TABLE IF NOT EXISTS categories (
            id           TEXT PRIMARY KEY NOT NULL,
            name         TEXT NOT NULL,
            icon_name    TEXT,
            updated_at   TEXT,
            sync_version INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS products (
            id           TEXT PRIMARY KEY NOT NULL,
            name         TEXT NOT NULL DEFAULT '',
            price        REAL NOT NULL DEFAULT 0,
            category_id  TEXT,
            icon_name    TEXT,
            updated_at   TEXT,
            sync_version INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX IF NOT EXISTS products_category ON products (category_id);
        CREATE TABLE IF NOT EXISTS catalog_tombstones (
            entity       TEXT NOT NULL,
            id           TEXT NOT NULL,
            sync_version INTEGER NOT NULL,
            PRIMARY KEY (entity, id)
        ) WITHOUT ROWID;",
    ),
    // Moves the tombstones into the SDK's table, where `Versioned` finds
    // them by the same entity names (`products`, `categories`).
    Migration::new(
        "catalog/2",
        "INSERT INTO possync_tombstones (entity, id, sync_version)
            SELECT entity, id, sync_version FROM catalog_tombstones WHERE true
            ON CONFLICT (entity, id) DO UPDATE
                SET sync_version = max(sync_version, excluded.sync_version);
        DROP TABLE catalog_tombstones;",
    ),
];

/// A product as the checksums see it: the fields `product_update` gives.
/// A product only ever priced has no name (`''`), which counts as none.
pub(crate) const PRODUCT_EXPORT: (&str, &[&str], &str) = (
    "product",
    &[
        "product_id",
        "product_name",
        "price",
        "category_id",
        "icon_name",
    ],
    "SELECT id, name, price, category_id, icon_name FROM products",
);

/// A category as the checksums see it.
pub(crate) const CATEGORY_EXPORT: (&str, &[&str], &str) = (
    "category",
    &["category_id", "category_name", "icon_name"],
    "SELECT id, name, icon_name FROM categories",
);

/// `products`, by `id`.
pub(crate) const PRODUCTS: Versioned = Versioned::new("products", "id");

/// `categories`, by `id`.
pub(crate) const CATEGORIES: Versioned = Versioned::new("categories", "id");

/// The message's timestamp, for the `updated_at` column.
pub(crate) fn updated_at(message: &Context<'_>) -> Value {
    message.timestamp().into()
}

/// Refuses an empty identifier, which no POS row can be found by.
pub(crate) fn non_empty(field: &str, id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    Ok(())
}

/// Refuses a price that is not a finite number.
pub(crate) fn finite(field: &str, price: f64) -> Result<(), String> {
    if !price.is_finite() {
        return Err(format!("{field} must be a finite number"));
    }
    Ok(())
}
