//! Every refusal of the API: a status and a JSON body `{"error": "..."}`
//! that says what is wrong and what to do about it.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::body::ErrorBody;
use crate::catalog::SubmitError;
use crate::storage::StorageError;
use crate::token::TOKEN_PREFIX;

/// How long a client should wait before retrying after a database failure.
const RETRY_AFTER_SECONDS: &str = "1";

/// A refused request.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// The HTTP status it is answered with.
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// 400: the request cannot be read (syntax, a parameter).
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 422: the request reads well but cannot be applied.
    pub(super) fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 404: what the request names does not exist.
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 401: no `Authorization` header.
    pub(super) fn no_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "no token: send `Authorization: Bearer {TOKEN_PREFIX}...` with a token made by `possync backend token create NAME`"
            ),
        )
    }

    /// 401: an `Authorization` header that is not a bearer token.
    pub(super) fn not_bearer() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "the Authorization header is not a bearer token: send `Authorization: Bearer {TOKEN_PREFIX}...`"
            ),
        )
    }

    /// 401: a token the backend does not know (mistyped or revoked).
    pub(super) fn unknown_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not known to this backend (mistyped, or revoked): ask its operator for a token (`possync backend token create NAME`)",
        )
    }

    /// 403: the token is limited to other stores.
    pub(super) fn forbidden(what: &str, store: &str, allowed: &[String]) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            format!(
                "{what}this token may not touch store {store:?}; it is limited to: {}. Use a token made for that store (`possync backend token create NAME --store {store}`)",
                allowed.join(", ")
            ),
        )
    }

    /// 403: a store-limited token asked for the metrics, which count every
    /// store.
    pub(super) fn metrics_forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "this token is limited to some stores, and the metrics count every store's requests and changes: scrape them with an operator's token made without --store (`possync backend token create NAME`)",
        )
    }

    /// 408: the request took longer than the server waits.
    pub(super) fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request was not received and answered within {} s; send it again (a submission with the same Idempotency-Key is applied at most once)",
                limit.as_secs()
            ),
        )
    }

    /// 413: the body is larger than the API reads.
    pub(super) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes: send fewer changes per request"),
        )
    }

    /// 404: no such route.
    pub(super) fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no route {method} {path}: the routes are listed in GET /openapi.json"),
        )
    }

    /// 405: the route exists, the method does not.
    pub(super) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{path} does not take {method}: the Allow header and GET /openapi.json list what it takes"
            ),
        )
    }

    /// 503: the database failed. The detail goes to the log, not to the
    /// client, and the client is told to retry.
    pub(super) fn unavailable(err: &StorageError) -> Self {
        tracing::warn!(event = "backend_api_database_failed", error = %err, "the backend database failed a request");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the backend's database is not answering; retry in a moment (a submission with the same Idempotency-Key is applied at most once)",
        )
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            // A token name cannot clash in a submission: whatever it is,
            // it is the database's doing, not the client's.
            SubmitError::Storage(
                err @ (StorageError::Database(_) | StorageError::TokenExists(_)),
            ) => Self::unavailable(&err),
            err => Self::unprocessable(err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"possync\""),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            _ => {}
        }
        response
    }
}
