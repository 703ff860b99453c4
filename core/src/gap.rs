//! Gaps: reasons for a terminal to think it lacks some of its store's
//! changes. Each is kept with the store's sync state (`possync_sequence`),
//! logged when found and shown by `possync status`, the status page and
//! the metrics, until it closes: a jump when the missing changes arrive.
//! The others stay open: only a snapshot of the store's catalog can tell
//! what was missed.
//!
//! A database restored from a backup is found by the mark beside it
//! (`<database>-applied`): the catalog and the highest `seq` this terminal
//! applied, written after commits at most once a second. A database behind
//! its mark was put back from an older copy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use possync_sdk::Migration;

use crate::sequence::SyncState;

/// The gap's columns beside the sync state.
pub(crate) const MIGRATION: Migration = Migration::new(
    "possync/gap",
    "ALTER TABLE possync_sequence ADD COLUMN gap_cause TEXT;
    ALTER TABLE possync_sequence ADD COLUMN gap_low INTEGER;
    ALTER TABLE possync_sequence ADD COLUMN gap_high INTEGER;
    ALTER TABLE possync_sequence ADD COLUMN gap_since_ms INTEGER;",
);

/// A reason to think this terminal lacks some of its store's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// What was found.
    pub cause: GapCause,
    /// When (ms since the epoch).
    pub since_ms: i64,
}

/// What made a terminal think it lacks changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The first sequenced change this terminal received was `received`:
    /// the store's changes before it were made before its first start.
    FirstStart {
        /// The first `seq` received.
        received: i64,
    },
    /// `received` arrived while `expected` was the next: the changes
    /// between have not arrived (the relay may still send them).
    Jump {
        /// The next `seq` expected.
        expected: i64,
        /// The `seq` that came instead.
        received: i64,
    },
    /// The terminal's queue was gone when it connected (expired while the
    /// till was off, or deleted) and was made again: what was published
    /// meanwhile never reached it.
    QueueRecreated,
    /// The database holds changes up to `found`, but this terminal had
    /// applied up to `recorded`: it was restored from an older copy.
    DatabaseBehind {
        /// The highest `seq` the database holds.
        found: i64,
        /// The highest `seq` this terminal had applied.
        recorded: i64,
    },
}

impl GapCause {
    /// Its name in the database, the status JSON and the logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FirstStart { .. } => "first_start",
            Self::Jump { .. } => "jump",
            Self::QueueRecreated => "queue_recreated",
            Self::DatabaseBehind { .. } => "database_behind",
        }
    }

    fn bounds(&self) -> (Option<i64>, Option<i64>) {
        match *self {
            Self::FirstStart { received } => (Some(1), Some(received)),
            Self::Jump { expected, received } => (Some(expected), Some(received)),
            Self::QueueRecreated => (None, None),
            Self::DatabaseBehind { found, recorded } => (Some(found), Some(recorded)),
        }
    }

    fn from_columns(name: &str, low: Option<i64>, high: Option<i64>) -> Option<Self> {
        Some(match (name, low, high) {
            ("first_start", _, Some(received)) => Self::FirstStart { received },
            ("jump", Some(expected), Some(received)) => Self::Jump { expected, received },
            ("queue_recreated", _, _) => Self::QueueRecreated,
            ("database_behind", Some(found), Some(recorded)) => {
                Self::DatabaseBehind { found, recorded }
            }
            _ => return None,
        })
    }

    /// Whether it closes once every `seq` below `received` is settled.
    fn closes_when_filled(&self) -> Option<i64> {
        match *self {
            Self::FirstStart { received } | Self::Jump { received, .. } => Some(received),
            Self::QueueRecreated | Self::DatabaseBehind { .. } => None,
        }
    }
}

