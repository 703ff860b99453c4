//! `Authorization: Bearer <token>`: who is asking, and which stores it may
//! touch. The token is hashed and looked up; it is never kept or logged.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::Shared;
use super::error::ApiError;
use crate::token::hash_token;

/// The client a request's token belongs to.
#[derive(Debug)]
pub(super) struct Client {
    /// The token's identity: idempotency keys are scoped by it
    /// ([`crate::TokenRecord::idempotency_client`]).
    pub(super) name: String,
    stores: Option<Vec<String>>,
}

impl Client {
    /// Whether the token may see and change `store`.
    pub(super) fn may(&self, store: &str) -> bool {
        self.stores
            .as_ref()
            .is_none_or(|stores| stores.iter().any(|allowed| allowed == store))
    }

    /// Whether the token is limited to some stores.
    pub(super) fn is_limited(&self) -> bool {
        self.stores.is_some()
    }

    /// 403 unless the token may touch `store`; `what` starts the message
    /// (`change 3: `).
    pub(super) fn check(&self, what: &str, store: &str) -> Result<(), ApiError> {
        match &self.stores {
            Some(stores) if !self.may(store) => Err(ApiError::forbidden(what, store, stores)),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<Shared> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(ApiError::no_token)?;
        let token = bearer(header.as_bytes()).ok_or_else(ApiError::not_bearer)?;
        let record = state
            .access
            .token_by_hash(&hash_token(token))
            .await
            .map_err(|err| ApiError::unavailable(&err))?
            .ok_or_else(ApiError::unknown_token)?;
        Ok(Self {
            name: record.idempotency_client(),
            stores: record.stores,
        })
    }
}

/// The token of `Bearer <token>` (the scheme in any case, RFC 9110).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn a_bearer_token_is_read_whatever_the_scheme_case() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer  abc "), Some("abc"));
    }

    #[test]
    fn anything_but_a_bearer_token_is_none() {
        for value in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"abc",
            b"Bearer \xff",
        ] {
            assert_eq!(bearer(value), None, "{value:?}");
        }
    }
}
