//! What a terminal is doing, for whoever watches it (the demo, logs, later
//! the status page).

use std::time::SystemTime;

use tokio::sync::watch;

use crate::applier::ApplierHandle;
use crate::progress::Tally;
use crate::redact::redact_url;
use crate::sequence::SyncState;
use crate::store::{StateRecord, unix_now_ms};

/// The connection state, as the POS top bar showed it: Live or Offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Starting, first connection not yet made.
    Connecting,
    /// Connected and consuming.
    Live {
        /// Since when.
        since: SystemTime,
    },
    /// Connection lost or refused; reconnecting.
    Offline {
        /// Since when.
        since: SystemTime,
        /// Why, password redacted.
        reason: String,
    },
    /// Connected, but the database refuses the batch in hand (locked by
    /// another program, disk full, ...): the terminal holds the batch, takes
    /// no new messages and tries the same batch again until it commits.
    Stalled {
        /// Since when.
        since: SystemTime,
        /// Why the batch cannot commit.
        reason: String,
    },
    /// Shut down.
    Stopped,
}

impl State {
    /// One state of each kind, with `since` and `reason` where the kind has
    /// them: every list of states is made from this one.
    fn each(since: SystemTime, reason: &str) -> [Self; 5] {
        // A new kind of state goes here too, or it has no series on
        // `/metrics` and cannot be read back from the database.
        [
            Self::Connecting,
            Self::Live { since },
            Self::Offline {
                since,
                reason: reason.to_owned(),
            },
            Self::Stalled {
                since,
                reason: reason.to_owned(),
            },
            Self::Stopped,
        ]
    }

    /// Every state's name, as [`State::name`] spells it: the `/metrics`
    /// endpoint shows one series per state, so that a dashboard sees each.
    pub fn names() -> [&'static str; 5] {
        Self::each(SystemTime::UNIX_EPOCH, "").map(|state| state.name())
    }

    /// The state [`State::name`] calls `name`, with `since` and `reason`
    /// where it has them: a state read back from the database.
    pub(crate) fn named(name: &str, since: SystemTime, reason: &str) -> Option<Self> {
        Self::each(since, reason)
            .into_iter()
            .find(|state| state.name() == name)
    }

    /// The state's name, as `possync status`, `/status`, `/metrics` and the
    /// database spell it; the only place they are spelled.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Live { .. } => "live",
            Self::Offline { .. } => "offline",
            Self::Stalled { .. } => "stalled",
            Self::Stopped => "stopped",
        }
    }

    /// Since when the state holds, if it says.
    pub fn since(&self) -> Option<SystemTime> {
        match self {
            Self::Live { since } | Self::Offline { since, .. } | Self::Stalled { since, .. } => {
                Some(*since)
            }
            Self::Connecting | Self::Stopped => None,
        }
    }

    /// Why the terminal is not live, if it says.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Offline { reason, .. } | Self::Stalled { reason, .. } => Some(reason),
            Self::Connecting | Self::Live { .. } | Self::Stopped => None,
        }
    }
}

/// A terminal's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Live, Offline, ...
    pub state: State,
    /// Messages applied since start.
    pub applied: u64,
    /// Messages dead-lettered since start.
    pub quarantined: u64,
    /// Redelivered messages that were applied before and changed nothing.
    pub duplicates: u64,
    /// Messages since start settled without being applied because a later
    /// change of the same batch overwrote them (backlog collapse); counted
    /// in `applied` too.
    pub collapsed: u64,
    /// How far the terminal is in sync with its store's sequence, as its
    /// database keeps it across restarts.
    pub sync: SyncState,
    /// Messages applied since start, by envelope type.
    pub applied_by_type: std::collections::BTreeMap<String, u64>,
    /// Messages since start that changed nothing because the database held
    /// a newer change of their entity, by envelope type. A publisher whose
    /// clock runs behind shows up here.
    pub stale_by_type: std::collections::BTreeMap<String, u64>,
    /// When the last message was applied.
    pub last_applied_at: Option<SystemTime>,
    /// Messages waiting in the terminal's queue, not yet delivered to it,
    /// as last counted (every few seconds while live); `None` before the
    /// first count or when the broker would not say.
    pub queue_depth: Option<u64>,
}

impl Status {
    /// Whether the terminal is connected and consuming.
    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Live { .. })
    }
}

#[derive(Debug)]
pub(crate) struct StatusSender(watch::Sender<Status>);

