//! A payload's fields as its plugin's JSON Schema describes them: what a
//! command-line value or a CSV cell means for each field, and the bounds a
//! value must keep. The binary knows no message type; it learns them here.

use serde_json::{Map, Value};

/// One top-level field of a payload.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) required: bool,
    pub(crate) description: Option<String>,
    /// Text that carries bytes as base64 (`contentEncoding`): given as
    /// `@FILE`, the file's bytes are read and encoded.
    base64: bool,
    minimum: Option<f64>,
    maximum: Option<f64>,
}

/// What JSON a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Integer,
    Number,
    Boolean,
    /// Arrays, objects, or anything the schema leaves open: given as JSON.
    Json,
}

impl Kind {
    /// The placeholder `--help` shows.
    fn value_name(self) -> &'static str {
        match self {
            Self::Text => "TEXT",
            Self::Integer => "INTEGER",
            Self::Number => "NUMBER",
            Self::Boolean => "true|false",
            Self::Json => "JSON",
        }
    }
}

/// The fields of the object a schema describes, in the schema's order;
/// empty when the schema is not of an object with properties.
pub(crate) fn of_schema(schema: &Value) -> Vec<Field> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| Field {
            name: name.clone(),
            kind: kind_of(property),
            required: required.contains(&name.as_str()),
            description: property["description"].as_str().map(str::to_owned),
            base64: property["contentEncoding"] == "base64",
            minimum: property["minimum"].as_f64(),
            maximum: property["maximum"].as_f64(),
        })
        .collect()
}

/// A property's kind from its `type` (`"number"`, `["string", "null"]`).
fn kind_of(property: &Value) -> Kind {
    let types: Vec<&str> = match &property["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut kinds = types.iter().filter(|t| **t != "null").map(|t| match *t {
        "string" => Kind::Text,
        "integer" => Kind::Integer,
        "number" => Kind::Number,
        "boolean" => Kind::Boolean,
        _ => Kind::Json,
    });
    match (kinds.next(), kinds.next()) {
        (Some(kind), None) => kind,
        _ => Kind::Json,
    }
}

impl Field {
    /// The placeholder `--help` shows.
    pub(crate) fn value_name(&self) -> &'static str {
        if self.base64 {
            "@FILE|BASE64"
        } else {
            self.kind.value_name()
        }
    }

    /// The JSON value of `text` typed on a command line or in a CSV cell.
    pub(crate) fn parse(&self, text: &str) -> Result<Value, String> {
        let value = match self.kind {
            Kind::Text if self.base64 && text.starts_with('@') => {
                use base64::Engine;
                let path = &text[1..];
                let bytes =
                    std::fs::read(path).map_err(|err| format!("cannot read {path}: {err}"))?;
                return Ok(Value::String(
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                ));
            }
            Kind::Text => return Ok(Value::String(text.to_owned())),
            Kind::Integer => text
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("{text:?} is not a whole number"))?,
            Kind::Number => {
                let number = text
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{text:?} is not a number"))?;
                serde_json::Number::from_f64(number)
                    .map(Value::Number)
                    .ok_or_else(|| self.rule(text))?
            }
            Kind::Boolean => match text.trim() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(format!("{text:?} is not true or false")),
            },
            Kind::Json => {
                serde_json::from_str(text).map_err(|err| format!("{text:?} is not JSON: {err}"))?
            }
        };
        self.check(&value).map_err(|_| self.rule(text))?;
        Ok(value)
    }

    /// Whether `value` keeps the field's bounds.
    fn check(&self, value: &Value) -> Result<(), String> {
        let Some(number) = value.as_f64() else {
            return Ok(());
        };
        let below = self.minimum.is_some_and(|min| number < min);
        let above = self.maximum.is_some_and(|max| number > max);
        if below || above {
            return Err(self.rule(&number.to_string()));
        }
        Ok(())
    }

    /// What a number of this field must be, refusing `text`.
    fn rule(&self, text: &str) -> String {
        let mut rule = format!("{text}: must be a finite number");
        match (self.minimum, self.maximum) {
            (Some(min), Some(max)) => rule.push_str(&format!(" from {min} to {max}")),
            (Some(min), None) => rule.push_str(&format!(" of {min} or more")),
            (None, Some(max)) => rule.push_str(&format!(" of {max} or less")),
            (None, None) => {}
        }
        rule
    }
}

