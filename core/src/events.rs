//! Everything worth telling an operator, as named events: one function per
//! event, so each is logged the same way everywhere and once.

use tracing::{debug, error, info, warn};

pub(crate) fn connecting(broker: &str, attempt: u32) {
    if attempt <= 1 {
        info!(event = "connecting", %broker, "connecting to the broker");
    } else {
        debug!(event = "connecting", %broker, attempt, "connecting to the broker");
    }
}

pub(crate) fn live(broker: &str, queue: &str, binding: &str) {
    info!(event = "live", %broker, %queue, %binding, "Live: receiving this store's changes");
}

/// Logged at warn on the transition to Offline, then quietly per retry.
pub(crate) fn offline(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(event = "offline", %reason, retry_in_ms, "Offline: will reconnect");
    } else {
        debug!(event = "offline", %reason, retry_in_ms, "still offline: will reconnect");
    }
}

pub(crate) fn batch_applied(size: usize, applied: u64, elapsed_ms: u128) {
    debug!(
        event = "batch_applied",
        size, applied, elapsed_ms, "batch committed"
    );
}

/// A batch held its runtime worker longer than it may (a slow disk): the
/// terminal's batches go to another thread for a while.
pub(crate) fn batches_handed_off(elapsed_ms: u128, for_ms: u128) {
    debug!(
        event = "batches_handed_off",
        elapsed_ms, for_ms, "a batch held its worker too long; handing batches off for a while"
    );
}

pub(crate) fn message_quarantined(routing_key: &str, message_type: Option<&str>, reason: &str) {
    warn!(
        event = "message_quarantined",
        %routing_key,
        message_type = message_type.unwrap_or("-"),
        %reason,
        "message can never apply: dead-lettered and kept in possync_quarantine"
    );
}

pub(crate) fn message_ignored(message_type: &str, plugin: &str) {
    debug!(event = "message_ignored", %message_type, %plugin, "plugin is disabled in [plugins]; message acknowledged unapplied");
}

pub(crate) fn message_retry(routing_key: &str, reason: &str, retry_in_ms: u128) {
    warn!(event = "message_retry", %routing_key, %reason, retry_in_ms, "message will be tried again; the messages behind it wait");
}

/// A message that changed nothing because its entity holds a newer change:
/// a publisher whose clock runs behind shows up here.
pub(crate) fn message_stale(message_type: &str, entity: &str, incoming: i64, stored: i64) {
    debug!(
        event = "message_stale",
        %message_type,
        %entity,
        incoming_version = incoming,
        stored_version = stored,
        "message is older than what the database holds for its entity; nothing changed"
    );
}

/// The store's sequence jumped: changes between `expected` and `received`
/// never reached this terminal (a first start, a lost queue). Logged once
/// per jump, when the batch that saw it commits.
pub(crate) fn sequence_gap(expected: i64, received: i64) {
    warn!(
        event = "sequence_gap",
        expected,
        received,
        "the store's sequence jumped: changes {expected} to {} never arrived; synced-up-to stays below them",
        received - 1
    );
}

/// A gap found another way than by the sequence: the queue made again,
/// the database behind its mark. Kept in the sync state until it closes.
pub(crate) fn gap_found(cause: &crate::gap::GapCause) {
    warn!(
        event = "gap_found",
        cause = cause.name(),
        "this terminal may lack some of its store's changes: {cause}"
    );
}

/// A jump in the sequence closed: the changes it missed arrived.
pub(crate) fn gap_closed(cause: &crate::gap::GapCause) {
    info!(
        event = "gap_closed",
        cause = cause.name(),
        "the missing changes arrived: {cause} no longer holds"
    );
}

/// The catalog matched the backend's checkpoint.
pub(crate) fn checkpoint_verified(seq: i64, kinds: usize, elapsed_ms: u128) {
    debug!(
        event = "checkpoint_verified",
        seq,
        kinds,
        elapsed_ms,
        "the catalog matches the backend's at seq {seq} ({kinds} kinds of entity compared)"
    );
}

