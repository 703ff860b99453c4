//! Dispatch: each message of a batch, checked, goes to the plugin of its
//! type inside the batch's transaction, and comes out as an [`Outcome`].

use std::sync::Arc;

use possync_sdk::HandlerError;

use crate::checksum::{CHECKPOINT_TYPE, Checkpoint};
use crate::collapse::Plan;
use crate::events;
use crate::feed::Changes;
use crate::identity::LicenseKey;
use crate::inbound::{Inbound, Message, check_envelope};
use crate::poison::Poison;
use crate::registry::{Registry, Route};
use crate::sequence::{Claim, Marks, SyncState, Verdict};
use crate::transaction::{StaleEntity, Transaction};

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Written and committed.
    Applied { message_type: String },
    /// It was settled before (by its `seq`, its publisher's number or its
    /// message id); nothing changed.
    Duplicate,
    /// A later change of the same batch overwrites it, so it was not
    /// applied; it counts as applied (backlog collapse).
    Collapsed { message_type: String },
    /// Its entity holds a newer change; nothing changed.
    Stale {
        message_type: String,
        entities: Vec<StaleEntity>,
    },
    /// Its handler is switched off in config; nothing changed.
    Disabled { message_type: String },
    /// It can never apply; recorded in the quarantine table.
    DeadLetter {
        reason: String,
        message_type: Option<String>,
    },
    /// It may apply later; nothing changed.
    Retry { reason: String },
    /// A checkpoint of the backend's catalog: compared, not applied.
    Checkpoint,
}

impl Outcome {
    pub(crate) fn settles_by_ack(&self) -> bool {
        !matches!(self, Self::Retry { .. })
    }

    /// Whether the message's change is in the database now (or a newer one
    /// of its entity is): what a change standing in for a skipped one must be.
    pub(crate) fn took_effect(&self) -> bool {
        matches!(
            self,
            Self::Applied { .. } | Self::Stale { .. } | Self::Collapsed { .. }
        )
    }
}

/// What a batch came to, ready to commit.
#[derive(Debug)]
pub(crate) struct Dispatched {
    /// One per message, up to the first one to try again.
    pub(crate) outcomes: Vec<Outcome>,
    /// The store's sync state, if the batch moved it.
    pub(crate) sync: Option<SyncState>,
    /// Jumps in the store's sequence: `(expected, received)`.
    pub(crate) gaps: Vec<(i64, i64)>,
    /// The gap this batch closed: the changes it missed arrived.
    pub(crate) closed_gap: Option<crate::gap::GapCause>,
    /// What the applied messages changed, in order, for the change feed.
    pub(crate) changes: Changes,
    /// The batch's last message, when it is a checkpoint: its payload and
    /// the catalog it names.
    pub(crate) checkpoint: Option<(Checkpoint, Option<String>)>,
    /// A change without a `seq` (sent straight to the exchange) applied.
    pub(crate) unsequenced: bool,
}

/// The whole batch failed: nothing of it applied, and it is held to be
/// tried again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    /// The database refused it (locked, full, read-only, ...).
    #[error("the batch could not be committed: {0}")]
    Database(#[from] rusqlite::Error),
    /// A handler's storage outside the database cannot take writes now.
    #[error("the batch could not be applied: {handler}: {reason}")]
    Storage { handler: String, reason: String },
}

/// Checks each message of a batch and hands it to its handler, inside the
/// batch's transaction.
#[derive(Debug)]
pub(crate) struct Dispatch {
    registry: Arc<Registry>,
    license_key: LicenseKey,
    max_message_bytes: usize,
    poison: Poison,
    /// Batches of at least this many messages collapse; 0: none do.
    collapse_min_batch: usize,
}

impl Dispatch {
    pub(crate) fn new(
        registry: Arc<Registry>,
        license_key: LicenseKey,
        max_message_bytes: usize,
        poison: Poison,
        collapse_min_batch: usize,
    ) -> Self {
        Self {
            registry,
            license_key,
            max_message_bytes,
            poison,
            collapse_min_batch,
        }
    }

