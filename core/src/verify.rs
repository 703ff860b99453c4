//! Checkpoint verification: a terminal proves its catalog is the backend's.
//!
//! The backend sends each store, now and then, a checkpoint: the checksum
//! of every kind of entity at a `seq`. A terminal that has applied exactly
//! every change up to that `seq` sums the rows its plugins export (see
//! `Plugin::export`) and compares. A match is recorded ("verified at seq
//! N"); a difference is a gap, and the terminal converges from a snapshot.
//!
//! Summing reads every exported row, so it is rationed: after a
//! verification that took `t`, the next waits at least `t × 100`, which
//! keeps its cost near 1% of the terminal's time however often
//! checkpoints come. A kind that still differs right after a snapshot
//! replaced it does not differ by accident: its plugin exports something
//! other than what the backend keeps (or is switched off where the backend
//! has it). It is not verified again until the terminal restarts, so that
//! it does not snapshot forever; the log says so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use possync_sdk::{Export, Migration};

use crate::checksum::{self, Checkpoint, Checksum};
use crate::sequence::SyncState;

/// Where the last match is kept, beside the sync state.
pub(crate) const MIGRATION: Migration = Migration::new(
    "possync/verified",
    "ALTER TABLE possync_sequence ADD COLUMN verified_seq INTEGER;
    ALTER TABLE possync_sequence ADD COLUMN verified_ms INTEGER;",
);

/// Where the last snapshot's chunks stop showing changes: the catalog
/// equals the backend's only from that seq on.
pub(crate) const MIGRATION_SETTLED: Migration = Migration::new(
    "possync/snapshot-settled",
    "ALTER TABLE possync_sequence ADD COLUMN snapshot_settled_seq INTEGER;",
);

/// A change sent straight to the exchange reaches the terminal before the
/// backend sequences its copy: for this long after one applied the
/// terminal may hold what the backend's checkpoints do not cover yet.
const UNSEQUENCED_QUIET: std::time::Duration = std::time::Duration::from_secs(60);

/// A verification costs at most 1/`RATION` of the time between two.
const RATION: u32 = 100;

/// When the terminal's catalog last matched the backend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The checkpoint's `seq`.
    pub seq: i64,
    /// When (ms since the epoch).
    pub at_ms: i64,
}

/// What a checkpoint came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not compared, and why (for the log at debug level).
    Skipped(&'static str),
    /// Every kind compared matched.
    Matched { kinds: usize },
    /// These kinds differ: (kind, the terminal's, the backend's).
    Differs(Vec<(String, Checksum, Checksum)>),
}

/// Whether the verifier would compare a checkpoint now, for the consumer:
/// it ends a batch at a checkpoint only then, since each batch is a
/// commit and most checkpoints fall within the ration's wait.
#[derive(Debug, Clone)]
pub(crate) struct Turn(std::sync::Arc<std::sync::Mutex<Instant>>);

impl Turn {
    /// Whether the ration allows a comparison now.
    pub(crate) fn due(&self) -> bool {
        Instant::now() >= *self.next()
    }

    pub(crate) fn set(&self, next: Instant) {
        *self.next() = next;
    }

