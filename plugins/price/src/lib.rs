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
