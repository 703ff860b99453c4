//! Bearer tokens of back office clients: `possync backend token create |
//! list | revoke`.
//!
//! A token is 32 bytes from the operating system's CSPRNG behind a prefix
//! that makes a leaked one recognisable (secret scanners, logs). It is shown
//! once, at creation; the database keeps only its SHA-256, so a copy of the
//! database lets nobody call the API, and a request's token is found by
//! looking up its hash rather than by comparing secrets.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use possync_core::LicenseKey;
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use crate::storage::{Storage, StorageError, TokenRecord};

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "possync_";

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// The longest token name accepted.
const MAX_NAME_LEN: usize = 64;

/// Why a token command failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The name is empty, too long or has other characters than letters,
    /// digits, `-`, `_` and `.`.
    #[error(
        "token name {0:?} is not valid: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
    )]
    InvalidName(String),
    /// A store the token is limited to is not a valid license key.
    #[error("--store: {0}")]
    InvalidStore(String),
    /// No token has that name.
    #[error("no token is named {0:?}; `possync backend token list` shows them")]
    NotFound(String),
    /// The operating system gave no random bytes.
    #[error("cannot draw random bytes for the token: {0}")]
    Random(String),
    /// The database refused or failed (a name taken, for one).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A token just created: the only time its text exists.
pub struct CreatedToken {
    /// The client's name.
    pub name: String,
    /// The stores it may touch; `None`: every store.
    pub stores: Option<Vec<String>>,
    /// The token to hand to the client, `Authorization: Bearer <token>`.
    pub token: String,
}

// By hand, so that a token never reaches a log through `{:?}`.
impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken")
            .field("name", &self.name)
            .field("stores", &self.stores)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A token as `token list` shows it: never its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The client's name.
    pub name: String,
    /// The stores it may touch; `None`: every store.
    pub stores: Option<Vec<String>>,
    /// When it was made (seconds since the Unix epoch).
    pub created_at: i64,
}

impl fmt::Display for TokenInfo {
    /// `NAME  stores: A, B  created: 2026-01-02T03:04:05Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stores = match &self.stores {
            Some(stores) => stores.join(", "),
            None => "all".to_owned(),
        };
        let created = OffsetDateTime::from_unix_timestamp(self.created_at)
            .ok()
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.created_at.to_string());
        write!(f, "{}  stores: {stores}  created: {created}", self.name)
    }
}

/// The SHA-256 of a token, lowercase hex: what the database keeps.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// `possync backend token create NAME [--store KEY ...]`: a new token for
/// the client `name`, limited to `stores` unless that is empty. The returned
/// text is the only copy; the database keeps its hash.
pub async fn create_token<S: Storage>(
    storage: &S,
    name: &str,
    stores: &[String],
) -> Result<CreatedToken, TokenError> {
    check_name(name)?;
    let stores = match stores {
        [] => None,
        stores => {
            let mut checked = Vec::with_capacity(stores.len());
            for store in stores {
                let key = LicenseKey::new(store.as_str())
                    .map_err(|err| TokenError::InvalidStore(err.to_string()))?;
                checked.push(key.as_str().to_owned());
            }
            checked.sort();
            checked.dedup();
            Some(checked)
        }
    };
    let token = new_token()?;
    storage
        .create_token(TokenRecord {
            name: name.to_owned(),
            hash: hash_token(&token),
            stores: stores.clone(),
            created_at: OffsetDateTime::now_utc().unix_timestamp(),
        })
        .await?;
    Ok(CreatedToken {
        name: name.to_owned(),
        stores,
        token,
    })
}

/// `possync backend token list`: every token by name, without its hash.
pub async fn list_tokens<S: Storage>(storage: &S) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(storage
        .tokens()
        .await?
        .into_iter()
        .map(|record| TokenInfo {
            name: record.name,
            stores: record.stores,
            created_at: record.created_at,
        })
        .collect())
}

/// `possync backend token revoke NAME`: the token stops working at once
/// (every request looks its hash up).
pub async fn revoke_token<S: Storage>(storage: &S, name: &str) -> Result<(), TokenError> {
    if storage.revoke_token(name).await? {
        Ok(())
    } else {
        Err(TokenError::NotFound(name.to_owned()))
    }
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(TokenError::InvalidName(name.to_owned()))
    }
}

fn new_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|err| TokenError::Random(err.to_string()))?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_prefixed_and_carries_32_random_bytes() -> Result<(), TokenError> {
        let token = new_token()?;
        let encoded = token.strip_prefix(TOKEN_PREFIX).unwrap_or_default();
        assert_eq!(URL_SAFE_NO_PAD.decode(encoded).map(|b| b.len()), Ok(32));
        assert_ne!(token, new_token()?);
        Ok(())
    }

    #[test]
    fn a_hash_is_the_lowercase_hex_sha256_of_the_token() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_created_token_never_shows_in_debug_output() {
        let created = CreatedToken {
            name: "office".into(),
            stores: None,
            token: "possync_secret".into(),
        };
        assert!(!format!("{created:?}").contains("secret"));
    }

    #[test]
    fn names_are_short_words() {
        assert!(check_name("back-office_1.main").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
