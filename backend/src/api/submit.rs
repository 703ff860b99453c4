//! Submitting changes: one for a store, or a batch for any stores in one
//! transaction; idempotent by the client's `Idempotency-Key`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::auth::Client;
use super::body::{self, BatchBody, ChangeBody, ChangeResult, ChangeStatus, ErrorBody, Submission};
use super::error::ApiError;
use super::{MAX_BODY_BYTES, MAX_CHANGES_PER_REQUEST, Shared};
use crate::catalog::ChangeRequest;
use crate::storage::{IdempotencyKey, Outcome};

/// The request header that makes a submission idempotent.
pub(super) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header set on an answer replayed for a key seen before.
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest idempotency key accepted.
const MAX_KEY_LEN: usize = 255;

/// The longest message id accepted: it becomes the AMQP `message_id`.
const MAX_MESSAGE_ID_LEN: usize = 128;

/// Submits one change to a store.
///
/// The change is checked by its type's plugin and sequenced; the answer is
/// sent after the commit, so a change answered is durable. With an
/// `Idempotency-Key`, a retry gets the first answer and applies nothing.
#[utoipa::path(
    post,
    path = "/v1/stores/{store}/changes",
    tag = "changes",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the request idempotent for this token: a retry with the same key and body gets the first answer; the same key with another body is refused with 422.", min_length = 1, max_length = 255, pattern = r"^[!-~]{1,255}$"),
    ),
    request_body(content = ChangeBody, description = "The change."),
    responses(
        (status = 200, description = "Durable in the catalog: its sequence number, or that it was stale.", body = Submission),
        (status = 400, description = "The body is not JSON of this shape, or a header is malformed.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "The change cannot be applied: unknown type, invalid payload, invalid store, or an idempotency key used for another request.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry (with the same Idempotency-Key).", body = ErrorBody),
    ),
)]
pub(super) async fn submit_one(
    State(shared): State<Shared>,
    client: Client,
    store: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = async {
        let store = super::read::store_of(store)?;
        client.check("", &store)?;
        let key = key_header(&headers)?;
        let bytes = read(bytes)?;
        let change: ChangeBody = body::parse(&bytes)?;
        let scope = format!("POST /v1/stores/{store}/changes");
        submit(&shared, &client, key, &scope, &bytes, vec![(store, change)]).await
    }
    .await;
    refused(&shared, result)
}

/// Submits changes for any stores in one transaction.
///
/// Every change is checked first; one refused change refuses the batch and
/// nothing of it is stored. A token limited to some stores may not submit a
/// batch that names any other store.
#[utoipa::path(
    post,
    path = "/v1/changes",
    tag = "changes",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the request idempotent for this token: a retry with the same key and body gets the first answer; the same key with another body is refused with 422. Use one key per batch.", min_length = 1, max_length = 255, pattern = r"^[!-~]{1,255}$"),
    ),
    request_body(content = BatchBody, description = "The changes, at most 1000."),
    responses(
        (status = 200, description = "All durable in the catalog: each change's sequence number, or that it was stale.", body = Submission),
        (status = 400, description = "The body is not JSON of this shape, or a header is malformed.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "A change names a store the token is not limited to: nothing was applied.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A change cannot be applied (unknown type, invalid payload, invalid store), the batch is empty or too long, or the idempotency key was used for another request: nothing was applied.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry (with the same Idempotency-Key).", body = ErrorBody),
    ),
)]
pub(super) async fn submit_batch(
    State(shared): State<Shared>,
    client: Client,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = async {
        let key = key_header(&headers)?;
        let bytes = read(bytes)?;
        let batch: BatchBody = body::parse(&bytes)?;
        if batch.changes.is_empty() {
            return Err(ApiError::unprocessable(
                "the batch holds no change: put at least one in `changes`",
            ));
        }
        if batch.changes.len() > MAX_CHANGES_PER_REQUEST {
            return Err(ApiError::unprocessable(format!(
                "the batch holds {} changes; at most {MAX_CHANGES_PER_REQUEST} are taken in one request: split it, one Idempotency-Key per request",
                batch.changes.len()
            )));
        }
        // Refuse the whole batch before anything is checked or stored.
        for (index, change) in batch.changes.iter().enumerate() {
            client.check(&format!("change {index}: "), &change.store)?;
        }
        let changes = batch.changes.into_iter().map(|change| change.split()).collect();
        submit(&shared, &client, key, "POST /v1/changes", &bytes, changes).await
    }
    .await;
    refused(&shared, result)
}

