//! Checksums of a store's catalog, the same on the backend and on a
//! terminal: proof that a till holds what the catalog of record holds.
//!
//! A kind of entity's checksum is the wrapping sum of a digest per entity,
//! with the count of entities: the backend keeps it as changes are made
//! (take the old digest away, add the new one) at no cost worth counting,
//! and a terminal adds up the rows its plugin exports. A plugin says which
//! fields of an entity its tables hold ([`ChecksumSpec`]); only those are
//! digested, in a canonical form that both sides reach from their own
//! representation: a backend's JSON state, a terminal's SQLite columns.
//!
//! The canonical form drops what a table cannot tell apart from nothing
//! (`null`, `""`, `[]`, `{}`), writes every scalar as text (`3`, `3.0` and
//! `"3"` are one value: an id may be an integer on the wire and text in a
//! table), rounds floating-point numbers to 15 significant digits (what
//! SQLite's JSON functions write), reads text that holds a JSON array or
//! object as that JSON, and sorts arrays and drops repeats in them (a
//! table holds sets, not lists). A field named `name{a,b}` is an array of
//! objects (or one object) of which only the members `a` and `b` count: a
//! table keeps those of a nested list, a payload may carry more.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The envelope `type` of a checkpoint, on the store's own routing key
/// (`license.<KEY>.possync_checkpoint`). It carries no `seq`: it changes
/// nothing, it states what the catalog was at one.
pub const CHECKPOINT_TYPE: &str = "possync_checkpoint";

/// One kind of entity's checksum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// The wrapping sum of the entities' digests, as 16 hex digits.
    #[serde(with = "hex_u64")]
    pub sum: u64,
    /// How many entities.
    pub count: u64,
}

impl Checksum {
    /// Counts in an entity of this digest.
    pub fn add(&mut self, digest: u64) {
        self.sum = self.sum.wrapping_add(digest);
        self.count = self.count.wrapping_add(1);
    }

    /// Takes away an entity of this digest.
    pub fn remove(&mut self, digest: u64) {
        self.sum = self.sum.wrapping_sub(digest);
        self.count = self.count.wrapping_sub(1);
    }
}

/// Changes when [`digest`] computes otherwise, so that checksums kept
/// under an earlier way are computed again.
const DIGEST_VERSION: &str = "1";

/// A checkpoint's payload: the store's catalog at `seq`, kind by kind.
/// Fields a later version adds are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every change of the store up to this seq, and none after it.
    pub seq: i64,
    /// Each kind of entity that has a checksum; a kind not named has none
    /// (0 entities).
    pub checksums: BTreeMap<String, Checksum>,
    /// Each kind's [`ChecksumSpec::kind_fingerprint`]: a terminal compares
    /// only kinds it digests the same way (a plugin of another version on
    /// one side exports other fields). A kind not named is compared.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub specs: BTreeMap<String, String>,
}

/// Which fields of each kind of entity a checksum covers, as the plugins
/// that export them declare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChecksumSpec {
    kinds: BTreeMap<String, Vec<String>>,
}

impl ChecksumSpec {
    /// A spec of `(entity, fields)` pairs; the first declaration of a kind
    /// counts.
    pub fn new<'a>(exports: impl IntoIterator<Item = (&'a str, &'a [String])>) -> Self {
        let mut kinds = BTreeMap::new();
        for (entity, fields) in exports {
            kinds
                .entry(entity.to_owned())
                .or_insert_with(|| fields.to_vec());
        }
        Self { kinds }
    }

    /// The fields a kind's checksum covers, if it has one.
    pub fn fields(&self, entity: &str) -> Option<&[String]> {
        self.kinds.get(entity).map(Vec::as_slice)
    }

    /// Whether no kind has a checksum.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// The kinds that have one.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// Tells one spec from another: stored checksums made under another
    /// are computed again.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(&self.kinds).unwrap_or_default();
        fingerprint_of(&text)
    }

    /// Tells how one kind is digested: its fields, and the way of
    /// [`digest`].
    pub fn kind_fingerprint(&self, entity: &str) -> Option<String> {
        self.fields(entity).map(fields_fingerprint)
    }

    /// The digest of an entity's JSON state (a backend's), if its kind
    /// has a checksum.
    pub fn digest(&self, entity: &str, id: &str, state: &Map<String, Value>) -> Option<u64> {
        let fields = self.fields(entity)?;
        Some(digest(
            entity,
            id,
            fields
                .iter()
                .map(|field| (field.as_str(), state.get(field_parts(field).0))),
        ))
    }
}

