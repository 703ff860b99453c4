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
    /// At `seq`, which the terminal had applied all of, its catalog's
    /// checksum differed from the backend's: a row was changed outside
    /// possync, or a change went missing unseen.
    ChecksumMismatch {
        /// The checkpoint's `seq`.
        seq: i64,
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
            Self::ChecksumMismatch { .. } => "checksum_mismatch",
        }
    }

    fn bounds(&self) -> (Option<i64>, Option<i64>) {
        match *self {
            Self::FirstStart { received } => (Some(1), Some(received)),
            Self::Jump { expected, received } => (Some(expected), Some(received)),
            Self::QueueRecreated => (None, None),
            Self::DatabaseBehind { found, recorded } => (Some(found), Some(recorded)),
            Self::ChecksumMismatch { seq } => (Some(seq), None),
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
            ("checksum_mismatch", Some(seq), _) => Self::ChecksumMismatch { seq },
            _ => return None,
        })
    }

    /// Whether it closes by itself once the missing changes arrive; the
    /// others stay open until a snapshot, and take the place of one that
    /// would.
    pub fn closes_when_filled(&self) -> bool {
        matches!(self, Self::FirstStart { .. } | Self::Jump { .. })
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
            Self::ChecksumMismatch { seq } => write!(
                f,
                "the catalog differed from the backend's at seq {seq} (its checksum did not match): a row was changed outside possync, or a change went missing unseen"
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

    /// Closes a jump once nothing is missing below the highest `seq`
    /// applied (`settled` is the contiguous mark): every jump since the
    /// first has filled too.
    pub(crate) fn note_settled(&mut self, settled: i64) {
        if self.gap.is_some_and(|gap| gap.cause.closes_when_filled())
            && settled >= self.highest_applied
        {
            self.gap = None;
        }
    }
}

/// The mark beside a terminal's database: the catalog and the highest
/// `seq` applied, to tell a database put back from an older copy.
#[derive(Debug)]
pub(crate) struct AppliedMark {
    /// `None` for a database that is no file (`:memory:`, a URI).
    path: Option<PathBuf>,
    license_key: String,
    written: Option<(Option<String>, i64)>,
    pending: Option<(Option<String>, i64)>,
    written_at: Instant,
}

/// How often the mark is written while changes apply.
const MARK_EVERY: Duration = Duration::from_secs(1);

impl AppliedMark {
    /// The mark of `license_key`'s database at `database`.
    pub(crate) fn beside(database: &Path, license_key: &str) -> Self {
        let text = database.to_string_lossy();
        let path =
            (!text.is_empty() && text != ":memory:" && !text.starts_with("file:")).then(|| {
                let mut name = database.as_os_str().to_owned();
                name.push("-applied");
                PathBuf::from(name)
            });
        Self {
            path,
            license_key: license_key.to_owned(),
            written: None,
            pending: None,
            written_at: Instant::now(),
        }
    }

    /// What the mark says of `license_key`: the catalog and the highest
    /// `seq` applied; `None` if there is none (or it is another store's, or
    /// cannot be read).
    fn read(&self, license_key: &str) -> Option<(Option<String>, i64)> {
        let path = self.path.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let mut words = text.split_whitespace();
        let (store, catalog, highest) = (words.next()?, words.next()?, words.next()?);
        if store != license_key {
            return None;
        }
        let catalog = (catalog != "-").then(|| catalog.to_owned());
        Some((catalog, highest.parse().ok()?))
    }

    /// The gap the database's `state` of `license_key` shows against the
    /// mark, if any. A database that holds nothing of the store is a new
    /// one (deleted to start over), not an older copy.
    pub(crate) fn check(&self, license_key: &str, state: &SyncState, now_ms: i64) -> Option<Gap> {
        let (catalog, recorded) = self.read(license_key)?;
        let holds_some = state.catalog.is_some() || state.highest_applied > 0;
        let same_catalog = state.catalog.is_none() || state.catalog == catalog;
        (holds_some && same_catalog && state.highest_applied < recorded).then_some(Gap {
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
        let Some(path) = &self.path else {
            return;
        };
        self.written_at = Instant::now();
        let (catalog, highest) = &pending;
        let text = format!(
            "{} {} {highest}\n",
            self.license_key,
            catalog.as_deref().unwrap_or("-")
        );
        // Whole or not at all: written aside, then renamed over the mark.
        let mut aside = path.as_os_str().to_owned();
        aside.push(".new");
        let aside = PathBuf::from(aside);
        match std::fs::write(&aside, text).and_then(|()| std::fs::rename(&aside, path)) {
            Ok(()) => self.written = Some(pending),
            Err(err) => crate::events::applied_mark_unwritten(path, &err.to_string()),
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
        state.highest_applied = 7;
        state.note_settled(5);
        assert!(state.gap.is_some(), "6 is still missing");
        state.note_settled(7);
        assert_eq!(state.gap, None);
    }

    #[test]
    fn a_jump_stays_open_while_a_later_one_is_still_missing() {
        let mut state = SyncState::default();
        state.note_jump(4, 7, 1);
        state.note_jump(10, 15, 2);
        state.highest_applied = 15;
        state.note_settled(9);
        assert!(state.gap.is_some(), "4 to 6 arrived, 10 to 14 did not");
        state.note_settled(15);
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
        let mut mark = AppliedMark::beside(&dir.path().join("till.db"), "STORE");
        let synced = |highest| SyncState {
            highest_applied: highest,
            catalog: Some("cat".into()),
            ..SyncState::default()
        };
        mark.note(&synced(40));
        mark.flush();
        assert_eq!(mark.check("STORE", &synced(40), 1), None);
        assert_eq!(
            mark.check("STORE", &synced(10), 1).map(|gap| gap.cause),
            Some(GapCause::DatabaseBehind {
                found: 10,
                recorded: 40
            })
        );
        assert_eq!(
            mark.check("STORE", &SyncState::default(), 1),
            None,
            "a database deleted to start over is new, not an older copy"
        );
        let other = SyncState {
            catalog: Some("another".into()),
            ..synced(1)
        };
        assert_eq!(
            mark.check("STORE", &other, 1),
            None,
            "another catalog's sequence"
        );
        assert_eq!(
            mark.check("OTHER", &synced(10), 1),
            None,
            "the file now holds another store"
        );
    }
}
