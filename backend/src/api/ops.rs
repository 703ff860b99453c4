//! What operators and tools ask: health, metrics, the OpenAPI document, and
//! the answers to requests that match no route.

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use super::auth::Client;
use super::body::{ErrorBody, HealthBody};
use super::error::ApiError;
use super::metrics::CONTENT_TYPE;

/// The token hash `/health` looks up: never a token's (those are hex).
const PING_HASH: &str = "health";

/// Says whether the backend's database answers. Needs no token.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The database answers.", body = HealthBody),
        (status = 503, description = "The database does not answer.", body = HealthBody),
    ),
)]
pub(super) async fn health(State(shared): State<Shared>) -> (StatusCode, Json<HealthBody>) {
    // One indexed lookup of a hash no token can have (hashes are hex): it
    // answers whether the database does, at the cost of a ping, however
    // large the outbox. Anyone may ask, so it must stay that cheap.
    match shared.access.token_by_hash(PING_HASH).await {
        Ok(_) => (
            StatusCode::OK,
            Json(HealthBody {
                status: "ok".into(),
                database: true,
            }),
        ),
        Err(err) => {
            tracing::warn!(event = "backend_api_health_failed", error = %err, "the backend database does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(HealthBody {
                    status: "unavailable".into(),
                    database: false,
                }),
            )
        }
    }
}

/// The API's counters and each store's head and unpublished changes, in
/// the Prometheus text format. For operators: a token limited to some
/// stores is refused, since the counters cover every store.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format.", body = String, content_type = "text/plain"),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to some stores; metrics take an unrestricted one.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn metrics(
    State(shared): State<Shared>,
    client: Client,
) -> Result<Response, ApiError> {
    if client.is_limited() {
        return Err(ApiError::metrics_forbidden());
    }
    let heads = shared
        .access
        .heads()
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    let fleet = super::fleet::summaries(&shared, &heads).await?;
    let text = shared.metrics.render(&heads, &fleet).map_err(|err| {
        ApiError::unavailable(&crate::StorageError::Database(format!(
            "cannot encode the metrics: {err}"
        )))
    })?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// This document. Needs no token.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The OpenAPI document of this API.", body = Object, content_type = "application/json"),
    ),
)]
pub(super) async fn openapi(State(shared): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        shared.openapi.clone(),
    )
        .into_response()
}

/// A request that matches no route.
pub(super) async fn no_route(request: Request) -> ApiError {
    ApiError::no_route(request.method().as_str(), request.uri().path())
}

/// A route asked with a method it does not take (axum adds `Allow`).
pub(super) async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(request.method().as_str(), request.uri().path())
}

/// Counts every answered request by route template, method and status.
/// Both labels come from fixed sets, so that no client can grow the
/// counters by calling many paths or inventing methods.
pub(super) async fn count(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let response = next.run(request).await;
    shared
        .metrics
        .request(&route, method, response.status().as_u16());
    response
}

/// The method's label: a standard method's name, else `other`.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    STANDARD
        .into_iter()
        .find(|name| *name == method.as_str())
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_outside_the_standard_ones_is_labelled_other() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        let invented = Method::from_bytes(b"BREW-abc123").expect("a method");
        assert_eq!(method_label(&invented), "other");
    }
}
