//! The checksums both storages keep: per store and kind of entity, the
//! wrapping sum of its entities' digests and their count (see
//! [`possync_core::Checksum`]), under the spec whose fingerprint is stored
//! beside them.
//!
//! Each is stored as two integers: the sum as the bits of a signed 64-bit
//! integer (the databases have no unsigned one), and the count. New values
//! are computed in Rust and written whole: adding in SQL would overflow.

use std::collections::BTreeMap;

use possync_core::{Checksum, ChecksumSpec};
use serde_json::{Map, Value};

use super::Recomputed;

/// A checksum's address: store, kind of entity.
pub(crate) type ChecksumKey = (String, String);

/// The fingerprint stored while no spec's checksums are kept: a database
/// made before checksums, or one a submission under another spec wrote to.
/// No spec has it.
pub(crate) const STALE: &str = "";

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
