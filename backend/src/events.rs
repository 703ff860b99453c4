//! Everything worth telling the operator of a backend, as named events: one
//! function per event, each saying what happened and what to do about it.

use tracing::{debug, error, info, warn};

pub(crate) fn config_readable(path: &std::path::Path, mode: u32) {
    warn!(
        event = "config_readable",
        file = %path.display(),
        mode = format!("{:o}", mode & 0o777),
        "the config file holds a password and others can read it: chmod 600 it"
    );
}

pub(crate) fn started(api: &str, database: &str, broker: &str, plugins: &str) {
    info!(
        event = "backend_started",
        %api,
        %database,
        %broker,
        %plugins,
        "backend running: HTTP API at http://{api}/, catalog in {database}"
    );
}

pub(crate) fn relay_standby(retry_in_secs: u64) {
    info!(
        event = "relay_standby",
        retry_in_secs,
        "another backend process relays the outbox; this one serves the API and will take over if it stops"
    );
}

pub(crate) fn relay_leading() {
    info!(
        event = "relay_leading",
        "this backend process relays the outbox to the broker"
    );
}

/// The relay stops publishing: it no longer leads, or cannot tell.
pub(crate) fn relay_lost_lead(reason: &str) {
    warn!(
        event = "relay_lost_lead",
        %reason,
        "this backend process stopped relaying the outbox; it will relay again once it leads"
    );
}

pub(crate) fn keys_pruned(removed: u64, days: u32) {
    debug!(
        event = "keys_pruned",
        removed, days, "idempotency keys older than the retention forgotten"
    );
}

pub(crate) fn keys_prune_failed(reason: &str) {
    warn!(
        event = "keys_prune_failed",
        %reason,
        "cannot forget old idempotency keys; trying again in an hour"
    );
}

pub(crate) fn relay_published(rows: usize, stores: usize, elapsed_ms: u128) {
    debug!(
        event = "relay_published",
        rows, stores, elapsed_ms, "outbox rows confirmed by the broker and marked published"
    );
}

pub(crate) fn relay_mark_failed(reason: &str, rows: usize) {
    warn!(
        event = "relay_mark_failed",
        %reason,
        rows,
        "cannot mark rows the broker confirmed as published; they will be published again and terminals will drop the copies"
    );
}

/// Logged at warn on the first failure of a stretch, quietly per retry
/// after it, so an outage of an hour is a few lines, not thousands.
pub(crate) fn relay_failed(reason: &str, unpublished: usize, retry_in_ms: u128, first: bool) {
    if first {
        warn!(
            event = "relay_failed",
            %reason,
            unpublished,
            retry_in_ms,
            "the relay cannot publish the outbox: the changes are safe in the catalog and go out in order once it can; check the broker (or the database) the reason names"
        );
    } else {
        debug!(
            event = "relay_failed",
            %reason,
            unpublished,
            retry_in_ms,
            "the relay still cannot publish the outbox"
        );
    }
}

/// A relay stall that lasts: said again every minute while it lasts.
pub(crate) fn relay_stalled(reason: &str, unpublished: usize, stalled_ms: u128, attempts: u32) {
    error!(
        event = "relay_stalled",
        %reason,
        unpublished,
        stalled_ms,
        attempts,
        "the relay still cannot publish the outbox: terminals fall behind the catalog until it can; fix what the reason names (a full terminal queue that rejects publishes, the broker, the database)"
    );
}

pub(crate) fn relay_recovered(failed_ms: u128, attempts: u32) {
    info!(
        event = "relay_recovered",
        failed_ms, attempts, "the relay publishes the outbox again"
    );
}

/// The outbox holds a row that can never be published as it is; the relay
/// holds it (and the store's later rows) rather than leave a gap.
pub(crate) fn relay_row_unpublishable(store: &str, seq: i64, reason: &str) {
    error!(
        event = "relay_row_unpublishable",
        %store,
        seq,
        %reason,
        "an outbox row cannot be published; the relay keeps trying it and holds the store's later changes behind it"
    );
}

/// The stored checksums were kept under another spec (the first start
/// after an upgrade, plugins that export otherwise) and were computed
/// again from the catalog.
pub(crate) fn checksums_recomputed(kinds: &str, stores: u64, entities: u64, elapsed_ms: u128) {
    info!(
        event = "checksums_recomputed",
        %kinds,
        stores,
        entities,
        elapsed_ms,
        "the catalog's checksums were computed again for what the plugins export now"
    );
}

pub(crate) fn checksums_recompute_failed(reason: &str) {
    warn!(
        event = "checksums_recompute_failed",
        %reason,
        "cannot compute the catalog's checksums again; no checkpoint is published until they are (the relay tries again)"
    );
}

/// A submission under another spec made the stored checksums stale: a
/// backend process with other `[plugins]` shares the database.
pub(crate) fn checksums_stale() {
    warn!(
        event = "checksums_stale",
        "the catalog's checksums were written by a backend process whose plugins export other entities; computing them again. Give every backend process on this database the same [plugins]"
    );
}

