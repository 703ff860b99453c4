//! How a submission's changes are sequenced, decided in memory from what
//! the database holds: which are stale, each one's sequence number, each
//! entity's new state, each touched checksum's new value and the checksum
//! log's rows (see [`super::checksums`]). Both
//! implementations load the same inputs inside their transaction and write
//! the same plan, so they judge alike.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use possync_core::{Checksum, ChecksumSpec};
use serde_json::{Map, Value};

use super::checksums::{ChecksumKey, LogRow};
use super::{Accepted, NewChange, OutboxRow, Outcome, StorageError};

/// An entity's address: store, kind, id.
pub(crate) type EntityKey = (String, String, String);

/// A message type's address, for a type without an entity: store, type.
pub(crate) type TypeKey = (String, String);

/// A message id's address: store, id.
pub(crate) type MessageKey = (String, String);

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
    /// Each type without an entity whose last clock from the exchange
    /// moved, with that clock.
    pub(crate) type_clocks: Vec<(TypeKey, i64)>,
    /// Each checksum an entity write moved, with its new value.
    pub(crate) checksums: Vec<(ChecksumKey, Checksum)>,
    /// The checksum log's new rows, by key: each moved checksum's new
    /// value at its store's new head (the submission's last seq of that
    /// store: a boundary), and for a store's first changes every kind of
    /// the spec there (zero unless moved), so that each kind has a row
    /// from the store's start.
    pub(crate) log: Vec<LogRow>,
}