/// A checkpoint was not compared.
pub(crate) fn checkpoint_skipped(seq: i64, reason: &str) {
    debug!(event = "checkpoint_skipped", seq, %reason, "checkpoint at seq {seq} not compared: {reason}");
}

/// The catalog differs from the backend's: a gap, healed by a snapshot.
pub(crate) fn checksum_differs(
    seq: i64,
    kind: &str,
    ours: &crate::Checksum,
    theirs: &crate::Checksum,
) {
    warn!(
        event = "checksum_differs",
        seq,
        kind,
        rows = ours.count,
        backend_rows = theirs.count,
        "the terminal's {kind}s differ from the backend's at seq {seq} ({} rows here, {} there): a row was changed outside possync or a change was lost; a snapshot will replace them",
        ours.count,
        theirs.count
    );
}

/// A kind still differs after a snapshot replaced it: not compared again
/// until the terminal restarts.
pub(crate) fn checksum_differs_after_snapshot(kind: &str, seq: i64) {
    error!(
        event = "checksum_differs_after_snapshot",
        kind,
        seq,
        "the terminal's {kind}s still differ from the backend's after a snapshot replaced them: the plugin that exports them here does not hold what the backend keeps (switched off here, or another version than the backend's); {kind}s are not verified again until the terminal restarts"
    );
}

/// A checkpoint could not be compared: the database could not be read.
pub(crate) fn checkpoint_unread(seq: i64, reason: &str) {
    warn!(event = "checkpoint_unread", seq, %reason, "checkpoint at seq {seq} not compared: {reason}");
}

/// A snapshot is asked for: the terminal takes nothing from its queue
/// until it is swapped in or dropped.
pub(crate) fn snapshot_started(reason: &str) {
    info!(
        event = "snapshot_started",
        %reason,
        "asking the backend for the store's catalog; changes wait in the queue meanwhile"
    );
}

pub(crate) fn snapshot_progress(seq: i64, entities: u64, elapsed_ms: u128) {
    info!(
        event = "snapshot_progress",
        seq, entities, elapsed_ms, "receiving the store's catalog: {entities} entities so far"
    );
}

/// The snapshot is swapped in: the catalog is the backend's at `seq`.
pub(crate) fn snapshot_applied(seq: i64, catalog: &str, entities: u64, elapsed_ms: u128) {
    info!(
        event = "snapshot_applied",
        seq,
        %catalog,
        entities,
        elapsed_ms,
        "the store's catalog at seq {seq} is swapped in ({entities} entities); the changes after it apply from the queue"
    );
}

/// A snapshot failed; dropped, asked again after `retry_in_ms` (never when
/// `None`).
pub(crate) fn snapshot_failed(reason: &str, retry_in_ms: Option<u128>, given_up: bool) {
    if given_up {
        error!(
            event = "snapshot_failed",
            %reason,
            "the snapshot cannot be restored with the plugins enabled here, so it is not asked again until the terminal restarts; the gap stays open"
        );
        return;
    }
    match retry_in_ms {
        Some(retry_in_ms) => warn!(
            event = "snapshot_failed",
            %reason,
            retry_in_ms,
            "the snapshot did not complete; nothing of it was applied, and it is asked again"
        ),
        None => info!(
            event = "snapshot_failed",
            %reason,
            "no snapshot at this first start; the terminal applies the store's changes as they come"
        ),
    }
}

/// The mark that tells a restored database could not be written.
pub(crate) fn applied_mark_unwritten(path: &std::path::Path, reason: &str) {
    warn!(
        event = "applied_mark_unwritten",
        path = %path.display(),
        %reason,
        "cannot write the mark beside the database; a database restored from an older copy may go unnoticed at the next start"
    );
}

