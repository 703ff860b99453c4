//! Identifiers sent as a JSON string or an integer: back offices differ,
//! and both mean the same row.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct ProductDelete {
//!     #[serde(deserialize_with = "possync_sdk::ids::id")]
//!     product_id: String,
//! }
//! let delete: ProductDelete = serde_json::from_str(r#"{"product_id": 42}"#).unwrap();
//! assert_eq!(delete.product_id, "42");
//! ```

use serde::{Deserialize, Deserializer};

/// Deserializes an identifier from a JSON string or integer into a `String`.
pub fn id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_any(IdVisitor)
}

/// Like [`id`], for an optional field (`null` or absent is `None`; add
/// `#[serde(default)]`).
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Product {
///     #[serde(default, deserialize_with = "possync_sdk::ids::optional_id")]
///     category_id: Option<String>,
/// }
/// let product: Product = serde_json::from_str(r#"{"category_id": 7}"#).unwrap();
/// assert_eq!(product.category_id.as_deref(), Some("7"));
/// let product: Product = serde_json::from_str("{}").unwrap();
/// assert_eq!(product.category_id, None);
/// ```
pub fn optional_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrapped(#[serde(deserialize_with = "id")] String);
    Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(id)| id))
}

/// Reads an identifier where it stands, without buffering the value first.
struct IdVisitor;

impl serde::de::Visitor<'_> for IdVisitor {
    type Value = String;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an identifier: a string or an integer")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<String, E> {
        Ok(number.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<String, E> {
        Ok(number.to_string())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Row {
        #[serde(deserialize_with = "super::id")]
        id: String,
        #[serde(default, deserialize_with = "super::optional_id")]
        parent: Option<String>,
    }

    fn row(json: &str) -> Result<Row, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn an_identifier_may_be_a_string_or_an_integer() {
        assert_eq!(row(r#"{"id":"PROD-1"}"#).expect("string").id, "PROD-1");
        assert_eq!(row(r#"{"id":42}"#).expect("integer").id, "42");
        assert_eq!(row(r#"{"id":-7}"#).expect("negative").id, "-7");
        let with_parent = row(r#"{"id":"A","parent":9}"#).expect("optional integer");
        assert_eq!(with_parent.parent.as_deref(), Some("9"));
        assert_eq!(
            row(r#"{"id":"A","parent":null}"#).expect("null").parent,
            None
        );
    }

    #[test]
    fn any_other_identifier_is_refused_with_what_was_expected() {
        let err = row(r#"{"id":1.5}"#).expect_err("a float is no identifier");
        assert!(
            err.to_string().contains("a string or an integer"),
            "unexpected message: {err}"
        );
    }
}
