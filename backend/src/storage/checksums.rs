//! The checksums both storages keep: per store and kind of entity, the
//! wrapping sum of its entities' digests and their count (see
//! [`possync_core::Checksum`]), under the spec whose fingerprint is stored
//! beside them.
//!
//! Each is stored as two integers: the sum as the bits of a signed 64-bit
//! integer (the databases have no unsigned one), and the count. New values
//! are computed in Rust and written whole: adding in SQL would overflow.
//!
//! Beside them, the checksum log (`checksum_log`) keeps their past values,
//! so that a checkpoint can state a store's checksums at the end of an
//! earlier submission rather than only at its head. Each row is one
//! checksum's value from a seq on: a submission that moves a checksum
//! logs its new value at the highest seq it gave the store (its changes to
//! one store have a contiguous range, so no other submission straddles
//! that seq). A store's log has, for every kind of the spec, a row at or
//! before the first seq it can answer for: computing the checksums again
//! writes every kind's at the store's head, and a store's first
//! submission every kind's, moved or zero. Then a kind with no row at or
//! before a seq marks the log as unable to answer there (pruned, or reset
//! after it), never a zero checksum.

use std::collections::BTreeMap;

use possync_core::{Checksum, ChecksumSpec};
use serde_json::{Map, Value};

use super::{ChecksumsAt, Recomputed};

/// A checksum's address: store, kind of entity.
pub(crate) type ChecksumKey = (String, String);

/// The fingerprint stored while no spec's checksums are kept: a database
/// made before checksums, or one a submission under another spec wrote to.
/// No spec has it.
pub(crate) const STALE: &str = "";

/// How far below a store's newest boundary its checksum log keeps every
/// boundary, in seqs, when nothing prunes it sooner: each submission that
/// logs a checksum prunes that checksum's rows older than this and older
/// than the store's first unpublished change (but the latest of them), so
/// a log holds at most this many and one rows per store and kind beyond
/// its unpublished backlog, even when no checkpoint is ever published;
/// the relay, however far behind, finds a boundary in each round.
pub(crate) const LOG_WINDOW: i64 = 1024;

/// A checksum log row: the checksum's address, the boundary seq it holds
/// from, its value there.
pub(crate) type LogRow = (ChecksumKey, i64, Checksum);

/// A store's checksums at a boundary, from the latest log row at or before
/// it of each kind of `spec` (`rows`: kind, seq, checksum): the boundary
/// (the highest of those seqs) and every kind's checksum; `None` when a
/// kind has no such row (the log cannot answer there) or `spec` has no
/// kind.
pub(crate) fn at_boundary(
    spec: &ChecksumSpec,
    rows: impl IntoIterator<Item = (String, i64, Checksum)>,
) -> Option<ChecksumsAt> {
    let found: BTreeMap<String, (i64, Checksum)> = rows
        .into_iter()
        .map(|(kind, seq, checksum)| (kind, (seq, checksum)))
        .collect();
    let mut boundary = None;
    let mut checksums = BTreeMap::new();
    for kind in spec.kinds() {
        let (seq, checksum) = found.get(kind)?;
        boundary = boundary.max(Some(*seq));
        checksums.insert(kind.to_owned(), *checksum);
    }
    Some((boundary?, checksums))
}

/// A checksum as its row stores it: `(sum, count)`.
pub(crate) fn to_row(checksum: Checksum) -> (i64, i64) {
    (checksum.sum.cast_signed(), checksum.count.cast_signed())
}

/// A checksum from its row.
pub(crate) fn from_row(sum: i64, count: i64) -> Checksum {
    Checksum {
        sum: sum.cast_unsigned(),
        count: count.cast_unsigned(),
    }
}

