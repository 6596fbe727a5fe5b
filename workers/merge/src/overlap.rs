//! Finding a write's overlapping registers without visiting every pair, and reporting the
//! conflicts they make up to a cap while counting all of them.
//!
//! While one batch applies, every held write splits in two kinds:
//!
//! * **Winners**: writes whose order key is larger than the batch's event (its stamp, replica
//!   and sequence). No write of the batch can replace or hide them, so they are set aside in a
//!   sorted list ([`Winners`]) for the batch: the ones under a path form one contiguous run,
//!   found by binary search, and counted without being visited.
//! * **The rest** stay in the session's map. They all have a smaller key than every write of
//!   the batch, so a stored write drops every one of them under its path: each is visited at
//!   most once more, when it leaves.
//!
//! So a batch of `k` changes over a session of `n` registers costs `O(n + k·depth·log n)` plus
//! the registers it drops, whatever the number of overlapping pairs; only the first
//! `cap` conflicts are materialised.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::register::Register;
use crate::state::Conflict;
use crate::Pointer;

/// The conflicts of one batch: the first `cap` in full, and the true count.
pub(crate) struct Conflicts {
    pub(crate) list: Vec<Conflict>,
    pub(crate) total: u64,
    cap: usize,
}

impl Conflicts {
    pub(crate) fn new(cap: usize) -> Self {
        Conflicts {
            list: Vec::new(),
            total: 0,
            cap,
        }
    }

    /// Counts the conflict between `incoming` and `existing`, materialising it under the cap.
    pub(crate) fn record(&mut self, incoming: &Register, existing: &Register) {
        self.total = self.total.saturating_add(1);
        if self.list.len() < self.cap {
            self.list.push(conflict(incoming, existing));
        }
    }

    fn room(&self) -> usize {
        self.cap.saturating_sub(self.list.len())
    }
}

/// The registers whose key beats the applying batch's event, sorted by path.
#[derive(Default)]
pub(crate) struct Winners {
    entries: Vec<(Pointer, Register)>,
    /// Positions in `entries` of the writes concurrent with the batch, increasing.
    concurrent: Vec<usize>,
}

impl Winners {
    /// Moves the registers `beats_batch` accepts out of `registers`.
    pub(crate) fn set_aside(
        registers: &mut BTreeMap<Pointer, Register>,
        beats_batch: impl Fn(&Register) -> bool,
        is_concurrent: impl Fn(&Register) -> bool,
    ) -> Winners {
        if !registers.values().any(&beats_batch) {
            return Winners::default();
        }
        let (entries, rest): (Vec<_>, Vec<_>) = std::mem::take(registers)
            .into_iter()
            .partition(|(_, register)| beats_batch(register));
        *registers = rest.into_iter().collect();
        let concurrent = entries
            .iter()
            .enumerate()
            .filter(|(_, (_, register))| is_concurrent(register))
            .map(|(position, _)| position)
            .collect();
        Winners {
            entries,
            concurrent,
        }
    }

    /// Puts the set-aside registers back.
    pub(crate) fn restore(self, registers: &mut BTreeMap<Pointer, Register>) {
        registers.extend(self.entries);
    }

    /// The winner at exactly `tokens`.
    pub(crate) fn get(&self, tokens: &[String]) -> Option<&Register> {
        let position = self
            .entries
            .binary_search_by(|(path, _)| path.tokens().cmp(tokens))
            .ok()?;
        Some(&self.entries[position].1)
    }

    /// Counts every concurrent winner strictly below `write`'s path as a conflict, and
    /// materialises as many as the cap leaves room for.
    pub(crate) fn record_descendants(&self, write: &Register, conflicts: &mut Conflicts) {
        let below = self.descendants(write.path.tokens());
        let first = self.concurrent.partition_point(|&p| p < below.start);
        let end = self.concurrent.partition_point(|&p| p < below.end);
        for &position in self.concurrent[first..end].iter().take(conflicts.room()) {
            conflicts
                .list
                .push(conflict(write, &self.entries[position].1));
        }
        let count = u64::try_from(end - first).unwrap_or(u64::MAX);
        conflicts.total = conflicts.total.saturating_add(count);
    }

    /// The positions of the entries strictly below `tokens`: right after it in path order.
    fn descendants(&self, tokens: &[String]) -> Range<usize> {
        let start = self
            .entries
            .partition_point(|(path, _)| path.tokens() <= tokens);
        let len =
            self.entries[start..].partition_point(|(path, _)| path.tokens().starts_with(tokens));
        start..start + len
    }
}

/// The conflict between an incoming write and an overlapping one already held.
fn conflict(incoming: &Register, existing: &Register) -> Conflict {
    let (winner, loser) = if incoming.cmp_order(existing).is_gt() {
        (incoming, existing)
    } else {
        (existing, incoming)
    };
    Conflict {
        path: incoming.path.as_str().to_owned(),
        winner: winner.into(),
        loser: loser.into(),
    }
}