/// Logged at error on entering the Stalled state and every few minutes
/// while it lasts, quietly per retry in between.
pub(crate) fn stalled(reason: &str, retry_in_ms: u128, loud: bool, stalled_secs: u64) {
    if loud {
        error!(event = "stalled", %reason, retry_in_ms, stalled_secs, "Stalled: the database refuses the batch; holding it and trying again, taking no new messages");
    } else {
        debug!(event = "stalled", %reason, retry_in_ms, stalled_secs, "still stalled: trying the same batch again");
    }
}

pub(crate) fn stall_cleared(stalled_ms: u128, attempts: u32) {
    info!(
        event = "stall_cleared",
        stalled_ms, attempts, "the held batch committed; the stream goes on"
    );
}

pub(crate) fn effect_panicked(message: &str) {
    error!(event = "effect_panicked", %message, "a handler's effect outside the database panicked; the others still ran");
}

/// A plugin library whose plugin calls itself by another name than the one
/// config gives it: config's name is the one used.
pub(crate) fn plugin_renamed(config_name: &str, own_name: &str, path: &str) {
    warn!(event = "plugin_renamed", plugin = config_name, own_name, %path, "the plugin library calls its plugin by another name than [plugins] does; the name in [plugins] is used");
}

pub(crate) fn plugin_drop_panicked(plugin: &str, message: &str) {
    error!(event = "plugin_drop_panicked", %plugin, %message, "a plugin panicked while being dropped; the panic was contained");
}

pub(crate) fn already_running(queue: &str) {
    error!(event = "already_running", %queue, "another process is already running as this terminal: the broker refused a second consumer on its queue");
}

pub(crate) fn waiting_for_lost_node(node: &str, seconds: u64) {
    warn!(
        event = "waiting_for_lost_node",
        %node,
        seconds,
        "the queue still counts this terminal's consumer on a cluster node it lost: taking it over once the cluster can no longer deliver to it"
    );
}

pub(crate) fn pruned(applied_ids: usize, quarantined: usize) {
    if applied_ids + quarantined > 0 {
        debug!(
            event = "pruned",
            applied_ids, quarantined, "old bookkeeping rows removed"
        );
    }
}

pub(crate) fn requeued(applied: usize, quarantined_again: usize, waiting: usize) {
    info!(
        event = "requeued",
        applied,
        quarantined_again,
        waiting,
        "applied messages requeued from the quarantine (`possync quarantine list` shows any quarantined again, with the new reason)"
    );
}

pub(crate) fn requeue_held(reason: &str) {
    warn!(
        event = "requeue_held",
        %reason,
        "could not apply the messages requeued from the quarantine; they stay marked and are tried again"
    );
}

pub(crate) fn prune_failed(reason: &str) {
    warn!(event = "prune_failed", %reason, "could not prune old bookkeeping rows; will try again later");
}

pub(crate) fn dead_letter_fallback(reason: &str) {
    warn!(event = "dead_letter_fallback", %reason, "could not publish to the dead-letter queue with a reason; rejected to it without one");
}

pub(crate) fn dead_letter_queue_kept(queue: &str, reason: &str) {
    warn!(
        event = "dead_letter_queue_kept",
        %queue,
        %reason,
        "the dead-letter queue exists with other arguments (made by an older possync: no expiry), so it is used as it is and never expires; to give it one, delete it once it is empty (`rabbitmqctl delete_queue {queue} --if-empty`): whoever declares it next (the terminal at its start, or `possync admin provision-terminal`) gives it the expiry"
    );
}

pub(crate) fn queue_probe_failed(reason: &str) {
    warn!(event = "queue_probe_failed", %reason, "cannot look at the terminal's queues: the status shows no queue depth, and the dead-letter queue's expiry is renewed only at the next connection");
}

pub(crate) fn migrations_ran(ids: &[String]) {
    if !ids.is_empty() {
        info!(event = "migrations_ran", ids = %ids.join(", "), "database schema updated");
    }
}

pub(crate) fn stopping() {
    info!(
        event = "stopping",
        "stopping: finishing the batch in progress"
    );
}

pub(crate) fn stopped() {
    info!(event = "stopped", "stopped cleanly");
}