    fn next(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Compares checkpoints with what the terminal holds.
#[derive(Debug)]
pub(crate) struct Verifier {
    exports: Vec<Export>,
    /// Not before then: the ration, shared with the consumer.
    pub(crate) turn: Turn,
    /// Kinds that differed at the last comparison.
    differed: BTreeSet<String>,
    /// Kinds that differed again after a snapshot: no longer compared.
    pub(crate) given_up: BTreeSet<String>,
    /// When a change without a `seq` last applied.
    unsequenced_at: Option<Instant>,
}

impl Verifier {
    pub(crate) fn new(exports: Vec<Export>) -> Self {
        Self {
            exports,
            turn: Turn(std::sync::Arc::new(std::sync::Mutex::new(Instant::now()))),
            differed: BTreeSet::new(),
            given_up: BTreeSet::new(),
            unsequenced_at: None,
        }
    }

    /// When the ration allows the next comparison, shared.
    pub(crate) fn turn(&self) -> Turn {
        self.turn.clone()
    }

    /// A change without a `seq` applied.
    pub(crate) fn unsequenced_applied(&mut self) {
        self.unsequenced_at = Some(Instant::now());
    }

    /// Compares `checkpoint` with the database, if the terminal stands
    /// exactly at its `seq` in the same catalog, at or past where its last
    /// snapshot `settled`, and it is time to.
    pub(crate) fn verify(
        &mut self,
        connection: &rusqlite::Connection,
        sync: &SyncState,
        settled: i64,
        checkpoint: &Checkpoint,
        catalog: Option<&str>,
    ) -> Result<Verdict, rusqlite::Error> {
        if self.exports.is_empty() {
            return Ok(Verdict::Skipped("no enabled plugin exports its entities"));
        }
        if sync.gap.is_some() {
            return Ok(Verdict::Skipped("a gap is open"));
        }
        if catalog.is_none() || catalog != sync.catalog.as_deref() {
            return Ok(Verdict::Skipped("another catalog's checkpoint"));
        }
        if sync.synced_up_to != checkpoint.seq || sync.highest_applied != checkpoint.seq {
            return Ok(Verdict::Skipped(
                "the terminal is not at the checkpoint's seq",
            ));
        }
        if checkpoint.seq < settled {
            return Ok(Verdict::Skipped(
                "the last snapshot's entities may show later changes than this checkpoint covers",
            ));
        }
        if self
            .unsequenced_at
            .is_some_and(|at| at.elapsed() < UNSEQUENCED_QUIET)
        {
            return Ok(Verdict::Skipped(
                "a change sent straight to the exchange applied within the last minute: the backend may not cover it yet",
            ));
        }
        if !self.turn.due() {
            return Ok(Verdict::Skipped("the last verification was too recent"));
        }
        let started = Instant::now();
        // A kind the backend digests otherwise (a plugin of another
        // version there) cannot be compared.
        let same_spec = |export: &&Export| {
            checkpoint
                .specs
                .get(&export.entity)
                .is_none_or(|theirs| *theirs == checksum::fields_fingerprint(&export.fields))
        };
        let exports: Vec<&Export> = self
            .exports
            .iter()
            .filter(|export| !self.given_up.contains(&export.entity))
            .filter(|export| checkpoint.checksums.contains_key(&export.entity))
            .filter(same_spec)
            .collect();
        if exports.is_empty() {
            return Ok(Verdict::Skipped(
                "the checkpoint names no kind exported here alike",
            ));
        }
        let ours = sums(connection, &exports)?;
        self.turn.set(Instant::now() + started.elapsed() * RATION);
        // A kind the checkpoint does not name has no checksum on the
        // backend (no plugin there exports it): nothing to compare.
        let mut compared = 0;
        let mut differs = Vec::new();
        for (kind, mine) in &ours {
            let Some(theirs) = checkpoint.checksums.get(kind).copied() else {
                continue;
            };
            compared += 1;
            if *mine != theirs {
                differs.push((kind.clone(), *mine, theirs));
            }
        }
        let kinds: BTreeSet<String> = differs.iter().map(|(kind, ..)| kind.clone()).collect();
        // A gap blocks comparing until a snapshot closes it: a kind that
        // differed last time and differs now differed after a snapshot.
        let again: Vec<String> = kinds.intersection(&self.differed).cloned().collect();
        self.differed = kinds;
        if !again.is_empty() {
            for kind in &again {
                crate::events::checksum_differs_after_snapshot(kind, checkpoint.seq);
                self.given_up.insert(kind.clone());
            }
            differs.retain(|(kind, ..)| !again.contains(kind));
        }
        if compared == 0 {
            return Ok(Verdict::Skipped(
                "the checkpoint names no kind exported here",
            ));
        }
        if differs.is_empty() {
            // A kind given up on differs: the catalog is not the backend's.
            return Ok(if self.given_up.is_empty() {
                Verdict::Matched { kinds: compared }
            } else {
                Verdict::Skipped(
                    "a kind differed after a snapshot (see checksum_differs_after_snapshot)",
                )
            });
        }
        Ok(Verdict::Differs(differs))
    }
}

/// The checksum of each exported kind, from the rows the exports select.
pub(crate) fn sums(
    connection: &rusqlite::Connection,
    exports: &[&Export],
) -> Result<BTreeMap<String, Checksum>, rusqlite::Error> {
    let mut sums = BTreeMap::new();
    for export in exports {
        let mut statement = connection.prepare(&export.query)?;
        let columns = statement.column_count().min(export.fields.len());
        let mut rows = statement.query([])?;
        let mut sum = Checksum::default();
        let mut values = Vec::with_capacity(columns);
        while let Some(row) = rows.next()? {
            values.clear();
            for index in 0..columns {
                values.push(checksum::sqlite_value(row.get_ref(index)?));
            }
            let id = match values.first() {
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(serde_json::Value::Null) | None => continue,
                Some(other) => other.to_string(),
            };
            sum.add(checksum::digest(
                &export.entity,
                &id,
                export
                    .fields
                    .iter()
                    .zip(&values)
                    .map(|(field, value)| (field.as_str(), Some(value))),
            ));
        }
        sums.insert(export.entity.clone(), sum);
    }
    Ok(sums)
}
