//! How a submission's changes are sequenced, decided in memory from what
//! the database holds: which are stale, each one's sequence number, each
//! entity's new state. Both implementations load the same inputs inside
//! their transaction and write the same plan, so they judge alike.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::{Accepted, NewChange, OutboxRow, Outcome};

/// An entity's address: store, kind, id.
pub(crate) type EntityKey = (String, String, String);

/// An entity as the database holds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredEntity {
    /// Its state; `None`: deleted (kept as a tombstone so that its clock
    /// still judges late changes).
    pub(crate) state: Option<Map<String, Value>>,
    /// The clock order of its last change from the exchange (0: none).
    pub(crate) clock: i64,
}

/// An entity to write: its state after the submission.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EntityWrite {
    pub(crate) key: EntityKey,
    pub(crate) stored: StoredEntity,
    /// The sequence number of the change that last wrote it.
    pub(crate) seq: i64,
}

/// What a submission writes, and its answer.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The answer, per change in submitted order.
    pub(crate) accepted: Vec<Accepted>,
    /// The outbox rows, in sequence order per store.
    pub(crate) outbox: Vec<OutboxRow>,
    /// Every entity the submission changed, once, in its final state.
    pub(crate) entities: Vec<EntityWrite>,
    /// Each store whose head moved, with its new head.
    pub(crate) heads: Vec<(String, i64)>,
}

/// The stores a submission touches, sorted: locked in this order so that
/// two submissions never wait on each other crosswise.
pub(crate) fn stores(changes: &[NewChange]) -> Vec<String> {
    changes
        .iter()
        .map(|change| change.store.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The entities a submission touches, sorted.
pub(crate) fn entity_keys(changes: &[NewChange]) -> Vec<EntityKey> {
    changes
        .iter()
        .filter_map(|change| {
            let entity = change.entity.as_ref()?;
            Some((
                change.store.clone(),
                entity.entity.clone(),
                entity.id.clone(),
            ))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Sequences `changes` after `heads` (every store of the submission, 0 for
/// one that has none yet), over the `stored` entities they touch (absent:
/// never seen). Each change sees the ones before it in the submission.
pub(crate) fn plan(
    changes: Vec<NewChange>,
    mut heads: HashMap<String, i64>,
    mut stored: HashMap<EntityKey, StoredEntity>,
) -> Plan {
    let mut plan = Plan::default();
    let mut written: BTreeMap<EntityKey, i64> = BTreeMap::new();
    let mut moved: BTreeSet<String> = BTreeSet::new();
    for change in changes {
        let key = change.entity.as_ref().map(|entity| {
            (
                change.store.clone(),
                entity.entity.clone(),
                entity.id.clone(),
            )
        });
        let before = key.as_ref().and_then(|key| stored.get(key));
        // An entity never seen has nothing a clock could be older than.
        if let (Some(clock), Some(before)) = (change.clock, before)
            && !clock.supersedes(before.clock)
        {
            plan.accepted.push(Accepted {
                store: change.store,
                message_id: change.message_id,
                outcome: Outcome::Stale,
            });
            continue;
        }
        let head = heads.entry(change.store.clone()).or_insert(0);
        *head += 1;
        let seq = *head;
        moved.insert(change.store.clone());
        if let (Some(entity), Some(key)) = (&change.entity, key) {
            let before = stored.remove(&key);
            let last_clock = before.as_ref().map_or(0, |before| before.clock);
            let after = StoredEntity {
                state: entity.apply(before.and_then(|before| before.state)),
                // Only changes from the exchange carry a clock; the others
                // leave the entity's clock as it was.
                clock: change.clock.map_or(last_clock, |clock| clock.micros),
            };
            stored.insert(key.clone(), after);
            written.insert(key, seq);
        }
        plan.accepted.push(Accepted {
            store: change.store.clone(),
            message_id: change.message_id.clone(),
            outcome: Outcome::Sequenced { seq },
        });
        plan.outbox.push(OutboxRow {
            store: change.store,
            seq,
            message_type: change.message_type,
            payload: change.payload,
            timestamp: change.timestamp,
            message_id: change.message_id,
        });
    }
    for (key, seq) in written {
        if let Some(entity) = stored.remove(&key) {
            plan.entities.push(EntityWrite {
                key,
                stored: entity,
                seq,
            });
        }
    }
    plan.heads = moved
        .into_iter()
        .map(|store| {
            let head = heads.get(&store).copied().unwrap_or_default();
            (store, head)
        })
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_core::{ChangeKind, EntityChange};
    use possync_sdk::Version;
    use serde_json::json;

    fn change(id: &str, kind: ChangeKind, fields: Value, clock: Option<i64>) -> NewChange {
        NewChange {
            store: "S".into(),
            message_type: "t".into(),
            payload: "{}".into(),
            timestamp: "2025-01-01T00:00:00Z".into(),
            message_id: format!("m-{id}-{clock:?}"),
            entity: Some(EntityChange {
                entity: "product".into(),
                id: id.into(),
                kind,
                fields: fields.as_object().cloned().unwrap_or_default(),
            }),
            clock: clock.map(|micros| Version {
                micros,
                exact: true,
            }),
        }
    }

    #[test]
    fn a_later_change_in_the_submission_sees_the_earlier_one() {
        let changes = vec![
            change("P", ChangeKind::Merge, json!({"price": 1}), None),
            change("P", ChangeKind::Merge, json!({"name": "Tea"}), None),
        ];
        let plan = plan(changes, HashMap::from([("S".into(), 4)]), HashMap::new());
        assert_eq!(
            plan.outbox.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [5, 6]
        );
        assert_eq!(plan.entities.len(), 1, "one write per entity");
        assert_eq!(plan.entities[0].seq, 6);
        assert_eq!(
            plan.entities[0].stored.state.clone().map(Value::Object),
            Some(json!({"price": 1, "name": "Tea"}))
        );
        assert_eq!(plan.heads, [("S".to_owned(), 6)]);
    }

    #[test]
    fn a_stale_clock_takes_no_seq_and_a_tombstone_still_judges() {
        let key: EntityKey = ("S".into(), "product".into(), "P".into());
        let stored = HashMap::from([(
            key,
            StoredEntity {
                state: None,
                clock: 100,
            },
        )]);
        let changes = vec![
            change("P", ChangeKind::Merge, json!({"price": 1}), Some(90)),
            change("P", ChangeKind::Merge, json!({"price": 2}), Some(110)),
        ];
        let plan = plan(changes, HashMap::new(), stored);
        assert_eq!(plan.accepted[0].outcome, Outcome::Stale);
        assert_eq!(plan.accepted[1].outcome, Outcome::Sequenced { seq: 1 });
        assert_eq!(plan.entities[0].stored.clock, 110);
    }
}
