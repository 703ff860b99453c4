//! What a terminal is doing, for whoever watches it (the demo, logs, later
//! the status page).

use std::time::SystemTime;

use tokio::sync::watch;

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
    /// Shut down.
    Stopped,
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
    /// When the last message was applied.
    pub last_applied_at: Option<SystemTime>,
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
    pub(crate) fn new() -> (Self, watch::Receiver<Status>) {
        let (sender, receiver) = watch::channel(Status {
            state: State::Connecting,
            applied: 0,
            quarantined: 0,
            duplicates: 0,
            last_applied_at: None,
        });
        (Self(sender), receiver)
    }

    pub(crate) fn set_state(&self, state: State) {
        self.0.send_modify(|status| status.state = state);
    }

    pub(crate) fn count(&self, applied: u64, quarantined: u64, duplicates: u64) {
        if applied == 0 && quarantined == 0 && duplicates == 0 {
            return;
        }
        self.0.send_modify(|status| {
            status.applied += applied;
            status.quarantined += quarantined;
            status.duplicates += duplicates;
            if applied > 0 {
                status.last_applied_at = Some(SystemTime::now());
            }
        });
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.0.subscribe()
    }
}