/// Checkpoints go out while this process relays.
pub(crate) fn checkpoints_on(kinds: &str, every_changes: u64, every_secs: u64) {
    info!(
        event = "checkpoints_on",
        %kinds,
        every_changes,
        every_secs,
        "the relay publishes each store's checksums (checkpoints) for its terminals to verify their catalog (0: that trigger is off)"
    );
}

/// No checkpoint is published, and why.
pub(crate) fn checkpoints_off(reason: &str) {
    info!(
        event = "checkpoints_off",
        %reason,
        "the relay publishes no checkpoints: terminals cannot verify their catalog against the backend's"
    );
}

pub(crate) fn checkpoint_published(store: &str, seq: i64, kinds: usize) {
    debug!(
        event = "checkpoint_published",
        %store,
        seq,
        kinds,
        "checkpoint confirmed by the broker"
    );
}

/// A checkpoint could not be read or published; it is tried again later.
pub(crate) fn checkpoint_failed(store: &str, reason: &str, retry_in_secs: u64) {
    warn!(
        event = "checkpoint_failed",
        %store,
        %reason,
        retry_in_secs,
        "cannot publish the store's checkpoint; its changes are not affected, and it is tried again"
    );
}

pub(crate) fn direct_live(queue: &str, binding: &str, ready: u32) {
    info!(
        event = "direct_live",
        %queue,
        %binding,
        ready,
        "recording changes other publishers send straight to the exchange"
    );
}

pub(crate) fn direct_caught_up() {
    info!(
        event = "direct_caught_up",
        "the changes sent straight to the exchange while the backend was away are recorded: checkpoints may go out"
    );
}

/// Logged at warn on the first failure of a stretch, quietly per retry after.
pub(crate) fn direct_offline(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(
            event = "direct_offline",
            %reason,
            retry_in_ms,
            "cannot read the direct queue: changes sent straight to the exchange still reach terminals and wait in the queue for the catalog; check the broker the reason names"
        );
    } else {
        debug!(
            event = "direct_offline",
            %reason,
            retry_in_ms,
            "still cannot read the direct queue"
        );
    }
}

pub(crate) fn direct_recorded(routing_key: &str, seq: Option<i64>) {
    debug!(
        event = "direct_recorded",
        %routing_key,
        seq = seq.unwrap_or(0),
        "a change sent straight to the exchange is in the catalog"
    );
}

/// Messages another catalog's relay published reach this backend: said at
/// once, then once a minute for each catalog and store while it lasts;
/// `seen` counts them all since start.
pub(crate) fn direct_foreign_catalog(catalog: &str, store: &str, ours: &str, seen: u64) {
    error!(
        event = "direct_foreign_catalog",
        %catalog,
        %store,
        %ours,
        seen,
        "another backend (catalog {catalog}) publishes store {store}'s changes on this exchange: two backends with their own databases on one exchange; terminals refuse the changes of the catalog they do not follow. Stop the backend that is not the store's catalog of record, or give it its own exchange; the message was skipped"
    );
}

pub(crate) fn direct_refused(routing_key: &str, reason: &str) {
    warn!(
        event = "direct_refused",
        %routing_key,
        %reason,
        "a message sent straight to the exchange cannot enter the catalog: dead-lettered with the reason; terminals judge it on their own"
    );
}

/// Logged at error on the first failure, quietly per retry after.
pub(crate) fn direct_held(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        error!(
            event = "direct_held",
            %reason,
            retry_in_ms,
            "the catalog's database refuses a change from the direct queue: holding it and trying again, taking no other; check the database the reason names"
        );
    } else {
        debug!(
            event = "direct_held",
            %reason,
            retry_in_ms,
            "still holding a change from the direct queue"
        );
    }
}

pub(crate) fn dead_letter_fallback(reason: &str) {
    warn!(
        event = "dead_letter_fallback",
        %reason,
        "could not publish the dead letter with its reason; rejected it to the dead-letter queue without one"
    );
}

pub(crate) fn stopping() {
    info!(
        event = "stopping",
        "stopping: finishing the relay round and the message in progress"
    );
}

pub(crate) fn accept_failed(error: &str) {
    warn!(
        event = "backend_api_accept_failed",
        %error,
        "the HTTP API cannot accept a connection; trying again in 500 ms"
    );
}

pub(crate) fn connections_dropped(connections: usize, grace_secs: u64) {
    warn!(
        event = "backend_api_connections_dropped",
        connections,
        grace_secs,
        "stopping: dropped {connections} HTTP connections whose requests did not finish within {grace_secs} s"
    );
}

pub(crate) fn stopped() {
    info!(event = "stopped", "backend stopped cleanly");
}

pub(crate) fn failpoint(what: &str) {
    warn!(event = "failpoint", %what, "test hook fired (never set in production)");
}

pub(crate) fn upstream_live(queue: &str, binding: &str) {
    info!(
        event = "upstream_live",
        %queue,
        %binding,
        "recording what terminals send upstream (orders, delivery receipts)"
    );
}

