//! Register rows by their dots (migration [`crate::migrations::REGISTER_DOTS`]): what lets a
//! catch-up (`GET …/changes?since=`) read only the registers new to the client's clock, and
//! what lies around them (`firemode_merge::Reads::around_keys`), instead of the whole session.
//!
//! * [`CatchUpRead`]: what a catch-up read found.
//! * [`new_dot_ranges`]: per replica, the sequence numbers past which a register is new.
//! * [`filled`]: the dots of a row an older release wrote without them, for the migration;
//!   the migration also marks every head (`firemode_merge::rows::mark_dotted`) and makes the
//!   table refuse rows without dots, so a process of the release before stops at once (it
//!   cannot load a marked head, nor create a session) instead of writing rows a catch-up by
//!   dots would never find. A catch-up trusts the dots only under a marked head.

use firemode_merge::VectorClock;

use crate::StoredSession;

/// The most registers new to a clock that a catch-up reads around (one subtree range each);
/// past that the caller reads the whole session (the answer is that large anyway).
pub const MAX_NEW_REGISTERS: usize = 4096;

/// The most parent paths of the new registers a catch-up looks up (one primary-key lookup
/// each, most of them finding nothing: writes go to leaves); past that the caller reads the
/// whole session. Each new path names at most its depth in parents (64 tokens at most), so
/// the lookups grow with the answer, which carries those paths; the bound only stops the
/// extreme (4,096 new paths 64 deep would be 258,048 lookups) where one ordered scan of the
/// session is cheaper. 66 new paths 64 deep (4,158 lookups): 2 ms on SQLite, against a
/// whole-session read of 20,000 paths that cost +17 to +32 MiB.
pub const MAX_PARENT_LOOKUPS: usize = 16 * MAX_NEW_REGISTERS;

/// Whether reading around the new registers (`reads`) is worth it rather than the whole
/// session (see [`MAX_NEW_REGISTERS`], [`MAX_PARENT_LOOKUPS`]).
pub(crate) fn worth_reading(reads: &firemode_merge::Reads) -> bool {
    reads.registers.len() <= MAX_NEW_REGISTERS && reads.ancestors.len() <= MAX_PARENT_LOOKUPS
}

/// What [`crate::Store::catch_up`] read.
#[derive(Debug)]
pub enum CatchUpRead {
    /// No applied batch yet.
    NoSession,
    /// The head, the base and the registers around every register new to the clock (their
    /// subtrees and their ancestors' registers).
    Part(StoredSession),
    /// More than [`MAX_NEW_REGISTERS`] are new or [`MAX_PARENT_LOOKUPS`] would be looked up,
    /// or the head does not parse, or it does not say that every register row carries its
    /// dots (a release before them wrote it): read the whole session.
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

/// How many rows the migration fills (or heads it marks) per statement: its memory is
/// bounded by this many rows whatever the table holds, and a round trip carries this many.
pub(crate) const FILL_BATCH: i64 = 1000;

/// The dots the migration writes into a register row an older release wrote without them.
pub(crate) struct FilledDots {
    pub replica: Vec<u8>,
    pub seq: i64,
    pub made_replica: Option<Vec<u8>>,
    pub made_seq: Option<i64>,
}

/// The dots of a stored register. One that does not parse (logged) gets a placeholder dot
/// (replica `""`, sequence -1: new to no clock) so that the column can refuse rows without
/// dots; a catch-up never reads it by them, and the whole-session reads that meet it answer
/// "unreadable" as before.
pub(crate) fn filled(tenant: &str, session_id: &str, register: &str) -> FilledDots {
    match firemode_merge::register_dots(register) {
        Ok((dot, made)) => FilledDots {
            replica: dot.replica_id.into_bytes(),
            seq: stored_sequence(dot.sequence),
            made_seq: made.as_ref().map(|m| stored_sequence(m.sequence)),
            made_replica: made.map(|m| m.replica_id.into_bytes()),
        },
        Err(e) => {
            tracing::error!(tenant, session_id, error = %e, "a stored register does not parse; it gets a placeholder dot");
            FilledDots {
                replica: Vec::new(),
                seq: -1,
                made_replica: None,
                made_seq: None,
            }
        }
    }
}

/// A sequence number as the stores keep it (BIGINT).
pub(crate) fn stored_sequence(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}