/// [`ChecksumSpec::kind_fingerprint`] of a kind digested over `fields`.
pub(crate) fn fields_fingerprint(fields: &[String]) -> String {
    let text = serde_json::to_string(fields).unwrap_or_default();
    fingerprint_of(&text)
}

fn fingerprint_of(text: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DIGEST_VERSION.as_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    let hash = hasher.finalize();
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A field of a spec: its name in the state, and for `name{a,b}` the
/// members of its nested objects that count.
fn field_parts(field: &str) -> (&str, Option<Vec<&str>>) {
    match field.strip_suffix('}').and_then(|f| f.split_once('{')) {
        Some((name, members)) => (name, Some(members.split(',').map(str::trim).collect())),
        None => (field, None),
    }
}

/// `value` with only `members` of its objects (of it, or of its array's).
fn projected(value: &Value, members: &[&str]) -> Value {
    match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(json @ (Value::Array(_) | Value::Object(_))) => projected(&json, members),
            _ => value.clone(),
        },
        Value::Array(items) => {
            Value::Array(items.iter().map(|item| projected(item, members)).collect())
        }
        Value::Object(object) => Value::Object(
            object
                .iter()
                .filter(|(name, _)| members.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The digest of one entity: its kind, id and the spec's fields' values
/// (`None`: absent), in canonical form. `fields` name them as the spec
/// does (see [`ChecksumSpec`]): `name{a,b}` picks members of nested objects.
pub fn digest<'a>(
    entity: &str,
    id: &str,
    fields: impl Iterator<Item = (&'a str, Option<&'a Value>)>,
) -> u64 {
    let mut object = BTreeMap::new();
    for (field, value) in fields {
        let (name, members) = field_parts(field);
        let value = match (value, members) {
            (Some(value), Some(members)) => canonical(&projected(value, &members)),
            (Some(value), None) => canonical(value),
            (None, _) => None,
        };
        if let Some(canonical) = value {
            object.insert(name, canonical);
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(entity.as_bytes());
    hasher.update([0]);
    hasher.update(id.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(&object).unwrap_or_default());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

/// A value in canonical form; `None` for what counts as nothing.
fn canonical(value: &Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Bool(flag) => Some(Value::String(if *flag { "1" } else { "0" }.into())),
        Value::Number(number) => Some(Value::String(number_text(number))),
        Value::String(text) if text.is_empty() => None,
        Value::String(text) => {
            let trimmed = text.trim_start();
            if (trimmed.starts_with('[') || trimmed.starts_with('{'))
                && let Ok(json @ (Value::Array(_) | Value::Object(_))) =
                    serde_json::from_str::<Value>(text)
            {
                return canonical(&json);
            }
            Some(Value::String(text.clone()))
        }
        Value::Array(items) => {
            let mut texts: Vec<String> = items
                .iter()
                .filter_map(canonical)
                .map(|item| serde_json::to_string(&item).unwrap_or_default())
                .collect();
            if texts.is_empty() {
                return None;
            }
            texts.sort_unstable();
            texts.dedup();
            Some(Value::Array(texts.into_iter().map(Value::String).collect()))
        }
        Value::Object(members) => {
            let sorted: BTreeMap<&String, Value> = members
                .iter()
                .filter_map(|(name, value)| canonical(value).map(|value| (name, value)))
                .collect();
            if sorted.is_empty() {
                return None;
            }
            Some(Value::Object(
                sorted
                    .into_iter()
                    .map(|(name, value)| (name.clone(), value))
                    .collect(),
            ))
        }
    }
}

/// A number as text: integers as integers (a float with no fraction
/// included), others to 15 significant digits.
fn number_text(number: &serde_json::Number) -> String {
    if let Some(integer) = number.as_i64() {
        return integer.to_string();
    }
    if let Some(integer) = number.as_u64() {
        return integer.to_string();
    }
    let float = number.as_f64().unwrap_or(f64::NAN);
    float_text(float)
}

fn float_text(float: f64) -> String {
    // Below 2^53 every integer is exact in a float.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if float.is_finite() && float.fract() == 0.0 && float.abs() < EXACT {
        #[allow(clippy::cast_possible_truncation)]
        return (float as i64).to_string();
    }
    let text = format!("{float:.14e}");
    // `1.50000000000000e0` and `1.5e0` are one number: trailing zeros go.
    match text.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exponent}")
        }
        _ => text,
    }
}