/// Counts a refusal for `/metrics`.
fn refused(shared: &Shared, result: Result<Response, ApiError>) -> Result<Response, ApiError> {
    if let Err(err) = &result {
        shared.metrics.refused(err.status().as_u16());
    }
    result
}

fn read(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    bytes.map_err(|err| {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(MAX_BODY_BYTES)
        } else {
            ApiError::bad_request(format!("the body could not be read: {}", err.body_text()))
        }
    })
}

async fn submit(
    shared: &Shared,
    client: &Client,
    key: Option<&str>,
    scope: &str,
    bytes: &[u8],
    changes: Vec<(String, ChangeBody)>,
) -> Result<Response, ApiError> {
    let key = key.map(|key| idempotency_key(client, key, scope, bytes));
    let mut requests = Vec::with_capacity(changes.len());
    for (index, (store, change)) in changes.into_iter().enumerate() {
        requests.push(request(shared, index, store, change)?);
    }
    let submitted = shared.access.submit(requests, key).await?;
    let mut sequenced = 0;
    let changes: Vec<ChangeResult> = submitted
        .accepted
        .into_iter()
        .map(|accepted| {
            let (status, seq) = match accepted.outcome {
                Outcome::Sequenced { seq } => {
                    sequenced += 1;
                    (ChangeStatus::Sequenced, Some(seq))
                }
                Outcome::Stale => (ChangeStatus::Stale, None),
            };
            ChangeResult {
                store: accepted.store,
                message_id: accepted.message_id,
                status,
                seq,
            }
        })
        .collect();
    if !submitted.replayed {
        shared
            .metrics
            .accepted(sequenced, changes.len() as u64 - sequenced);
    }
    let mut response = Json(Submission {
        changes,
        replayed: submitted.replayed,
    })
    .into_response();
    if submitted.replayed {
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The `Idempotency-Key` header, if sent, checked.
fn key_header(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= MAX_KEY_LEN)
        .filter(|key| key.bytes().all(|b| b.is_ascii_graphic()))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "the Idempotency-Key header must be 1 to {MAX_KEY_LEN} visible ASCII characters (a UUID, say)"
            ))
        })
}

/// The key, scoped by the token's name; its fingerprint is the SHA-256 of
/// the route and the body, so the same body sent to another store's route
/// is another request.
fn idempotency_key(client: &Client, key: &str, scope: &str, bytes: &[u8]) -> IdempotencyKey {
    let mut digest = Sha256::new();
    digest.update(scope.as_bytes());
    digest.update(b"\n");
    digest.update(bytes);
    let fingerprint = digest
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    IdempotencyKey {
        client: client.name.clone(),
        key: key.to_owned(),
        fingerprint,
    }
}

/// A change as the catalog takes it, after the checks that the catalog
/// leaves to its callers: a known type (named among the enabled ones), a
/// readable timestamp, a usable message id.
fn request(
    shared: &Shared,
    index: usize,
    store: String,
    change: ChangeBody,
) -> Result<ChangeRequest, ApiError> {
    if shared.types.binary_search(&change.message_type).is_err() {
        return Err(ApiError::unprocessable(format!(
            "change {index}: unknown type {:?}; this backend takes: {}",
            change.message_type,
            shared.types.join(", ")
        )));
    }
    if let Some(timestamp) = &change.timestamp
        && OffsetDateTime::parse(timestamp, &Rfc3339).is_err()
    {
        return Err(ApiError::unprocessable(format!(
            "change {index}: timestamp {timestamp:?} is not an RFC 3339 time (2025-11-27T10:30:00Z); leave it out to use the backend's clock"
        )));
    }
    if let Some(id) = &change.message_id
        && (id.is_empty()
            || id.len() > MAX_MESSAGE_ID_LEN
            || !id.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::unprocessable(format!(
            "change {index}: message_id must be 1 to {MAX_MESSAGE_ID_LEN} visible ASCII characters; leave it out to get a new one"
        )));
    }
    Ok(ChangeRequest {
        store,
        message_type: change.message_type,
        payload: serde_json::Value::Object(change.payload).to_string(),
        timestamp: change.timestamp,
        message_id: change.message_id,
        clock: None,
    })
}
