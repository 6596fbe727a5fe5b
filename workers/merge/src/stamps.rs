//! The effective timestamps the merge needs: per replica and sequence number, the largest
//! stamp of that replica's events up to it.
//!
//! A session held whole in memory knows every one of them; a state loaded for one batch
//! ([`crate::rows`]) knows only the ones the batch can ask for (the latest of each replica, and
//! those at the counts its clock names). [`Stamps::get`] answers `None` for one it does not
//! know, which a merge never asks for.

use std::collections::BTreeMap;

/// Per replica, sequence number → the largest effective timestamp of events `1..=sequence`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamps(BTreeMap<String, BTreeMap<u64, u64>>);

impl Stamps {
    /// The stamp recorded for `(replica, sequence)`, if known.
    pub(crate) fn get(&self, replica: &str, sequence: u64) -> Option<u64> {
        self.0.get(replica)?.get(&sequence).copied()
    }

    /// Records the stamp of `(replica, sequence)`.
    pub(crate) fn insert(&mut self, replica: &str, sequence: u64, stamp: u64) {
        match self.0.get_mut(replica) {
            Some(known) => {
                known.insert(sequence, stamp);
            }
            None => {
                self.0
                    .insert(replica.to_owned(), BTreeMap::from([(sequence, stamp)]));
            }
        }
    }

    /// Every known stamp: (replica, sequence, stamp), by replica then sequence.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.0.iter().flat_map(|(replica, known)| {
            known
                .iter()
                .map(move |(&sequence, &stamp)| (replica.as_str(), sequence, stamp))
        })
    }

    /// Per replica, its stamps in sequence order, when every replica's are all of
    /// `1..=count`: the shape of a whole session saved as one value.
    pub(crate) fn to_dense(&self) -> Option<BTreeMap<&str, Vec<u64>>> {
        self.0
            .iter()
            .map(|(replica, known)| {
                let complete = known.keys().copied().eq(1..=known.len() as u64);
                complete.then(|| (replica.as_str(), known.values().copied().collect()))
            })
            .collect()
    }

    /// The stamps in `other` that this set lacks or records differently.
    pub(crate) fn added_since<'a>(
        &'a self,
        other: &'a Stamps,
    ) -> impl Iterator<Item = (&'a str, u64, u64)> + 'a {
        self.iter()
            .filter(move |&(replica, sequence, stamp)| other.get(replica, sequence) != Some(stamp))
    }
}