    /// The store this terminal belongs to.
    pub(crate) fn license_key(&self) -> &str {
        self.license_key.as_str()
    }

    /// Checks and applies each message of `batch` in `transaction`, in
    /// order, up to the first one to try again, and writes the sequence
    /// marks it moved; `None` when a handler failed outside `careful` mode,
    /// or a change standing in for a collapsed one did not take effect (the
    /// batch must run again, carefully, which never collapses).
    pub(crate) fn apply_in_transaction(
        &self,
        transaction: &mut Transaction<'_>,
        batch: &[Inbound],
        careful: bool,
    ) -> Result<Option<Dispatched>, BatchError> {
        let envelopes: Vec<Result<Message<'_>, String>> =
            batch.iter().map(|inbound| self.check(inbound)).collect();
        let plan =
            if careful || self.collapse_min_batch == 0 || batch.len() < self.collapse_min_batch {
                Plan::none()
            } else {
                Plan::of(&envelopes, |message_type| {
                    self.registry.entity_rule(message_type)
                })
            };
        let mut marks = Marks::new(self.license_key.as_str());
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut changes = Changes::default();
        let mut checkpoint = None;
        let mut unsequenced = false;
        for (index, (inbound, checked)) in batch.iter().zip(envelopes).enumerate() {
            transaction.begin_message();
            let outcome = match checked {
                Ok(envelope) if envelope.message_type == CHECKPOINT_TYPE => {
                    match serde_json::from_str::<Checkpoint>(&envelope.payload) {
                        Ok(read) => {
                            // Compared after the commit, and only as the
                            // batch's last: the state it describes is the
                            // one the messages before it left.
                            checkpoint = (index + 1 == batch.len())
                                .then(|| (read, envelope.catalog.as_deref().map(str::to_owned)));
                            Outcome::Checkpoint
                        }
                        Err(err) => self.poison.quarantine(
                            transaction,
                            inbound,
                            Some(&envelope),
                            format!("a checkpoint that cannot be read: {err}"),
                        )?,
                    }
                }
                Ok(envelope) => {
                    let skip = plan.skips(index);
                    let Some(outcome) =
                        self.apply_one(transaction, &mut marks, inbound, &envelope, careful, skip)?
                    else {
                        return Ok(None);
                    };
                    if plan.overwrites(index) && !outcome.took_effect() {
                        return Ok(None);
                    }
                    if outcome.settles_by_ack() {
                        self.poison.settled(transaction, inbound, &envelope)?;
                    }
                    if let Outcome::Applied { message_type } = &outcome {
                        unsequenced |= envelope.seq.is_none();
                        let rule = self.registry.entity_rule(message_type);
                        changes.push(&envelope, rule);
                    }
                    outcome
                }
                Err(reason) => self.poison.quarantine(transaction, inbound, None, reason)?,
            };
            let retry = !outcome.settles_by_ack();
            outcomes.push(outcome);
            if retry {
                // The messages behind it wait for it, so that order holds.
                break;
            }
        }
        marks.write(transaction)?;
        Ok(Some(Dispatched {
            outcomes,
            sync: marks.moved(),
            gaps: marks.gaps().to_vec(),
            closed_gap: marks.closed_gap(),
            changes,
            checkpoint,
            unsequenced,
        }))
    }

