//! Which entity a message changes, and how: declared by a plugin in its
//! payload's JSON Schema, read by the core without knowing any type.
//!
//! A payload schema may carry, at its root,
//!
//! ```json
//! "x-possync-entity": {"entity": "product", "id": "product_id",
//!                      "change": "merge", "fields": {"new_price": "price"}}
//! ```
//!
//! `entity` names the kind of row, `id` the payload field that identifies
//! it, `change` whether the payload replaces the entity's state, merges into
//! it (only the fields it carries change) or deletes it, and `fields`
//! renames payload fields to the entity's field names (so that a
//! `price_update`'s `new_price` and a `product_update`'s `price` are one
//! field; a renamed field wins over a payload field of its new name). Only
//! the fields the schema declares (`properties`) are part of the change: the
//! terminals' plugin reads those and no others. The backend keeps each
//! entity's state from these declarations;
//! a terminal uses them to skip changes a later one in the same batch
//! overwrites. A type without a declaration is still sequenced, published
//! and applied; it only has no state in the backend's catalog.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The schema keyword of the declaration.
pub const ENTITY_KEYWORD: &str = "x-possync-entity";

/// How a message type changes its entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityRule {
    /// The kind of entity, for example `product`.
    pub entity: String,
    /// The payload field holding the entity's id (a string or an integer).
    pub id: String,
    /// Replace, merge into, or delete the entity.
    pub change: ChangeKind,
    /// Payload field → entity field, for fields named differently.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// The payload fields the schema declares (its `properties`); `None`
    /// when it declares none: every field then counts.
    #[serde(skip)]
    pub properties: Option<BTreeSet<String>>,
}

/// What a message does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The payload is the entity's whole state.
    Replace,
    /// The payload's fields replace those fields of the state; the others
    /// stay. An entity that does not exist yet is created from them.
    Merge,
    /// The entity is gone.
    Delete,
}

/// One message's change to one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityChange {
    /// The kind of entity.
    pub entity: String,
    /// Its id.
    pub id: String,
    /// What happens to it.
    pub kind: ChangeKind,
    /// The payload's fields under their entity names (empty for a delete).
    /// A field that is `null` or absent is not part of the change.
    pub fields: Map<String, Value>,
}

/// A declaration that does not describe a payload of its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    /// The declaration itself is malformed.
    #[error("the {ENTITY_KEYWORD} declaration of {message_type} is invalid: {reason}")]
    Declaration {
        /// The message type.
        message_type: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A payload lacks the declared id, or is not an object.
    #[error("{0}")]
    Payload(String),
}

impl EntityRule {
    /// The rule a payload schema declares, if any.
    pub fn from_schema(message_type: &str, schema: &Value) -> Result<Option<Self>, EntityError> {
        let Some(declared) = schema.get(ENTITY_KEYWORD) else {
            return Ok(None);
        };
        let mut rule: Self =
            serde_json::from_value(declared.clone()).map_err(|err| EntityError::Declaration {
                message_type: message_type.to_owned(),
                reason: err.to_string(),
            })?;
        if rule.entity.is_empty() || rule.id.is_empty() {
            return Err(EntityError::Declaration {
                message_type: message_type.to_owned(),
                reason: "`entity` and `id` must not be empty".into(),
            });
        }
        rule.properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|properties| properties.keys().cloned().collect());
        Ok(Some(rule))
    }

    /// Whether `field` of a payload is part of its change: declared by the
    /// schema, when it declares its fields.
    fn declares(&self, field: &str) -> bool {
        self.properties
            .as_ref()
            .is_none_or(|properties| properties.contains(field))
    }

    /// The change a payload (JSON text) makes.
    pub fn change(&self, payload: &str) -> Result<EntityChange, EntityError> {
        let object: Map<String, Value> = serde_json::from_str(payload)
            .map_err(|err| EntityError::Payload(format!("the payload is not an object: {err}")))?;
        let Some(id) = object.get(&self.id).and_then(entity_id) else {
            return Err(EntityError::Payload(format!(
                "the payload has no {} (the {}'s id)",
                self.id, self.entity
            )));
        };
        let fields = match self.change {
            ChangeKind::Delete => Map::new(),
            ChangeKind::Replace | ChangeKind::Merge => {
                let mut fields = Map::new();
                let mut renamed = Vec::new();
                for (field, value) in object {
                    if value.is_null() || !self.declares(&field) {
                        continue;
                    }
                    match self.fields.get(&field) {
                        Some(name) => renamed.push((name.clone(), value)),
                        None => {
                            fields.insert(field, value);
                        }
                    }
                }
                // Last, so that a renamed field wins over a payload field
                // of its new name, which the terminals' plugin does not read
                // as that field.
                fields.extend(renamed);
                fields
            }
        };
        Ok(EntityChange {
            entity: self.entity.clone(),
            id,
            kind: self.change,
            fields,
        })
    }
}

