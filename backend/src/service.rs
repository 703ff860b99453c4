//! `possync backend`: the HTTP API, the relay and the direct consumer over
//! one catalog, until asked to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use possync_core::{Registry, RegistryError};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::ServiceConfig;
use crate::direct::Direct;
use crate::events;
use crate::relay::Relay;
use crate::storage::{Storage, StorageError};

/// How long the relay and the direct consumer get to finish what they hold
/// once asked to stop (a relay round waits for the broker's confirms).
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often idempotency keys past `[service] idempotency_days` are
/// forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why the backend could not start or stopped with an error.
///
/// Each message holds its cause's text, so no variant also exposes the
/// cause as its [`source`](std::error::Error::source): a caller printing
/// the chain would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A plugin named in `[plugins]` could not be loaded.
    #[error("the plugins in [plugins] did not load: {0}")]
    Plugins(RegistryError),
    /// `[upstream] types` names a type no enabled plugin handles.
    #[error(
        "upstream.types names {message_type}, which no enabled plugin handles; enable its plugin in [plugins], or take it out of upstream.types (types the plugins handle: {known})"
    )]
    UpstreamType {
        /// The type.
        message_type: String,
        /// The types the enabled plugins handle.
        known: String,
    },
    /// The catalog's database could not be opened.
    #[error("cannot open the catalog's database {database}: {reason}")]
    Database {
        /// Which database (any password redacted).
        database: String,
        /// Why.
        reason: StorageError,
    },
    /// The HTTP API's address cannot be listened on.
    #[error(
        "cannot listen on {address} (service.listen): {reason}; is another backend running there? choose another address or port"
    )]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        reason: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("the HTTP API failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the backend `config` describes until `shutdown` completes (SIGTERM,
/// Ctrl-C), then stops cleanly: the API stops taking requests, the relay
/// finishes its round and the direct consumer its message.
pub async fn run(
    config: ServiceConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let registry =
        Arc::new(Registry::for_publishing(&config.plugins).map_err(ServiceError::Plugins)?);
    let location = config.service.database_location();
    let opening = |reason| ServiceError::Database {
        database: location.to_string(),
        reason,
    };
    match &location {
        crate::config::DatabaseLocation::Sqlite(path) => {
            let storage = crate::SqliteStorage::open(path).await.map_err(opening)?;
            run_with(config, Arc::new(storage), registry, shutdown).await
        }
        crate::config::DatabaseLocation::Postgres(url) => {
            let storage = crate::PostgresStorage::connect(url)
                .await
                .map_err(opening)?;
            run_with(config, Arc::new(storage), registry, shutdown).await
        }
    }
}

/// [`run`] over a storage already open.
pub async fn run_with<S: Storage>(
    config: ServiceConfig,
    storage: Arc<S>,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let plugins = registry
        .plugins()
        .iter()
        .filter(|p| p.enabled)
        .map(|p| p.name.clone())
        .collect::<Vec<_>>()
        .join(", ");
    if config.upstream.enabled
        && let Some(unknown) = config
            .upstream
            .types
            .iter()
            .find(|message_type| registry.schema(message_type).is_none())
    {
        let mut known: Vec<String> = registry
            .plugins()
            .into_iter()
            .filter(|plugin| plugin.enabled)
            .flat_map(|plugin| plugin.message_types)
            .collect();
        known.sort();
        return Err(ServiceError::UpstreamType {
            message_type: unknown.clone(),
            known: known.join(", "),
        });
    }
    let catalog = Arc::new(
        Catalog::new(storage, registry).with_max_message_bytes(config.relay.max_message_bytes),
    );
    let address = config.service.listen;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|reason| ServiceError::Listen { address, reason })?;
    let bound = listener
        .local_addr()
        .map_err(|reason| ServiceError::Listen { address, reason })?;
    events::started(
        &bound.to_string(),
        &config.service.database_location().to_string(),
        &config.broker.redacted_urls(),
        &plugins,
    );

    // Before the relay's first checkpoint, so that it states what the
    // plugins export now. A failure leaves the start going: the relay
    // tries again before it publishes a checkpoint.
    if let Err(err) = sync_checksums(&catalog).await {
        events::checksums_recompute_failed(&err.to_string());
    }

    if config.direct.enabled {
        // Before the relay starts: no checkpoint goes out before the
        // changes waiting in the direct queue are recorded.
        catalog.direct_expected();
    }
    let (stop, stopped) = watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    let relay = Relay::new(
        Arc::clone(&catalog),
        config.broker.clone(),
        config.relay.clone(),
    );
    workers.spawn(relay.run(stopped.clone()));
    workers.spawn(prune_keys(
        Arc::clone(catalog.storage()),
        config.service.idempotency_days,
        stopped.clone(),
    ));
    let counters = Arc::new(crate::fleet::Counters::default());
    if config.upstream.enabled {
        let upstream = crate::upstream::Upstream::new(
            Arc::clone(&catalog),
            config.broker.clone(),
            config.upstream.clone(),
            Arc::clone(&counters),
        );
        workers.spawn(upstream.run(stopped.clone()));
        let snapshots = crate::snapshots::Snapshots::new(
            Arc::clone(&catalog),
            config.broker.clone(),
            config.upstream.clone(),
            crate::upstream::own_user(&config.broker),
        );
        workers.spawn(snapshots.run(stopped.clone()));
        // Applying, unlike checking, may prepare what a plugin writes to
        // (its settings say where).
        let applying =
            Arc::new(Registry::from_config(&config.plugins).map_err(ServiceError::Plugins)?);
        let databases = crate::store_databases::StoreDatabases::new(
            Arc::clone(catalog.storage()),
            applying,
            crate::store_databases::Settings {
                dir: config.upstream.store_databases.clone(),
                types: config.upstream.types.clone(),
                max_message_bytes: config.upstream.max_message_bytes,
            },
            Arc::clone(&counters),
        );
        workers.spawn(databases.run(stopped.clone()));
    }
    if config.direct.enabled {
        let direct = Direct::new(
            Arc::clone(&catalog),
            config.broker.clone(),
            config.direct.clone(),
        );
        workers.spawn(direct.run(stopped.clone()));
    }

    let server = crate::serve::serve(
        listener,
        crate::api::router_with(
            Arc::clone(&catalog),
            crate::fleet::FleetRules::of(&config.upstream),
            counters,
        ),
        crate::serve::Limits::default(),
        stopped.clone(),
    );
    let mut server = std::pin::pin!(server);
    let served = tokio::select! {
        () = shutdown => None,
        served = &mut server => Some(served),
    };
    events::stopping();
    let _ = stop.send(true);
    let served = match served {
        Some(served) => served,
        None => server.await,
    };
    let finished = tokio::time::timeout(STOP_GRACE, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        workers.abort_all();
    }
    served.map_err(ServiceError::Serve)?;
    events::stopped();
    Ok(())
}

