//! The plugin's tables and how its messages change them.

use possync_sdk::{
    Context, Decision, HandlerError, Migration, Store, TOMBSTONES, Value, Version, Versioned,
};

use crate::{ModifierGroupDelete, ModifierGroupUpdate};

/// The plugin's schema. Released migrations never change.
pub const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
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
    ),
    // Moves the tombstones into the SDK's table, where `Versioned` finds them.
    Migration::new(
        "modifier_groups/2",
        "INSERT INTO possync_tombstones (entity, id, sync_version)
            SELECT 'modifier_groups', id, sync_version FROM modifier_group_tombstones WHERE true
            ON CONFLICT (entity, id) DO UPDATE
                SET sync_version = max(sync_version, excluded.sync_version);
        DROP TABLE modifier_group_tombstones;",
    ),
];

const GROUPS: Versioned = Versioned::new("modifier_groups", "id");

/// Applies a `modifier_group_update`: the group, its modifiers and its
/// product links, replaced as a whole.
pub fn apply_update(
    update: ModifierGroupUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let order = message.order();
    let decision = GROUPS.decide(store, &update.group_id, order)?;
    if decision == Decision::Stale {
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
    GROUPS.revive(store, &update.group_id, decision)?;
    Ok(())
}

/// Applies a `modifier_group_delete`: the group goes with its modifiers and
/// links, and leaves a tombstone so that a late update does not bring it back.
pub fn apply_delete(
    delete: ModifierGroupDelete,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    if GROUPS.is_newer(store, &delete.group_id, message.order())? {
        remove_group(store, &delete.group_id)?;
        GROUPS.delete(store, &delete.group_id, message.order())?;
    }
    Ok(())
}

/// Removes a group's modifiers and product links, then the group's row.
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
