//! Modifier-group sync, loaded by possync from a path in config:
//!
//! ```toml
//! [plugins.modifier_groups]
//! path = "target/release/libpossync_plugin_modifier_groups.so"
//! ```
//!
//! Tables: `modifier_groups(id, name, min_select, max_select)`,
//! `modifiers(id, group_id, name, price_delta)`,
//! `product_modifier_groups(product_id, group_id)`.

use possync_modifier_groups_types::{ModifierGroupDelete, ModifierGroupUpdate};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Registrar, Store, Value, Version,
    WireMessage, async_trait,
};

const MIGRATIONS: &[Migration] = &[Migration::new(
    "modifier_groups/1",
    "CREATE TABLE IF NOT EXISTS modifier_groups (
        id           TEXT PRIMARY KEY NOT NULL,
        name         TEXT NOT NULL,
        min_select   INTEGER NOT NULL,
        max_select   INTEGER NOT NULL,
        sync_version INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS modifiers (
        id          TEXT PRIMARY KEY NOT NULL,
        group_id    TEXT NOT NULL REFERENCES modifier_groups (id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        price_delta REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS modifiers_group ON modifiers (group_id);
    CREATE TABLE IF NOT EXISTS product_modifier_groups (
        product_id TEXT NOT NULL,
        group_id   TEXT NOT NULL REFERENCES modifier_groups (id) ON DELETE CASCADE,
        PRIMARY KEY (product_id, group_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS product_modifier_groups_group ON product_modifier_groups (group_id);
    CREATE TABLE IF NOT EXISTS modifier_group_tombstones (
        id           TEXT PRIMARY KEY NOT NULL,
        sync_version INTEGER NOT NULL
    ) WITHOUT ROWID;",
)];

/// Applies modifier-group messages.
#[derive(Debug, Default)]
pub struct ModifierGroupsHandler;

#[async_trait]
impl MessageHandler for ModifierGroupsHandler {
    fn name(&self) -> &str {
        "modifier_groups"
    }

    fn message_types(&self) -> &[&str] {
        &[ModifierGroupUpdate::TYPE, ModifierGroupDelete::TYPE]
    }

    fn description(&self) -> &str {
        "modifier groups, their modifiers and the products they apply to"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let order = envelope.order();
        if envelope.message_type == ModifierGroupDelete::TYPE {
            let delete: ModifierGroupDelete = envelope.payload_as()?;
            if possync_sdk::is_newer(store, VERSION_QUERIES, &delete.group_id, order)? {
                remove_group(store, &delete.group_id)?;
                store.execute(
                    "INSERT INTO modifier_group_tombstones (id, sync_version) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET sync_version = max(sync_version, excluded.sync_version)",
                    &[delete.group_id.into(), Version::column(order)],
                )?;
            }
            return Ok(());
        }
        let update: ModifierGroupUpdate = envelope.payload_as()?;
        check(&update)?;
        if !possync_sdk::is_newer(store, VERSION_QUERIES, &update.group_id, order)? {
            return Ok(());
        }
        for modifier in &update.modifiers {
            let owner = store.query_row(
                "SELECT group_id FROM modifiers WHERE id = ?1",
                &[modifier.modifier_id.as_str().into()],
            )?;
            if let Some(Value::Text(other)) = owner.and_then(|row| row.into_iter().next())
                && other != update.group_id
            {
                return Err(HandlerError::permanent(format!(
                    "modifier {} already belongs to group {other}; delete or update that group first",
                    modifier.modifier_id
                )));
            }
        }
        // The update replaces the group as a whole: old modifiers and links go.
        remove_group(store, &update.group_id)?;
        store.execute(
            "INSERT INTO modifier_groups (id, name, min_select, max_select, sync_version) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[
                update.group_id.as_str().into(),
                update.group_name.as_str().into(),
                i64::from(update.min_select).into(),
                i64::from(update.max_select).into(),
                Version::column(order),
            ],
        )?;
        for modifier in &update.modifiers {
            store.execute(
                "INSERT INTO modifiers (id, group_id, name, price_delta) VALUES (?1, ?2, ?3, ?4)",
                &[
                    modifier.modifier_id.as_str().into(),
                    update.group_id.as_str().into(),
                    modifier.name.as_str().into(),
                    modifier.price_delta.into(),
                ],
            )?;
        }
        for product_id in &update.product_ids {
            store.execute(
                "INSERT OR IGNORE INTO product_modifier_groups (product_id, group_id) VALUES (?1, ?2)",
                &[product_id.as_str().into(), update.group_id.as_str().into()],
            )?;
        }
        store.execute(
            "DELETE FROM modifier_group_tombstones WHERE id = ?1",
            &[update.group_id.into()],
        )?;
        Ok(())
    }
}

fn check(update: &ModifierGroupUpdate) -> Result<(), HandlerError> {
    if update.group_id.trim().is_empty() {
        return Err(HandlerError::permanent("group_id must not be empty"));
    }
    if update.min_select > update.max_select {
        return Err(HandlerError::permanent(format!(
            "min_select {} is more than max_select {}",
            update.min_select, update.max_select
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for modifier in &update.modifiers {
        if modifier.modifier_id.trim().is_empty() {
            return Err(HandlerError::permanent("a modifier_id is empty"));
        }
        if !seen.insert(modifier.modifier_id.as_str()) {
            return Err(HandlerError::permanent(format!(
                "modifier {} appears twice",
                modifier.modifier_id
            )));
        }
        if !modifier.price_delta.is_finite() {
            return Err(HandlerError::permanent(format!(
                "modifier {}: price_delta is not a number",
                modifier.modifier_id
            )));
        }
    }
    Ok(())
}

fn remove_group(store: &mut dyn Store, group_id: &str) -> Result<(), HandlerError> {
    store.execute(
        "DELETE FROM modifiers WHERE group_id = ?1",
        &[group_id.into()],
    )?;
    store.execute(
        "DELETE FROM product_modifier_groups WHERE group_id = ?1",
        &[group_id.into()],
    )?;
    store.execute(
        "DELETE FROM modifier_groups WHERE id = ?1",
        &[group_id.into()],
    )?;
    Ok(())
}

/// Where a stored version is found: the row, then its tombstone.
const VERSION_QUERIES: &[&str] = &[
    "SELECT sync_version FROM modifier_groups WHERE id = ?1",
    "SELECT sync_version FROM modifier_group_tombstones WHERE id = ?1",
];

fn register(registrar: &mut Registrar) -> Result<(), String> {
    registrar.register(ModifierGroupsHandler);
    Ok(())
}

possync_sdk::declare_plugin!(register);
