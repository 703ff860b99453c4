//! `price_update`: sets a product's price, creating the product if the
//! terminal does not have it yet.

use possync_sdk::{Context, Decision, HandlerError, Payload, Plugin, Settings, Store, Version};
use serde::{Deserialize, Serialize};

use crate::tables::{self, MIGRATIONS, PRODUCTS};

/// The payload of `price_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "product", "id": "product_id", "change": "merge", "fields": {"new_price": "price"}}))]
pub struct PriceUpdate {
    /// The product's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
    /// The new price.
    #[schemars(range(min = 0), extend("x-possync-aliases" = ["price"]))]
    pub new_price: f64,
    /// The product's name, if it changes too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
}

impl Payload for PriceUpdate {
    const TYPE: &'static str = "price_update";

    fn validate(&self) -> Result<(), String> {
        tables::non_empty("product_id", &self.product_id)?;
        tables::finite("new_price", self.new_price)
    }
}

/// The `price` plugin.
pub fn price_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("price")
        .describe("sets a product's price (creates the product if it is new)")
        .migrations(MIGRATIONS)
        .export(
            tables::PRODUCT_EXPORT.0,
            tables::PRODUCT_EXPORT.1,
            tables::PRODUCT_EXPORT.2,
        )
        .on::<PriceUpdate>(apply_price))
}

/// Applies a `price_update` to `products`.
pub fn apply_price(
    update: PriceUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let order = message.order();
    // Most price updates change a product the terminal has, with a newer
    // version: one statement. A new, stale or deleted product takes the
    // full path below (an existing row never has a tombstone). A change
    // without an order applies here unless a sequenced change wrote the row.
    let updated = store.execute(
        "UPDATE products SET
             name = coalesce(?2, name),
             price = ?3,
             updated_at = ?4,
             sync_version = ?5
         WHERE id = ?1
           AND ((?6 AND sync_version <= ?8) OR sync_version < ?5 OR (?7 AND sync_version = ?5))",
        &[
            update.product_id.as_str().into(),
            update.product_name.clone().into(),
            update.new_price.into(),
            tables::updated_at(message),
            Version::column(order),
            order.is_none().into(),
            order.is_some_and(|o| !o.exact).into(),
            Version::SEQUENCED.into(),
        ],
    )?;
    if updated > 0 {
        return Ok(());
    }
    let decision = PRODUCTS.decide(store, &update.product_id, order)?;
    if decision == Decision::Stale {
        return Ok(());
    }
    store.execute(
        "INSERT INTO products (id, name, price, updated_at, sync_version)
         VALUES (?1, coalesce(?2, ''), ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET
             name = coalesce(?2, name),
             price = excluded.price,
             updated_at = excluded.updated_at,
             sync_version = excluded.sync_version",
        &[
            update.product_id.as_str().into(),
            update.product_name.into(),
            update.new_price.into(),
            tables::updated_at(message),
            Version::column(order),
        ],
    )?;
    PRODUCTS.revive(store, &update.product_id, decision)?;
    Ok(())
}
