//! Compaction (design §3): storage grows with the live document, not with the writes.
//!
//! The document is every write replayed in key order. Compaction replaces a *prefix* of that
//! replay with its result, the session's **base** document: every register whose key is below
//! `H` is folded into the base and dropped, where `H` is the smallest key of any replay step
//! (a register's write, or the parent-making a tombstone remembers) whose event the
//! **horizon** clock does not cover. The replay is then `base`, followed by the remaining
//! registers in key order, which is the same document.
//!
//! The horizon is a session clock the session had at least `sync.tombstone_retention` ago (a
//! [`Checkpoint`]; a session clock is causally closed). From then on every batch must cover
//! the horizon, and so does every `since`, or they are refused with [`MustRefetch`] (HTTP 410:
//! do a full GET and start again from its clock). A batch that covers the horizon is stamped
//! above every event the horizon covers (its effective timestamp is lifted above all it
//! covers), so no later write can sort into the folded prefix: nothing removed comes back,
//! and no acknowledged write is lost.

use serde::{Deserialize, Serialize};

use crate::document::materialise_with;
use crate::register::WriteKey;
use crate::{SessionState, VectorClock};

/// The session clock at a moment (server time, ms since the epoch): a candidate horizon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// When the session had this clock.
    pub at_ms: u64,
    /// The session clock then.
    pub clock: VectorClock,
}

/// Refused because the batch's clock, or a `since`, predates the session's compaction horizon
/// (HTTP 410 `must-refetch`): the client must fetch the whole session and continue from its
/// clock (re-sending any edits it still holds as a new batch).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this clock predates what the session keeps (its history was compacted); fetch the whole session and continue from its vector_clock")]
pub struct MustRefetch {
    /// What every clock must cover from now on.
    pub horizon: VectorClock,
}

/// What one compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Registers folded into the base document and dropped.
    pub folded: usize,
    /// Tombstones among them.
    pub tombstones: usize,
}

impl SessionState {
    /// The clock every batch and every `since` must cover (empty before any compaction).
    pub fn horizon(&self) -> &VectorClock {
        &self.horizon
    }

    /// Refuses a clock that does not cover the horizon (`own` adds a named replica's own
    /// earlier events: `(replica, 1..=sequence - 1)`).
    pub(crate) fn check_horizon(
        &self,
        clock: &VectorClock,
        own: Option<(&str, u64)>,
    ) -> Result<(), MustRefetch> {
        let covered = |replica: &str, count: u64| {
            let named = clock.get(replica).copied().unwrap_or(0);
            let own = own
                .filter(|(own, _)| *own == replica)
                .map_or(0, |(_, sequence)| sequence.saturating_sub(1));
            named.max(own) >= count
        };
        if self
            .horizon
            .iter()
            .all(|(replica, &count)| covered(replica, count))
        {
            return Ok(());
        }
        Err(MustRefetch {
            horizon: self.horizon.clone(),
        })
    }

    /// Notes the session clock at `now_ms` as a candidate horizon when the newest checkpoint
    /// is at least `every_ms` old (so a session keeps about retention / every of them).
    pub fn checkpoint(&mut self, now_ms: u64, every_ms: u64) {
        let due = self
            .checkpoints
            .last()
            .is_none_or(|last| now_ms.saturating_sub(last.at_ms) >= every_ms);
        if due && !self.clock.is_empty() {
            self.checkpoints.push(Checkpoint {
                at_ms: now_ms,
                clock: self.clock.clone(),
            });
        }
    }

    /// Compacts up to the newest checkpoint taken at or before `cutoff_ms` (now less the
    /// tombstone retention), if it is newer than the current horizon and there is anything to
    /// fold. Older checkpoints are dropped.
    pub fn compact_before(&mut self, cutoff_ms: u64) -> Option<Compacted> {
        let due = self
            .checkpoints
            .iter()
            .rposition(|checkpoint| checkpoint.at_ms <= cutoff_ms)?;
        let horizon = self.checkpoints[due].clock.clone();
        self.checkpoints.drain(..=due);
        Some(self.compact_to(horizon))
    }

    /// Folds every register below the first replay step the `horizon` does not cover into
    /// the base document, and makes `horizon` the clock every batch and `since` must cover;
    /// does nothing when that prefix holds no tombstone.
    /// `horizon` must be a clock this session had (causally closed, covered by its clock).
    pub fn compact_to(&mut self, horizon: VectorClock) -> Compacted {
        let covers =
            |replica: &str, sequence: u64| sequence <= horizon.get(replica).copied().unwrap_or(0);
        // The first replay step (a write, or a remembered parent-making) the horizon does not
        // cover: everything before it is the prefix.
        let first_uncovered: Option<WriteKey> = self
            .registers
            .values()
            .flat_map(|register| {
                let own = register.write_key();
                let made = register.parents_made.as_deref().cloned();
                [Some(own), made]
            })
            .flatten()
            // A saturated stamp (u64::MAX) no longer orders causally (a later write can share
            // it and sort below by replica id), so it is never folded.
            .filter(|key| !covers(&key.replica_id, key.sequence) || key.timestamp == u64::MAX)
            .min();
        let in_prefix = |key: &WriteKey| first_uncovered.as_ref().is_none_or(|first| key < first);
        // Only tombstones are worth compacting: with none in the prefix nothing shrinks, and the
        // horizon stays where it is (no client is sent to refetch for nothing).
        let worth_it = self.registers.values().any(|register| {
            let own = in_prefix(&register.write_key());
            let made = register.parents_made.as_deref().is_some_and(&in_prefix);
            (own && register.value.is_none()) || (!own && made)
        });
        if !worth_it {
            return Compacted::default();
        }
        // The base: the old base and the prefix's steps (writes below the first uncovered
        // key, and the parent-makings below it that later tombstones remember).
        let mut prefix = Vec::new();
        let mut kept = std::collections::BTreeMap::new();
        for (path, register) in std::mem::take(&mut self.registers) {
            if in_prefix(&register.write_key()) {
                prefix.push(register);
            } else {
                kept.insert(path, register);
            }
        }
        // Kept tombstones whose remembered parent-making is in the prefix: that step is
        // folded into the base, and forgotten by the tombstone.
        let made_early: Vec<_> = kept
            .values()
            .filter(|register| register.parents_made.as_deref().is_some_and(&in_prefix))
            .cloned()
            .collect();
        let base = materialise_with(&self.base, prefix.iter(), made_early.iter()).to_value();
        for register in kept.values_mut() {
            if register.parents_made.as_deref().is_some_and(&in_prefix) {
                register.parents_made = None;
            }
        }
        let compacted = Compacted {
            folded: prefix.len(),
            tombstones: prefix.iter().filter(|r| r.value.is_none()).count(),
        };
        self.base = base;
        self.registers = kept;
        for (replica, count) in horizon {
            let entry = self.horizon.entry(replica).or_insert(0);
            *entry = (*entry).max(count);
        }
        compacted
    }
}