    fn check<'b>(&self, inbound: &'b Inbound) -> Result<Message<'b>, String> {
        check_envelope(
            &inbound.body,
            &inbound.routing_key,
            &self.license_key,
            self.max_message_bytes,
        )
    }

    /// Applies one message (or, `skip`ped, settles it unapplied); `None`
    /// when its handler failed outside `careful` mode (the batch must run
    /// again, carefully).
    fn apply_one(
        &self,
        transaction: &mut Transaction<'_>,
        marks: &mut Marks<'_>,
        inbound: &Inbound,
        envelope: &Message<'_>,
        careful: bool,
        skip: bool,
    ) -> Result<Option<Outcome>, BatchError> {
        if inbound.requeued {
            let claim = marks.requeued(transaction, envelope)?;
            let outcome = self.apply_fresh(transaction, inbound, envelope, claim, careful, skip)?;
            if let Some(outcome) = &outcome {
                marks.settle(claim, outcome);
            }
            return Ok(outcome);
        }
        let claim = match marks.judge(transaction, envelope)? {
            Verdict::Duplicate => return Ok(Some(Outcome::Duplicate)),
            Verdict::Refused(reason) => {
                return Ok(Some(self.poison.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    reason,
                )?));
            }
            Verdict::Fresh(claim) => claim,
        };
        let outcome = self.apply_fresh(transaction, inbound, envelope, claim, careful, skip)?;
        if let Some(outcome) = &outcome {
            marks.settle(claim, outcome);
        }
        Ok(outcome)
    }

    fn apply_fresh(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: &Message<'_>,
        claim: Claim,
        careful: bool,
        skip: bool,
    ) -> Result<Option<Outcome>, BatchError> {
        let handler = match self.registry.route(&envelope.message_type) {
            Route::Handler(handler) => handler,
            Route::Disabled(plugin) if inbound.requeued => {
                let reason = format!(
                    "plugin {plugin} is switched off in [plugins]: switch it on, restart the terminal, then requeue"
                );
                return Ok(Some(self.poison.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    reason,
                )?));
            }
            Route::Disabled(plugin) => {
                events::message_ignored(&envelope.message_type, plugin);
                return Ok(Some(Outcome::Disabled {
                    message_type: envelope.message_type.to_string(),
                }));
            }
            Route::Unknown => {
                let reason = format!(
                    "unknown message type {:?}: no plugin handles it",
                    envelope.message_type
                );
                return Ok(Some(self.poison.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    reason,
                )?));
            }
        };
        if careful {
            transaction.savepoint()?;
        }
        // Only a message with nothing but an id costs a record of its own.
        if claim == Claim::ById
            && let Some(message_id) = &envelope.message_id
            && !transaction.record_applied(message_id)?
        {
            if careful {
                transaction.release()?;
            }
            return Ok(Some(Outcome::Duplicate));
        }
        if skip {
            if careful {
                transaction.release()?;
            }
            return Ok(Some(Outcome::Collapsed {
                message_type: envelope.message_type.to_string(),
            }));
        }
        let result = handler.handle(
            &envelope.payload,
            &envelope.context(),
            &mut transaction.store(),
        );
        if let Some(fault) = transaction.take_fault() {
            // The database itself failed: no message of this batch can commit.
            return Err(fault.into());
        }
        if let Err(HandlerError::Storage(reason)) = result {
            return Err(BatchError::Storage {
                handler: handler.name().to_owned(),
                reason,
            });
        }
        if !careful && result.is_err() {
            return Ok(None);
        }
        let outcome = match result {
            Ok(()) => {
                if careful {
                    transaction.release()?;
                }
                let stale = transaction.take_stale();
                Ok(if stale.is_empty() {
                    Outcome::Applied {
                        message_type: envelope.message_type.to_string(),
                    }
                } else {
                    Outcome::Stale {
                        message_type: envelope.message_type.to_string(),
                        entities: stale,
                    }
                })
            }
            Err(HandlerError::Transient(reason)) => {
                transaction.rollback_to_savepoint()?;
                self.poison.failed_try(
                    transaction,
                    inbound,
                    envelope,
                    format!("{}: {reason}", handler.name()),
                )
            }
            Err(HandlerError::Panicked(message)) => {
                transaction.rollback_to_savepoint()?;
                self.poison.failed_try(
                    transaction,
                    inbound,
                    envelope,
                    format!("handler {} panicked: {message}", handler.name()),
                )
            }
            Err(err) => {
                transaction.rollback_to_savepoint()?;
                self.poison.quarantine(
                    transaction,
                    inbound,
                    Some(envelope),
                    format!("{}: {err}", handler.name()),
                )
            }
        };
        Ok(Some(outcome?))
    }
}