/// Makes the stored checksums the plugins' (see
/// [`Storage::sync_checksums`]), logging what it took when it computed
/// them again.
pub(crate) async fn sync_checksums<S: Storage>(catalog: &Catalog<S>) -> Result<(), StorageError> {
    let started = std::time::Instant::now();
    let spec = catalog.checksums();
    if let Some(recomputed) = catalog.storage().sync_checksums(spec).await? {
        events::checksums_recomputed(
            &spec.kinds().collect::<Vec<_>>().join(", "),
            recomputed.stores,
            recomputed.entities,
            started.elapsed().as_millis(),
        );
    }
    Ok(())
}

/// Forgets idempotency keys older than `days`, at start and then hourly,
/// until `stop` turns true.
async fn prune_keys<S: Storage>(storage: Arc<S>, days: u32, mut stop: watch::Receiver<bool>) {
    let retention = Duration::from_secs(u64::from(days) * 24 * 3600);
    loop {
        match storage.prune_keys(retention).await {
            Ok(removed) => events::keys_pruned(removed, days),
            Err(err) => events::keys_prune_failed(&err.to_string()),
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Completes once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::config::BackendConfig;

    #[tokio::test]
    async fn an_upstream_type_no_plugin_handles_stops_the_start_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ServiceConfig::default();
        config.service.listen = "127.0.0.1:0".parse().expect("an address");
        config.upstream.types = vec!["order".into(), "refund".into()];
        config.upstream.store_databases = dir.path().join("stores");
        let storage = crate::SqliteStorage::open(dir.path().join("backend.db"))
            .await
            .expect("opens");
        let registry =
            Registry::for_publishing(&Default::default()).expect("the built-in plugins load");
        let err = run_with(
            config,
            Arc::new(storage),
            Arc::new(registry),
            std::future::pending(),
        )
        .await
        .expect_err("refund has no plugin");
        let said = err.to_string();
        assert!(
            said.contains("upstream.types names refund") && said.contains("[plugins]"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_database_that_cannot_be_opened_is_named_once_with_its_cause_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = dir.path().join("no-such-folder").join("catalog.db");
        let config = ServiceConfig {
            service: BackendConfig {
                database: database.display().to_string(),
                ..BackendConfig::default()
            },
            ..ServiceConfig::default()
        };
        let err = run(config, std::future::pending())
            .await
            .expect_err("cannot open");
        // What a caller printing the whole chain shows (anyhow's `{:#}`).
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        assert!(
            chain.contains("cannot open the catalog's database"),
            "{chain}"
        );
        assert_eq!(
            chain.matches("the backend database failed").count(),
            1,
            "{chain}"
        );
    }
}
