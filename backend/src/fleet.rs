//! The fleet: every terminal the backend heard from, judged from its
//! latest receipt (live, offline, stalled) against its store's head, and
//! the upstream consumer's counters.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::UpstreamConfig;
use crate::storage::TerminalRecord;

/// How a terminal is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminalState {
    /// Its receipts arrive and it keeps up (or waits for nothing).
    Live,
    /// No receipt for `upstream.offline_after_secs`, or its last said it
    /// was stopping.
    Offline,
    /// Its receipts arrive, but it has been behind its store's head, and
    /// has applied nothing, for `upstream.stalled_after_secs`.
    Stalled,
}

impl TerminalState {
    /// `live`, `offline`, `stalled`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Offline => "offline",
            Self::Stalled => "stalled",
        }
    }
}

/// When a terminal counts as offline or stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetRules {
    /// No receipt for this long: offline.
    pub offline_after: Duration,
    /// Behind the head without progress for this long: stalled.
    pub stalled_after: Duration,
}

impl FleetRules {
    /// The rules of `[upstream]`.
    pub fn of(config: &UpstreamConfig) -> Self {
        Self {
            offline_after: Duration::from_secs(config.offline_after_secs),
            stalled_after: Duration::from_secs(config.stalled_after_secs),
        }
    }

    /// `terminal` as of `now_ms`, its store's head being `head`.
    pub fn judge(&self, terminal: &TerminalRecord, head: i64, now_ms: i64) -> Judged {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let silent = now_ms.saturating_sub(terminal.last_seen_ms);
        let lag = head.saturating_sub(terminal.applied_up_to).max(0);
        let state = if terminal.stopping || silent > ms(self.offline_after) {
            TerminalState::Offline
        } else if lag > 0
            && now_ms.saturating_sub(terminal.applied_changed_ms) > ms(self.stalled_after)
            && terminal
                .behind_since_ms
                .is_some_and(|since| now_ms.saturating_sub(since) > ms(self.stalled_after))
        {
            TerminalState::Stalled
        } else {
            TerminalState::Live
        };
        Judged {
            state,
            lag,
            offline_since_ms: (state == TerminalState::Offline).then_some(terminal.last_seen_ms),
        }
    }
}

impl Default for FleetRules {
    fn default() -> Self {
        Self::of(&UpstreamConfig::default())
    }
}

/// A terminal, judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    /// How it is doing.
    pub state: TerminalState,
    /// Changes of its store's head it has not applied.
    pub lag: i64,
    /// Offline since its last receipt (ms since the epoch).
    pub offline_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReceivedLabels {
    store: String,
    #[prometheus(flatten)]
    kind: TypeLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The upstream consumer's counters, since start, and a signal for those
/// waiting on receipts.
#[derive(Debug)]
pub struct Counters {
    received: Family<ReceivedLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    duplicates: Counter,
    receipts: Counter,
    applied: Family<TypeLabel, Counter>,
    stale: Family<TypeLabel, Counter>,
    unapplied: Family<TypeLabel, Counter>,
    /// Bumped after each commit of receipts.
    recorded: watch::Sender<u64>,
    /// Bumped after each commit of new upstream messages.
    messages: watch::Sender<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            received: Family::default(),
            refused: Family::default(),
            duplicates: Counter::default(),
            receipts: Counter::default(),
            applied: Family::default(),
            stale: Family::default(),
            unapplied: Family::default(),
            recorded: watch::channel(0).0,
            messages: watch::channel(0).0,
        }
    }
}

impl Counters {
    /// Changes after each commit of receipts by this process.
    pub(crate) fn receipts_recorded(&self) -> watch::Receiver<u64> {
        self.recorded.subscribe()
    }

    pub(crate) fn received(&self, store: &str, message_type: &str) {
        self.received
            .get_or_create(&ReceivedLabels {
                store: store.to_owned(),
                kind: TypeLabel {
                    r#type: message_type.to_owned(),
                },
            })
            .inc();
    }

    /// Changes after each commit of new upstream messages by this process.
    pub(crate) fn messages_recorded(&self) -> watch::Receiver<u64> {
        self.messages.subscribe()
    }

