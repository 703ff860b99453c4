//! License keys and terminal ids: the words that address a store's terminals.
//!
//! Both become words of routing keys and queue names, so they are checked
//! wherever they enter: a key like `#` or `A.B` would widen a binding
//! (`license.#.#`) to every store.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest license key or terminal id accepted.
pub const MAX_ID_LEN: usize = 64;

/// Why a license key or terminal id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {reason}")]
pub struct InvalidId {
    what: &'static str,
    value: String,
    reason: String,
}

fn check(what: &'static str, value: &str) -> Result<(), InvalidId> {
    let refuse = |reason: String| InvalidId {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    if value.len() > MAX_ID_LEN {
        return Err(refuse(format!(
            "it is {} characters long; at most {MAX_ID_LEN} are allowed",
            value.len()
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        let why = match bad {
            '.' | '*' | '#' => format!(
                "{bad:?} has a meaning in routing keys and would let it match other stores' messages"
            ),
            _ => format!("{bad:?} is not allowed"),
        };
        return Err(refuse(format!(
            "{why}; use only letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check($what, &value)?;
                Ok(Self(value))
            }

            /// The checked value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A store's license key: one routing-key word of letters, digits, `-`, `_`.
    LicenseKey,
    "license key"
);
id_type!(
    /// One terminal of a store: letters, digits, `-`, `_`.
    TerminalId,
    "terminal id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_keys_stores_have() {
        for key in ["EXTRO-LIFE-ABC123", "store_7", "a", &"K".repeat(MAX_ID_LEN)] {
            assert!(LicenseKey::new(key).is_ok(), "{key}");
        }
    }

    #[test]
    fn refuses_anything_that_could_widen_a_binding() {
        for key in [
            "",
            "#",
            "*",
            "A.B",
            "ABC.price",
            "a b",
            "ä",
            "x/y",
            &"K".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(LicenseKey::new(key).is_err(), "{key:?} was accepted");
            assert!(TerminalId::new(key).is_err(), "{key:?} was accepted");
        }
    }

    #[test]
    fn the_error_says_why_and_what_to_do() {
        let err = LicenseKey::new("#").expect_err("refused").to_string();
        assert!(err.contains("license key \"#\""), "{err}");
        assert!(err.contains("other stores"), "{err}");
        assert!(err.contains("letters, digits"), "{err}");
    }
}