/// Checks the bounds of every field `payload` has (a JSON payload written
/// by hand or a program): the same rules as typed values.
pub(crate) fn check_bounds(fields: &[Field], payload: &Map<String, Value>) -> Result<(), String> {
    for field in fields {
        if let Some(value) = payload.get(&field.name) {
            field
                .check(value)
                .map_err(|rule| format!("{} {rule}", field.name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<Field> {
        of_schema(&serde_json::json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "The id."},
                "data": {"type": "string", "contentEncoding": "base64"},
                "price": {"type": "number", "minimum": 0},
                "seats": {"type": ["integer", "null"], "minimum": 1, "maximum": 20},
                "open": {"type": "boolean"},
                "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}}
            },
            "required": ["id", "price"]
        }))
    }

    fn field(name: &str) -> Field {
        fields()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no field {name}"))
    }

    #[test]
    fn fields_take_their_kind_and_bounds_from_the_schema() {
        let kinds: Vec<_> = ["id", "data", "price", "seats", "open", "lines"]
            .map(|name| field(name).kind)
            .to_vec();
        assert_eq!(
            kinds,
            [
                Kind::Text,
                Kind::Text,
                Kind::Number,
                Kind::Integer,
                Kind::Boolean,
                Kind::Json
            ]
        );
        assert!(field("id").required && field("price").required && !field("seats").required);
        assert_eq!(field("id").description.as_deref(), Some("The id."));
        assert_eq!(field("data").value_name(), "@FILE|BASE64");
    }

    #[test]
    fn text_stays_text_and_numbers_are_numbers_within_their_bounds() {
        assert_eq!(field("id").parse("007").expect("text"), "007");
        assert_eq!(field("id").parse("@x").expect("text"), "@x");
        assert_eq!(field("price").parse(" 2.50 ").expect("number"), 2.5);
        assert_eq!(field("seats").parse("4").expect("integer"), 4);
        assert_eq!(field("open").parse("true").expect("boolean"), true);
        assert_eq!(
            field("lines").parse("[1]").expect("json"),
            serde_json::json!([1])
        );
        for bad in ["NaN", "inf", "-1", "1e999", "-0.01"] {
            let err = field("price").parse(bad).expect_err(bad);
            assert!(
                err.ends_with("must be a finite number of 0 or more"),
                "{err}"
            );
        }
        assert!(
            field("price")
                .parse("cheap")
                .expect_err("text")
                .contains("is not a number")
        );
        assert!(
            field("seats")
                .parse("21")
                .expect_err("above")
                .contains("from 1 to 20")
        );
        assert!(
            field("seats")
                .parse("2.5")
                .expect_err("fraction")
                .contains("whole number")
        );
    }

    #[test]
    fn bytes_given_as_a_file_are_read_and_encoded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("logo.png");
        std::fs::write(&file, b"\x89PNG").expect("write");
        let value = field("data")
            .parse(&format!("@{}", file.display()))
            .expect("reads the file");
        assert_eq!(value, "iVBORw==");
        assert_eq!(
            field("data").parse("iVBORw==").expect("base64 as is"),
            "iVBORw=="
        );
        let err = field("data").parse("@/no/such/file").expect_err("missing");
        assert!(err.starts_with("cannot read /no/such/file"), "{err}");
    }

    #[test]
    fn a_payload_written_as_json_keeps_the_same_bounds() {
        let fields = fields();
        let payload = serde_json::json!({"id": "P1", "price": -3});
        let err = check_bounds(&fields, payload.as_object().expect("object"))
            .expect_err("negative price");
        assert_eq!(err, "price -3: must be a finite number of 0 or more");
    }
}