impl std::fmt::Display for GapCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let missing = |f: &mut std::fmt::Formatter<'_>, first: i64, next: i64| {
            if next - first == 1 {
                write!(f, "change {first}")
            } else {
                write!(f, "changes {first} to {}", next - 1)
            }
        };
        match *self {
            Self::FirstStart { received } => {
                missing(f, 1, received)?;
                write!(
                    f,
                    " of the store were made before this terminal first started (its first was {received})"
                )
            }
            Self::Jump { expected, received } => {
                missing(f, expected, received)?;
                write!(
                    f,
                    " never arrived: {received} came after {}",
                    expected - 1
                )
            }
            Self::QueueRecreated => f.write_str(
                "the terminal's queue was gone when it connected (expired while the till was off, or deleted) and was made again: changes published meanwhile never reached it",
            ),
            Self::DatabaseBehind { found, recorded } => write!(
                f,
                "the database holds changes up to {found}, but this terminal had applied up to {recorded}: it was restored from an older copy"
            ),
        }
    }
}

/// The columns `gap_cause, gap_low, gap_high, gap_since_ms` as a gap.
pub(crate) fn from_columns(
    cause: Option<String>,
    low: Option<i64>,
    high: Option<i64>,
    since_ms: Option<i64>,
) -> Option<Gap> {
    let cause = GapCause::from_columns(cause.as_deref()?, low, high)?;
    Some(Gap {
        cause,
        since_ms: since_ms.unwrap_or_default(),
    })
}

/// The columns of `gap`: cause, low, high, since.
pub(crate) fn to_columns(
    gap: Option<&Gap>,
) -> (Option<&'static str>, Option<i64>, Option<i64>, Option<i64>) {
    match gap {
        None => (None, None, None, None),
        Some(gap) => {
            let (low, high) = gap.cause.bounds();
            (Some(gap.cause.name()), low, high, Some(gap.since_ms))
        }
    }
}

impl SyncState {
    /// Takes note of a jump in the sequence: a gap, unless one is open.
    pub(crate) fn note_jump(&mut self, expected: i64, received: i64, now_ms: i64) {
        if self.gap.is_some() {
            return;
        }
        // Nothing sequenced was applied here before.
        let cause = if expected == 1 {
            GapCause::FirstStart { received }
        } else {
            GapCause::Jump { expected, received }
        };
        self.gap = Some(Gap {
            cause,
            since_ms: now_ms,
        });
    }

    /// Closes a jump once every `seq` before the one that jumped is
    /// settled (`settled` is the contiguous mark).
    pub(crate) fn note_settled(&mut self, settled: i64) {
        if let Some(received) = self.gap.and_then(|gap| gap.cause.closes_when_filled())
            && settled >= received - 1
        {
            self.gap = None;
        }
    }
}

/// The mark beside a terminal's database: the catalog and the highest
/// `seq` applied, to tell a database put back from an older copy.
#[derive(Debug)]
pub(crate) struct AppliedMark {
    path: PathBuf,
    written: Option<(Option<String>, i64)>,
    pending: Option<(Option<String>, i64)>,
    written_at: Instant,
}

/// How often the mark is written while changes apply.
const MARK_EVERY: Duration = Duration::from_secs(1);

impl AppliedMark {
    /// The mark of the database at `database`.
    pub(crate) fn beside(database: &Path) -> Self {
        let mut name = database.as_os_str().to_owned();
        name.push("-applied");
        Self {
            path: PathBuf::from(name),
            written: None,
            pending: None,
            written_at: Instant::now(),
        }
    }

