//! `POSSYNC_...` environment variables as configuration, each value kept as
//! the text it was set to.
//!
//! figment's own `Env` reads `12345` as a number and `true` as a boolean, so a
//! password like those fails to load as a string, and the type error quotes
//! it. Here a scalar stays text, and the config is extracted lossily (a
//! number or boolean setting reads its text). Lists and tables (`[a, b]`,
//! `{k = v}`) keep figment's syntax, but for the admin password, and plugin
//! settings are read as figment reads them: only the plugin knows their types.

use figment::providers::Env;
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

/// The `POSSYNC_<SECTION>__<KEY>` variables, as a figment provider: the
/// environment layer of every possync config.
#[derive(Debug)]
pub struct EnvText(Env);

impl EnvText {
    /// The variables of this process's environment.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::ignoring(&[])
    }

    /// The variables of this process's environment but those of `sections`,
    /// which belong to another possync config: a back office shell may set
    /// `POSSYNC_SERVICE__DATABASE` for its backend and `POSSYNC_BACKEND__TOKEN`
    /// for `possync publish`, and neither config must refuse the other's.
    pub fn ignoring(sections: &'static [&'static str]) -> Self {
        Self(
            Env::prefixed("POSSYNC_")
                // Only sectioned variables are config; POSSYNC_LOG and friends are not.
                .filter(move |key| {
                    let key = key.as_str();
                    key.split_once("__").is_some_and(|(section, _)| {
                        !sections.iter().any(|s| s.eq_ignore_ascii_case(section))
                    })
                })
                .split("__"),
        )
    }
}

impl Provider for EnvText {
    fn metadata(&self) -> Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, text) in self.0.iter() {
            let path: Vec<&str> = key.as_str().split('.').collect();
            insert(&mut dict, &path, value_of(&path, text));
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// The value a variable at `path` sets.
fn value_of(path: &[&str], text: String) -> Value {
    let parsed: Value = match text.parse() {
        Ok(value) => value,
        Err(never) => match never {},
    };
    let plugin_setting = matches!(path, ["plugins", _, "settings", ..]);
    // A password is text whatever it looks like, `[x]` and `{x}` too.
    if path == ["admin", "password"] {
        return Value::from(text);
    }
    match parsed {
        Value::Num(..) | Value::Bool(..) | Value::Char(..) | Value::Empty(..)
            if !plugin_setting =>
        {
            Value::from(text)
        }
        other => other,
    }
}

/// Puts `value` at `path` in `dict`, making the tables on the way.
fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_stay_text_and_lists_keep_their_syntax() {
        assert_eq!(
            value_of(&["admin", "password"], "12345".into()),
            Value::from("12345")
        );
        assert_eq!(
            value_of(&["admin", "password"], "true".into()),
            Value::from("true")
        );
        assert_eq!(
            value_of(&["admin", "password"], "-4.5".into()),
            Value::from("-4.5")
        );
        assert!(matches!(
            value_of(&["broker", "url"], "[amqp://a, amqp://b]".into()),
            Value::Array(..)
        ));
        assert_eq!(
            value_of(&["admin", "password"], "[x]".into()),
            Value::from("[x]")
        );
        assert!(matches!(
            value_of(&["plugins", "x", "settings", "max"], "5".into()),
            Value::Num(..)
        ));
    }

    #[test]
    fn nested_keys_make_nested_tables() {
        let mut dict = Dict::new();
        insert(&mut dict, &["a", "b"], Value::from("1"));
        insert(&mut dict, &["a", "c"], Value::from("2"));
        let a = dict["a"].as_dict().expect("a table");
        assert_eq!(a.len(), 2);
    }
}
