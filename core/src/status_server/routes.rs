//! The paths, and what every answer shares: the `Host` check and
//! `Cache-Control: no-store` (a status is stale as soon as it is read).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::allowed_hosts::AllowedHosts;
use super::metrics::{self, Metrics};
use super::snapshot::Snapshot;
use super::{StatusView, json, page};
use crate::events;
use crate::status::State as TerminalState;

#[derive(Debug)]
pub(super) struct Endpoint {
    pub(super) view: StatusView,
    /// Change feed streams that may still open, of `streams_limit`.
    pub(super) streams: Arc<tokio::sync::Semaphore>,
    pub(super) streams_limit: usize,
    metrics: Metrics,
    hosts: AllowedHosts,
    /// Whether a request was refused before: the first refusal is worth a
    /// warning, a page that keeps trying is not worth one each time.
    refused_before: AtomicBool,
}

type Shared = State<Arc<Endpoint>>;

pub(super) fn router(view: StatusView, hosts: AllowedHosts, streams: usize) -> Router {
    let endpoint = Arc::new(Endpoint {
        streams: Arc::new(tokio::sync::Semaphore::new(streams)),
        streams_limit: streams,
        metrics: Metrics::new(&view),
        view,
        hosts,
        refused_before: AtomicBool::new(false),
    });
    Router::new()
        .route("/", get(status_page))
        .route("/status", get(status_json))
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .route("/events", get(super::events::stream))
        .fallback(not_found)
        .method_not_allowed_fallback(only_get)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&endpoint),
            check_host,
        ))
        .layer(middleware::map_response(no_store))
        .with_state(endpoint)
}

async fn check_host(State(endpoint): Shared, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    // A request in absolute form (`GET http://name/ HTTP/1.1`) names its
    // host twice; both must pass.
    let checked = endpoint.hosts.check(host.as_deref()).and_then(|()| {
        request.uri().authority().map_or(Ok(()), |authority| {
            endpoint.hosts.check(Some(authority.as_str()))
        })
    });
    match checked {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            let first = !endpoint.refused_before.swap(true, Ordering::Relaxed);
            let reason = refused.to_string();
            events::status_request_refused(&reason, first);
            (StatusCode::MISDIRECTED_REQUEST, format!("{reason}\n")).into_response()
        }
    }
}

async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn healthz(State(endpoint): Shared) -> Response {
    let state = endpoint.view.status.borrow().state.clone();
    if matches!(state, TerminalState::Live { .. }) {
        return "live\n".into_response();
    }
    let why = state
        .reason()
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not live: {}{why}\n", state.name()),
    )
        .into_response()
}

async fn status_json(State(endpoint): Shared) -> Response {
    from_snapshot(&endpoint, "application/json", json::render).await
}

async fn status_page(State(endpoint): Shared) -> Response {
    from_snapshot(&endpoint, "text/html; charset=utf-8", page::render).await
}

async fn prometheus(State(endpoint): Shared) -> Response {
    match endpoint.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

/// A snapshot rendered as `content_type`. The snapshot is read on a
/// blocking thread: the database may make the read wait for its busy
/// timeout, and the terminal runs on this runtime too.
async fn from_snapshot(
    endpoint: &Arc<Endpoint>,
    content_type: &'static str,
    render: fn(&StatusView, &Snapshot) -> String,
) -> Response {
    let reader = Arc::clone(endpoint);
    match tokio::task::spawn_blocking(move || Snapshot::take(&reader.view)).await {
        Ok(snapshot) => (
            [(header::CONTENT_TYPE, content_type)],
            render(&endpoint.view, &snapshot),
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the terminal's database\n",
        )
            .into_response(),
    }
}

async fn not_found(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        (
            StatusCode::NOT_FOUND,
            "not found: try /, /status, /events, /healthz or /metrics\n",
        )
            .into_response()
    } else {
        only_get().await
    }
}

async fn only_get() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        "only GET\n",
    )
        .into_response()
}
