//! Sequence marks: how a terminal tells a duplicate from a new change
//! without a record per message, and how far it is in sync with its store.
//!
//! - A message with `seq` (the store's sequence number, from `possync
//!   backend`) is a duplicate exactly when its `seq` was settled here
//!   before: at or below the contiguous mark (every `seq` from 1 to it is
//!   settled), or one of the few settled above it, kept as ranges in
//!   `possync_sequence_above` (normally none). A `seq` above the mark that
//!   was not settled applies, whenever it comes: the relay sends a change
//!   again after the broker refused it, behind later ones it already sent,
//!   and that change must still apply. When the missing ones arrive the
//!   mark moves over the ranges.
//! - A sequenced message names its catalog (the backend database that gave
//!   the `seq`). The terminal follows the catalog of the first sequenced
//!   message of its store; a sequenced message from another catalog, or
//!   with a `seq` but no catalog, is dead-lettered, never applied: its
//!   `seq` counts in another sequence.
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

use possync_sdk::Migration;
use rusqlite::params;

use crate::dispatch::Outcome;
use crate::gap::{self, Gap};
use crate::inbound::Message;
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

/// The settled mark, the first dead-lettered `seq`, the catalog followed,
/// and the ranges settled above the mark. A store's state from before
/// keeps its meaning: everything up to its highest `seq` counts as
/// settled, and `synced_up_to` stays where it was.
pub(crate) const MIGRATION_ABOVE: Migration = Migration::new(
    "possync/sequence-above",
    "ALTER TABLE possync_sequence ADD COLUMN settled_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE possync_sequence ADD COLUMN dead_seq INTEGER;
    ALTER TABLE possync_sequence ADD COLUMN catalog TEXT;
    UPDATE possync_sequence SET settled_seq = applied_seq,
        dead_seq = CASE WHEN synced_seq < applied_seq THEN synced_seq + 1 END;
    CREATE TABLE IF NOT EXISTS possync_sequence_above (
        license_key TEXT NOT NULL,
        first_seq   INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        PRIMARY KEY (license_key, first_seq)
    ) WITHOUT ROWID;",
);

/// How far a terminal is in sync with its store's sequence, kept in its
/// database (`possync_sequence`) across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncState {
    /// Every change of the store up to this `seq` is applied here, from 1
    /// on without a gap ("synced up to N"); 0 before the first.
    pub synced_up_to: i64,
    /// The highest `seq` applied. Above `synced_up_to` when changes
    /// between them have not arrived yet (a gap) or could not apply
    /// (dead-lettered).
    pub highest_applied: i64,
    /// When the terminal last applied a sequenced change (ms since the
    /// epoch): the clock as that change's batch applied its first one.
    pub last_change_ms: Option<i64>,
    /// The highest `seq` this terminal knows the backend gave its store:
    /// those it received, and the `head` the relay names. A lower bound of
    /// the backend's head.
    pub head: Option<i64>,
    /// The catalog (backend database) whose sequence this terminal follows
    /// for its store: the one of the first sequenced message it applied.
    pub catalog: Option<String>,
    /// A reason to think this terminal lacks some of the store's changes,
    /// until it closes.
    pub gap: Option<Gap>,
    /// When its catalog last matched the backend's checksums; cleared when
    /// one differs.
    pub verified: Option<crate::verify::Verified>,
}

/// What tells a duplicate `seq` from a fresh one: every `seq` up to
/// `settled` is settled (applied or dead-lettered), and so is every one
/// in `above`, sorted ranges above `settled + 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Settled {
    state: SyncState,
    settled: i64,
    /// The first dead-lettered `seq`: `synced_up_to` never passes it.
    dead: Option<i64>,
    above: Vec<(i64, i64)>,
}

impl Settled {
    fn contains(&self, seq: i64) -> bool {
        seq <= self.settled
            || self
                .above
                .iter()
                .any(|&(first, last)| first <= seq && seq <= last)
    }

