//! The HTTP API for back office apps in any language: submit changes, read
//! a store's catalog and its changes after a sequence number, health,
//! metrics, and the OpenAPI document of all of it.
//!
//! Every route but `/health` and `/openapi.json` wants
//! `Authorization: Bearer <token>` (see [`crate::token`]); every refusal is
//! a JSON body `{"error": "..."}`. The document is built from the handlers'
//! annotations and the bodies' types while the router is built from the
//! same handlers, so a route cannot exist without its description.

mod access;
mod auth;
mod body;
mod error;
mod fleet;
mod metrics;
mod ops;
mod read;
mod received;
mod submit;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{InfoBuilder, SecurityRequirement};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::catalog::Catalog;
use crate::storage::Storage;
use access::Access;
use metrics::Metrics;

/// The largest request body read, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The most changes one request may submit.
pub const MAX_CHANGES_PER_REQUEST: usize = 1000;

/// The most changes one read of a store's changes returns.
pub const MAX_CHANGES_PER_PAGE: usize = 1000;

/// Changes returned when the client names no `limit`.
const DEFAULT_CHANGES_PER_PAGE: usize = 100;

/// The name of the bearer security scheme in the document.
const BEARER: &str = "bearer";

/// What every handler shares.
#[derive(Clone)]
struct Shared(Arc<Inner>);

struct Inner {
    access: Arc<dyn Access>,
    metrics: Metrics,
    rules: crate::fleet::FleetRules,
    counters: Arc<crate::fleet::Counters>,
    /// The enabled message types, sorted: named when a client sends another.
    types: Vec<String>,
    /// The OpenAPI document, serialized once.
    openapi: Bytes,
}

impl std::ops::Deref for Shared {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The API over `catalog`, ready to serve (for example with `axum::serve`).
pub fn router<S: Storage>(catalog: Arc<Catalog<S>>) -> Router {
    router_with(
        catalog,
        crate::fleet::FleetRules::default(),
        Arc::new(crate::fleet::Counters::default()),
    )
}

/// [`router`] judging the fleet by `rules`, with the upstream consumer's
/// `counters` in `/metrics`.
pub fn router_with<S: Storage>(
    catalog: Arc<Catalog<S>>,
    rules: crate::fleet::FleetRules,
    counters: Arc<crate::fleet::Counters>,
) -> Router {
    let (routes, document) = routes().split_for_parts();
    // Serializing a document of plain strings and maps does not fail; an
    // empty document would be noticed by the OpenAPI test and every client.
    let openapi = serde_json::to_vec(&document).unwrap_or_default();
    let access: Arc<dyn Access> = catalog;
    let shared = Shared(Arc::new(Inner {
        types: access.message_types(),
        access,
        metrics: Metrics::new(&counters),
        rules,
        counters,
        openapi: Bytes::from(openapi),
    }));
    routes
        .fallback(ops::no_route)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            ops::count,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// The answer to a request not answered within `limit`.
pub(crate) fn request_timeout(limit: std::time::Duration) -> axum::response::Response {
    axum::response::IntoResponse::into_response(error::ApiError::request_timeout(limit))
}

/// The OpenAPI 3.1 document of [`router`]'s API, as `GET /openapi.json`
/// serves it.
pub fn openapi() -> OpenApi {
    routes().into_openapi()
}

/// Every route, with its description.
fn routes() -> OpenApiRouter<Shared> {
    OpenApiRouter::with_openapi(document())
        .routes(routes!(submit::submit_batch))
        .routes(routes!(submit::submit_one, read::changes))
        .routes(routes!(read::stores))
        .routes(routes!(read::catalog))
        .routes(routes!(received::received))
        .routes(routes!(fleet::fleet))
        .routes(routes!(fleet::applied))
        .routes(routes!(fleet::forget))
        .routes(routes!(fleet::page))
        .routes(routes!(ops::health))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
}

/// The document's header: title, version, and bearer auth for every
/// operation that does not say otherwise.
fn document() -> OpenApi {
    let mut document = OpenApi::new(
        InfoBuilder::new()
            .title("possync backend")
            .version(env!("CARGO_PKG_VERSION"))
            .description(Some(
                "The catalog of record of possync: back office apps submit changes to stores' catalogs; each accepted change gets its store's next sequence number and reaches the store's point-of-sale terminals. Send `Authorization: Bearer <token>` (from `possync backend token create NAME`) on every request but /health and /openapi.json. Errors are `{\"error\": \"...\"}`.",
            ))
            .build(),
        utoipa::openapi::Paths::new(),
    );
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    document.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    document
}