    /// What the mark says: the catalog and the highest `seq` applied;
    /// `None` if there is none (or it cannot be read).
    pub(crate) fn read(&self) -> Option<(Option<String>, i64)> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let (catalog, highest) = text.trim().split_once(' ')?;
        let catalog = (catalog != "-").then(|| catalog.to_owned());
        Some((catalog, highest.parse().ok()?))
    }

    /// The gap the database's `state` shows against the mark, if any.
    pub(crate) fn check(&self, state: &SyncState, now_ms: i64) -> Option<Gap> {
        let (catalog, recorded) = self.read()?;
        let same_catalog = state.catalog.is_none() || state.catalog == catalog;
        (same_catalog && state.highest_applied < recorded).then_some(Gap {
            cause: GapCause::DatabaseBehind {
                found: state.highest_applied,
                recorded,
            },
            since_ms: now_ms,
        })
    }

    /// Takes note of the committed `state`; writes it at most once a
    /// second (`flush` writes what waits).
    pub(crate) fn note(&mut self, state: &SyncState) {
        self.pending = Some((state.catalog.clone(), state.highest_applied));
        if self.written_at.elapsed() >= MARK_EVERY {
            self.flush();
        }
    }

    /// Writes what waits. A mark that cannot be written only weakens the
    /// check of a restored database: logged, never fatal.
    pub(crate) fn flush(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if self.written.as_ref() == Some(&pending) {
            return;
        }
        self.written_at = Instant::now();
        let (catalog, highest) = &pending;
        let text = format!("{} {highest}\n", catalog.as_deref().unwrap_or("-"));
        match std::fs::write(&self.path, text) {
            Ok(()) => self.written = Some(pending),
            Err(err) => crate::events::applied_mark_unwritten(&self.path, &err.to_string()),
        }
    }
}

impl Drop for AppliedMark {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_opens_a_gap_that_closes_when_the_missing_changes_arrive() {
        let mut state = SyncState::default();
        state.note_jump(4, 7, 1);
        assert_eq!(
            state.gap.map(|gap| gap.cause),
            Some(GapCause::Jump {
                expected: 4,
                received: 7
            })
        );
        state.note_settled(5);
        assert!(state.gap.is_some(), "6 is still missing");
        state.note_settled(6);
        assert_eq!(state.gap, None);
    }

    #[test]
    fn a_gap_found_another_way_stays_open_however_the_sequence_moves() {
        let mut state = SyncState {
            gap: Some(Gap {
                cause: GapCause::QueueRecreated,
                since_ms: 1,
            }),
            ..SyncState::default()
        };
        state.note_jump(3, 9, 2);
        state.note_settled(100);
        assert_eq!(
            state.gap.map(|gap| gap.cause),
            Some(GapCause::QueueRecreated)
        );
    }

    #[test]
    fn every_cause_survives_its_columns() {
        for cause in [
            GapCause::FirstStart { received: 5 },
            GapCause::Jump {
                expected: 3,
                received: 8,
            },
            GapCause::QueueRecreated,
            GapCause::DatabaseBehind {
                found: 10,
                recorded: 40,
            },
        ] {
            let gap = Gap { cause, since_ms: 7 };
            let (name, low, high, since) = to_columns(Some(&gap));
            assert_eq!(
                from_columns(name.map(str::to_owned), low, high, since),
                Some(gap)
            );
        }
    }

    #[test]
    fn a_database_behind_its_mark_is_a_gap_and_one_level_with_it_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut mark = AppliedMark::beside(&dir.path().join("till.db"));
        let synced = |highest| SyncState {
            highest_applied: highest,
            catalog: Some("cat".into()),
            ..SyncState::default()
        };
        mark.note(&synced(40));
        mark.flush();
        assert_eq!(mark.check(&synced(40), 1), None);
        assert_eq!(
            mark.check(&synced(10), 1).map(|gap| gap.cause),
            Some(GapCause::DatabaseBehind {
                found: 10,
                recorded: 40
            })
        );
        assert_eq!(
            mark.check(&SyncState::default(), 1).map(|gap| gap.cause),
            Some(GapCause::DatabaseBehind {
                found: 0,
                recorded: 40
            }),
            "an empty database put in its place"
        );
        let other = SyncState {
            catalog: Some("another".into()),
            ..synced(1)
        };
        assert_eq!(mark.check(&other, 1), None, "another catalog's sequence");
    }
}
