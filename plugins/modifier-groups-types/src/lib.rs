//! The payloads of `modifier_group_update` and `modifier_group_delete`.
//!
//! A modifier group is a choice offered with products ("Milk": oat, soy,
//! lactose-free), with how many of its modifiers the cashier must and may
//! pick. An update replaces the group, its modifiers and the products it
//! applies to as a whole.

use possync_sdk::WireMessage;
use serde::{Deserialize, Serialize};

/// One option of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Modifier {
    /// Unique across all groups.
    #[serde(deserialize_with = "possync_catalog::id")]
    pub modifier_id: String,
    /// What the POS shows.
    pub name: String,
    /// Added to the product's price when chosen (may be negative or zero).
    pub price_delta: f64,
}

/// `modifier_group_update`: creates or replaces a group as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModifierGroupUpdate {
    /// The group's id.
    #[serde(deserialize_with = "possync_catalog::id")]
    pub group_id: String,
    /// What the POS shows.
    pub group_name: String,
    /// Fewest modifiers the cashier must pick.
    pub min_select: u32,
    /// Most modifiers the cashier may pick.
    pub max_select: u32,
    /// The group's modifiers; replaces the previous list.
    #[serde(default)]
    pub modifiers: Vec<Modifier>,
    /// The products the group applies to; replaces the previous list.
    #[serde(default)]
    pub product_ids: Vec<String>,
}

impl WireMessage for ModifierGroupUpdate {
    const TYPE: &'static str = "modifier_group_update";
}

/// `modifier_group_delete`: removes a group, its modifiers and its links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModifierGroupDelete {
    /// The group's id.
    #[serde(deserialize_with = "possync_catalog::id")]
    pub group_id: String,
}

impl WireMessage for ModifierGroupDelete {
    const TYPE: &'static str = "modifier_group_delete";
}