    /// `seq` (not settled before) settled as `outcome`. Returns the gap
    /// `(expected, received)` if `seq` jumped past the next one.
    fn settle(&mut self, seq: i64, outcome: &Outcome, now_ms: i64) -> Option<(i64, i64)> {
        let expected = self.state.highest_applied + 1;
        let gap = (seq > expected).then_some((expected, seq));
        if gap.is_some() {
            self.state.note_jump(expected, seq, now_ms);
        }
        self.state.highest_applied = self.state.highest_applied.max(seq);
        if matches!(outcome, Outcome::DeadLetter { .. }) {
            self.dead = Some(self.dead.map_or(seq, |dead| dead.min(seq)));
        }
        if seq == self.settled + 1 {
            self.settled = seq;
        } else if seq > self.settled {
            self.insert_above(seq);
        }
        // The gap filled: the mark moves over the ranges it reaches.
        while let Some(&(first, last)) = self.above.first()
            && first <= self.settled + 1
        {
            self.settled = self.settled.max(last);
            self.above.remove(0);
        }
        self.state.note_settled(self.settled);
        self.state.synced_up_to = match self.dead {
            Some(dead) => self.settled.min(dead - 1),
            None => self.settled,
        };
        self.state.last_change_ms = Some(now_ms);
        gap
    }

    fn insert_above(&mut self, seq: i64) {
        let at = self.above.partition_point(|&(first, _)| first < seq);
        self.above.insert(at, (seq, seq));
        // Join it with its neighbours where they touch.
        if at + 1 < self.above.len() && self.above[at + 1].0 == seq + 1 {
            self.above[at].1 = self.above[at + 1].1;
            self.above.remove(at + 1);
        }
        if at > 0 && self.above[at - 1].1 + 1 == seq {
            self.above[at - 1].1 = self.above[at].1;
            self.above.remove(at);
        }
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
    /// Taken from the quarantine by its operator: applied whatever the
    /// marks say (it was settled as quarantined). Applied, its `seq` no
    /// longer holds `synced_up_to` back.
    Requeued(Option<i64>),
}

/// Whether a message was settled before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Duplicate,
    Fresh(Claim),
    /// Never to apply here: dead-lettered with this reason.
    Refused(String),
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
    store: Option<(Settled, Settled)>,
    publishers: Vec<PublisherMark>,
    gaps: Vec<(i64, i64)>,
    /// The clock, read once a batch: its changes commit together.
    now_ms: Option<i64>,
    /// The first dead-lettered `seq`, requeued and applied in this batch.
    dead_applied: Option<i64>,
}

impl<'k> Marks<'k> {
    pub(crate) fn new(license_key: &'k str) -> Self {
        Self {
            license_key,
            store: None,
            publishers: Vec::new(),
            gaps: Vec::new(),
            now_ms: None,
            dead_applied: None,
        }
    }

    /// The claim of a message requeued from the quarantine: applied
    /// whatever the marks say, by its `seq` if it has one.
    pub(crate) fn requeued(
        &mut self,
        transaction: &mut Transaction<'_>,
        envelope: &Message<'_>,
    ) -> rusqlite::Result<Claim> {
        if envelope.seq.is_some() {
            self.store(transaction)?;
        }
        Ok(Claim::Requeued(envelope.seq))
    }

