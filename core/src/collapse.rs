//! Backlog collapse: in a large batch (a terminal draining a deep backlog),
//! a change that a later change of the same batch overwrites is not
//! applied; it is settled with the batch all the same.
//!
//! Which changes overwrite which comes from the plugins' entity
//! declarations ([`EntityRule`]); only what that needs is read from each
//! payload, and only in batches of at least `terminal.collapse_min_batch`
//! messages, so live traffic (small batches) pays nothing.
//!
//! Skipping a change `e` for the next change `l` of the same entity in the
//! batch leaves the database as applying both would, when
//! - `l` leaves nothing of `e` ([`Footprint::overwrites`]: a replace or a
//!   delete, or a merge of every field `e` merged), and
//! - `l` applies after `e` wherever `e` applied: both carry an order and
//!   `l`'s supersedes `e`'s, or neither carries one (both apply
//!   unconditionally) and `l` is no delete. A delete keeps its entity's
//!   tombstone at the highest order it had, so after an unordered `e`
//!   (which applies over any tombstone and removes it) an unordered delete
//!   leaves a lower tombstone than alone. One change with an order and one
//!   without never qualify: an unordered `e` applies over a newer row that
//!   an ordered `l` alone would leave alone, and an ordered delete `e`
//!   raises the tombstone that an unordered delete `l` keeps.
//!
//! Then whatever `e` would write, `l` writes over it, and if `e` would be
//! stale so would `l`. Skips chain (`e` for `l`, `l` for a later `m`) since
//! each is judged against the next change of its entity. A jump in the
//! store's `seq` within the batch, or a change of catalog, ends the
//! collapse there: a change never stands in for one across changes that
//! did not arrive.
//!
//! The equivalence needs `l` to take effect. If an overwriting change does
//! not (a duplicate, a dead letter, a retry), the dispatcher runs the batch
//! again without collapsing, so a skipped change is never lost.

use std::collections::HashMap;

use possync_sdk::Version;

use crate::entity::{ChangeKind, EntityRule, Footprint};
use crate::inbound::Message;

/// Which messages of a batch are skipped, and which overwrite a skipped one.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    skip: Vec<bool>,
    overwrites: Vec<bool>,
}

impl Plan {
    /// No message skipped.
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// The plan for a batch's envelopes (an `Err` is a message that will be
    /// dead-lettered), with `rule` giving the entity rule of each enabled type.
    pub(crate) fn of<'r>(
        envelopes: &[Result<Message<'_>, String>],
        rule: impl Fn(&str) -> Option<&'r EntityRule>,
    ) -> Self {
        let mut plan = Self {
            skip: vec![false; envelopes.len()],
            overwrites: vec![false; envelopes.len()],
        };
        // The next change of each entity, walking back from the batch's end.
        let mut next: HashMap<(&str, String), (Footprint, Option<Version>, usize)> = HashMap::new();
        let mut next_seq: Option<(i64, Option<&str>)> = None;
        for (index, envelope) in envelopes.iter().enumerate().rev() {
            let Ok(envelope) = envelope else { continue };
            if let Some(seq) = envelope.seq {
                // A seq counts only within its catalog: one from another
                // (or none), which the terminal refuses, is a gap too.
                let catalog = envelope.catalog.as_deref();
                if next_seq.is_some_and(|after| after != (seq + 1, catalog)) {
                    next.clear();
                }
                next_seq = Some((seq, catalog));
            }
            let Some(rule) = rule(&envelope.message_type) else {
                continue;
            };
            let Ok(footprint) = rule.footprint(&envelope.payload) else {
                // Which entity it touches is unknown: nothing collapses across it.
                next.clear();
                continue;
            };
            let order = envelope.order();
            let key = (rule.entity.as_str(), footprint.id.clone());
            if let Some((later, later_order, later_index)) = next.get(&key)
                && later.overwrites(&footprint)
                && applies_after(order, *later_order, later.kind)
            {
                plan.skip[index] = true;
                plan.overwrites[*later_index] = true;
            }
            next.insert(key, (footprint, order, index));
        }
        plan
    }

    /// Whether message `index` is skipped.
    pub(crate) fn skips(&self, index: usize) -> bool {
        self.skip.get(index).copied().unwrap_or(false)
    }

