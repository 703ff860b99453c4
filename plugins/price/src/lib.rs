//! `price_update`: sets a product's price, creating the product if the
//! terminal does not have it yet.

use possync_catalog::{Decision, Entity, MIGRATIONS};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Store, WireMessage, async_trait,
};
use serde::{Deserialize, Serialize};

/// Applies `price_update` messages to `products`.
#[derive(Debug, Default)]
pub struct PriceHandler;

/// The payload of `price_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceUpdate {
    #[serde(deserialize_with = "possync_catalog::id")]
    pub product_id: String,
    pub new_price: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
}

impl WireMessage for PriceUpdate {
    const TYPE: &'static str = "price_update";
}

#[async_trait]
impl MessageHandler for PriceHandler {
    fn name(&self) -> &str {
        "price"
    }

    fn message_types(&self) -> &[&str] {
        &[PriceUpdate::TYPE]
    }

    fn description(&self) -> &str {
        "sets a product's price (creates the product if it is new)"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let update: PriceUpdate = envelope.payload_as()?;
        possync_catalog::require_id("product_id", &update.product_id)?;
        possync_catalog::require_price("new_price", update.new_price)?;
        let order = envelope.order();
        // Most price updates change a product the terminal has, with a newer
        // version: one statement. A new, stale or deleted product takes the
        // full path below (an existing row never has a tombstone).
        let updated = store.execute(
            "UPDATE products SET
                 name = coalesce(?2, name),
                 price = ?3,
                 updated_at = ?4,
                 sync_version = ?5
             WHERE id = ?1
               AND (?6 OR sync_version < ?5 OR (?7 AND sync_version = ?5))",
            &[
                update.product_id.as_str().into(),
                update.product_name.clone().into(),
                update.new_price.into(),
                possync_catalog::updated_at(envelope),
                possync_catalog::version_value(order),
                order.is_none().into(),
                order.is_some_and(|o| !o.exact).into(),
            ],
        )?;
        if updated > 0 {
            return Ok(());
        }
        let decision = possync_catalog::decide(store, Entity::Product, &update.product_id, order)?;
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
                possync_catalog::updated_at(envelope),
                possync_catalog::version_value(order),
            ],
        )?;
        possync_catalog::clear_tombstone(store, Entity::Product, &update.product_id, decision)?;
        Ok(())
    }
}

possync_sdk::register_handler!(PriceHandler::default);
