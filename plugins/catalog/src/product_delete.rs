//! `product_delete`: removes a product from `products`, leaving a tombstone
//! so that a late update does not bring it back.

use possync_sdk::{Context, HandlerError, Payload, Plugin, Settings, Store};
use serde::{Deserialize, Serialize};

use crate::tables::{self, MIGRATIONS, PRODUCTS};

/// The payload of `product_delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "product", "id": "product_id", "change": "delete"}))]
pub struct ProductDelete {
    /// The product's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
}

impl Payload for ProductDelete {
    const TYPE: &'static str = "product_delete";

    fn validate(&self) -> Result<(), String> {
        tables::non_empty("product_id", &self.product_id)
    }
}

/// The `product_delete` plugin.
pub fn product_delete_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("product_delete")
        .describe("removes a product")
        .migrations(MIGRATIONS)
        .export(
            tables::PRODUCT_EXPORT.0,
            tables::PRODUCT_EXPORT.1,
            tables::PRODUCT_EXPORT.2,
        )
        .on::<ProductDelete>(apply_product_delete))
}

/// Applies a `product_delete` to `products`.
pub fn apply_product_delete(
    delete: ProductDelete,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    if PRODUCTS.is_newer(store, &delete.product_id, message.order())? {
        PRODUCTS.delete(store, &delete.product_id, message.order())?;
    }
    Ok(())
}