    /// Whether message `index` stands in for a skipped one: it must take effect.
    pub(crate) fn overwrites(&self, index: usize) -> bool {
        self.overwrites.get(index).copied().unwrap_or(false)
    }
}

/// Whether a change at `later` applies over one at `earlier` wherever that
/// one applied (see the module's documentation).
fn applies_after(earlier: Option<Version>, later: Option<Version>, kind: ChangeKind) -> bool {
    match (earlier, later) {
        (None, None) => kind != ChangeKind::Delete,
        (Some(earlier), Some(later)) => later.supersedes(earlier.micros),
        (None, Some(_)) | (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_sdk::Envelope;
    use serde_json::json;

    fn rules() -> [(&'static str, EntityRule); 3] {
        let rule = |declared: serde_json::Value| {
            EntityRule::from_schema("t", &json!({ crate::entity::ENTITY_KEYWORD: declared }))
                .expect("valid")
                .expect("declared")
        };
        [
            (
                "price_update",
                rule(
                    json!({"entity": "product", "id": "product_id", "change": "merge",
                            "fields": {"new_price": "price"}}),
                ),
            ),
            (
                "product_update",
                rule(json!({"entity": "product", "id": "product_id", "change": "replace"})),
            ),
            (
                "product_delete",
                rule(json!({"entity": "product", "id": "product_id", "change": "delete"})),
            ),
        ]
    }

    fn skipped(batch: &[Envelope]) -> Vec<usize> {
        let rules = rules();
        let envelopes: Vec<_> = batch
            .iter()
            .cloned()
            .map(|e| Ok(Message::from(e)))
            .collect();
        let plan = Plan::of(&envelopes, |t| {
            rules.iter().find(|(name, _)| *name == t).map(|(_, r)| r)
        });
        (0..batch.len()).filter(|&i| plan.skips(i)).collect()
    }

    fn price(id: &str, price: f64) -> Envelope {
        Envelope::new(
            "price_update",
            "K",
            json!({"product_id": id, "new_price": price}),
        )
    }

    fn product(id: &str) -> Envelope {
        Envelope::new(
            "product_update",
            "K",
            json!({"product_id": id, "product_name": "n", "price": 1, "category_id": "c"}),
        )
    }

    fn delete(id: &str) -> Envelope {
        Envelope::new("product_delete", "K", json!({"product_id": id}))
    }

    #[test]
    fn each_change_overwritten_later_in_the_batch_is_skipped() {
        let batch = [
            price("A", 1.0),
            price("B", 1.0).with_version(1),
            product("A"),
            price("A", 2.0),
            delete("B").with_version(2),
        ];
        assert_eq!(skipped(&batch), [0, 1]);
    }

    #[test]
    fn a_merge_of_fewer_fields_or_a_change_of_another_type_without_a_rule_skips_nothing() {
        let named = Envelope::new(
            "price_update",
            "K",
            json!({"product_id": "A", "new_price": 1, "product_name": "Tea"}),
        );
        let unknown = Envelope::new("note", "K", json!({"product_id": "A"}));
        assert_eq!(
            skipped(&[named, price("A", 2.0), unknown]),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn a_later_change_that_would_be_stale_after_the_earlier_one_does_not_stand_in_for_it() {
        let batch = [
            price("A", 1.0).with_version(20),
            price("A", 2.0).with_version(10),
            // Without an order it would apply over any row; with one, the
            // row may be newer than the later change.
            price("B", 1.0),
            price("B", 2.0).with_version(10),
            // A delete without an order leaves a higher tombstone as it is.
            delete("C").with_version(10),
            delete("C"),
            price("D", 1.0).with_seq(4),
            price("D", 2.0).with_version(i64::MAX),
            price("E", 1.0).with_version(10),
            price("E", 2.0).with_version(11),
            price("F", 1.0),
            price("F", 2.0),
            // After an unordered change, an unordered delete would leave a
            // lower tombstone than alone.
            price("G", 1.0),
            delete("G"),
        ];
        assert_eq!(skipped(&batch), [8, 10]);
    }

    #[test]
    fn nothing_collapses_across_a_jump_in_the_sequence() {
        let batch = [
            price("A", 1.0).with_seq(1),
            price("A", 2.0).with_seq(2),
            price("A", 3.0).with_seq(5),
            price("A", 4.0).with_seq(6),
        ];
        assert_eq!(skipped(&batch), [0, 2]);
    }

    #[test]
    fn nothing_collapses_across_a_change_of_catalog() {
        // seq 6 of another catalog is refused: seq 6 of the followed one
        // never arrived between 5 and 7.
        let batch = [
            price("A", 1.0).with_seq(5).with_catalog("c"),
            price("B", 1.0).with_seq(6).with_catalog("other"),
            price("A", 2.0).with_seq(7).with_catalog("c"),
            price("A", 3.0).with_seq(8).with_catalog("c"),
        ];
        assert_eq!(skipped(&batch), [2]);
    }

    /// The same batches through the catalog's plugins, collapsing and not.
    mod same_database {
        use std::sync::Arc;

        use possync_catalog as _;
        use proptest::prelude::*;

        use crate::applier::{Applier, Limits};
        use crate::dispatch::Outcome;
        use crate::identity::LicenseKey;
        use crate::inbound::Inbound;
        use crate::registry::Registry;
        use crate::store::Database;

        fn applier(path: &std::path::Path, collapse_min_batch: usize) -> Applier {
            let mut database = Database::open(path).expect("opens");
            let registry = Registry::from_config(&Default::default()).expect("built-ins");
            database
                .migrate(registry.migrations().iter())
                .expect("migrates");
            Applier::new(
                database,
                Arc::new(registry),
                LicenseKey::new("K").expect("valid"),
                Limits {
                    max_message_bytes: 1 << 20,
                    max_attempts: 3,
                    quarantine_max_rows: 100,
                    quarantine_max_age_secs: 3600,
                    applied_ids_max_age_secs: 3600,
                    collapse_min_batch,
                    feed_keep: 10_000,
                },
                crate::feed::channel(),
            )
        }

        /// Every row of the catalog and its tombstones, as text.
        fn contents(path: &std::path::Path) -> Vec<String> {
            let connection = rusqlite::Connection::open(path).expect("opens");
            let mut rows = Vec::new();
            for sql in [
                "SELECT 'product', id, name, price, category_id, icon_name, updated_at, sync_version FROM products",
                "SELECT 'tombstone', entity, id, sync_version, '', '', '', '' FROM possync_tombstones",
            ] {
                let mut statement = connection.prepare(sql).expect("prepares");
                let mut found = statement.query([]).expect("queries");
                while let Some(row) = found.next().expect("reads") {
                    let row: Vec<String> = (0..8)
                        .map(|i| format!("{:?}", row.get_ref(i).expect("column")))
                        .collect();
                    rows.push(row.join("|"));
                }
            }
            rows.sort();
            rows
        }

        fn inbound(body: String) -> Inbound {
            let message_type = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["type"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Inbound {
                tag: 0,
                routing_key: format!("license.K.{message_type}"),
                body: body.into_bytes(),
                redelivered: false,
                requeued: false,
            }
        }

        /// One change: its type, product, values and how it is ordered.
        #[derive(Debug, Clone)]
        struct Change {
            kind: u8,
            product: u8,
            price: u8,
            named: bool,
            order: u8,
            version: i64,
            timestamp_second: u8,
        }

        fn change() -> impl Strategy<Value = Change> {
            (
                0u8..3,
                0u8..3,
                0u8..4,
                any::<bool>(),
                0u8..5,
                1i64..8,
                0u8..3,
            )
                .prop_map(
                    |(kind, product, price, named, order, version, timestamp_second)| Change {
                        kind,
                        product,
                        price,
                        named,
                        order,
                        version,
                        timestamp_second,
                    },
                )
        }

        /// The wire bodies of `changes`: orders by `seq` (rising), `version`,
        /// `timestamp`, none, or a message id alone; a few sent twice.
        fn bodies(changes: &[Change]) -> Vec<String> {
            let mut seq = 0;
            let mut bodies: Vec<String> = Vec::new();
            for (i, change) in changes.iter().enumerate() {
                let id = format!("P{}", change.product);
                let (message_type, payload) = match change.kind {
                    0 => (
                        "price_update",
                        if change.named {
                            serde_json::json!({"product_id": id, "new_price": change.price, "product_name": "named"})
                        } else {
                            serde_json::json!({"product_id": id, "new_price": change.price})
                        },
                    ),
                    1 => (
                        "product_update",
                        serde_json::json!({"product_id": id, "product_name": format!("n{}", change.price),
                            "price": change.price, "category_id": "c"}),
                    ),
                    _ => ("product_delete", serde_json::json!({"product_id": id})),
                };
                let mut envelope = serde_json::json!({"type": message_type, "license_key": "K", "payload": payload});
                match change.order {
                    0 => {
                        seq += 1;
                        envelope["seq"] = seq.into();
                        envelope["catalog"] = "c".into();
                        envelope["message_id"] = format!("m{i}").into();
                    }
                    1 => {
                        envelope["version"] = change.version.into();
                        envelope["message_id"] = format!("m{i}").into();
                    }
                    2 => {
                        envelope["timestamp"] =
                            format!("2025-11-27T10:30:0{}Z", change.timestamp_second).into();
                    }
                    3 => envelope["message_id"] = format!("m{i}").into(),
                    _ => {}
                }
                bodies.push(envelope.to_string());
                if change.named && change.order == 3 {
                    // Sent again: a duplicate by its id.
                    bodies.push(envelope.to_string());
                }
            }
            bodies
        }

        fn apply_all(applier: &mut Applier, bodies: &[String], cuts: &[usize]) -> u64 {
            let mut collapsed = 0;
            let mut rest: Vec<Inbound> = bodies.iter().cloned().map(inbound).collect();
            for &cut in cuts {
                let tail = rest.split_off(cut.min(rest.len()));
                let applied = applier.apply(&rest).expect("applies");
                assert_eq!(applied.outcomes.len(), rest.len(), "every message settles");
                collapsed += applied.tally.collapsed;
                rest = tail;
            }
            if !rest.is_empty() {
                collapsed += applier.apply(&rest).expect("applies").tally.collapsed;
            }
            collapsed
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn collapsing_leaves_the_database_as_applying_every_change_would(
                changes in proptest::collection::vec(change(), 1..40),
                cuts in proptest::collection::vec(1usize..30, 0..3),
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let (with, without) = (dir.path().join("with.db"), dir.path().join("without.db"));
                let bodies = bodies(&changes);
                apply_all(&mut applier(&with, 1), &bodies, &cuts);
                apply_all(&mut applier(&without, 0), &bodies, &cuts);
                prop_assert_eq!(contents(&with), contents(&without));
            }
        }

        #[test]
        fn a_backlog_collapses_to_the_last_change_of_each_product() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("terminal.db");
            let bodies: Vec<String> = (0..30)
                .map(|i| {
                    serde_json::json!({"type": "price_update", "license_key": "K", "seq": i + 1, "catalog": "c",
                        "payload": {"product_id": format!("P{}", i % 3), "new_price": i}})
                    .to_string()
                })
                .collect();
            let collapsed = apply_all(&mut applier(&path, 10), &bodies, &[]);
            assert_eq!(
                collapsed, 27,
                "all but the last change of each of 3 products"
            );
            let prices: Vec<String> = contents(&path)
                .into_iter()
                .map(|row| row.split('|').nth(3).unwrap_or_default().to_owned())
                .collect();
            assert_eq!(prices, ["Real(27.0)", "Real(28.0)", "Real(29.0)"]);
        }

        #[test]
        fn a_change_overwritten_by_one_that_is_dead_lettered_is_applied_all_the_same() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("terminal.db");
            let price = |value: serde_json::Value| {
                inbound(
                    serde_json::json!({"type": "price_update", "license_key": "K",
                        "payload": {"product_id": "P", "new_price": value}})
                    .to_string(),
                )
            };
            // The second names the same product and field, so it would
            // stand in for the first, but its price cannot be read.
            let batch = [price(5.into()), price("five".into())];
            let applied = applier(&path, 1).apply(&batch).expect("applies");
            assert!(
                matches!(
                    applied.outcomes[..],
                    [Outcome::Applied { .. }, Outcome::DeadLetter { .. }]
                ),
                "{:?}",
                applied.outcomes
            );
            assert_eq!(applied.tally.collapsed, 0);
            let row = contents(&path).join("\n");
            assert!(row.contains("Real(5.0)"), "{row}");
        }
    }
}
