//! What operators and tools ask: health, metrics, the OpenAPI document, and
//! the answers to requests that match no route.

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use super::auth::Client;
use super::body::{ErrorBody, HealthBody};
use super::error::ApiError;
use super::metrics::CONTENT_TYPE;

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
    match shared.access.heads().await {
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
/// the Prometheus text format (only the stores the token may see).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format.", body = String, content_type = "text/plain"),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn metrics(
    State(shared): State<Shared>,
    client: Client,
) -> Result<Response, ApiError> {
    let mut heads = shared
        .access
        .heads()
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    heads.retain(|head| client.may(&head.store));
    let text = shared.metrics.render(&heads).map_err(|err| {
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
pub(super) async fn count(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    shared
        .metrics
        .request(&route, method.as_str(), response.status().as_u16());
    response
}