impl StatusSender {
    /// The status of a terminal starting with `sync` in its database.
    pub(crate) fn new(sync: SyncState) -> (Self, watch::Receiver<Status>) {
        let (sender, receiver) = watch::channel(Status {
            state: State::Connecting,
            applied: 0,
            quarantined: 0,
            duplicates: 0,
            collapsed: 0,
            sync,
            applied_by_type: std::collections::BTreeMap::new(),
            stale_by_type: std::collections::BTreeMap::new(),
            last_applied_at: None,
            queue_depth: None,
        });
        (Self(sender), receiver)
    }

    pub(crate) fn set_state(&self, state: State) {
        self.0.send_modify(|status| status.state = state);
    }

    pub(crate) fn set_queue_depth(&self, depth: Option<u64>) {
        self.0.send_if_modified(|status| {
            let changed = status.queue_depth != depth;
            status.queue_depth = depth;
            changed
        });
    }

    /// The sync state as last known.
    pub(crate) fn sync(&self) -> SyncState {
        self.0.borrow().sync.clone()
    }

    /// The sync state as the database holds it now.
    pub(crate) fn set_sync(&self, sync: SyncState) {
        self.0.send_modify(|status| status.sync = sync);
    }

    /// Adds a committed batch's outcomes to the counters, with the sync
    /// state it moved to.
    pub(crate) fn count(&self, tally: &Tally, sync: Option<SyncState>) {
        if let Some(sync) = sync {
            self.0.send_modify(|status| status.sync = sync);
        }
        if tally.applied == 0
            && tally.quarantined == 0
            && tally.duplicates == 0
            && tally.stale_by_type.is_empty()
        {
            return;
        }
        self.0.send_modify(|status| {
            add_by_type(&mut status.applied_by_type, &tally.by_type);
            add_by_type(&mut status.stale_by_type, &tally.stale_by_type);
            status.applied += tally.applied;
            status.quarantined += tally.quarantined;
            status.duplicates += tally.duplicates;
            status.collapsed += tally.collapsed;
            if tally.applied > 0 {
                status.last_applied_at = Some(SystemTime::now());
            }
        });
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.0.subscribe()
    }
}

/// Publishes state changes to watchers and to the database.
pub(crate) struct Reporter<'a> {
    applier: &'a ApplierHandle,
    status: &'a StatusSender,
    identity: (String, String),
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(
        applier: &'a ApplierHandle,
        status: &'a StatusSender,
        identity: (String, String),
    ) -> Self {
        Self {
            applier,
            status,
            identity,
        }
    }

    /// Where the state and counters go to watchers.
    pub(crate) fn status(&self) -> &StatusSender {
        self.status
    }

    /// Says `state` to watchers, then records it for `possync status`.
    pub(crate) async fn set(&self, state: State, broker: Option<&str>) {
        let since_ms = state
            .since()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(unix_now_ms, |d| {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            });
        // Watchers first: recording waits for the database, which may be
        // the very thing that is stuck.
        self.status.set_state(state.clone());
        self.applier
            .record_state(StateRecord {
                license_key: self.identity.0.clone(),
                terminal_id: self.identity.1.clone(),
                state,
                since_ms,
                broker: broker.map(redact_url),
            })
            .await;
    }
}

fn add_by_type(counts: &mut std::collections::BTreeMap<String, u64>, by_type: &[(String, u64)]) {
    for (message_type, count) in by_type {
        *counts.entry(message_type.clone()).or_default() += count;
    }
}

/// `possync status`: what a terminal's database says about it, and whether
/// the process that wrote it still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// Whether the terminal is live (the exit code of `possync status`).
    pub live: bool,
    /// Lines for a person.
    pub text: String,
}