/// What [`EntityChange::overwrites`] needs of a change and no more: its
/// id, kind and field names, read without decoding the field values (a
/// terminal collapsing a backlog reads this for every message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Footprint {
    /// The entity's id, as [`EntityRule::change`] spells it.
    pub(crate) id: String,
    pub(crate) kind: ChangeKind,
    /// The entity fields the change sets (not `null`), sorted.
    pub(crate) fields: Vec<String>,
}

impl Footprint {
    /// [`EntityChange::overwrites`] for two changes of the same entity.
    pub(crate) fn overwrites(&self, earlier: &Footprint) -> bool {
        self.id == earlier.id
            && leaves_nothing_of(self.kind, earlier.kind, || {
                earlier
                    .fields
                    .iter()
                    .all(|field| self.fields.binary_search(field).is_ok())
            })
    }
}

impl EntityRule {
    /// The entity's id in a payload (JSON text), as [`EntityRule::change`]
    /// spells it; `None` when the payload has none. Only the id is decoded.
    pub(crate) fn id_in<'p>(&self, payload: &'p str) -> Option<std::borrow::Cow<'p, str>> {
        crate::inbound::plain_member(payload, &self.id)
            .or_else(|| self.id_by_serde(payload).map(std::borrow::Cow::Owned))
    }

    /// [`EntityRule::id_in`] for any payload.
    fn id_by_serde(&self, payload: &str) -> Option<String> {
        struct IdOf<'r>(&'r str);
        impl<'de> serde::de::Visitor<'de> for IdOf<'_> {
            type Value = Option<String>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    // The first of the key's members, as read by hand.
                    if key == self.0 && id.is_none() {
                        id = entity_id(&map.next_value::<Value>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(id)
            }
        }
        let mut deserializer = serde_json::Deserializer::from_str(payload);
        serde::Deserializer::deserialize_map(&mut deserializer, IdOf(&self.id))
            .ok()
            .flatten()
    }

    /// The [`Footprint`] of a payload (JSON text).
    pub(crate) fn footprint(&self, payload: &str) -> Result<Footprint, EntityError> {
        let object: BTreeMap<String, &serde_json::value::RawValue> = serde_json::from_str(payload)
            .map_err(|err| EntityError::Payload(format!("the payload is not an object: {err}")))?;
        let id = object
            .get(&self.id)
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            .as_ref()
            .and_then(entity_id)
            .ok_or_else(|| {
                EntityError::Payload(format!(
                    "the payload has no {} (the {}'s id)",
                    self.id, self.entity
                ))
            })?;
        let mut fields: Vec<String> = match self.change {
            ChangeKind::Delete => Vec::new(),
            ChangeKind::Replace | ChangeKind::Merge => object
                .into_iter()
                .filter(|(field, raw)| raw.get() != "null" && self.declares(field))
                .map(|(field, _)| self.fields.get(&field).cloned().unwrap_or(field))
                .collect(),
        };
        fields.sort_unstable();
        fields.dedup();
        Ok(Footprint {
            id,
            kind: self.change,
            fields,
        })
    }
}

