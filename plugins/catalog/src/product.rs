//! `product_update`: creates or replaces a product.

use possync_sdk::{Context, Decision, HandlerError, Payload, Plugin, Settings, Store, Version};
use serde::{Deserialize, Serialize};

use crate::tables::{self, MIGRATIONS, PRODUCTS};

/// The payload of `product_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "product", "id": "product_id", "change": "replace"}))]
pub struct ProductUpdate {
    /// The product's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
    /// What the POS shows.
    #[schemars(extend("x-possync-aliases" = ["name"]))]
    pub product_name: String,
    /// The price.
    #[schemars(range(min = 0))]
    pub price: f64,
    /// The product's category (a string, or an integer on the wire).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "possync_sdk::ids::optional_id"
    )]
    pub category_id: Option<String>,
    /// The icon the POS shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_name: Option<String>,
}

impl Payload for ProductUpdate {
    const TYPE: &'static str = "product_update";

    fn validate(&self) -> Result<(), String> {
        tables::non_empty("product_id", &self.product_id)?;
        tables::finite("price", self.price)
    }
}

/// The `product` plugin.
pub fn product_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("product")
        .describe("creates or replaces a product")
        .migrations(MIGRATIONS)
        .export(
            tables::PRODUCT_EXPORT.0,
            tables::PRODUCT_EXPORT.1,
            tables::PRODUCT_EXPORT.2,
        )
        .on::<ProductUpdate>(apply_product))
}

/// Applies a `product_update` to `products`.
pub fn apply_product(
    update: ProductUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let order = message.order();
    let decision = PRODUCTS.decide(store, &update.product_id, order)?;
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
            tables::updated_at(message),
            Version::column(order),
        ],
    )?;
    PRODUCTS.revive(store, &update.product_id, decision)?;
    Ok(())
}