/// What the database holds that a submission is judged against, read
/// inside its transaction.
#[derive(Debug, Default)]
pub(crate) struct Before {
    /// Every store of the submission's head (0: none yet).
    pub(crate) heads: HashMap<String, i64>,
    /// The entities it touches that exist (or existed: tombstones).
    pub(crate) entities: HashMap<EntityKey, StoredEntity>,
    /// The last clock from the exchange of each type without an entity it
    /// touches with a clock, when there was one.
    pub(crate) type_clocks: HashMap<TypeKey, i64>,
    /// Its message ids already in their store's outbox.
    pub(crate) used_ids: HashSet<MessageKey>,
    /// The stored checksums of [`checksum_keys`] (a checksum without a
    /// row is zero), when they are kept under the submission's spec;
    /// `None`: they are not, and the submission leaves them alone.
    pub(crate) checksums: Option<HashMap<ChecksumKey, Checksum>>,
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

/// The types without an entity that a submission's changes from the
/// exchange carry, sorted: their clocks judge those changes.
pub(crate) fn type_keys(changes: &[NewChange]) -> Vec<TypeKey> {
    changes
        .iter()
        .filter(|change| change.entity.is_none() && change.clock.is_some())
        .map(|change| (change.store.clone(), change.message_type.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The checksums a submission may move under `spec`, sorted: those of
/// the kinds of the entities it touches that have one.
pub(crate) fn checksum_keys(changes: &[NewChange], spec: &ChecksumSpec) -> Vec<ChecksumKey> {
    changes
        .iter()
        .filter_map(|change| {
            let entity = change.entity.as_ref()?;
            spec.fields(&entity.entity)?;
            Some((change.store.clone(), entity.entity.clone()))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether a submission needs the stored checksums ([`Before::checksums`],
/// read after [`Before::heads`]): it writes an entity, which may move one,
/// or it may start a store, whose log takes every kind.
pub(crate) fn reads_checksums(changes: &[NewChange], before: &Before) -> bool {
    changes.iter().any(|change| change.entity.is_some())
        || before.heads.values().any(|head| *head == 0)
}

/// The message ids of a submission, by store.
pub(crate) fn message_keys(changes: &[NewChange]) -> Vec<MessageKey> {
    changes
        .iter()
        .map(|change| (change.store.clone(), change.message_id.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Sequences `changes` after what the database holds. Each change sees the
/// ones before it in the submission. Refused whole when a message id is
/// used already or twice, or a store has no sequence number left.
/// `spec` says which kinds' checksums move (when `before` holds them).
pub(crate) fn plan(
    changes: Vec<NewChange>,
    before: Before,
    spec: &ChecksumSpec,
) -> Result<Plan, StorageError> {
    let Before {
        mut heads,
        entities: mut stored,
        mut type_clocks,
        mut used_ids,
        checksums,
    } = before;
    // Taken before any change of the submission replaces them.
    let old_digests: HashMap<EntityKey, u64> = if checksums.is_some() {
        stored
            .iter()
            .filter_map(|(key, entity)| {
                let digest = spec.digest(&key.1, &key.2, entity.state.as_ref()?)?;
                Some((key.clone(), digest))
            })
            .collect()
    } else {
        HashMap::new()
    };
    let mut plan = Plan::default();
    let mut written: BTreeMap<EntityKey, i64> = BTreeMap::new();
    let mut moved: BTreeSet<String> = BTreeSet::new();
    // Stores whose first change this submission sequences.
    let mut started: BTreeSet<String> = BTreeSet::new();
    let mut clocked: BTreeSet<TypeKey> = BTreeSet::new();
    for change in changes {
        // Terminals drop a message whose id they saw: a second change under
        // one id would reach the catalog and never a terminal.
        if !used_ids.insert((change.store.clone(), change.message_id.clone())) {
            return Err(StorageError::MessageIdUsed {
                store: change.store,
                message_id: change.message_id,
            });
        }
        // A type without an entity is judged by the last clock of its type
        // to its store (see `Storage::submit`); a change from the API
        // (no clock) neither is judged nor moves that clock.
        let type_key = (change.entity.is_none() && change.clock.is_some())
            .then(|| (change.store.clone(), change.message_type.clone()));
        if let (Some(clock), Some(last)) = (
            change.clock,
            type_key.as_ref().and_then(|key| type_clocks.get(key)),
        ) && !clock.supersedes(*last)
        {
            plan.accepted.push(Accepted {
                store: change.store,
                message_id: change.message_id,
                outcome: Outcome::Stale,
            });
            continue;
        }
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
        if *head == 0 {
            started.insert(change.store.clone());
        }
        *head = head.checked_add(1).ok_or_else(|| {
            StorageError::Refused(format!(
                "store {}'s sequence is exhausted (its head is {head}); it takes no more changes",
                change.store
            ))
        })?;
        let seq = *head;
        moved.insert(change.store.clone());
        if let (Some(key), Some(clock)) = (type_key, change.clock) {
            type_clocks.insert(key.clone(), clock.micros);
            clocked.insert(key);
        }
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
    plan.type_clocks = clocked
        .into_iter()
        .map(|key| {
            let clock = type_clocks.get(&key).copied().unwrap_or_default();
            (key, clock)
        })
        .collect();
    if let Some(mut checksums) = checksums {
        plan.checksums = moved_checksums(&plan.entities, &old_digests, &mut checksums, spec);
        plan.log = log_rows(&plan, &started, spec);
    }
    Ok(plan)
}

/// The checksum log's rows for a plan whose checksums moved as
/// `plan.checksums` says: each at its store's new head; `started`'s
/// stores log every kind of `spec`.
fn log_rows(plan: &Plan, started: &BTreeSet<String>, spec: &ChecksumSpec) -> Vec<LogRow> {
    let heads: HashMap<&str, i64> = plan
        .heads
        .iter()
        .map(|(store, head)| (store.as_str(), *head))
        .collect();
    let mut rows: BTreeMap<ChecksumKey, Checksum> = started
        .iter()
        .flat_map(|store| {
            spec.kinds()
                .map(|kind| ((store.clone(), kind.to_owned()), Checksum::default()))
        })
        .collect();
    rows.extend(plan.checksums.iter().cloned());
    rows.into_iter()
        .filter_map(|(key, checksum)| {
            let head = *heads.get(key.0.as_str())?;
            Some((key, head, checksum))
        })
        .collect()
}

/// The new value of each checksum the writes move: each entity's old
/// digest out, its new one in (a deleted entity has none).
fn moved_checksums(
    writes: &[EntityWrite],
    old_digests: &HashMap<EntityKey, u64>,
    checksums: &mut HashMap<ChecksumKey, Checksum>,
    spec: &ChecksumSpec,
) -> Vec<(ChecksumKey, Checksum)> {
    let mut moved = BTreeSet::new();
    for write in writes {
        let (store, kind, id) = &write.key;
        if spec.fields(kind).is_none() {
            continue;
        }
        let key = (store.clone(), kind.clone());
        let checksum = checksums.entry(key.clone()).or_default();
        if let Some(old) = old_digests.get(&write.key) {
            checksum.remove(*old);
        }
        if let Some(new) = (write.stored.state.as_ref()).and_then(|s| spec.digest(kind, id, s)) {
            checksum.add(new);
        }
        moved.insert(key);
    }
    moved
        .into_iter()
        .map(|key| {
            let checksum = checksums.get(&key).copied().unwrap_or_default();
            (key, checksum)
        })
        .collect()
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
            message_id: format!("m-{id}-{clock:?}-{fields}"),
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
        let before = Before {
            heads: HashMap::from([("S".into(), 4)]),
            ..Before::default()
        };
        let plan = plan(changes, before, &ChecksumSpec::default()).expect("planned");
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
        let before = Before {
            entities: stored,
            ..Before::default()
        };
        let plan = plan(changes, before, &ChecksumSpec::default()).expect("planned");
        assert_eq!(plan.accepted[0].outcome, Outcome::Stale);
        assert_eq!(plan.accepted[1].outcome, Outcome::Sequenced { seq: 1 });
        assert_eq!(plan.entities[0].stored.clock, 110);
    }

    #[test]
    fn a_write_takes_its_entitys_old_digest_out_and_puts_its_new_one_in() {
        let fields = vec!["price".to_owned(), "name".to_owned()];
        let spec = ChecksumSpec::new([("product", fields.as_slice())]);
        let state = |value: Value| value.as_object().cloned();
        let digest = |id: &str, value: Value| {
            let state = value.as_object().cloned().unwrap_or_default();
            spec.digest("product", id, &state)
                .expect("a kind with a checksum")
        };
        let key = |id: &str| -> EntityKey { ("S".into(), "product".into(), id.into()) };
        let stored = |value: Value| StoredEntity {
            state: state(value),
            clock: 0,
        };
        let mut start = Checksum::default();
        start.add(digest("P", json!({"price": 1})));
        start.add(digest("Q", json!({"price": 5, "name": "Tea"})));
        let before = Before {
            entities: HashMap::from([
                (key("P"), stored(json!({"price": 1}))),
                (key("Q"), stored(json!({"price": 5, "name": "Tea"}))),
            ]),
            checksums: Some(HashMap::from([(("S".into(), "product".into()), start)])),
            ..Before::default()
        };
        let changes = vec![
            change("P", ChangeKind::Merge, json!({"price": 2}), None),
            change("P", ChangeKind::Merge, json!({"name": "Tea"}), None),
            change("Q", ChangeKind::Delete, json!({}), None),
            change("R", ChangeKind::Replace, json!({"price": 3}), None),
        ];
        let plan = plan(changes, before, &spec).expect("planned");
        let mut expected = Checksum::default();
        expected.add(digest("P", json!({"price": 2, "name": "Tea"})));
        expected.add(digest("R", json!({"price": 3})));
        assert_eq!(
            plan.checksums,
            [(("S".to_owned(), "product".to_owned()), expected)]
        );
    }

    #[test]
    fn the_log_takes_each_moved_checksum_at_its_stores_last_seq() {
        let fields = vec!["price".to_owned()];
        let spec = ChecksumSpec::new([("product", fields.as_slice()), ("category", &fields)]);
        let digest = |store: &str, id: &str, price: i64| {
            let state = json!({ "price": price }).as_object().cloned();
            let digest = spec.digest("product", id, &state.unwrap_or_default());
            let mut checksum = Checksum::default();
            checksum.add(digest.expect("a kind with a checksum"));
            ((store.to_owned(), "product".to_owned()), checksum)
        };
        let in_store = |store: &str, mut change: NewChange| {
            change.store = store.into();
            change.message_id.push_str(store);
            change
        };
        let mut note = in_store("T", change("N", ChangeKind::Merge, json!({}), None));
        note.entity = None;
        let changes = vec![
            in_store(
                "S",
                change("P", ChangeKind::Merge, json!({"price": 1}), None),
            ),
            in_store(
                "T",
                change("P", ChangeKind::Merge, json!({"price": 2}), None),
            ),
            in_store(
                "S",
                change("P", ChangeKind::Merge, json!({"price": 3}), None),
            ),
            in_store(
                "U",
                change("P", ChangeKind::Merge, json!({"price": 4}), None),
            ),
            note,
        ];
        let before = Before {
            heads: HashMap::from([("S".into(), 0), ("T".into(), 7)]),
            checksums: Some(HashMap::new()),
            ..Before::default()
        };
        let plan = plan(changes.clone(), before, &spec).expect("planned");
        let zero = |store: &str| {
            (
                (store.to_owned(), "category".to_owned()),
                Checksum::default(),
            )
        };
        let row = |(key, checksum): ((String, String), Checksum), seq: i64| (key, seq, checksum);
        assert_eq!(
            plan.log,
            [
                row(zero("S"), 2),
                row(digest("S", "P", 3), 2),
                row(digest("T", "P", 2), 9),
                row(zero("U"), 1),
                row(digest("U", "P", 4), 1),
            ],
            "a store's first changes log every kind; T logs what moved, at its last seq"
        );
        let before = Before {
            heads: HashMap::from([("S".into(), 0)]),
            ..Before::default()
        };
        let plan = super::plan(changes, before, &spec).expect("planned");
        assert!(
            plan.log.is_empty(),
            "checksums under another spec log nothing"
        );
    }

    #[test]
    fn checksums_kept_under_another_spec_are_left_alone() {
        let fields = vec!["price".to_owned()];
        let spec = ChecksumSpec::new([("product", fields.as_slice())]);
        let changes = vec![change("P", ChangeKind::Merge, json!({"price": 2}), None)];
        let plan = plan(changes, Before::default(), &spec).expect("planned");
        assert!(plan.checksums.is_empty());
    }

    #[test]
    fn the_last_seq_is_refused_not_wrapped() {
        let before = Before {
            heads: HashMap::from([("S".into(), i64::MAX)]),
            ..Before::default()
        };
        let changes = vec![change("P", ChangeKind::Merge, json!({}), None)];
        let err = plan(changes, before, &ChecksumSpec::default()).expect_err("no number left");
        assert!(matches!(err, StorageError::Refused(_)), "{err}");
    }
}
