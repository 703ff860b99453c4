//! Sequence marks: how a terminal tells a duplicate from a new change
//! without a record per message, and how far it is in sync with its store.
//!
//! - A message with `seq` (the store's sequence number, from `possync
//!   backend`) is a duplicate exactly when its `seq` is at or below the
//!   highest the terminal applied for its store. The backend relays a
//!   store's changes in `seq` order on one channel, and the broker keeps a
//!   channel's order into the queue, so a `seq` at or below the mark is
//!   one the terminal has settled, or one it missed for good (a gap, which
//!   a catch-up must fill, never normal delivery).
//! - A message with `publisher_id` and `publisher_seq` (possync's
//!   publisher) is a duplicate exactly when its `publisher_seq` is at or
//!   below the highest applied from that publisher id: one row per id.
//! - Every other message with a `message_id` is looked up in
//!   `possync_applied`, as before.
//!
//! Each batch reads the marks it needs once, keeps them in memory while it
//! runs, and writes them in its own transaction just before the commit, so
//! after a crash they say exactly what the database holds.

use std::time::{SystemTime, UNIX_EPOCH};

use possync_sdk::{Envelope, Migration};
use rusqlite::params;

use crate::dispatch::Outcome;
use crate::store::unix_now;
use crate::transaction::Transaction;

/// The tables of the marks, run like the plugins' migrations.
pub(crate) const MIGRATION: Migration = Migration::new(
    "possync/sequence",
    "CREATE TABLE IF NOT EXISTS possync_sequence (
        license_key    TEXT PRIMARY KEY NOT NULL,
        synced_seq     INTEGER NOT NULL DEFAULT 0,
        applied_seq    INTEGER NOT NULL DEFAULT 0,
        last_change_ms INTEGER,
        head_seq       INTEGER
    );
    CREATE TABLE IF NOT EXISTS possync_publishers (
        publisher_id TEXT PRIMARY KEY NOT NULL,
        last_seq     INTEGER NOT NULL,
        applied_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS possync_publishers_applied_at ON possync_publishers (applied_at);",
);

/// How far a terminal is in sync with its store's sequence, kept in its
/// database (`possync_sequence`) across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncState {
    /// Every change of the store up to this `seq` is applied here, from 1
    /// on without a gap ("synced up to N"); 0 before the first.
    pub synced_up_to: i64,
    /// The highest `seq` applied; a message at or below it is a duplicate.
    /// Above `synced_up_to` when changes between them never arrived (a
    /// gap) or could not apply (dead-lettered).
    pub highest_applied: i64,
    /// When the terminal last applied a sequenced change (ms since the epoch).
    pub last_change_ms: Option<i64>,
    /// The backend's latest `seq` for the store, when a message told it.
    pub head: Option<i64>,
}

impl SyncState {
    /// The state a batch found: `seq` settled as `outcome`. Returns the gap
    /// `(expected, received)` if `seq` jumped past the next one.
    fn settle(&mut self, seq: i64, outcome: &Outcome, now_ms: i64) -> Option<(i64, i64)> {
        let expected = self.highest_applied + 1;
        let gap = (seq > expected).then_some((expected, seq));
        self.highest_applied = self.highest_applied.max(seq);
        // A dead-lettered change is not here: synced-up-to stops below it.
        if seq == self.synced_up_to + 1 && !matches!(outcome, Outcome::DeadLetter { .. }) {
            self.synced_up_to = seq;
        }
        self.last_change_ms = Some(now_ms);
        gap
    }
}

/// How a message is told from a duplicate, and what it claims once settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Neither `seq` nor a publisher stamp: `possync_applied` by
    /// `message_id`, if it has one.
    ById,
    /// The store's `seq`.
    Seq(i64),
    /// The number among its publisher's (an index into the batch's marks).
    Publisher { index: usize, seq: i64 },
}

/// Whether a message was settled before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Duplicate,
    Fresh(Claim),
}

#[derive(Debug)]
struct PublisherMark {
    id: String,
    /// As read at the batch's start.
    stored: Option<i64>,
    last: i64,
}

/// The marks one batch reads, moves and writes.
#[derive(Debug)]
pub(crate) struct Marks<'k> {
    license_key: &'k str,
    /// Read at the first sequenced message; `stored` says whether it moved.
    store: Option<(SyncState, SyncState)>,
    publishers: Vec<PublisherMark>,
    gaps: Vec<(i64, i64)>,
}

impl<'k> Marks<'k> {
    pub(crate) fn new(license_key: &'k str) -> Self {
        Self {
            license_key,
            store: None,
            publishers: Vec::new(),
            gaps: Vec::new(),
        }
    }

    /// Whether `envelope` was settled before: by `seq` if it has one, else
    /// by its publisher stamp; [`Claim::ById`] leaves it to `possync_applied`.
    pub(crate) fn judge(
        &mut self,
        transaction: &mut Transaction<'_>,
        envelope: &Envelope,
    ) -> rusqlite::Result<Verdict> {
        if let Some(seq) = envelope.seq {
            let state = self.store(transaction)?;
            return Ok(if seq <= state.highest_applied {
                Verdict::Duplicate
            } else {
                Verdict::Fresh(Claim::Seq(seq))
            });
        }
        let (Some(id), Some(seq)) = (&envelope.publisher_id, envelope.publisher_seq) else {
            return Ok(Verdict::Fresh(Claim::ById));
        };
        let index = match self.publishers.iter().position(|p| p.id == *id) {
            Some(index) => index,
            None => {
                let stored = transaction.query_optional(
                    "SELECT last_seq FROM possync_publishers WHERE publisher_id = ?1",
                    params![id],
                    |row| row.get(0),
                )?;
                self.publishers.push(PublisherMark {
                    id: id.clone(),
                    stored,
                    last: stored.unwrap_or(0),
                });
                self.publishers.len() - 1
            }
        };
        Ok(if seq <= self.publishers[index].last {
            Verdict::Duplicate
        } else {
            Verdict::Fresh(Claim::Publisher { index, seq })
        })
    }

