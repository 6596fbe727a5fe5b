//! Register rows by their dots (migration [`crate::migrations::REGISTER_DOTS`]): what lets a
//! catch-up (`GET …/changes?since=`) read only the registers new to the client's clock, and
//! what lies around them (`firemode_merge::Reads::around_keys`), instead of the whole session.
//!
//! * [`CatchUpRead`]: what a catch-up read found.
//! * [`new_dot_ranges`]: per replica, the sequence numbers past which a register is new.
//! * [`filled`]: the dots of a row an older release wrote without them, for the migration.

use firemode_merge::{Dot, VectorClock};

use crate::StoredSession;

/// The most registers new to a clock that a catch-up reads around, and the most lookups
/// (subtree ranges plus ancestor keys) it makes for them; past either the caller reads the
/// whole session (the answer is that large anyway, or the paths so deep that one ordered
/// scan beats thousands of lookups: 1,000 new paths 64 deep name 63,000 ancestors).
pub const MAX_NEW_REGISTERS: usize = 4096;

/// Whether reading around the new registers (`reads`) is worth it rather than the whole
/// session (see [`MAX_NEW_REGISTERS`]).
pub(crate) fn worth_reading(reads: &firemode_merge::Reads) -> bool {
    reads.registers.len() + reads.ancestors.len() <= MAX_NEW_REGISTERS
}

/// What [`crate::Store::catch_up`] read.
#[derive(Debug)]
pub enum CatchUpRead {
    /// No applied batch yet.
    NoSession,
    /// The head, the base and the registers around every register new to the clock (their
    /// subtrees and their ancestors' registers).
    Part(StoredSession),
    /// More than [`MAX_NEW_REGISTERS`] are new or would be looked up, or the head does not
    /// parse: read the whole session.
    Whole,
}

/// Per replica of `session_clock` that `since` lacks events of: `(replica, seen)`, where a
/// register whose dot (or remembered `set`'s dot) is `(replica, k)` with `k > seen` is new.
pub fn new_dot_ranges(session_clock: &VectorClock, since: &VectorClock) -> Vec<(String, i64)> {
    session_clock
        .iter()
        .filter_map(|(replica, &count)| {
            let seen = since.get(replica).copied().unwrap_or(0);
            (count > seen).then(|| (replica.clone(), i64::try_from(seen).unwrap_or(i64::MAX)))
        })
        .collect()
}

/// The dots of a stored register, `None` (logged) when it does not parse: such a row keeps
/// no dots, a catch-up never reads it by them, and the whole-session reads that meet it
/// answer "unreadable" as before.
pub(crate) fn filled(tenant: &str, session_id: &str, register: &str) -> Option<(Dot, Option<Dot>)> {
    match firemode_merge::register_dots(register) {
        Ok(dots) => Some(dots),
        Err(e) => {
            tracing::error!(tenant, session_id, error = %e, "a stored register does not parse; its dots are left empty");
            None
        }
    }
}

/// A sequence number as the stores keep it (BIGINT).
pub(crate) fn stored_sequence(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}