    /// New upstream messages were committed.
    pub(crate) fn recorded_messages(&self) {
        self.messages.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A store database's plugin applied an upstream message.
    pub(crate) fn applied(&self, message_type: &str) {
        self.applied
            .get_or_create(&TypeLabel {
                r#type: message_type.to_owned(),
            })
            .inc();
    }

    /// An upstream message changed nothing: its entity holds a newer change.
    pub(crate) fn stale(&self, message_type: &str) {
        self.stale
            .get_or_create(&TypeLabel {
                r#type: message_type.to_owned(),
            })
            .inc();
    }

    /// A store database's plugin refused an upstream message for good.
    pub(crate) fn unapplied(&self, message_type: &str) {
        self.unapplied
            .get_or_create(&TypeLabel {
                r#type: message_type.to_owned(),
            })
            .inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn duplicate(&self) {
        self.duplicates.inc();
    }

    pub(crate) fn receipts(&self, count: usize) {
        self.receipts
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
        self.recorded.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Adds the counters to `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "possync_backend_upstream_received",
            "Upstream messages (orders, ...) recorded, by store and type.",
            self.received.clone(),
        );
        registry.register(
            "possync_backend_upstream_refused",
            "Upstream messages dead-lettered, by reason: identity (user_id is not the terminal's broker user), mismatch (routing key and body disagree), malformed, type (not in upstream.types), invalid (its plugin refused it), database.",
            self.refused.clone(),
        );
        registry.register(
            "possync_backend_upstream_duplicates",
            "Upstream messages received again and recorded once.",
            self.duplicates.clone(),
        );
        registry.register(
            "possync_backend_upstream_applied",
            "Upstream messages their plugins applied to the store databases, by type.",
            self.applied.clone(),
        );
        registry.register(
            "possync_backend_upstream_stale",
            "Upstream messages that changed nothing in their store database because their entity holds a change recorded later, by type.",
            self.stale.clone(),
        );
        registry.register(
            "possync_backend_upstream_unapplied",
            "Upstream messages their plugins refused to apply to a store database (kept, with the reason, in its possync_quarantine), by type.",
            self.unapplied.clone(),
        );
        registry.register(
            "possync_backend_receipts",
            "Delivery receipts recorded.",
            self.receipts.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminal(last_seen_ms: i64, applied_up_to: i64, applied_changed_ms: i64) -> TerminalRecord {
        TerminalRecord {
            store: "S1".into(),
            terminal: "T1".into(),
            first_seen_ms: 0,
            last_seen_ms,
            applied_up_to,
            highest_applied: applied_up_to,
            quarantined: 0,
            outbox: 0,
            applied_changed_ms,
            stopping: false,
            behind_since_ms: Some(applied_changed_ms),
            verified_seq: None,
            gap: None,
        }
    }

    const RULES: FleetRules = FleetRules {
        offline_after: Duration::from_secs(10),
        stalled_after: Duration::from_secs(60),
    };

    #[test]
    fn a_terminal_heard_from_lately_and_caught_up_is_live() {
        let judged = RULES.judge(&terminal(100_000, 7, 0), 7, 105_000);
        assert_eq!(judged.state, TerminalState::Live);
        assert_eq!(judged.lag, 0);
        assert_eq!(judged.offline_since_ms, None);
    }

    #[test]
    fn a_silent_terminal_is_offline_since_its_last_receipt() {
        let judged = RULES.judge(&terminal(100_000, 7, 0), 9, 110_001);
        assert_eq!(judged.state, TerminalState::Offline);
        assert_eq!(judged.lag, 2);
        assert_eq!(judged.offline_since_ms, Some(100_000));
        assert_eq!(
            RULES
                .judge(&terminal(100_000, 7, 100_000), 9, 110_000)
                .state,
            TerminalState::Live,
            "silent for exactly the limit is not yet offline"
        );
    }

    #[test]
    fn a_terminal_that_said_it_stops_is_offline_at_once() {
        let mut stopping = terminal(100_000, 7, 100_000);
        stopping.stopping = true;
        assert_eq!(
            RULES.judge(&stopping, 7, 100_001).state,
            TerminalState::Offline
        );
    }

    #[test]
    fn an_idle_terminal_that_just_fell_behind_is_not_stalled() {
        let mut idle = terminal(200_000, 7, 100_000);
        idle.behind_since_ms = Some(199_500);
        assert_eq!(RULES.judge(&idle, 8, 200_000).state, TerminalState::Live);
        idle.behind_since_ms = Some(100_000);
        assert_eq!(RULES.judge(&idle, 8, 200_000).state, TerminalState::Stalled);
    }

    #[test]
    fn a_terminal_behind_without_progress_is_stalled_and_one_that_moves_is_not() {
        assert_eq!(
            RULES
                .judge(&terminal(200_000, 7, 100_000), 9, 200_000)
                .state,
            TerminalState::Stalled
        );
        assert_eq!(
            RULES
                .judge(&terminal(200_000, 7, 150_000), 9, 200_000)
                .state,
            TerminalState::Live
        );
        assert_eq!(
            RULES
                .judge(&terminal(200_000, 9, 100_000), 9, 200_000)
                .state,
            TerminalState::Live,
            "caught up: nothing to wait for"
        );
    }
}
