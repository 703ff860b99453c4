//! `product_delete`: removes a product from `products`, leaving a tombstone
//! so that a late update does not bring it back.

use possync_catalog::{Entity, MIGRATIONS};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Store, WireMessage, async_trait,
};
use serde::{Deserialize, Serialize};

/// Applies `product_delete` messages to `products`.
#[derive(Debug, Default)]
pub struct ProductDeleteHandler;

/// The payload of `product_delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductDelete {
    #[serde(deserialize_with = "possync_catalog::id")]
    pub product_id: String,
}

impl WireMessage for ProductDelete {
    const TYPE: &'static str = "product_delete";
}

#[async_trait]
impl MessageHandler for ProductDeleteHandler {
    fn name(&self) -> &str {
        "product_delete"
    }

    fn message_types(&self) -> &[&str] {
        &[ProductDelete::TYPE]
    }

    fn description(&self) -> &str {
        "removes a product"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let delete: ProductDelete = envelope.payload_as()?;
        possync_catalog::require_id("product_id", &delete.product_id)?;
        let order = envelope.order();
        if !possync_catalog::is_newer(store, Entity::Product, &delete.product_id, order)? {
            return Ok(());
        }
        possync_catalog::delete(store, Entity::Product, &delete.product_id, order)?;
        Ok(())
    }
}

possync_sdk::register_handler!(ProductDeleteHandler::default);
