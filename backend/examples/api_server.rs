//! Serves the backend's HTTP API alone (no broker, no relay) over a SQLite
//! database, for tools that test the API from outside (`.ci/schemathesis`).
//!
//! ```text
//! POSSYNC_API_DB=/tmp/api.db POSSYNC_API_TOKEN=possync_test... \
//!     cargo run -p possync-backend --example api_server -- 127.0.0.1:0
//! ```
//!
//! Prints `listening on http://ADDRESS` once it accepts connections. The
//! token in `POSSYNC_API_TOKEN`, if set, is registered (by its hash, as
//! `possync backend token create` would) under the name `api-server`.

use std::collections::BTreeMap;
use std::error::Error;
use std::io::Write as _;
use std::sync::Arc;

use possync_backend::token::hash_token;
use possync_backend::{Catalog, SqliteStorage, Storage, TokenRecord};
use possync_catalog as _;
use possync_core::Registry;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let database = std::env::var("POSSYNC_API_DB")
        .map_err(|_| "set POSSYNC_API_DB to the SQLite file to serve")?;
    let storage = Arc::new(SqliteStorage::open(&database).await?);
    if let Ok(token) = std::env::var("POSSYNC_API_TOKEN") {
        let hash = hash_token(&token);
        if storage.token_by_hash(&hash).await?.is_none() {
            storage
                .create_token(TokenRecord {
                    name: "api-server".to_owned(),
                    hash,
                    stores: None,
                    created_at: 0,
                })
                .await?;
        }
    }
    let registry = Arc::new(Registry::for_publishing(&BTreeMap::new())?);
    let router = possync_backend::api::router(Arc::new(Catalog::new(storage, registry)));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, router).await?;
    Ok(())
}
