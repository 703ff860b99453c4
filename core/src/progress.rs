//! Progress: what a batch's outcomes add up to ([`Tally`]), for the
//! terminal's status, and the counters of `possync status` ([`Progress`]),
//! written to the database at most once a second.

use crate::dispatch::Outcome;
use crate::store::{ProgressRecord, unix_now_ms};

/// What a batch's outcomes add up to, for the status and the database.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) by_type: Vec<(String, u64)>,
    /// Messages that changed nothing because their entity held a newer change.
    pub(crate) stale_by_type: Vec<(String, u64)>,
    pub(crate) applied: u64,
    pub(crate) quarantined: u64,
    pub(crate) duplicates: u64,
    /// Messages settled unapplied because a later change of the same batch
    /// overwrote them (counted in `applied` too).
    pub(crate) collapsed: u64,
    pub(crate) retries: u64,
    /// The type of the last message applied.
    pub(crate) last_type: Option<String>,
}

impl Tally {
    pub(crate) fn of(outcomes: &[Outcome]) -> Self {
        let mut tally = Self::default();
        let mut last_type = None;
        for outcome in outcomes {
            match outcome {
                Outcome::Applied { message_type } => {
                    tally.applied += 1;
                    last_type = Some(message_type);
                    count_type(&mut tally.by_type, message_type);
                }
                Outcome::Collapsed { message_type } => {
                    tally.applied += 1;
                    tally.collapsed += 1;
                    last_type = Some(message_type);
                    count_type(&mut tally.by_type, message_type);
                }
                Outcome::Stale { message_type, .. } => {
                    count_type(&mut tally.stale_by_type, message_type);
                }
                Outcome::DeadLetter { .. } => tally.quarantined += 1,
                Outcome::Duplicate => tally.duplicates += 1,
                Outcome::Retry { .. } => tally.retries += 1,
                Outcome::Disabled { .. } | Outcome::Checkpoint => {}
            }
        }
        tally.last_type = last_type.cloned();
        tally
    }
}

fn count_type(counts: &mut Vec<(String, u64)>, message_type: &str) {
    match counts.iter_mut().find(|(t, _)| t == message_type) {
        Some((_, count)) => *count += 1,
        None => counts.push((message_type.to_owned(), 1)),
    }
}

/// How often the counters of `possync status` are written: a batch that
/// wrote them would dirty one more page of the database per commit.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counters committed to the catalog but not yet to `possync_status`.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    counts: ProgressRecord,
    written_at: std::time::Instant,
    /// The transaction in progress writes the counters.
    writing: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            counts: ProgressRecord::default(),
            written_at: std::time::Instant::now(),
            writing: false,
        }
    }
}

impl Progress {
    /// Whether the batch about to commit writes the counters: it is time
    /// when they were last written [`PROGRESS_EVERY`] ago.
    pub(crate) fn due(&mut self) -> bool {
        self.writing = self.written_at.elapsed() >= PROGRESS_EVERY;
        self.writing
    }

    /// The counters committed but not yet written.
    pub(crate) fn unwritten(&self) -> &ProgressRecord {
        &self.counts
    }

    /// The counters with a batch's added, as of now.
    pub(crate) fn with(&self, tally: &Tally) -> ProgressRecord {
        let mut counts = self.counts.clone();
        counts.applied += tally.applied;
        counts.collapsed += tally.collapsed;
        counts.quarantined += tally.quarantined;
        counts.stale += tally.stale_by_type.iter().map(|(_, n)| n).sum::<u64>();
        if tally.applied > 0 {
            counts.last_applied_ms = Some(unix_now_ms());
        }
        if tally.last_type.is_some() {
            counts.last_type.clone_from(&tally.last_type);
        }
        counts
    }

    /// A batch committed, and the counters with it if it wrote them.
    pub(crate) fn committed(&mut self, tally: &Tally) {
        if self.writing {
            *self = Self::default();
        } else {
            self.counts = self.with(tally);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::StaleEntity;

    #[test]
    fn a_tally_counts_each_outcome_and_remembers_the_last_type_applied() {
        let applied = |t: &str| Outcome::Applied {
            message_type: t.into(),
        };
        let outcomes = [
            applied("price_update"),
            Outcome::Duplicate,
            applied("category_update"),
            applied("price_update"),
            Outcome::Collapsed {
                message_type: "price_update".into(),
            },
            Outcome::Stale {
                message_type: "price_update".into(),
                entities: Vec::<StaleEntity>::new(),
            },
            Outcome::Disabled {
                message_type: "product_images".into(),
            },
            Outcome::DeadLetter {
                reason: "bad".into(),
                message_type: None,
            },
            Outcome::Retry {
                reason: "busy".into(),
            },
        ];
        let tally = Tally::of(&outcomes);
        assert_eq!(
            tally.by_type,
            [("price_update".into(), 3), ("category_update".into(), 1)]
        );
        assert_eq!(tally.stale_by_type, [("price_update".into(), 1)]);
        assert_eq!(
            (
                tally.applied,
                tally.collapsed,
                tally.quarantined,
                tally.duplicates,
                tally.retries
            ),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(tally.last_type.as_deref(), Some("price_update"));
    }

    #[test]
    fn counters_not_yet_written_add_up_until_a_batch_writes_them() {
        let tally = Tally::of(&[Outcome::Applied {
            message_type: "price_update".into(),
        }]);
        let mut progress = Progress::default();
        progress.committed(&tally);
        progress.committed(&tally);
        assert_eq!(progress.unwritten().applied, 2);
        assert_eq!(progress.with(&tally).applied, 3);
        progress.writing = true;
        progress.committed(&tally);
        assert_eq!(progress.unwritten().applied, 0, "the batch wrote them");
    }
}
