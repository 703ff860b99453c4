//! The catalog tables the POS app reads, shared by the built-in handlers.
//!
//! `products(id, name, price, category_id, icon_name, ...)` and
//! `categories(id, name, icon_name, ...)` are a contract with the POS app:
//! their names and meaning do not change. Besides them, each row keeps the
//! version of the change that wrote it, and deleted rows leave a tombstone,
//! so that a late or redelivered update never undoes a newer change.

use possync_sdk::{Envelope, HandlerError, Migration, Store, StoreError, Value, Version};
use serde::{Deserialize, Deserializer};

/// The catalog schema, listed by every built-in handler (it runs once).
pub const MIGRATIONS: &[Migration] = &[Migration::new(
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
)];

/// A catalog table whose rows are versioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// `products`
    Product,
    /// `categories`
    Category,
}

impl Entity {
    fn table(self) -> &'static str {
        match self {
            Self::Product => "products",
            Self::Category => "categories",
        }
    }

    fn version_query(self) -> &'static str {
        match self {
            Self::Product => "SELECT sync_version FROM products WHERE id = ?1",
            Self::Category => "SELECT sync_version FROM categories WHERE id = ?1",
        }
    }
}

/// What to do with a change to one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Older than what the database holds: change nothing.
    Stale,
    /// Apply it. `revives` says a tombstone must go (the entity was deleted
    /// before this newer change).
    Apply {
        /// Whether a tombstone of the entity exists.
        revives: bool,
    },
}

/// Whether a change at `order` to entity `id` is newer than what the
/// database holds (the row, or the tombstone of its deletion).
///
/// A message without any order applies, as it did in the original system.
pub fn decide(
    store: &mut dyn Store,
    entity: Entity,
    id: &str,
    order: Option<Version>,
) -> Result<Decision, StoreError> {
    if let Some(row) = store.query_row(entity.version_query(), &[id.into()])? {
        // An existing row has no tombstone: deletes remove the row.
        return Ok(match order {
            Some(order) if !order.supersedes(first_i64(&row)) => {
                store.stale(id, order, first_i64(&row));
                Decision::Stale
            }
            _ => Decision::Apply { revives: false },
        });
    }
    let tombstone = store.query_row(
        "SELECT sync_version FROM catalog_tombstones WHERE entity = ?1 AND id = ?2",
        &[entity.table().into(), id.into()],
    )?;
    Ok(match (tombstone, order) {
        (None, _) => Decision::Apply { revives: false },
        (Some(_), None) => Decision::Apply { revives: true },
        (Some(row), Some(order)) if order.supersedes(first_i64(&row)) => {
            Decision::Apply { revives: true }
        }
        (Some(row), Some(order)) => {
            store.stale(id, order, first_i64(&row));
            Decision::Stale
        }
    })
}

/// Whether a change at `order` to entity `id` is newer than what the
/// database holds; see [`decide`].
pub fn is_newer(
    store: &mut dyn Store,
    entity: Entity,
    id: &str,
    order: Option<Version>,
) -> Result<bool, StoreError> {
    Ok(decide(store, entity, id, order)? != Decision::Stale)
}

/// Deletes entity `id` and records a tombstone at `order`, so updates older
/// than the delete cannot bring it back. Returns whether a row was deleted.
pub fn delete(
    store: &mut dyn Store,
    entity: Entity,
    id: &str,
    order: Option<Version>,
) -> Result<bool, StoreError> {
    let deleted = match entity {
        Entity::Product => store.execute("DELETE FROM products WHERE id = ?1", &[id.into()])?,
        Entity::Category => store.execute("DELETE FROM categories WHERE id = ?1", &[id.into()])?,
    };
    store.execute(
        "INSERT INTO catalog_tombstones (entity, id, sync_version) VALUES (?1, ?2, ?3)
         ON CONFLICT (entity, id) DO UPDATE SET sync_version = max(sync_version, excluded.sync_version)",
        &[entity.table().into(), id.into(), version_value(order)],
    )?;
    Ok(deleted > 0)
}

/// Clears the tombstone of an entity that a newer update brings back, if
/// `decision` says it has one.
pub fn clear_tombstone(
    store: &mut dyn Store,
    entity: Entity,
    id: &str,
    decision: Decision,
) -> Result<(), StoreError> {
    if decision != (Decision::Apply { revives: true }) {
        return Ok(());
    }
    store.execute(
        "DELETE FROM catalog_tombstones WHERE entity = ?1 AND id = ?2",
        &[entity.table().into(), id.into()],
    )?;
    Ok(())
}

/// The value to store in `sync_version` for a change at `order`.
pub fn version_value(order: Option<Version>) -> Value {
    Version::column(order)
}

/// Rejects an empty identifier, which no POS row can be found by.
pub fn require_id(field: &str, id: &str) -> Result<(), HandlerError> {
    if id.trim().is_empty() {
        return Err(HandlerError::permanent(format!(
            "{field} must not be empty"
        )));
    }
    Ok(())
}

/// Rejects a price that is not a finite number.
pub fn require_price(field: &str, price: f64) -> Result<(), HandlerError> {
    if !price.is_finite() {
        return Err(HandlerError::permanent(format!(
            "{field} must be a finite number"
        )));
    }
    Ok(())
}

/// The timestamp the envelope carries, for the `updated_at` column.
pub fn updated_at(envelope: &Envelope) -> Value {
    envelope.timestamp.as_deref().into()
}

fn first_i64(row: &[Value]) -> i64 {
    row.first().and_then(Value::as_i64).unwrap_or(0)
}

/// Deserializes an identifier sent as a JSON string or integer: back
/// offices differ, and both mean the same row.
pub fn id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_any(IdVisitor)
}

/// Reads an identifier where it stands, without buffering the value first.
struct IdVisitor;

impl serde::de::Visitor<'_> for IdVisitor {
    type Value = String;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an identifier: a string or an integer")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<String, E> {
        Ok(number.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<String, E> {
        Ok(number.to_string())
    }
}

/// Like [`id`], for an optional field.
pub fn optional_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrapped(#[serde(deserialize_with = "id")] String);
    Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(id)| id))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Row {
        #[serde(deserialize_with = "super::id")]
        id: String,
        #[serde(default, deserialize_with = "super::optional_id")]
        parent: Option<String>,
    }

    fn row(json: &str) -> Result<Row, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn an_identifier_may_be_a_string_or_an_integer() {
        assert_eq!(row(r#"{"id":"PROD-1"}"#).expect("string").id, "PROD-1");
        assert_eq!(row(r#"{"id":42}"#).expect("integer").id, "42");
        assert_eq!(row(r#"{"id":-7}"#).expect("negative").id, "-7");
        let with_parent = row(r#"{"id":"A","parent":9}"#).expect("optional integer");
        assert_eq!(with_parent.parent.as_deref(), Some("9"));
        assert_eq!(
            row(r#"{"id":"A","parent":null}"#).expect("null").parent,
            None
        );
    }

    #[test]
    fn any_other_identifier_is_refused_with_what_was_expected() {
        let err = row(r#"{"id":1.5}"#).expect_err("a float is no identifier");
        assert!(
            err.to_string().contains("a string or an integer"),
            "unexpected message: {err}"
        );
    }
}
