//! The fleet: every terminal's state and lag (`/v1/fleet` and the `/fleet`
//! page), waiting until a store's terminals applied a change, and
//! forgetting a terminal that is gone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use possync_core::{TerminalId, unix_now_ms};

use super::Shared;
use super::auth::Client;
use super::body::{
    AppliedBody, AppliedQuery, ErrorBody, FleetBody, FleetQuery, FleetStore, TerminalBody,
};
use super::error::ApiError;
use super::read::store_of;
use crate::storage::{StoreHead, TerminalRecord};

/// The longest `wait` of `/v1/stores/{store}/applied`, under the request
/// limit of 60 s.
const MAX_WAIT_SECS: u64 = 50;

/// How often a wait looks again when no receipt of this process wakes it
/// (another backend process may record them).
const RECHECK: Duration = Duration::from_millis(250);

/// The page: the fleet, drawn by its script from `/v1/fleet`.
const PAGE: &str = include_str!("fleet.html");

/// Lists every store's terminals with their state and lag, furthest
/// behind first (or by name).
///
/// A terminal appears once it sent a receipt (a terminal reports at start,
/// after each commit, at most once a second, and every few seconds while
/// nothing changes). It is `offline` when its last receipt is older than
/// `upstream.offline_after_secs` or said it stopped, `stalled` when it is
/// behind its store's head and has applied nothing for
/// `upstream.stalled_after_secs`. Each says up to which sequence number
/// its catalog was verified against the backend's checksums, and the gap
/// it has open, if any.
#[utoipa::path(
    get,
    path = "/v1/fleet",
    tag = "fleet",
    params(FleetQuery),
    responses(
        (status = 200, description = "Every store this token may see that has a terminal, with its terminals.", body = FleetBody),
        (status = 400, description = "`sort` is neither `lag` nor `name`.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn fleet(
    State(shared): State<Shared>,
    client: Client,
    query: Result<Query<FleetQuery>, QueryRejection>,
) -> Result<Json<FleetBody>, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::bad_request(err.body_text()))?;
    let by_lag = match query.sort.as_deref() {
        None | Some("lag") => true,
        Some("name") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "sort={other:?}: give `lag` (furthest behind first) or `name`"
            )));
        }
    };
    let heads = heads(&shared).await?;
    let records = shared
        .access
        .fleet(None)
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    let now_ms = unix_now_ms();
    let mut stores: Vec<FleetStore> = by_store(records)
        .into_iter()
        .filter(|(store, _)| client.may(store))
        .map(|(store, terminals)| {
            let head = head_of(&heads, &store);
            let mut terminals: Vec<TerminalBody> = terminals
                .iter()
                .map(|t| terminal_body(&shared, t, head, now_ms))
                .collect();
            if by_lag {
                terminals.sort_by(|a, b| b.lag.cmp(&a.lag).then(a.terminal.cmp(&b.terminal)));
            }
            FleetStore {
                max_lag: terminals.iter().map(|t| t.lag).max().unwrap_or(0),
                store,
                head,
                terminals,
            }
        })
        .collect();
    if by_lag {
        stores.sort_by(|a, b| b.max_lag.cmp(&a.max_lag).then(a.store.cmp(&b.store)));
    }
    Ok(Json(FleetBody { stores, now_ms }))
}