/// Logged at warn on the first failure of a stretch, quietly per retry after.
pub(crate) fn upstream_offline(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(
            event = "upstream_offline",
            %reason,
            retry_in_ms,
            "cannot read the upstream queue: terminals keep their orders in their outboxes and the fleet page goes stale; check the broker the reason names"
        );
    } else {
        debug!(event = "upstream_offline", %reason, retry_in_ms, "still cannot read the upstream queue");
    }
}

pub(crate) fn snapshots_live(queue: &str) {
    info!(
        event = "snapshots_live",
        %queue,
        "answering terminals' snapshot requests"
    );
}

/// Logged at warn on the first failure of a stretch, quietly per retry after.
pub(crate) fn snapshots_offline(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(
            event = "snapshots_offline",
            %reason,
            retry_in_ms,
            "cannot read the snapshot queue: terminals with a gap wait for their snapshot; check the broker the reason names"
        );
    } else {
        debug!(event = "snapshots_offline", %reason, retry_in_ms, "still cannot read the snapshot queue");
    }
}

/// A snapshot request not answered: the terminal asks again.
pub(crate) fn snapshot_refused(routing_key: &str, reason: &str) {
    warn!(
        event = "snapshot_refused",
        %routing_key,
        %reason,
        "a snapshot request was not answered"
    );
}

pub(crate) fn snapshot_chunk_sent(store: &str, seq: i64, entities: usize) {
    debug!(
        event = "snapshot_chunk_sent",
        %store,
        seq,
        entities,
        "sent a chunk of a store's catalog to the terminal that asked"
    );
}

pub(crate) fn upstream_refused(routing_key: &str, reason: &str) {
    warn!(
        event = "upstream_refused",
        %routing_key,
        %reason,
        "an upstream message was refused: dead-lettered with the reason"
    );
}

/// Logged at error on the first failure, quietly per retry after.
pub(crate) fn upstream_held(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        error!(
            event = "upstream_held",
            %reason,
            retry_in_ms,
            "cannot record upstream messages: they wait in the queue, unacknowledged, and are tried again"
        );
    } else {
        debug!(event = "upstream_held", %reason, retry_in_ms, "still cannot record upstream messages");
    }
}

pub(crate) fn upstream_unverified() {
    warn!(
        event = "upstream_unverified",
        "upstream.verify_user is off: the backend accepts any terminal's messages from any broker user, as with shared development credentials; provision each terminal (`possync admin provision-terminal`) and turn it on in production"
    );
}

/// At debug: a till sends one every few seconds, and the count in
/// `/metrics` says it.
pub(crate) fn upstream_receipt_refused(routing_key: &str, reason: &str) {
    debug!(
        event = "upstream_receipt_refused",
        %routing_key,
        %reason,
        "a delivery receipt was refused and dropped (counted in possync_backend_upstream_refused_total)"
    );
}

pub(crate) fn store_databases_started(dir: &std::path::Path, applied_up_to: i64) {
    info!(
        event = "store_databases_started",
        dir = %dir.display(),
        applied_up_to,
        "applying what terminals sent to the store databases"
    );
}

/// Logged at error on the first failure of a stretch and every 20th try
/// after (a store set aside waits up to 30 s between tries), quietly
/// otherwise.
pub(crate) fn store_databases_held(store: &str, reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        error!(
            event = "store_databases_held",
            %store,
            %reason,
            retry_in_ms,
            "cannot apply upstream messages to the store database: they stay recorded and are tried again, while the other stores go on; check the folder (upstream.store_databases) and the reason"
        );
    } else {
        debug!(event = "store_databases_held", %store, %reason, retry_in_ms, "still cannot apply upstream messages");
    }
}

pub(crate) fn store_database_refused(store: &str, cursor: i64, message_type: &str, reason: &str) {
    warn!(
        event = "store_database_refused",
        %store,
        cursor,
        %message_type,
        %reason,
        "a plugin refused to apply an upstream message: it stays recorded (GET /v1/stores/{store}/upstream) and is kept with the reason in the store database's possync_quarantine"
    );
}

pub(crate) fn store_databases_skipped(store: &str, messages: usize) {
    error!(
        event = "store_databases_skipped",
        %store,
        messages,
        "recorded upstream messages name a store that is not a valid id: not applied"
    );
}

pub(crate) fn store_databases_progress_unsaved(dir: &std::path::Path, reason: &str) {
    warn!(
        event = "store_databases_progress_unsaved",
        dir = %dir.display(),
        %reason,
        "cannot save how far the store databases are applied: nothing is lost, a restart reads more of the record again"
    );
}

pub(crate) fn store_database_recovered(store: &str, tries: u32) {
    info!(
        event = "store_database_recovered",
        %store,
        tries,
        "the store database takes its messages again and has caught up"
    );
}

/// At debug: counted by nothing else, and a till that sends such a type
/// sends it often.
pub(crate) fn store_database_skipped_type(store: &str, message_type: &str) {
    debug!(
        event = "store_database_skipped_type",
        %store,
        %message_type,
        "a recorded message of a type not in upstream.types was not applied"
    );
}
