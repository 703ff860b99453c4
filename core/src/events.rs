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

pub(crate) fn message_retry(routing_key: &str, reason: &str) {
    warn!(event = "message_retry", %routing_key, %reason, "message will be tried again");
}

pub(crate) fn batch_failed(reason: &str) {
    error!(event = "batch_failed", %reason, "batch rolled back; its messages return to the queue");
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

pub(crate) fn queue_depth_unknown(reason: &str) {
    warn!(event = "queue_depth_unknown", %reason, "cannot count the messages waiting in the queue; the status shows no queue depth until the next connection");
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
