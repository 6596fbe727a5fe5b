//! Finding a write's overlapping registers without visiting every pair, and reporting the
//! conflicts they make within limits ([`ReportLimits`]) while counting all of them.
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
//! the registers it drops, whatever the number of overlapping pairs; only the conflicts the
//! limits allow are materialised.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::register::Register;
use crate::state::Conflict;
use crate::Pointer;

/// How much of a batch's conflicts [`SessionState::apply_reporting`](crate::SessionState::apply_reporting)
/// materialises: at most `max_conflicts` entries, and no entry that would take the list past
/// about `max_bytes` of JSON (a listed conflict repeats both values, so a hundred conflicts
/// against one large value would otherwise answer a hundred copies of it). Every conflict is
/// counted either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportLimits {
    /// The most conflicts listed.
    pub max_conflicts: usize,
    /// The most bytes of JSON the listed conflicts take, roughly.
    pub max_bytes: usize,
}

impl ReportLimits {
    /// Every conflict listed, whatever its size.
    pub const UNLIMITED: ReportLimits = ReportLimits {
        max_conflicts: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// How many of `conflicts`, from the first, these limits list, by the measure
    /// [`SessionState::apply_reporting`](crate::SessionState::apply_reporting) uses: so a list
    /// made under wider limits (a journal's) gives the answer's list as its prefix.
    pub fn fitting(&self, conflicts: &[Conflict]) -> usize {
        let mut bytes = 0usize;
        let mut count = 0;
        for conflict in conflicts.iter().take(self.max_conflicts) {
            let size = [&conflict.winner, &conflict.loser]
                .into_iter()
                .map(|side| side_size(&side.path, &side.replica_id, side.value.as_ref()))
                .fold(0usize, usize::saturating_add);
            bytes = bytes.saturating_add(size);
            if bytes > self.max_bytes {
                break;
            }
            count += 1;
        }
        count
    }
}

/// The conflicts of one batch: a prefix of them in full, within the limits, and the true count.
pub(crate) struct Conflicts {
    pub(crate) list: Vec<Conflict>,
    pub(crate) total: u64,
    limits: ReportLimits,
    /// Bytes of JSON the listed conflicts take, roughly.
    bytes: usize,
    /// Set once a conflict did not fit: nothing later is listed, so the list stays a prefix.
    full: bool,
}

impl Conflicts {
    pub(crate) fn new(limits: ReportLimits) -> Self {
        Conflicts {
            list: Vec::new(),
            total: 0,
            limits,
            bytes: 0,
            full: false,
        }
    }

    /// Counts the conflict between `incoming` and `existing`, listing it within the limits.
    pub(crate) fn record(&mut self, incoming: &Register, existing: &Register) {
        self.total = self.total.saturating_add(1);
        self.list_within_limits(incoming, existing);
    }

    /// Lists the conflict if it fits; returns whether the list can take more.
    fn list_within_limits(&mut self, incoming: &Register, existing: &Register) -> bool {
        if self.full || self.list.len() >= self.limits.max_conflicts {
            return false;
        }
        let bytes = self.bytes.saturating_add(
            [incoming, existing]
                .into_iter()
                .map(|r| side_size(r.path.as_str(), &r.replica_id, r.value.as_ref()))
                .fold(0usize, usize::saturating_add),
        );
        if bytes > self.limits.max_bytes {
            self.full = true;
            return false;
        }
        self.bytes = bytes;
        self.list.push(conflict(incoming, existing));
        true
    }
}

/// Roughly the JSON bytes one side of a conflict takes: its value, path and replica, plus the
/// fixed keys. Counted without building the text.
fn side_size(path: &str, replica_id: &str, value: Option<&serde_json::Value>) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(64);
    // Writing to a counter cannot fail; a failure would only undercount. The path counts
    // twice: a conflict names the incoming path at its top level too.
    for text in [path, path, replica_id] {
        let _ = serde_json::to_writer(&mut count, text);
    }
    if let Some(value) = value {
        let _ = serde_json::to_writer(&mut count, value);
    }
    count.0
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

    /// The winner at exactly `tokens`, to update what a tombstone remembers.
    pub(crate) fn get_mut(&mut self, tokens: &[String]) -> Option<&mut Register> {
        let position = self
            .entries
            .binary_search_by(|(path, _)| path.tokens().cmp(tokens))
            .ok()?;
        Some(&mut self.entries[position].1)
    }

    /// Counts every concurrent winner strictly below `write`'s path as a conflict, and lists
    /// as many as the limits leave room for.
    pub(crate) fn record_descendants(&self, write: &Register, conflicts: &mut Conflicts) {
        let below = self.descendants(write.path.tokens());
        let first = self.concurrent.partition_point(|&p| p < below.start);
        let end = self.concurrent.partition_point(|&p| p < below.end);
        for &position in &self.concurrent[first..end] {
            if !conflicts.list_within_limits(write, &self.entries[position].1) {
                break;
            }
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
