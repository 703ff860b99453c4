//! Retry and poison policy: a message whose handler fails for now is tried
//! again, its tries counted across deliveries, up to `terminal.max_attempts`;
//! then, like a message that can never apply, it is quarantined (recorded in
//! `possync_quarantine`, then dead-lettered).

use possync_sdk::Envelope;

use crate::dispatch::Outcome;
use crate::inbound::Inbound;
use crate::store::Quarantined;
use crate::transaction::Transaction;

/// How many tries a failing message gets, and how many quarantined ones
/// are kept.
#[derive(Debug, Clone)]
pub(crate) struct Poison {
    pub(crate) max_attempts: u32,
    pub(crate) quarantine_max_rows: u32,
}

impl Poison {
    /// A try that may succeed another time: retry, unless the message has
    /// failed `max_attempts` times already (then it is a poison message).
    pub(crate) fn failed_try(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: &Envelope,
        reason: String,
    ) -> Result<Outcome, rusqlite::Error> {
        let key = inbound.key(envelope);
        let attempts = transaction.record_attempt(&key, &reason)?;
        if attempts < self.max_attempts {
            return Ok(Outcome::Retry { reason });
        }
        transaction.forget_attempts(&key)?;
        self.quarantine(
            transaction,
            inbound,
            Some(envelope),
            format!("failed {attempts} times; last: {reason}"),
        )
    }

    /// Records a message that will never apply, with the reason, in
    /// `possync_quarantine`; it is dead-lettered once the batch commits.
    pub(crate) fn quarantine(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: Option<&Envelope>,
        reason: String,
    ) -> Result<Outcome, rusqlite::Error> {
        let message = Quarantined::new(
            &inbound.routing_key,
            envelope.map(|e| e.message_type.as_str()),
            envelope.and_then(|e| e.message_id.as_deref()),
            reason,
            &inbound.body,
        );
        transaction.record_quarantined(&message, self.quarantine_max_rows)?;
        Ok(Outcome::DeadLetter {
            reason: message.reason,
            message_type: message.message_type,
        })
    }

    /// A message settles (applied, dead-lettered, ...): the tries it failed
    /// before, if it was delivered before, are forgotten.
    pub(crate) fn settled(
        &self,
        transaction: &mut Transaction<'_>,
        inbound: &Inbound,
        envelope: &Envelope,
    ) -> Result<(), rusqlite::Error> {
        if inbound.redelivered {
            transaction.forget_attempts(&inbound.key(envelope))?;
        }
        Ok(())
    }
}