/// A store's checksums as a checkpoint states them: every kind of `spec`,
/// the zero checksum for a kind with no row; rows of other kinds left out.
pub(crate) fn of_store(
    spec: &ChecksumSpec,
    rows: impl IntoIterator<Item = (String, Checksum)>,
) -> BTreeMap<String, Checksum> {
    let mut checksums: BTreeMap<String, Checksum> = spec
        .kinds()
        .map(|kind| (kind.to_owned(), Checksum::default()))
        .collect();
    for (kind, checksum) in rows {
        if let Some(kept) = checksums.get_mut(&kind) {
            *kept = checksum;
        }
    }
    checksums
}

/// Every checksum computed from scratch, one entity at a time.
#[derive(Debug)]
pub(crate) struct Tally<'a> {
    spec: &'a ChecksumSpec,
    sums: BTreeMap<ChecksumKey, Checksum>,
    entities: u64,
}

impl<'a> Tally<'a> {
    pub(crate) fn new(spec: &'a ChecksumSpec) -> Self {
        Self {
            spec,
            sums: BTreeMap::new(),
            entities: 0,
        }
    }

    /// Counts in an existing entity (one of a kind without a checksum
    /// counts for nothing).
    pub(crate) fn add(&mut self, store: &str, kind: &str, id: &str, state: &Map<String, Value>) {
        if let Some(digest) = self.spec.digest(kind, id, state) {
            self.sums
                .entry((store.to_owned(), kind.to_owned()))
                .or_default()
                .add(digest);
            self.entities += 1;
        }
    }

    /// The checksums to store, and what was computed.
    pub(crate) fn finish(self) -> (BTreeMap<ChecksumKey, Checksum>, Recomputed) {
        let stores = self
            .sums
            .keys()
            .map(|(store, _)| store)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let recomputed = Recomputed {
            stores: u64::try_from(stores).unwrap_or(u64::MAX),
            entities: self.entities,
        };
        (self.sums, recomputed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksum_survives_its_row_whatever_its_bits() {
        for checksum in [
            Checksum { sum: 0, count: 0 },
            Checksum {
                sum: u64::MAX,
                count: 1,
            },
            Checksum {
                sum: 1 << 63,
                count: u64::MAX,
            },
        ] {
            let (sum, count) = to_row(checksum);
            assert_eq!(from_row(sum, count), checksum);
        }
    }

    #[test]
    fn a_boundary_is_the_latest_row_of_any_kind_and_needs_a_row_of_each() {
        let fields = vec!["price".to_owned()];
        let spec = ChecksumSpec::new([("product", fields.as_slice()), ("category", &fields)]);
        let product = Checksum { sum: 7, count: 1 };
        let category = Checksum { sum: 3, count: 2 };
        assert_eq!(
            at_boundary(
                &spec,
                [
                    ("product".to_owned(), 9, product),
                    ("category".to_owned(), 4, category),
                    ("modifier".to_owned(), 12, product),
                ]
            ),
            Some((
                9,
                BTreeMap::from([
                    ("category".to_owned(), category),
                    ("product".to_owned(), product),
                ])
            )),
            "a kind of another spec neither counts nor shows"
        );
        assert_eq!(
            at_boundary(&spec, [("product".to_owned(), 9, product)]),
            None,
            "a kind without a row: the log cannot answer"
        );
        assert_eq!(
            at_boundary(&ChecksumSpec::default(), []),
            None,
            "no kind, no boundary"
        );
    }

    #[test]
    fn a_checkpoint_names_every_kind_of_the_spec_and_no_other() {
        let fields = vec!["price".to_owned()];
        let spec = ChecksumSpec::new([("product", fields.as_slice()), ("category", &fields)]);
        let product = Checksum { sum: 7, count: 1 };
        let rows = [
            ("product".to_owned(), product),
            ("modifier".to_owned(), Checksum { sum: 1, count: 1 }),
        ];
        assert_eq!(
            of_store(&spec, rows),
            BTreeMap::from([
                ("category".to_owned(), Checksum::default()),
                ("product".to_owned(), product),
            ])
        );
    }
}