impl StatusReport {
    /// Builds the report from the stored status, at `now_ms`.
    pub fn new(stored: &crate::store::StoredStatus, now_ms: i64) -> Self {
        let running = stored.pid.is_none_or(process_exists);
        let state = match (&stored.state, running) {
            (State::Stopped, _) => "Stopped".to_owned(),
            (state, false) => format!(
                "Stopped (process {} is gone without a clean stop; it was {})",
                stored.pid.unwrap_or_default(),
                state.name()
            ),
            (state, true) => capitalize(state.name()),
        };
        let live = running && matches!(stored.state, State::Live { .. });
        let mut text = format!("{state} since {}\n", moment_text(stored.since_ms, now_ms));
        if let Some(reason) = stored.state.reason().filter(|reason| !reason.is_empty()) {
            text.push_str(&format!("reason        {reason}\n"));
        }
        text.push_str(&format!(
            "store         {} (terminal {})\n",
            stored.license_key, stored.terminal_id
        ));
        if let Some(broker) = &stored.broker {
            text.push_str(&format!("broker        {broker}\n"));
        }
        match stored.last_applied_ms {
            Some(ms) => text.push_str(&format!(
                "last applied  {} at {}\n",
                stored.last_message_type.as_deref().unwrap_or("a message"),
                moment_text(ms, now_ms)
            )),
            None => text.push_str("last applied  never\n"),
        }
        text.push_str(&format!(
            "applied       {} messages; {} quarantined ({} kept in possync_quarantine)\n",
            stored.applied_total, stored.quarantined_total, stored.quarantine_rows
        ));
        if stored.collapsed_total > 0 {
            text.push_str(&format!(
                "collapsed     {} of them overwritten by a later change in the same batch, not applied on their own\n",
                stored.collapsed_total
            ));
        }
        text.push_str(&synced_line(&stored.sync, now_ms));
        if let Some(gap) = &stored.sync.gap {
            text.push_str(&format!(
                "gap           {} (found {})\n",
                gap.cause,
                moment_text(gap.since_ms, now_ms)
            ));
        }
        match &stored.sync.verified {
            Some(verified) => text.push_str(&format!(
                "verified      at seq {} ({}): the catalog matched the backend's checksums\n",
                verified.seq,
                moment_text(verified.at_ms, now_ms)
            )),
            None if stored.sync.catalog.is_some() => text.push_str(
                "verified      not yet (the backend's next checkpoint compares the catalog)\n",
            ),
            None => {}
        }
        if stored.stale_total > 0 {
            text.push_str(&format!(
                "stale         {} changes older than what the database held, not applied (a publisher's clock behind? by type in /status)\n",
                stored.stale_total
            ));
        }
        Self { live, text }
    }
}

/// "synced up to N" for `possync status`, with what the terminal knows
/// of the store's head and of changes that never arrived.
fn synced_line(sync: &SyncState, now_ms: i64) -> String {
    if sync.highest_applied == 0 && sync.gap.is_none() {
        return "synced up to  no sequenced change yet (seq comes from possync backend)\n"
            .to_owned();
    }
    let mut line = format!("synced up to  seq {}", sync.synced_up_to);
    if sync.highest_applied > sync.synced_up_to {
        line.push_str(&format!(
            " (highest applied {}: change {} never arrived or could not apply)",
            sync.highest_applied,
            sync.synced_up_to + 1
        ));
    }
    match sync.head {
        Some(head) => line.push_str(&format!(" of at least {head}")),
        None => line.push_str(", backend head unknown"),
    }
    if let Some(ms) = sync.last_change_ms {
        line.push_str(&format!("; last change {}", moment_text(ms, now_ms)));
    }
    if let Some(catalog) = &sync.catalog {
        line.push_str(&format!("; catalog {catalog}"));
    }
    line.push('\n');
    line
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A moment (ms since the epoch) for people: `2026-12-02 14:03:07 UTC (12 s
/// ago)`.
pub fn moment_text(ms: i64, now_ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| ms.to_string());
    let ago = (now_ms - ms).max(0) / 1000;
    let ago = match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        3600..86_400 => format!("{} h {} min ago", ago / 3600, ago % 3600 / 60),
        _ => format!("{} days ago", ago / 86_400),
    };
    format!("{at} ({ago})")
}

/// Whether process `pid` exists on this machine.
pub(crate) fn process_exists(pid: i64) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Elsewhere we cannot tell cheaply; trust the stored state.
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::State;

    #[test]
    fn every_state_has_a_name_of_its_own_and_reads_back_from_it() {
        let since = UNIX_EPOCH + std::time::Duration::from_secs(7);
        let names = State::names();
        for (i, name) in names.iter().enumerate() {
            assert!(!names[..i].contains(name), "{name} named twice");
            let state = State::named(name, since, "why").expect("reads back");
            assert_eq!(state.name(), *name);
            assert!(state.since().is_none_or(|at| at == since), "{name}");
            assert!(state.reason().is_none_or(|why| why == "why"), "{name}");
        }
        assert_eq!(State::named("unknown", since, "why"), None);
    }
}
