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
//! - `l` applies after `e` wherever `e` applied: `l` carries no order
//!   (it applies unconditionally), or both carry one and `l`'s supersedes
//!   `e`'s. (`e` without an order and `l` with one does not qualify: `e`
//!   would apply over a newer row that `l` alone would leave alone.)
//!
//! Then whatever `e` would write, `l` writes over it, and if `e` would be
//! stale so would `l`. Skips chain (`e` for `l`, `l` for a later `m`) since
//! each is judged against the next change of its entity. A jump in the
//! store's `seq` within the batch ends the collapse there: a change never
//! stands in for one across changes that did not arrive.
//!
//! The equivalence needs `l` to take effect. If an overwriting change does
//! not (a duplicate, a dead letter, a retry), the dispatcher runs the batch
//! again without collapsing, so a skipped change is never lost.

use std::collections::HashMap;

use possync_sdk::{Envelope, Version};

use crate::entity::{EntityRule, Footprint};

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
        envelopes: &[Result<Envelope, String>],
        rule: impl Fn(&str) -> Option<&'r EntityRule>,
    ) -> Self {
        let mut plan = Self {
            skip: vec![false; envelopes.len()],
            overwrites: vec![false; envelopes.len()],
        };
        // The next change of each entity, walking back from the batch's end.
        let mut next: HashMap<(&str, String), (Footprint, Option<Version>, usize)> = HashMap::new();
        let mut next_seq: Option<i64> = None;
        for (index, envelope) in envelopes.iter().enumerate().rev() {
            let Ok(envelope) = envelope else { continue };
            if let Some(seq) = envelope.seq {
                if next_seq.is_some_and(|after| after != seq + 1) {
                    next.clear();
                }
                next_seq = Some(seq);
            }
            let Some(rule) = rule(&envelope.message_type) else {
                continue;
            };
            let Ok(footprint) = rule.footprint(envelope.payload.get()) else {
                // Which entity it touches is unknown: nothing collapses across it.
                next.clear();
                continue;
            };
            let order = envelope.order();
            let key = (rule.entity.as_str(), footprint.id.clone());
            if let Some((later, later_order, later_index)) = next.get(&key)
                && later.overwrites(&footprint)
                && applies_after(order, *later_order)
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
fn applies_after(earlier: Option<Version>, later: Option<Version>) -> bool {
    match (earlier, later) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(earlier), Some(later)) => later.supersedes(earlier.micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let envelopes: Vec<_> = batch.iter().cloned().map(Ok).collect();
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
            price("B", 1.0),
            product("A"),
            price("A", 2.0),
            delete("B"),
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
            price("C", 1.0).with_version(10),
            price("C", 2.0),
            price("D", 1.0).with_seq(4),
            price("D", 2.0).with_version(i64::MAX),
        ];
        assert_eq!(skipped(&batch), [4]);
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
}
