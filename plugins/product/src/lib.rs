//! `product_update`: creates or replaces a product.

use possync_catalog::{Decision, Entity, MIGRATIONS};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Store, WireMessage, async_trait,
};
use serde::{Deserialize, Serialize};

/// Applies `product_update` messages to `products`.
#[derive(Debug, Default)]
pub struct ProductHandler;

/// The payload of `product_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductUpdate {
    #[serde(deserialize_with = "possync_catalog::id")]
    pub product_id: String,
    pub product_name: String,
    pub price: f64,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "possync_catalog::optional_id"
    )]
    pub category_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_name: Option<String>,
}

impl WireMessage for ProductUpdate {
    const TYPE: &'static str = "product_update";
}

#[async_trait]
impl MessageHandler for ProductHandler {
    fn name(&self) -> &str {
        "product"
    }

    fn message_types(&self) -> &[&str] {
        &[ProductUpdate::TYPE]
    }

    fn description(&self) -> &str {
        "creates or replaces a product"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let update: ProductUpdate = envelope.payload_as()?;
        possync_catalog::require_id("product_id", &update.product_id)?;
        possync_catalog::require_price("price", update.price)?;
        let order = envelope.order();
        let decision = possync_catalog::decide(store, Entity::Product, &update.product_id, order)?;
        if decision == Decision::Stale {
            return Ok(());
        }
        store.execute(
            "INSERT INTO products (id, name, price, category_id, icon_name, updated_at, sync_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET
                 name = excluded.name,
                 price = excluded.price,
                 category_id = excluded.category_id,
                 icon_name = excluded.icon_name,
                 updated_at = excluded.updated_at,
                 sync_version = excluded.sync_version",
            &[
                update.product_id.as_str().into(),
                update.product_name.into(),
                update.price.into(),
                update.category_id.into(),
                update.icon_name.into(),
                possync_catalog::updated_at(envelope),
                possync_catalog::version_value(order),
            ],
        )?;
        possync_catalog::clear_tombstone(store, Entity::Product, &update.product_id, decision)?;
        Ok(())
    }
}

possync_sdk::register_handler!(ProductHandler::default);