/// An entity's id as a payload gives it: a string that is not empty, or a
/// number in its JSON spelling.
fn entity_id(value: &Value) -> Option<String> {
    match value {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// Whether a change of kind `later` leaves nothing of an `earlier` one:
/// a replace or delete always, a merge when it sets every field the
/// earlier merge set (`covers_fields`).
fn leaves_nothing_of(
    later: ChangeKind,
    earlier: ChangeKind,
    covers_fields: impl FnOnce() -> bool,
) -> bool {
    match (later, earlier) {
        (ChangeKind::Replace | ChangeKind::Delete, _) => true,
        (ChangeKind::Merge, ChangeKind::Merge) => covers_fields(),
        (ChangeKind::Merge, _) => false,
    }
}

impl EntityChange {
    /// The entity's state after this change, from its state before
    /// (`None`: it does not exist). `None` after: it is deleted.
    pub fn apply(&self, before: Option<Map<String, Value>>) -> Option<Map<String, Value>> {
        match self.kind {
            ChangeKind::Delete => None,
            ChangeKind::Replace => Some(self.fields.clone()),
            ChangeKind::Merge => {
                let mut state = before.unwrap_or_default();
                for (field, value) in &self.fields {
                    state.insert(field.clone(), value.clone());
                }
                Some(state)
            }
        }
    }

    /// Whether this change, applied after `earlier`, leaves nothing of
    /// `earlier` behind: the same entity, and a replace or delete, or a
    /// merge of every field `earlier` merged.
    pub fn overwrites(&self, earlier: &EntityChange) -> bool {
        if self.entity != earlier.entity || self.id != earlier.id {
            return false;
        }
        leaves_nothing_of(self.kind, earlier.kind, || {
            earlier.fields.keys().all(|k| self.fields.contains_key(k))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(change: &str) -> EntityRule {
        let schema = json!({ ENTITY_KEYWORD: {
            "entity": "product", "id": "product_id", "change": change,
            "fields": {"new_price": "price"}
        }});
        EntityRule::from_schema("t", &schema)
            .expect("valid")
            .expect("declared")
    }

    #[test]
    fn a_schema_without_a_declaration_has_no_rule() {
        assert_eq!(
            EntityRule::from_schema("t", &json!({"type": "object"})),
            Ok(None)
        );
    }

    #[test]
    fn a_malformed_declaration_names_the_type() {
        let schema =
            json!({ ENTITY_KEYWORD: {"entity": "product", "id": "id", "change": "upsert"}});
        let err = EntityRule::from_schema("thing_update", &schema).expect_err("unknown change");
        assert!(err.to_string().contains("thing_update"), "{err}");
    }

    #[test]
    fn a_merge_renames_fields_and_keeps_the_others() {
        let change = rule("merge")
            .change(r#"{"product_id": 7, "new_price": 2.5, "product_name": null}"#)
            .expect("valid");
        assert_eq!(change.id, "7");
        let before = json!({"product_id": "7", "price": 1.0, "product_name": "Tea"});
        let after = change.apply(before.as_object().cloned()).expect("exists");
        assert_eq!(
            Value::Object(after),
            json!({"product_id": 7, "price": 2.5, "product_name": "Tea"})
        );
    }

    #[test]
    fn a_replace_drops_fields_it_does_not_carry_and_a_delete_removes() {
        let replace = rule("replace")
            .change(r#"{"product_id": "P", "price": 3}"#)
            .expect("valid");
        let before = json!({"product_id": "P", "price": 1, "icon_name": "cup"});
        assert_eq!(
            replace
                .apply(before.as_object().cloned())
                .map(Value::Object),
            Some(json!({"product_id": "P", "price": 3}))
        );
        let delete = rule("delete")
            .change(r#"{"product_id": "P"}"#)
            .expect("valid");
        assert_eq!(delete.apply(before.as_object().cloned()), None);
    }

    #[test]
    fn a_renamed_field_wins_over_a_payload_field_of_its_new_name() {
        let change = rule("merge")
            .change(r#"{"product_id": "P", "new_price": 5, "price": 999}"#)
            .expect("valid");
        assert_eq!(change.fields.get("price"), Some(&json!(5)));
    }

    #[test]
    fn only_the_fields_the_schema_declares_become_state() {
        let schema = json!({
            "type": "object",
            "properties": {"product_id": {}, "new_price": {}, "product_name": {}},
            ENTITY_KEYWORD: {
                "entity": "product", "id": "product_id", "change": "merge",
                "fields": {"new_price": "price"}
            }
        });
        let rule = EntityRule::from_schema("price_update", &schema)
            .expect("valid")
            .expect("declared");
        let payload = r#"{"product_id": "P", "new_price": 5, "price": 999, "colour": "red"}"#;
        let change = rule.change(payload).expect("valid");
        assert_eq!(
            Value::Object(change.fields),
            json!({"product_id": "P", "price": 5})
        );
        let footprint = rule.footprint(payload).expect("valid");
        assert_eq!(footprint.fields, ["price", "product_id"]);
    }

    #[test]
    fn a_payload_without_its_id_is_refused() {
        let err = rule("merge")
            .change(r#"{"new_price": 1}"#)
            .expect_err("no id");
        assert!(err.to_string().contains("product_id"), "{err}");
    }

    /// A payload's members in any order, the id among them or not, as
    /// any JSON text: plain, escaped, nested, a float, a number too large.
    fn any_payload() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just("null"),
            Just("true"),
            Just("1"),
            Just("-0"),
            Just("1.5"),
            Just("1e3"),
            Just("07"),
            Just("-12"),
            Just("18446744073709551615"),
            Just("9223372036854775807"),
            Just("\"x\""),
            Just("\"\""),
            Just("\"a\\\"b\""),
            Just("\"\\u0050\""),
            Just("[1,{\"a\":2}]"),
            Just("{\"product_id\":\"inner\"}"),
            Just(" \"spaced\" "),
        ];
        let key = prop_oneof![
            Just("product_id"),
            Just("price"),
            Just("product_i"),
            Just("product_id2"),
            Just("product\\u005fid"),
        ];
        proptest::collection::vec((key, value), 0..5).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            format!("{{ {} }}", members.join(" , "))
        })
    }

    #[test]
    fn what_plugins_send_has_its_id_read_by_hand() {
        for (payload, id) in [
            (r#"{"product_id":"P1","new_price":2}"#, "P1"),
            (
                r#"{"new_price":2.5,"product_name":"Tea","active":true,"product_id":7}"#,
                "7",
            ),
        ] {
            assert_eq!(
                crate::inbound::plain_member(payload, "product_id").as_deref(),
                Some(id)
            );
        }
        // A nested value before the id: serde reads it.
        let nested = r#"{"tags":["a"],"product_id":"P2"}"#;
        assert_eq!(crate::inbound::plain_member(nested, "product_id"), None);
        assert_eq!(rule("merge").id_in(nested).as_deref(), Some("P2"));
    }

    proptest::proptest! {
        /// Read by hand or by serde, a payload's id is the same.
        #[test]
        fn an_id_read_by_hand_is_the_id_serde_reads(payload in any_payload()) {
            let rule = rule("merge");
            // The feed names the entity the change changed (of an id named
            // twice, the first: see `plain_member`).
            let named = payload.matches("\"product_id\"").count() + payload.matches("product\\u005fid").count();
            if let (Ok(change), true) = (rule.change(&payload), named <= 1) {
                let id = rule.id_in(&payload);
                proptest::prop_assert_eq!(id.as_deref(), Some(change.id.as_str()), "{}", payload);
            }
            if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_ok() {
                let by_hand = crate::inbound::plain_member(&payload, "product_id");
                if by_hand.is_some() {
                    proptest::prop_assert_eq!(by_hand.map(|id| id.into_owned()), rule.id_by_serde(&payload), "{}", payload);
                }
            }
        }

        #[test]
        fn a_footprint_overwrites_exactly_when_its_change_does(
            earlier in payload(), later in payload(),
            earlier_kind in kind(), later_kind in kind(),
        ) {
            let earlier_rule = rule(earlier_kind);
            let later_rule = rule(later_kind);
            let (Ok(a), Ok(b)) = (earlier_rule.change(&earlier), later_rule.change(&later)) else {
                return Ok(());
            };
            let fa = earlier_rule.footprint(&earlier).expect("same payload");
            let fb = later_rule.footprint(&later).expect("same payload");
            proptest::prop_assert_eq!(&fa.id, &a.id);
            proptest::prop_assert_eq!(fb.overwrites(&fa), b.overwrites(&a));
        }
    }

    fn kind() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec!["merge", "replace", "delete"])
    }

    /// Payloads of one product, or another, with some of its fields, some null.
    fn payload() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let value = prop_oneof![Just("null"), Just("1"), Just("\"x\"")];
        (
            prop_oneof![Just(r#""P""#), Just("7"), Just(r#""7""#), Just(r#""""#)],
            proptest::collection::btree_map(
                proptest::sample::select(vec!["new_price", "price", "product_name", "icon_name"]),
                value,
                0..4,
            ),
        )
            .prop_map(|(id, fields)| {
                let mut text = format!(r#"{{"product_id":{id}"#);
                for (field, value) in fields {
                    text.push_str(&format!(r#","{field}":{value}"#));
                }
                text.push('}');
                text
            })
    }

    #[test]
    fn only_a_change_leaving_nothing_of_the_earlier_one_overwrites_it() {
        let merge = rule("merge");
        let price = merge
            .change(r#"{"product_id": "P", "new_price": 1}"#)
            .expect("valid");
        let price_and_name = merge
            .change(r#"{"product_id": "P", "new_price": 2, "product_name": "Tea"}"#)
            .expect("valid");
        let other = merge
            .change(r#"{"product_id": "Q", "new_price": 1}"#)
            .expect("valid");
        let replace = rule("replace")
            .change(r#"{"product_id": "P", "price": 1}"#)
            .expect("valid");
        assert!(price_and_name.overwrites(&price));
        assert!(!price.overwrites(&price_and_name));
        assert!(!other.overwrites(&price));
        assert!(replace.overwrites(&price_and_name));
        assert!(!price.overwrites(&replace));
    }
}
