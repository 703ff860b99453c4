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
    /// Text that carries bytes as base64 (`contentEncoding`): on the
    /// command line, `@FILE` reads and encodes a file.
    pub(crate) base64: bool,
    /// Other option names for the field (`x-possync-aliases`): the names a
    /// plugin's publish command had before, say.
    pub(crate) aliases: Vec<String>,
    /// An option that reads the field from a file (`x-possync-file-option`),
    /// such as `--file PICTURE` for an image's bytes.
    pub(crate) file_option: Option<String>,
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
    /// Only while reading a schema: the `null` of an optional field.
    Null,
}

impl Kind {
    /// The placeholder `--help` shows.
    fn value_name(self) -> &'static str {
        match self {
            Self::Text => "TEXT",
            Self::Integer => "INTEGER",
            Self::Number => "NUMBER",
            Self::Boolean => "true|false",
            Self::Json | Self::Null => "JSON",
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
    let words = |key: &str, property: &Value| -> Vec<String> {
        property[key]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    properties
        .iter()
        .map(|(name, property)| Field {
            name: name.clone(),
            kind: kind_of(property, schema, 0),
            required: required.contains(&name.as_str()),
            description: property["description"].as_str().map(str::to_owned),
            base64: property["contentEncoding"] == "base64",
            aliases: words("x-possync-aliases", property),
            file_option: property["x-possync-file-option"]
                .as_str()
                .map(str::to_owned),
            minimum: property["minimum"].as_f64(),
            maximum: property["maximum"].as_f64(),
        })
        .collect()
}

/// A property's kind from its `type` (`"number"`, `["string", "null"]`),
/// following `$ref`s into the schema's `$defs` (an enum of names is text)
/// and the alternatives of `anyOf`/`oneOf` (an `Option<Enum>`).
fn kind_of(property: &Value, root: &Value, depth: u8) -> Kind {
    if depth > 8 {
        return Kind::Json;
    }
    if let Some(reference) = property["$ref"].as_str() {
        let target = reference
            .strip_prefix("#/")
            .map(|path| path.split('/').fold(root, |node, key| &node[key]));
        return target.map_or(Kind::Json, |def| kind_of(def, root, depth + 1));
    }
    let mut kinds: Vec<Kind> = match &property["type"] {
        Value::String(one) => vec![kind_named(one)],
        Value::Array(many) => many
            .iter()
            .filter_map(Value::as_str)
            .map(kind_named)
            .collect(),
        _ => ["anyOf", "oneOf", "allOf"]
            .iter()
            .filter_map(|key| property[*key].as_array())
            .flatten()
            .filter(|member| member["type"] != "null")
            .map(|member| kind_of(member, root, depth + 1))
            .collect(),
    };
    kinds.retain(|kind| *kind != Kind::Null);
    // Alternatives of one kind are that kind: an enum whose names each
    // carry a description is a `oneOf` of string constants.
    kinds.dedup();
    if kinds.is_empty()
        && (property["enum"]
            .as_array()
            .is_some_and(|names| names.iter().all(Value::is_string))
            || property["const"].is_string())
    {
        return Kind::Text;
    }
    match kinds.as_slice() {
        [kind] => *kind,
        _ => Kind::Json,
    }
}

fn kind_named(name: &str) -> Kind {
    match name {
        "string" => Kind::Text,
        "integer" => Kind::Integer,
        "number" => Kind::Number,
        "boolean" => Kind::Boolean,
        "null" => Kind::Null,
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
            Kind::Json | Kind::Null => {
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

/// The bytes of the file at `path`, base64-encoded, for a field that
/// carries bytes; only a file named on the command line is read, and none
/// larger than `limit` (a message could not carry it).
pub(crate) fn read_base64_file(path: &str, limit: usize) -> Result<Value, String> {
    use base64::Engine;
    use std::io::Read;
    let cannot = |err: std::io::Error| format!("cannot read {path}: {err}");
    let file = std::fs::File::open(path).map_err(cannot)?;
    // Read at most one byte past the limit: a pipe or a device says nothing
    // of its size beforehand.
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() > limit {
        return Err(format!(
            "{path} is over the terminals' limit of {limit} bytes (terminal.max_message_bytes)"
        ));
    }
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(bytes),
    ))
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
                "data": {"type": "string", "contentEncoding": "base64",
                         "x-possync-file-option": "file", "x-possync-aliases": ["bytes"]},
                "level": {"$ref": "#/$defs/Level"},
                "maybe_level": {"anyOf": [{"$ref": "#/$defs/Level"}, {"type": "null"}]},
                "tone": {"$ref": "#/$defs/Tone"},
                "line": {"$ref": "#/$defs/Line"},
                "price": {"type": "number", "minimum": 0},
                "seats": {"type": ["integer", "null"], "minimum": 1, "maximum": 20},
                "open": {"type": "boolean"},
                "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}}
            },
            "required": ["id", "price"],
            "$defs": {
                "Level": {"type": "string", "enum": ["Low", "High"]},
                "Tone": {"oneOf": [
                    {"type": "string", "const": "calm", "description": "Quiet."},
                    {"const": "loud", "description": "Not quiet."}
                ]},
                "Line": {"type": "object", "properties": {"n": {"type": "integer"}}}
            }
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
        assert_eq!(field("data").aliases, ["bytes"]);
        assert_eq!(field("data").file_option.as_deref(), Some("file"));
    }

    #[test]
    fn referenced_names_are_text_and_referenced_structures_are_json() {
        assert_eq!(field("level").kind, Kind::Text);
        assert_eq!(field("maybe_level").kind, Kind::Text);
        // An enum whose names carry descriptions.
        assert_eq!(field("tone").kind, Kind::Text);
        assert_eq!(field("line").kind, Kind::Json);
        assert_eq!(field("level").parse("Low").expect("a name"), "Low");
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
    fn a_file_is_read_only_when_asked_and_only_up_to_the_message_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("logo.png");
        std::fs::write(&file, b"\x89PNG").expect("write");
        let path = file.to_str().expect("utf-8");
        assert_eq!(
            read_base64_file(path, 100).expect("reads the file"),
            "iVBORw=="
        );
        let err = read_base64_file(path, 3).expect_err("too large");
        assert!(
            err.contains("limit of 3 bytes (terminal.max_message_bytes)"),
            "{err}"
        );
        let err = read_base64_file("/dev/zero", 1000).expect_err("endless");
        assert!(err.contains("limit of 1000 bytes"), "{err}");
        let err = read_base64_file("/no/such/file", 100).expect_err("missing");
        assert!(err.starts_with("cannot read /no/such/file"), "{err}");
        // A value (a CSV cell, say) is never taken for a file name.
        assert_eq!(
            field("data").parse(&format!("@{path}")).expect("text"),
            format!("@{path}")
        );
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
