//! `category_update`: creates or replaces a category.

use possync_catalog::{Decision, Entity, MIGRATIONS};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Store, WireMessage, async_trait,
};
use serde::{Deserialize, Serialize};

/// Applies `category_update` messages to `categories`.
#[derive(Debug, Default)]
pub struct CategoryHandler;

/// The payload of `category_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryUpdate {
    #[serde(deserialize_with = "possync_catalog::id")]
    pub category_id: String,
    pub category_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_name: Option<String>,
}

impl WireMessage for CategoryUpdate {
    const TYPE: &'static str = "category_update";
}

#[async_trait]
impl MessageHandler for CategoryHandler {
    fn name(&self) -> &str {
        "category"
    }

    fn message_types(&self) -> &[&str] {
        &[CategoryUpdate::TYPE]
    }

    fn description(&self) -> &str {
        "creates or replaces a category"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let update: CategoryUpdate = envelope.payload_as()?;
        possync_catalog::require_id("category_id", &update.category_id)?;
        let order = envelope.order();
        let decision =
            possync_catalog::decide(store, Entity::Category, &update.category_id, order)?;
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
                possync_catalog::updated_at(envelope),
                possync_catalog::version_value(order),
            ],
        )?;
        possync_catalog::clear_tombstone(store, Entity::Category, &update.category_id, decision)?;
        Ok(())
    }
}

possync_sdk::register_handler!(CategoryHandler::default);