/// A SQLite column value as the JSON value it stands for.
pub(crate) fn sqlite_value(value: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(integer) => Value::from(integer),
        ValueRef::Real(real) => {
            serde_json::Number::from_f64(real).map_or(Value::Null, Value::Number)
        }
        ValueRef::Text(text) => Value::String(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(bytes) => Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect()),
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:016x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Vec<String> {
        ["product_id", "product_name", "price", "category_id", "tags"]
            .map(String::from)
            .to_vec()
    }

    fn of(state: Value) -> u64 {
        let spec = ChecksumSpec::new([("product", fields().as_slice())]);
        let state = state.as_object().cloned().unwrap_or_default();
        spec.digest("product", "42", &state).expect("declared")
    }

    #[test]
    fn a_backend_state_and_a_table_row_of_the_same_product_digest_alike() {
        let wire = of(json!({"product_id": 42, "product_name": "Tea", "price": 3,
                             "category_id": null, "tags": ["b", "a"], "extra": "not held"}));
        let row = of(
            json!({"product_id": "42", "product_name": "Tea", "price": 3.0,
                            "category_id": "", "tags": "[\"a\",\"b\"]"}),
        );
        assert_eq!(wire, row);
    }

    #[test]
    fn a_float_written_with_fewer_digits_is_the_same_number() {
        assert_eq!(
            of(json!({"price": 0.1 + 0.2})),
            of(json!({"price": 0.3})),
            "SQLite's JSON writes 15 significant digits"
        );
        assert_eq!(float_text(1.5), "1.5e0");
        assert_eq!(float_text(-0.25), "-2.5e-1");
    }

    #[test]
    fn any_field_that_differs_changes_the_digest() {
        let base = of(json!({"product_id": 42, "product_name": "Tea", "price": 3}));
        assert_ne!(
            base,
            of(json!({"product_id": 42, "product_name": "Tea", "price": 4}))
        );
        assert_ne!(
            base,
            of(json!({"product_id": 42, "product_name": "Tee", "price": 3}))
        );
        assert_ne!(base, of(json!({"product_id": 42, "price": 3})));
        let spec = ChecksumSpec::new([("product", fields().as_slice())]);
        let state = json!({"product_id": 42, "product_name": "Tea", "price": 3});
        let other = spec.digest("product", "43", state.as_object().expect("an object"));
        assert_ne!(Some(base), other, "another id");
    }

    #[test]
    fn nested_objects_count_by_the_members_the_spec_names_and_lists_as_sets() {
        let fields = [
            "group_id",
            "modifiers{modifier_id,price_delta}",
            "product_ids",
        ]
        .map(String::from)
        .to_vec();
        let spec = ChecksumSpec::new([("modifier_group", fields.as_slice())]);
        let of = |state: Value| {
            spec.digest("modifier_group", "G", state.as_object().expect("an object"))
                .expect("declared")
        };
        let wire = of(json!({"group_id": "G", "product_ids": ["P1", "P2", "P1"],
            "modifiers": [{"modifier_id": 2, "price_delta": 0.4, "sku": "not kept"},
                          {"modifier_id": "1", "price_delta": 0}]}));
        let row = of(json!({"group_id": "G", "product_ids": "[\"P2\",\"P1\"]",
            "modifiers": "[{\"modifier_id\":\"1\",\"price_delta\":0.0},{\"modifier_id\":\"2\",\"price_delta\":0.4}]"}));
        assert_eq!(wire, row);
        let changed = of(json!({"group_id": "G", "product_ids": ["P1", "P2"],
            "modifiers": [{"modifier_id": 2, "price_delta": 0.5}, {"modifier_id": "1", "price_delta": 0}]}));
        assert_ne!(wire, changed);
    }

    #[test]
    fn a_checkpoint_of_a_later_version_with_more_fields_is_read() {
        let text = r#"{"seq": 4, "checksums": {}, "specs": {"product": "ab"}, "later": 1}"#;
        let checkpoint: Checkpoint = serde_json::from_str(text).expect("read");
        assert_eq!(checkpoint.specs["product"], "ab");
    }

    #[test]
    fn a_sum_taken_apart_and_put_back_is_the_same() {
        let mut checksum = Checksum::default();
        checksum.add(u64::MAX);
        checksum.add(7);
        checksum.remove(u64::MAX);
        assert_eq!(checksum, Checksum { sum: 7, count: 1 });
        let text = serde_json::to_string(&checksum).expect("writes");
        assert_eq!(text, r#"{"sum":"0000000000000007","count":1}"#);
        assert_eq!(
            serde_json::from_str::<Checksum>(&text).expect("reads"),
            checksum
        );
    }

    #[test]
    fn a_kind_without_a_declaration_has_no_digest() {
        let spec = ChecksumSpec::new([("product", fields().as_slice())]);
        assert_eq!(spec.digest("category", "1", &Map::new()), None);
        assert_ne!(spec.fingerprint(), ChecksumSpec::default().fingerprint());
    }
}