/// Says whether every known terminal of a store applied a sequence number,
/// waiting up to `wait` seconds for it.
///
/// Answers as soon as the last of them reports it, or when `wait` passes
/// with the terminals that have not (`pending`). Known terminals are those
/// that ever sent a receipt and were not forgotten (`DELETE
/// /v1/stores/{store}/terminals/{terminal}`); offline ones count.
#[utoipa::path(
    get,
    path = "/v1/stores/{store}/applied",
    tag = "fleet",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        AppliedQuery,
    ),
    responses(
        (status = 200, description = "Whether every known terminal applied `seq`, and which have not.", body = AppliedBody),
        (status = 400, description = "The store is not a valid license key, or `seq` (above the store's head) or `wait` is out of range.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn applied(
    State(shared): State<Shared>,
    client: Client,
    store: Result<Path<String>, PathRejection>,
    query: Result<Query<AppliedQuery>, QueryRejection>,
) -> Result<Json<AppliedBody>, ApiError> {
    let store = store_of(store)?;
    client.check("", &store)?;
    let Query(query) = query.map_err(|err| {
        ApiError::bad_request(format!(
            "{}; `seq` is a sequence number (1 or more), `wait` 0 to {MAX_WAIT_SECS} seconds",
            err.body_text()
        ))
    })?;
    if query.seq < 1 {
        return Err(ApiError::bad_request(format!(
            "seq={} is out of range: sequence numbers start at 1",
            query.seq
        )));
    }
    if query.wait > MAX_WAIT_SECS {
        return Err(ApiError::bad_request(format!(
            "wait={} is out of range: give 0 to {MAX_WAIT_SECS} seconds, and ask again to wait longer",
            query.wait
        )));
    }
    let head = head_of(&heads(&shared).await?, &store);
    if query.seq > head {
        return Err(ApiError::bad_request(format!(
            "seq={} is above store {store}'s head ({head}): no terminal can have applied it",
            query.seq
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(query.wait);
    let mut recorded = shared.counters.receipts_recorded();
    loop {
        // Marked seen before the read: a receipt recorded after it wakes the wait.
        recorded.borrow_and_update();
        let records = shared
            .access
            .fleet(Some(&store))
            .await
            .map_err(|err| ApiError::unavailable(&err))?;
        let pending: Vec<String> = records
            .iter()
            .filter(|t| t.applied_up_to < query.seq)
            .map(|t| t.terminal.clone())
            .collect();
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            let head = head_of(&heads(&shared).await?, &store);
            let now_ms = unix_now_ms();
            return Ok(Json(AppliedBody {
                complete: pending.is_empty(),
                terminals: records
                    .iter()
                    .map(|t| terminal_body(&shared, t, head, now_ms))
                    .collect(),
                store,
                seq: query.seq,
                pending,
            }));
        }
        let wake = RECHECK.min(deadline - now);
        tokio::select! {
            () = tokio::time::sleep(wake) => {}
            _ = recorded.changed() => {}
        }
    }
}

/// Forgets a terminal that is gone (replaced, retired): the fleet and
/// `applied` no longer count it, until it sends a receipt again.
#[utoipa::path(
    delete,
    path = "/v1/stores/{store}/terminals/{terminal}",
    tag = "fleet",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("terminal" = String, Path, description = "The terminal's id.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
    ),
    responses(
        (status = 204, description = "Forgotten."),
        (status = 400, description = "The store or terminal is not a valid id.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 404, description = "The backend knows no such terminal of this store.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn forget(
    State(shared): State<Shared>,
    client: Client,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((store, terminal)) = path.map_err(|err| ApiError::bad_request(err.body_text()))?;
    let store = store_of(Ok(Path(store)))?;
    let terminal = TerminalId::new(terminal)
        .map_err(|err| ApiError::bad_request(format!("the path's terminal: {err}")))?;
    client.check("", &store)?;
    let known = shared
        .access
        .forget_terminal(&store, terminal.as_str())
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    if !known {
        return Err(ApiError::not_found(format!(
            "no terminal {terminal} of store {store} has reported to this backend"
        )));
    }
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// The fleet page, for people: its script reads `/v1/fleet` with the token
/// given after `#token=` in its address (never sent to the server, kept
/// for the browser tab only) and redraws every 2 s. Needs no token itself.
#[utoipa::path(
    get,
    path = "/fleet",
    tag = "fleet",
    security(()),
    responses(
        (status = 200, description = "The page.", content_type = "text/html"),
    ),
)]
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// Per store, for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct StoreSummary {
    pub(super) store: String,
    pub(super) states: Vec<(&'static str, i64)>,
    pub(super) max_lag: i64,
    pub(super) quarantined: i64,
    pub(super) outbox: i64,
    /// Terminals with a gap open.
    pub(super) gaps: i64,
}

/// Every store's terminals summed up, for `/metrics`.
pub(super) async fn summaries(
    shared: &Shared,
    heads: &[StoreHead],
) -> Result<Vec<StoreSummary>, ApiError> {
    let records = shared
        .access
        .fleet(None)
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    let now_ms = unix_now_ms();
    Ok(by_store(records)
        .into_iter()
        .map(|(store, terminals)| {
            let head = head_of(heads, &store);
            let mut states = BTreeMap::from([("live", 0), ("offline", 0), ("stalled", 0)]);
            let mut summary = StoreSummary::default();
            for terminal in &terminals {
                let judged = shared.rules.judge(terminal, head, now_ms);
                *states.entry(judged.state.name()).or_default() += 1;
                summary.max_lag = summary.max_lag.max(judged.lag);
                // A terminal reports what it likes: summed without overflow.
                summary.quarantined = summary.quarantined.saturating_add(terminal.quarantined);
                summary.outbox = summary.outbox.saturating_add(terminal.outbox);
                summary.gaps += i64::from(terminal.gap.is_some());
            }
            summary.states = states.into_iter().collect();
            summary.store = store;
            summary
        })
        .collect())
}

fn by_store(records: Vec<TerminalRecord>) -> BTreeMap<String, Vec<TerminalRecord>> {
    let mut stores: BTreeMap<String, Vec<TerminalRecord>> = BTreeMap::new();
    for record in records {
        stores.entry(record.store.clone()).or_default().push(record);
    }
    stores
}

async fn heads(shared: &Shared) -> Result<Vec<StoreHead>, ApiError> {
    shared
        .access
        .heads()
        .await
        .map_err(|err| ApiError::unavailable(&err))
}

fn head_of(heads: &[StoreHead], store: &str) -> i64 {
    heads
        .iter()
        .find(|head| head.store == store)
        .map_or(0, |head| head.head)
}

fn terminal_body(shared: &Shared, t: &TerminalRecord, head: i64, now_ms: i64) -> TerminalBody {
    let judged = shared.rules.judge(t, head, now_ms);
    TerminalBody {
        terminal: t.terminal.clone(),
        state: judged.state.name().to_owned(),
        lag: judged.lag,
        applied_up_to: t.applied_up_to,
        highest_applied: t.highest_applied,
        last_seen_ms: t.last_seen_ms,
        offline_since_ms: judged.offline_since_ms,
        quarantined: t.quarantined,
        outbox: t.outbox,
        verified_seq: t.verified_seq,
        gap: t.gap.clone(),
    }
}
