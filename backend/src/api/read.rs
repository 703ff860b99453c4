//! Reading the catalog: the stores and their heads, a store's entities, a
//! store's changes after a sequence number.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use possync_core::LicenseKey;
use serde_json::Value;

use super::auth::Client;
use super::body::{
    CatalogBody, ChangeEntry, ChangesBody, ChangesQuery, EntityBody, ErrorBody, StoreHeadBody,
    StoresBody,
};
use super::error::ApiError;
use super::{DEFAULT_CHANGES_PER_PAGE, MAX_CHANGES_PER_PAGE, Shared};

/// Lists the stores this token may see, with their sequence heads.
///
/// A store appears once it has a change.
#[utoipa::path(
    get,
    path = "/v1/stores",
    tag = "catalog",
    responses(
        (status = 200, description = "The stores, by license key.", body = StoresBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn stores(
    State(shared): State<Shared>,
    client: Client,
) -> Result<Json<StoresBody>, ApiError> {
    let heads = shared
        .access
        .heads()
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    Ok(Json(StoresBody {
        stores: heads
            .into_iter()
            .filter(|head| client.may(&head.store))
            .map(|head| StoreHeadBody {
                store: head.store,
                head: head.head,
                unpublished: head.unpublished,
            })
            .collect(),
    }))
}

/// Reads a store's catalog: every entity with its state and the sequence
/// number that last wrote it, and the store's head.
///
/// A store without changes has an empty catalog and head 0.
#[utoipa::path(
    get,
    path = "/v1/stores/{store}/catalog",
    tag = "catalog",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
    ),
    responses(
        (status = 200, description = "The store's catalog.", body = CatalogBody),
        (status = 400, description = "The store is not a valid license key.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn catalog(
    State(shared): State<Shared>,
    client: Client,
    store: Result<Path<String>, PathRejection>,
) -> Result<Json<CatalogBody>, ApiError> {
    let store = store_of(store)?;
    client.check("", &store)?;
    // The head first: every change up to it is then in the entities read
    // after it, so a client that goes on with changes after the head
    // misses none.
    let head = head(&shared, &store).await?;
    let entries = shared
        .access
        .catalog(&store)
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    Ok(Json(CatalogBody {
        store,
        head,
        entities: entries
            .into_iter()
            .map(|entry| EntityBody {
                entity: entry.entity,
                id: entry.id,
                seq: entry.seq,
                state: entry.state,
            })
            .collect(),
    }))
}

/// Reads a store's changes after a sequence number, in order.
#[utoipa::path(
    get,
    path = "/v1/stores/{store}/changes",
    tag = "catalog",
    params(
        ("store" = String, Path, description = "The store's license key.", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ChangesQuery,
    ),
    responses(
        (status = 200, description = "The changes after `after`, at most `limit`, and the store's head.", body = ChangesBody),
        (status = 400, description = "The store is not a valid license key, or `after` or `limit` is out of range.", body = ErrorBody),
        (status = 401, description = "No token, or a token this backend does not know.", body = ErrorBody),
        (status = 403, description = "The token is limited to other stores.", body = ErrorBody),
        (status = 503, description = "The database is not answering; retry.", body = ErrorBody),
    ),
)]
pub(super) async fn changes(
    State(shared): State<Shared>,
    client: Client,
    store: Result<Path<String>, PathRejection>,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<ChangesBody>, ApiError> {
    let store = store_of(store)?;
    client.check("", &store)?;
    let Query(query) = query.map_err(|err| {
        ApiError::bad_request(format!(
            "{}; `after` is a sequence number (0 or more), `limit` 1 to {MAX_CHANGES_PER_PAGE}",
            err.body_text()
        ))
    })?;
    if query.after < 0 {
        return Err(ApiError::bad_request(format!(
            "after={} is negative: give 0 to read from the first change",
            query.after
        )));
    }
    let limit = query.limit.unwrap_or(DEFAULT_CHANGES_PER_PAGE);
    if !(1..=MAX_CHANGES_PER_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit={limit} is out of range: give 1 to {MAX_CHANGES_PER_PAGE}, and read further pages with `after`"
        )));
    }
    let changes = shared
        .access
        .changes_after(&store, query.after, limit)
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    // The head after the changes, so that it is never below the last one.
    let head = head(&shared, &store).await?;
    Ok(Json(ChangesBody {
        store,
        head,
        changes: changes
            .into_iter()
            .map(|change| {
                let row = change.row;
                ChangeEntry {
                    seq: row.seq,
                    // Stored after its plugin checked it: JSON. Should it
                    // not be, the text is still shown rather than lost.
                    payload: serde_json::from_str(&row.payload)
                        .unwrap_or(Value::String(row.payload)),
                    message_type: row.message_type,
                    timestamp: row.timestamp,
                    message_id: row.message_id,
                    published: change.published,
                }
            })
            .collect(),
    }))
}

/// The store named in the path, checked as a license key.
pub(super) fn store_of(store: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(store) = store.map_err(|err| ApiError::bad_request(err.body_text()))?;
    LicenseKey::new(store)
        .map(|key| key.as_str().to_owned())
        .map_err(|err| ApiError::bad_request(format!("the path's store: {err}")))
}

async fn head(shared: &Shared, store: &str) -> Result<i64, ApiError> {
    let heads = shared
        .access
        .heads()
        .await
        .map_err(|err| ApiError::unavailable(&err))?;
    Ok(heads
        .into_iter()
        .find(|head| head.store == store)
        .map_or(0, |head| head.head))
}