pub(crate) fn publisher_reconnecting(reason: &str, unconfirmed: usize) {
    warn!(event = "publisher_reconnecting", %reason, unconfirmed, "publisher lost the broker: reconnecting to send unconfirmed messages again");
}

pub(crate) fn status_not_recorded(reason: &str) {
    warn!(event = "status_not_recorded", %reason, "could not record the terminal's state for `possync status`");
}

pub(crate) fn status_page(address: &str) {
    info!(event = "status_page", %address, "status page at http://{address}/ (also /status, /healthz, /metrics)");
}

/// Logged at warn when accepting starts failing (out of file descriptors,
/// say), then quietly while it goes on.
pub(crate) fn status_accept_failed(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(event = "status_accept_failed", %reason, retry_in_ms, "the status page cannot accept a connection: trying again");
    } else {
        debug!(event = "status_accept_failed", %reason, retry_in_ms, "the status page still cannot accept a connection");
    }
}

/// Logged at warn the first time, then quietly: a web page trying to read
/// the status through a name of its own (DNS rebinding) may try again and
/// again. The reason quotes the host it named, escaped.
pub(crate) fn status_request_refused(reason: &str, first: bool) {
    if first {
        warn!(event = "status_request_refused", %reason, "status page request refused");
    } else {
        debug!(event = "status_request_refused", %reason, "status page request refused");
    }
}

/// A change feed client asked for changes no longer kept (away too long,
/// or holding an id of another database): it is told to read everything.
pub(crate) fn feed_reload(after: i64, last: i64) {
    info!(
        event = "feed_reload",
        after,
        last,
        "a change feed client asked for the changes after {after}, which are no longer kept (or were never this database's); it was told to read the tables again"
    );
}

pub(crate) fn feed_unreadable(reason: &str) {
    warn!(event = "feed_unreadable", %reason, "the change feed cannot read the terminal's database; the client was told and disconnected");
}

pub(crate) fn database_locked_at_start() {
    warn!(
        event = "database_locked_at_start",
        "the database is locked by another program (the POS app?); waiting for it, up to 2 minutes"
    );
}

pub(crate) fn startup_prune_failed(reason: &str) {
    warn!(event = "startup_prune_failed", %reason, "could not prune old message ids at start; the running terminal tries again");
}

pub(crate) fn uplink_live(broker: &str, user: &str) {
    info!(event = "uplink_live", %broker, %user, "uplink connected: sending the outbox and delivery receipts upstream");
}

/// Logged at warn when the uplink loses the broker, then quietly per retry.
pub(crate) fn uplink_offline(reason: &str, retry_in_ms: u128, first: bool) {
    if first {
        warn!(event = "uplink_offline", %reason, retry_in_ms, "uplink cannot send upstream: will reconnect (outbox rows wait in the database; a refused permission means this terminal's broker user predates the uplink: run `possync admin provision-terminal` again)");
    } else {
        debug!(event = "uplink_offline", %reason, retry_in_ms, "uplink still cannot send upstream");
    }
}

pub(crate) fn uplink_off(reason: &str) {
    error!(event = "uplink_off", %reason, "uplink stopped: outbox rows and receipts are not sent");
}

pub(crate) fn uplink_outbox_failed(reason: &str) {
    warn!(event = "uplink_outbox_failed", %reason, "cannot read or clear the outbox: trying again");
}

pub(crate) fn uplink_sent(rows: usize) {
    debug!(
        event = "uplink_sent",
        rows, "outbox rows confirmed by the broker and removed"
    );
}

pub(crate) fn uplink_unroutable(routing_key: &str, retry_in_secs: u64) {
    warn!(event = "uplink_unroutable", %routing_key, retry_in_secs, "no queue took an outbox row, or the broker refused one: is `possync backend` running with its upstream consumer? the round stays in the outbox and is sent again");
}

pub(crate) fn uplink_row_quarantined(row: i64, reason: &str) {
    error!(event = "uplink_row_quarantined", row, %reason, "an outbox row can never be sent: moved to the quarantine (possync status lists it); the rows behind it go on");
}
