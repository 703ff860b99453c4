//! `/metrics`: the API's counters, kept in memory since start, and each
//! store's sequence head and unpublished changes, read from the database at
//! each scrape.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::storage::StoreHead;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(super) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    /// The route's template (`/v1/stores/{store}/changes`), so a client
    /// cannot grow the label set by calling many paths.
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StoreLabels {
    store: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    store: String,
    state: String,
}

/// The API's counters.
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    sequenced: Counter,
    stale: Counter,
    refused: Family<RefusedLabels, Counter>,
}

impl Metrics {
    pub(super) fn new(counters: &crate::fleet::Counters) -> Self {
        let mut registry = Registry::default();
        counters.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "possync_backend_http_requests",
            "HTTP requests answered, by route, method and status.",
            requests.clone(),
        );
        let sequenced = Counter::default();
        registry.register(
            "possync_backend_changes_sequenced",
            "Changes accepted through the API and given a sequence number.",
            sequenced.clone(),
        );
        let stale = Counter::default();
        registry.register(
            "possync_backend_changes_stale",
            "Changes accepted through the API that were older than the catalog's entity and changed nothing.",
            stale.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "possync_backend_submissions_refused",
            "Submissions refused, by HTTP status.",
            refused.clone(),
        );
        Self {
            registry,
            requests,
            sequenced,
            stale,
            refused,
        }
    }

    pub(super) fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
    }

    pub(super) fn accepted(&self, sequenced: u64, stale: u64) {
        self.sequenced.inc_by(sequenced);
        self.stale.inc_by(stale);
    }

    pub(super) fn refused(&self, status: u16) {
        self.refused.get_or_create(&RefusedLabels { status }).inc();
    }

    /// The counters, then `heads` and `fleet` as gauges.
    pub(super) fn render(
        &self,
        heads: &[StoreHead],
        fleet: &[super::fleet::StoreSummary],
    ) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        let mut stores = Registry::default();
        let head = Family::<StoreLabels, Gauge>::default();
        let unpublished = Family::<StoreLabels, Gauge>::default();
        stores.register(
            "possync_backend_store_head",
            "The store's highest sequence number given out.",
            head.clone(),
        );
        stores.register(
            "possync_backend_store_unpublished",
            "The store's changes not yet confirmed by the broker.",
            unpublished.clone(),
        );
        for store in heads {
            let labels = StoreLabels {
                store: store.store.clone(),
            };
            head.get_or_create(&labels).set(store.head);
            unpublished.get_or_create(&labels).set(store.unpublished);
        }
        let terminals = Family::<StateLabels, Gauge>::default();
        let max_lag = Family::<StoreLabels, Gauge>::default();
        let quarantined = Family::<StoreLabels, Gauge>::default();
        let outbox = Family::<StoreLabels, Gauge>::default();
        let gaps = Family::<StoreLabels, Gauge>::default();
        stores.register(
            "possync_backend_fleet_terminals",
            "The store's terminals, by state (live, offline, stalled).",
            terminals.clone(),
        );
        stores.register(
            "possync_backend_fleet_max_lag",
            "The most changes of the store's head any of its terminals has not applied.",
            max_lag.clone(),
        );
        stores.register(
            "possync_backend_fleet_quarantined",
            "Messages in the quarantines of the store's terminals.",
            quarantined.clone(),
        );
        stores.register(
            "possync_backend_fleet_outbox",
            "Rows waiting in the outboxes of the store's terminals.",
            outbox.clone(),
        );
        stores.register(
            "possync_backend_fleet_gaps",
            "The store's terminals with a gap open (a lost queue, a checksum that differs), converging from a snapshot.",
            gaps.clone(),
        );
        for summary in fleet {
            let labels = StoreLabels {
                store: summary.store.clone(),
            };
            for (state, count) in &summary.states {
                terminals
                    .get_or_create(&StateLabels {
                        store: summary.store.clone(),
                        state: (*state).to_owned(),
                    })
                    .set(*count);
            }
            max_lag.get_or_create(&labels).set(summary.max_lag);
            quarantined.get_or_create(&labels).set(summary.quarantined);
            outbox.get_or_create(&labels).set(summary.outbox);
            gaps.get_or_create(&labels).set(summary.gaps);
        }
        prometheus_text::encode(&mut text, &stores)?;
        Ok(text)
    }
}
