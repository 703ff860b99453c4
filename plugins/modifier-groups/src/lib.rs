//! Modifier-group sync: a dynamic plugin, and the payload types of its
//! messages.
//!
//! A modifier group is a choice offered with products ("Milk": oat, soy,
//! lactose-free), with how many of its modifiers the cashier must and may
//! pick. [`ModifierGroupUpdate`] replaces a group, its modifiers and the
//! products it applies to as a whole; [`ModifierGroupDelete`] removes them.
//!
//! Tables: `modifier_groups(id, name, min_select, max_select)`,
//! `modifiers(id, group_id, name, price_delta)`,
//! `product_modifier_groups(product_id, group_id)`.
//!
//! A terminal loads the library built with the `dynamic` feature:
//!
//! ```sh
//! cargo build --release -p possync-plugin-modifier-groups --features dynamic
//! ```
//!
//! ```toml
//! [plugins.modifier_groups]
//! path = "target/release/libpossync_plugin_modifier_groups.so"
//! ```
//!
//! A publisher depends on this crate without the feature, for the types.

mod apply;
mod payload;

pub use apply::{MIGRATIONS, apply_delete, apply_update};
pub use payload::{Modifier, ModifierGroupDelete, ModifierGroupUpdate};

use possync_sdk::{Plugin, Settings};

/// The `modifier_groups` plugin.
pub fn plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("modifier_groups")
        .describe("modifier groups, their modifiers and the products they apply to")
        .migrations(MIGRATIONS)
        .export(
            "modifier_group",
            &[
                "group_id",
                "group_name",
                "min_select",
                "max_select",
                "modifiers{modifier_id,name,price_delta}",
                "product_ids",
            ],
            "SELECT g.id, g.name, g.min_select, g.max_select,
                 (SELECT json_group_array(json_object('modifier_id', m.id, 'name', m.name,
                      'price_delta', m.price_delta))
                  FROM modifiers m WHERE m.group_id = g.id),
                 (SELECT json_group_array(p.product_id)
                  FROM product_modifier_groups p WHERE p.group_id = g.id)
             FROM modifier_groups g",
        )
        .on::<ModifierGroupUpdate>(apply_update)
        .on::<ModifierGroupDelete>(apply_delete))
}

#[cfg(feature = "dynamic")]
possync_sdk::export_plugin!(plugin);
