//! What a client sends: one batch of changes, stamped with its replica's vector clock.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Pointer, VectorClock};

/// One change of a batch, in the request's vocabulary
/// (`{"op":"set","path":…,"value":…}` or `{"op":"remove","path":…}`).
///
/// Deserializing refuses an unknown `op`, a path that is not a pointer the merge accepts and a
/// `set` without `value` (`"value": null` is a value: it sets JSON `null`). Unknown fields are
/// ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// Write `value` at `path`, creating (or turning into objects) the parents on the way.
    Set {
        /// Where to write.
        path: Pointer,
        /// What to write.
        value: Value,
    },
    /// Write a tombstone at `path`: the key and everything under it disappear.
    Remove {
        /// What to delete.
        path: Pointer,
    },
}

impl Change {
    /// The path the change writes.
    pub fn path(&self) -> &Pointer {
        match self {
            Change::Set { path, .. } | Change::Remove { path } => path,
        }
    }

    /// The value written, `None` for a tombstone.
    pub fn value(&self) -> Option<&Value> {
        match self {
            Change::Set { value, .. } => Some(value),
            Change::Remove { .. } => None,
        }
    }
}

/// One event of one replica: its changes, taking effect together and in list order.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The writer (the `_sync_meta.replica_id`, defaulted by the caller to the token's `sub`).
    pub replica_id: String,
    /// Whether the client named its replica (`_sync_meta.replica_id` was sent). A named replica
    /// is one device and has seen its own earlier events. A batch without one cannot name its
    /// device (one technician may carry two tablets): its sequence number is always assigned
    /// by the server and its causal past is only what its clock names, so two devices of one
    /// user are concurrent and their conflicts are reported (design §3).
    pub replica_named: bool,
    /// The client's vector clock as sent (may lack its own entry, then the server assigns the
    /// sequence number).
    pub clock: VectorClock,
    /// Device timestamp in ms, already defaulted and clamped by the caller.
    pub timestamp_ms: u64,
    /// The changes, in the order they take effect.
    pub changes: Vec<Change>,
}

/// A batch the merge cannot interpret; the caller answers 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBatch {
    /// The clock's own entry is 0, which is no event: sequence numbers start at 1.
    #[error("vector_clock[{replica_id:?}] is 0, but a batch's own sequence number starts at 1; send the number of this batch or leave the entry out")]
    ZeroSequence {
        /// The batch's replica.
        replica_id: String,
    },
}

impl Batch {
    /// Checks what the merge itself needs of a batch. Call it before
    /// [`SessionState::apply`](crate::SessionState::apply) and answer 400 on `Err`.
    pub fn validate(&self) -> Result<(), InvalidBatch> {
        if self.replica_named && self.clock.get(&self.replica_id) == Some(&0) {
            return Err(InvalidBatch::ZeroSequence {
                replica_id: self.replica_id.clone(),
            });
        }
        Ok(())
    }

    /// The batch's sequence number against a session clock: its own clock entry, or one past
    /// what the session has seen of the replica when the entry is missing or the replica was
    /// not named.
    pub fn sequence(&self, session_clock: &VectorClock) -> u64 {
        let own = self
            .clock
            .get(&self.replica_id)
            .filter(|_| self.replica_named);
        match own {
            Some(&sequence) => sequence,
            None => session_clock
                .get(&self.replica_id)
                .copied()
                .unwrap_or(0)
                .saturating_add(1),
        }
    }

    /// Whether the batch's clock covers the event `(replica_id, sequence)` when the batch itself
    /// has sequence number `own_sequence`: every event it names, and a named replica's earlier
    /// events whatever the clock says.
    pub(crate) fn covers(&self, own_sequence: u64, replica_id: &str, sequence: u64) -> bool {
        if self.replica_named && replica_id == self.replica_id {
            sequence < own_sequence
        } else {
            sequence <= self.clock.get(replica_id).copied().unwrap_or(0)
        }
    }
}