    /// A message judged fresh came out as `outcome`: unless it is held to
    /// be tried again, it is settled, and the marks move past it.
    pub(crate) fn settle(&mut self, claim: Claim, outcome: &Outcome) {
        if !outcome.settles_by_ack() {
            return;
        }
        match claim {
            Claim::ById => {}
            Claim::Seq(seq) => {
                if let Some((_, state)) = &mut self.store
                    && let Some(gap) = state.settle(seq, outcome, now_ms())
                {
                    self.gaps.push(gap);
                }
            }
            Claim::Publisher { index, seq } => {
                if let Some(mark) = self.publishers.get_mut(index) {
                    mark.last = mark.last.max(seq);
                }
            }
        }
    }

    /// Writes the marks that moved, in the batch's transaction.
    pub(crate) fn write(&self, transaction: &mut Transaction<'_>) -> rusqlite::Result<()> {
        if let Some((stored, state)) = &self.store
            && stored != state
        {
            transaction.execute(
                "INSERT INTO possync_sequence (license_key, synced_seq, applied_seq, last_change_ms, head_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (license_key) DO UPDATE SET synced_seq = excluded.synced_seq,
                     applied_seq = excluded.applied_seq, last_change_ms = excluded.last_change_ms,
                     head_seq = excluded.head_seq",
                params![
                    self.license_key,
                    state.synced_up_to,
                    state.highest_applied,
                    state.last_change_ms,
                    state.head
                ],
            )?;
        }
        for mark in &self.publishers {
            if mark.stored != Some(mark.last) && mark.last > 0 {
                transaction.execute(
                    "INSERT INTO possync_publishers (publisher_id, last_seq, applied_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (publisher_id) DO UPDATE SET
                         last_seq = max(last_seq, excluded.last_seq), applied_at = excluded.applied_at",
                    params![mark.id, mark.last, unix_now()],
                )?;
            }
        }
        Ok(())
    }

    /// The store's sync state after this batch, if the batch moved it.
    pub(crate) fn moved(&self) -> Option<SyncState> {
        self.store
            .filter(|(stored, state)| stored != state)
            .map(|(_, state)| state)
    }

    /// Jumps in the store's sequence this batch saw: `(expected, received)`.
    pub(crate) fn gaps(&self) -> &[(i64, i64)] {
        &self.gaps
    }

    fn store(&mut self, transaction: &mut Transaction<'_>) -> rusqlite::Result<SyncState> {
        if let Some((_, state)) = self.store {
            return Ok(state);
        }
        let state = transaction
            .query_optional(READ_STATE, [self.license_key], state_from_row)?
            .unwrap_or_default();
        self.store = Some((state, state));
        Ok(state)
    }
}

/// The statement that reads a store's [`SyncState`].
pub(crate) const READ_STATE: &str = "SELECT synced_seq, applied_seq, last_change_ms, head_seq
     FROM possync_sequence WHERE license_key = ?1";

/// A [`SyncState`] from a row of [`READ_STATE`].
pub(crate) fn state_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SyncState> {
    Ok(SyncState {
        synced_up_to: row.get(0)?,
        highest_applied: row.get(1)?,
        last_change_ms: row.get(2)?,
        head: row.get(3)?,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied() -> Outcome {
        Outcome::Applied {
            message_type: "t".into(),
        }
    }

    #[test]
    fn synced_up_to_follows_contiguous_changes_and_stops_at_a_gap() {
        let mut state = SyncState::default();
        assert_eq!(state.settle(1, &applied(), 5), None);
        assert_eq!(state.settle(2, &applied(), 6), None);
        assert_eq!(
            state.settle(5, &applied(), 7),
            Some((3, 5)),
            "3 and 4 missing"
        );
        assert_eq!(state.settle(6, &applied(), 8), None, "one gap, said once");
        assert_eq!(
            (
                state.synced_up_to,
                state.highest_applied,
                state.last_change_ms
            ),
            (2, 6, Some(8))
        );
    }

    #[test]
    fn a_dead_lettered_change_stops_synced_up_to_but_is_not_a_gap() {
        let mut state = SyncState::default();
        state.settle(1, &applied(), 0);
        let dead = Outcome::DeadLetter {
            reason: "bad".into(),
            message_type: None,
        };
        assert_eq!(state.settle(2, &dead, 0), None);
        assert_eq!(state.settle(3, &applied(), 0), None);
        assert_eq!((state.synced_up_to, state.highest_applied), (1, 3));
    }

    #[test]
    fn every_settled_kind_but_a_dead_letter_counts_as_in_sync() {
        for outcome in [
            applied(),
            Outcome::Collapsed {
                message_type: "t".into(),
            },
            Outcome::Stale {
                message_type: "t".into(),
                entities: Vec::new(),
            },
            Outcome::Disabled {
                message_type: "t".into(),
            },
        ] {
            let mut state = SyncState::default();
            state.settle(1, &outcome, 0);
            assert_eq!(state.synced_up_to, 1, "{outcome:?}");
        }
    }
}
