//! Reading what a store's terminals sent upstream (orders), after a cursor.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde_json::Value;

use super::auth::Client;
use super::body::{ErrorBody, ReceivedBody, ReceivedEntry, ReceivedQuery};
use super::error::ApiError;
use super::read::store_of;
use super::{DEFAULT_CHANGES_PER_PAGE, MAX_CHANGES_PER_PAGE, Shared};

/// Reads what a store's terminals sent upstream (orders, ...), in the order
/// the backend recorded them, after a cursor.
///
/// Each message is recorded once, however often a terminal sent it; the
/// messages of one terminal come in the order its POS app wrote them. Read
/// from `after=0`, then on from each answer's `next_after`.
#[utoipa::path(
    get,
    path = "/v1/stores/{store}/upstream",
    tag = "upstream",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ReceivedQuery,
    ),
    responses(
        (status = 200, description = "The messages after `after`, at most `limit`.", body = ReceivedBody),
        (status = 400, description = "The store is not a valid license key, or `after`, `type` or `limit` is out of range.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn received(
    State(shared): State<Shared>,
    client: Client,
    store: Result<Path<String>, PathRejection>,
    query: Result<Query<ReceivedQuery>, QueryRejection>,
) -> Result<Json<ReceivedBody>, ApiError> {
    let store = store_of(store)?;
    client.check("", &store)?;
    let Query(query) = query.map_err(|err| {
        ApiError::bad_request(format!(
            "{}; `after` is a cursor (0 or more), `limit` 1 to {MAX_CHANGES_PER_PAGE}",
            err.body_text()
        ))
    })?;
    if query.after < 0 {
        return Err(ApiError::bad_request(format!(
            "after={} is negative: give 0 to read from the first message",
            query.after
        )));
    }
    let limit = query.limit.unwrap_or(DEFAULT_CHANGES_PER_PAGE);
    if !(1..=MAX_CHANGES_PER_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit={limit} is out of range: give 1 to {MAX_CHANGES_PER_PAGE}, and read further pages with `after`"
        )));
    }
    if let Some(message_type) = &query.message_type
        && !possync_core::is_message_type(message_type)
    {
        return Err(ApiError::bad_request(
            "type must be 1 to 64 of a-z, 0-9 and _ (a message type, like `order`)",
        ));
    }
    let messages = shared
        .access
        .upstream_after(&store, query.message_type.as_deref(), query.after, limit)
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    let next_after = messages.last().map_or(query.after, |m| m.cursor);
    Ok(Json(ReceivedBody {
        store,
        next_after,
        messages: messages
            .into_iter()
            .map(|m| ReceivedEntry {
                cursor: m.cursor,
                // Stored after its plugin checked it: JSON. Should it not
                // be, the text is still shown rather than lost.
                payload: serde_json::from_str(&m.record.payload)
                    .unwrap_or(Value::String(m.record.payload)),
                terminal: m.record.terminal,
                message_type: m.record.message_type,
                message_id: m.record.message_id,
                created_at: m.record.created_at,
                received_ms: m.received_ms,
            })
            .collect(),
    }))
}