    /// Whether `envelope` was settled before: by `seq` if it has one, else
    /// by its publisher stamp; [`Claim::ById`] leaves it to `possync_applied`.
    pub(crate) fn judge(
        &mut self,
        transaction: &mut Transaction<'_>,
        envelope: &Message<'_>,
    ) -> rusqlite::Result<Verdict> {
        if let Some(seq) = envelope.seq {
            let license_key = self.license_key;
            let settled = self.store(transaction)?;
            let Some(catalog) = envelope.catalog.as_deref() else {
                return Ok(Verdict::Refused(format!(
                    "seq {seq} for store {license_key} names no catalog, so this terminal cannot tell which backend's sequence it belongs to; it was not applied: publish sequenced changes through a possync backend that stamps its catalog id (upgrade the backend)"
                )));
            };
            match &settled.state.catalog {
                Some(followed) if followed != catalog => {
                    return Ok(Verdict::Refused(format!(
                        "seq {seq} for store {license_key} comes from catalog {catalog}, but this terminal follows catalog {followed}: two backends publish to this store (stop the one that is not the store's catalog of record), or the backend's database was replaced (re-provision the terminal so it follows the new catalog); it was not applied"
                    )));
                }
                Some(_) => {}
                None => settled.state.catalog = Some(catalog.to_owned()),
            }
            let head = envelope.head.unwrap_or(seq).max(seq);
            if settled.state.head.is_none_or(|known| known < head) {
                settled.state.head = Some(head);
            }
            return Ok(if settled.contains(seq) {
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
                    id: id.to_string(),
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
            Claim::ById | Claim::Requeued(None) => {}
            Claim::Requeued(Some(seq)) => {
                if outcome.took_effect()
                    && let Some((_, settled)) = &self.store
                    && settled.dead == Some(seq)
                {
                    self.dead_applied = Some(seq);
                }
            }
            Claim::Seq(seq) => {
                let now_ms = *self.now_ms.get_or_insert_with(now_ms);
                if let Some((_, settled)) = &mut self.store
                    && let Some(gap) = settled.settle(seq, outcome, now_ms)
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
    pub(crate) fn write(&mut self, transaction: &mut Transaction<'_>) -> rusqlite::Result<()> {
        if let Some(seq) = self.dead_applied.take()
            && let Some((_, settled)) = &mut self.store
        {
            // The next dead-lettered change still quarantined, if any,
            // holds `synced_up_to` back now.
            let next: Option<i64> = transaction
                .query_optional(
                    "SELECT min(json_extract(CAST(body AS TEXT), '$.seq'))
                     FROM possync_quarantine
                     WHERE json_valid(CAST(body AS TEXT))
                       AND json_extract(CAST(body AS TEXT), '$.seq') > ?1",
                    [seq],
                    |row| row.get(0),
                )?
                .flatten();
            settled.dead = next;
            settled.state.synced_up_to = match next {
                Some(dead) => settled.settled.min(dead - 1),
                None => settled.settled,
            };
        }
        if let Some((stored, settled)) = &self.store
            && stored != settled
        {
            let state = &settled.state;
            let (gap_cause, gap_low, gap_high, gap_since) = gap::to_columns(state.gap.as_ref());
            transaction.execute(
                "INSERT INTO possync_sequence (license_key, synced_seq, applied_seq, last_change_ms,
                     head_seq, settled_seq, dead_seq, catalog, gap_cause, gap_low, gap_high, gap_since_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (license_key) DO UPDATE SET synced_seq = excluded.synced_seq,
                     applied_seq = excluded.applied_seq, last_change_ms = excluded.last_change_ms,
                     head_seq = excluded.head_seq, settled_seq = excluded.settled_seq,
                     dead_seq = excluded.dead_seq, catalog = excluded.catalog,
                     gap_cause = excluded.gap_cause, gap_low = excluded.gap_low,
                     gap_high = excluded.gap_high, gap_since_ms = excluded.gap_since_ms",
                params![
                    self.license_key,
                    state.synced_up_to,
                    state.highest_applied,
                    state.last_change_ms,
                    state.head,
                    settled.settled,
                    settled.dead,
                    state.catalog,
                    gap_cause,
                    gap_low,
                    gap_high,
                    gap_since
                ],
            )?;
            // Only the ranges that changed: a store with many holes (each
            // change that never arrived) costs a batch what it moved.
            for (first, _) in stored
                .above
                .iter()
                .filter(|r| settled.above.binary_search(r).is_err())
            {
                transaction.execute(
                    "DELETE FROM possync_sequence_above WHERE license_key = ?1 AND first_seq = ?2",
                    params![self.license_key, first],
                )?;
            }
            for (first, last) in settled
                .above
                .iter()
                .filter(|r| stored.above.binary_search(r).is_err())
            {
                transaction.execute(
                    "INSERT INTO possync_sequence_above (license_key, first_seq, last_seq)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (license_key, first_seq) DO UPDATE SET last_seq = excluded.last_seq",
                    params![self.license_key, first, last],
                )?;
            }
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
            .as_ref()
            .filter(|(stored, settled)| stored.state != settled.state)
            .map(|(_, settled)| settled.state.clone())
    }

    /// The gap this batch closed, if any.
    pub(crate) fn closed_gap(&self) -> Option<crate::gap::GapCause> {
        let (stored, settled) = self.store.as_ref()?;
        match (stored.state.gap, settled.state.gap) {
            (Some(gap), None) => Some(gap.cause),
            _ => None,
        }
    }

    /// Jumps in the store's sequence this batch saw: `(expected, received)`.
    pub(crate) fn gaps(&self) -> &[(i64, i64)] {
        &self.gaps
    }

    fn store(&mut self, transaction: &mut Transaction<'_>) -> rusqlite::Result<&mut Settled> {
        if self.store.is_none() {
            let read = transaction.query_optional(
                "SELECT synced_seq, applied_seq, last_change_ms, head_seq, catalog,
                     gap_cause, gap_low, gap_high, gap_since_ms, verified_seq, verified_ms,
                     settled_seq, dead_seq
                 FROM possync_sequence WHERE license_key = ?1",
                [self.license_key],
                |row| {
                    Ok(Settled {
                        state: state_from_row(row)?,
                        settled: row.get(11)?,
                        dead: row.get(12)?,
                        above: Vec::new(),
                    })
                },
            )?;
            let mut settled = read.unwrap_or_default();
            if settled.settled < settled.state.highest_applied {
                settled.above = transaction.query_all(
                    "SELECT first_seq, last_seq FROM possync_sequence_above
                     WHERE license_key = ?1 ORDER BY first_seq",
                    [self.license_key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
            }
            self.store = Some((settled.clone(), settled));
        }
        Ok(&mut self.store.as_mut().expect("read above").1)
    }
}

/// The statement that reads a store's [`SyncState`].
pub(crate) const READ_STATE: &str =
    "SELECT synced_seq, applied_seq, last_change_ms, head_seq, catalog,
         gap_cause, gap_low, gap_high, gap_since_ms, verified_seq, verified_ms
     FROM possync_sequence WHERE license_key = ?1";

/// A [`SyncState`] from a row of [`READ_STATE`].
pub(crate) fn state_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SyncState> {
    Ok(SyncState {
        synced_up_to: row.get(0)?,
        highest_applied: row.get(1)?,
        last_change_ms: row.get(2)?,
        head: row.get(3)?,
        catalog: row.get(4)?,
        gap: gap::from_columns(row.get(5)?, row.get(6)?, row.get(7)?, row.get(8)?),
        verified: match (row.get(9)?, row.get(10)?) {
            (Some(seq), Some(at_ms)) => Some(crate::verify::Verified { seq, at_ms }),
            _ => None,
        },
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
        let mut state = Settled::default();
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
                state.state.synced_up_to,
                state.state.highest_applied,
                state.state.last_change_ms
            ),
            (2, 6, Some(8))
        );
    }

    #[test]
    fn a_dead_lettered_change_stops_synced_up_to_but_is_not_a_gap() {
        let mut state = Settled::default();
        state.settle(1, &applied(), 0);
        let dead = Outcome::DeadLetter {
            reason: "bad".into(),
            message_type: None,
        };
        assert_eq!(state.settle(2, &dead, 0), None);
        assert_eq!(state.settle(3, &applied(), 0), None);
        assert_eq!(
            (state.state.synced_up_to, state.state.highest_applied),
            (1, 3)
        );
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
            let mut state = Settled::default();
            state.settle(1, &outcome, 0);
            assert_eq!(state.state.synced_up_to, 1, "{outcome:?}");
        }
    }

    #[test]
    fn a_change_sent_again_behind_later_ones_applies_and_fills_the_gap() {
        let mut state = Settled::default();
        for seq in [1, 2, 4, 5] {
            assert!(!state.contains(seq));
            state.settle(seq, &applied(), 0);
        }
        assert!(!state.contains(3), "3 was refused, never applied");
        assert!(state.contains(4) && state.contains(5) && state.contains(2));
        assert_eq!(state.above, vec![(4, 5)]);
        assert_eq!(state.settle(3, &applied(), 0), None, "no new gap");
        assert_eq!(
            (state.state.synced_up_to, state.state.highest_applied),
            (5, 5)
        );
        assert!(state.above.is_empty(), "the set is empty again");
        assert!((1..=5).all(|seq| state.contains(seq)));
    }

    #[test]
    fn settled_ranges_join_when_they_touch() {
        let mut state = Settled::default();
        for seq in [3, 7, 5, 4, 6, 9] {
            state.settle(seq, &applied(), 0);
        }
        assert_eq!(state.above, vec![(3, 7), (9, 9)]);
        state.settle(1, &applied(), 0);
        state.settle(2, &applied(), 0);
        assert_eq!((state.settled, state.above.clone()), (7, vec![(9, 9)]));
        assert_eq!(state.state.synced_up_to, 7);
    }

    #[test]
    fn a_dead_letter_keeps_synced_up_to_below_it_once_the_gap_fills() {
        let mut state = Settled::default();
        let dead = Outcome::DeadLetter {
            reason: "bad".into(),
            message_type: None,
        };
        state.settle(1, &applied(), 0);
        state.settle(3, &applied(), 0);
        state.settle(2, &dead, 0);
        assert_eq!((state.settled, state.state.synced_up_to), (3, 1));
    }
}
