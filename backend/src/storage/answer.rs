//! A submission's answer as an idempotency key keeps it: JSON text, so that
//! a replay returns exactly what the first submission was told.

use serde::{Deserialize, Serialize};

use super::{Accepted, Outcome, StorageError};

#[derive(Serialize, Deserialize)]
struct Stored {
    store: String,
    message_id: String,
    /// `None`: stale.
    seq: Option<i64>,
}

/// The answer as stored.
pub(crate) fn encode(accepted: &[Accepted]) -> Result<String, StorageError> {
    let stored: Vec<Stored> = accepted
        .iter()
        .map(|accepted| Stored {
            store: accepted.store.clone(),
            message_id: accepted.message_id.clone(),
            seq: match accepted.outcome {
                Outcome::Sequenced { seq } => Some(seq),
                Outcome::Stale => None,
            },
        })
        .collect();
    serde_json::to_string(&stored)
        .map_err(|err| StorageError::Database(format!("cannot encode an answer: {err}")))
}

/// The answer stored by [`encode`].
pub(crate) fn decode(text: &str) -> Result<Vec<Accepted>, StorageError> {
    let stored: Vec<Stored> = serde_json::from_str(text).map_err(|err| {
        StorageError::Database(format!(
            "a stored idempotent answer is unreadable ({err}); the database was changed by hand"
        ))
    })?;
    Ok(stored
        .into_iter()
        .map(|stored| Accepted {
            store: stored.store,
            message_id: stored.message_id,
            outcome: stored
                .seq
                .map_or(Outcome::Stale, |seq| Outcome::Sequenced { seq }),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_survives_its_round_trip() {
        let accepted = vec![
            Accepted {
                store: "S".into(),
                message_id: "a".into(),
                outcome: Outcome::Sequenced { seq: 3 },
            },
            Accepted {
                store: "S".into(),
                message_id: "b".into(),
                outcome: Outcome::Stale,
            },
        ];
        let text = encode(&accepted).expect("encodes");
        assert_eq!(decode(&text).expect("decodes"), accepted);
    }
}
