//! The payloads of `modifier_group_update` and `modifier_group_delete`.

use possync_sdk::Payload;
use serde::{Deserialize, Serialize};

/// One option of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Modifier {
    /// Unique across all groups (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub modifier_id: String,
    /// What the POS shows.
    pub name: String,
    /// Added to the product's price when chosen (may be negative or zero).
    pub price_delta: f64,
}

/// `modifier_group_update`: creates or replaces a group as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "modifier_group", "id": "group_id", "change": "replace"}))]
pub struct ModifierGroupUpdate {
    /// The group's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
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

impl Payload for ModifierGroupUpdate {
    const TYPE: &'static str = "modifier_group_update";

    fn validate(&self) -> Result<(), String> {
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        if self.min_select > self.max_select {
            return Err(format!(
                "min_select {} is more than max_select {}",
                self.min_select, self.max_select
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for modifier in &self.modifiers {
            if modifier.modifier_id.trim().is_empty() {
                return Err("a modifier_id is empty".into());
            }
            if !seen.insert(modifier.modifier_id.as_str()) {
                return Err(format!("modifier {} appears twice", modifier.modifier_id));
            }
            if !modifier.price_delta.is_finite() {
                return Err(format!(
                    "modifier {}: price_delta is not a number",
                    modifier.modifier_id
                ));
            }
        }
        Ok(())
    }
}

/// `modifier_group_delete`: removes a group, its modifiers and its links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "modifier_group", "id": "group_id", "change": "delete"}))]
pub struct ModifierGroupDelete {
    /// The group's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub group_id: String,
}

impl Payload for ModifierGroupDelete {
    const TYPE: &'static str = "modifier_group_delete";
}
