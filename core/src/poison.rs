//! Retry and poison policy: a message whose handler fails for now is tried
//! again, its tries counted across deliveries, up to `terminal.max_attempts`;
//! then, like a message that can never apply, it is quarantined (recorded in
//! `possync_quarantine`, then dead-lettered).

use crate::dispatch::Outcome;
use crate::inbound::{Inbound, Message};
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
        envelope: &Message<'_>,
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
        envelope: Option<&Message<'_>>,
        reason: String,
    ) -> Result<Outcome, rusqlite::Error> {
        if inbound.requeued {
            // Its row, with the whole body, stays: the applier puts the new
            // reason on it.
            return Ok(Outcome::DeadLetter {
                reason,
                message_type: envelope.map(|e| e.message_type.to_string()),
            });
        }
        let message = Quarantined::new(
            &inbound.routing_key,
            envelope.map(|e| &*e.message_type),
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
        envelope: &Message<'_>,
    ) -> Result<(), rusqlite::Error> {
        if inbound.redelivered {
            transaction.forget_attempts(&inbound.key(envelope))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Database;

    const POISON: Poison = Poison {
        max_attempts: 3,
        quarantine_max_rows: 10,
    };

    fn database() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = Database::open(&dir.path().join("terminal.db")).expect("opens");
        (dir, database)
    }

    fn message(redelivered: bool) -> (Inbound, Message<'static>) {
        let envelope = possync_sdk::Envelope::new("price_update", "STORE-1", serde_json::json!({}))
            .with_message_id("m-1");
        let inbound = Inbound {
            tag: 1,
            routing_key: "license.STORE-1.price_update".into(),
            body: serde_json::to_vec(&envelope).expect("encodes"),
            redelivered,
            requeued: false,
        };
        (inbound, Message::from(envelope))
    }

    fn count(database: &Database, table: &str) -> i64 {
        database
            .connection()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .expect("counts")
    }

    #[test]
    fn a_failing_message_is_tried_again_then_quarantined_with_the_last_reason() {
        let (_dir, mut database) = database();
        let (inbound, envelope) = message(true);
        for try_number in 1..=3 {
            let mut transaction = database.begin().expect("begins");
            let outcome = POISON
                .failed_try(
                    &mut transaction,
                    &inbound,
                    &envelope,
                    format!("busy {try_number}"),
                )
                .expect("recorded");
            transaction.commit().expect("commits");
            let expected = if try_number < 3 {
                Outcome::Retry {
                    reason: format!("busy {try_number}"),
                }
            } else {
                Outcome::DeadLetter {
                    reason: "failed 3 times; last: busy 3".into(),
                    message_type: Some("price_update".into()),
                }
            };
            assert_eq!(outcome, expected);
        }
        assert_eq!(count(&database, "possync_attempts"), 0, "tries forgotten");
        assert_eq!(count(&database, "possync_quarantine"), 1);
    }

    #[test]
    fn a_message_that_settles_forgets_its_failed_tries_if_it_was_delivered_before() {
        let (_dir, mut database) = database();
        let (first, envelope) = message(false);
        let mut transaction = database.begin().expect("begins");
        POISON
            .failed_try(&mut transaction, &first, &envelope, "busy".into())
            .expect("recorded");
        POISON
            .settled(&mut transaction, &first, &envelope)
            .expect("settles");
        transaction.commit().expect("commits");
        assert_eq!(
            count(&database, "possync_attempts"),
            1,
            "a first delivery has no tries to forget"
        );
        let (again, envelope) = message(true);
        let mut transaction = database.begin().expect("begins");
        POISON
            .settled(&mut transaction, &again, &envelope)
            .expect("settles");
        transaction.commit().expect("commits");
        assert_eq!(count(&database, "possync_attempts"), 0);
    }
}
