//! `category_update`: creates or replaces a category.

use possync_sdk::{Context, Decision, HandlerError, Payload, Plugin, Settings, Store, Version};
use serde::{Deserialize, Serialize};

use crate::tables::{self, CATEGORIES, MIGRATIONS};

/// The payload of `category_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "category", "id": "category_id", "change": "replace"}))]
pub struct CategoryUpdate {
    /// The category's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub category_id: String,
    /// What the POS shows.
    #[schemars(extend("x-possync-aliases" = ["name"]))]
    pub category_name: String,
    /// The icon the POS shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_name: Option<String>,
}

impl Payload for CategoryUpdate {
    const TYPE: &'static str = "category_update";

    fn validate(&self) -> Result<(), String> {
        tables::non_empty("category_id", &self.category_id)
    }
}

/// The `category` plugin.
pub fn category_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("category")
        .describe("creates or replaces a category")
        .migrations(MIGRATIONS)
        .export(
            tables::CATEGORY_EXPORT.0,
            tables::CATEGORY_EXPORT.1,
            tables::CATEGORY_EXPORT.2,
        )
        .on::<CategoryUpdate>(apply_category))
}

/// Applies a `category_update` to `categories`.
pub fn apply_category(
    update: CategoryUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let order = message.order();
    let decision = CATEGORIES.decide(store, &update.category_id, order)?;
    if decision == Decision::Stale {
        return Ok(());
    }
    store.execute(
        "INSERT INTO categories (id, name, icon_name, updated_at, sync_version)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET
             name = excluded.name,
             icon_name = excluded.icon_name,
             updated_at = excluded.updated_at,
             sync_version = excluded.sync_version",
        &[
            update.category_id.as_str().into(),
            update.category_name.into(),
            update.icon_name.into(),
            tables::updated_at(message),
            Version::column(order),
        ],
    )?;
    CATEGORIES.revive(store, &update.category_id, decision)?;
    Ok(())
}
