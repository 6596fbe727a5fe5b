//! The sync session API of the store: one transaction per group of merges of one session
//! (often a group of one), holding the session's rows, every member's idempotency record and
//! journal entries, so a crash leaves all of it or none of it.
//!
//! The merge itself is the caller's closure ([`GroupFn`], [`MergeFn`]), so this crate knows
//! nothing of CRDTs, only the rows a session is kept as (`firemode_merge::rows`): under the
//! session's lock it reads the rows the caller names ([`Reads`]: the head, registers by key
//! range and by ancestor prefix, stamps by event), hands them to the closure, and writes
//! back the rows it changed.

/// Who is asking and with which key.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub subject: String,
    pub key: String,
    /// Fingerprint of the request (method, session, body): same key + other request → reuse.
    pub request_hash: String,
    /// A fingerprint an older release stored for the same request, also accepted as "the
    /// same request" (never stored).
    pub legacy_request_hash: Option<String>,
}

impl IdempotencyKey {
    /// Whether a stored fingerprint is this request's.
    pub(crate) fn is_same_request(&self, stored_hash: &str) -> bool {
        stored_hash == self.request_hash || self.legacy_request_hash.as_deref() == Some(stored_hash)
    }

    /// The outcome when the key already has a live record: its stored answer for the same
    /// request, [`MergeOutcome::KeyReused`] for another.
    pub(crate) fn answer_from_record(
        &self,
        stored_hash: &str,
        status: u16,
        body: String,
    ) -> MergeOutcome {
        if self.is_same_request(stored_hash) {
            MergeOutcome::Replay { status, body }
        } else {
            MergeOutcome::KeyReused
        }
    }
}

pub use firemode_merge::{Reads, RowChanges, SessionRows};

/// What the merge closure decided.
#[derive(Debug)]
pub struct MergeStep {
    /// The rows to write (an applied batch), or `None` when nothing changed.
    pub changes: Option<RowChanges>,
    pub status: u16,
    pub body: String,
    /// Remember the answer under the idempotency key (false for answers a retry should not
    /// get again, such as "sync first").
    pub remember: bool,
    /// Conflicts to keep in the session's journal, each a JSON object (without its `seq`,
    /// which the store assigns), in order. Only written with `changes`.
    pub journal: Vec<String>,
    /// The closure's note to its caller that the session is due for compaction
    /// ([`crate::Store::compact_session`]); the store only hands it back.
    pub compact: bool,
}

/// One kept conflict: its number in the session's journal and the JSON the merge wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalEntry {
    pub seq: i64,
    pub entry: String,
}

/// How a merge request ended.
#[derive(Debug)]
pub enum MergeOutcome {
    /// The closure ran; this is its answer.
    Ran(MergeStep),
    /// The key was used before for the same request: its stored answer.
    Replay { status: u16, body: String },
    /// The key was used before for a different request.
    KeyReused,
}

/// The merge closure: gets the rows it asked for (`None` for a new session) and decides.
pub type MergeFn = Box<dyn FnOnce(Option<SessionRows>) -> MergeStep + Send + 'static>;

/// The closure of a group of merges of one session ([`crate::Store::merge_group`]): gets the
/// rows the group asked for (`None` for a new session) and, per member in order, the answer
/// its idempotency key already has (`Some`: a live record; that member is not merged), and
/// decides every member's answer and the rows to write for all of them.
pub type GroupFn =
    Box<dyn FnOnce(Option<SessionRows>, Vec<Option<MergeOutcome>>) -> GroupStep + Send + 'static>;

/// What a group's closure decided.
#[derive(Debug)]
pub struct GroupStep {
    /// The rows to write for the whole group, or `None` when nothing changed.
    pub changes: Option<RowChanges>,
    /// One answer per member, in order. A `Ran` answer's record is kept when it says
    /// `remember` (at most one `Ran` per key in a group), and its journal entries are kept, in
    /// member order, when the group changed anything. Its own `changes` is not used.
    pub answers: Vec<MergeOutcome>,
    /// See [`MergeStep::compact`].
    pub compact: bool,
}

/// How a group of merges ended.
#[derive(Debug)]
pub struct GroupDone {
    /// One answer per member, in order.
    pub answers: Vec<MergeOutcome>,
    /// Whether rows were written (the session's version moved).
    pub changed: bool,
    /// See [`MergeStep::compact`].
    pub compact: bool,
}

/// The compaction closure: gets every row of the session but its stamps, returns the rows to
/// write (`None`: nothing to do).
pub type CompactFn = Box<dyn FnOnce(SessionRows) -> Option<RowChanges> + Send + 'static>;

/// A session as stored: its head, base and every register (no stamp rows: reads need none),
/// read in one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSession {
    pub rows: SessionRows,
    /// Bumped by every applied batch.
    pub version: i64,
}

/// The journal entries of a group's merged members, in member order.
pub(crate) fn group_journal(step: &GroupStep) -> Vec<String> {
    step.answers
        .iter()
        .filter_map(|answer| match answer {
            MergeOutcome::Ran(ran) => Some(ran.journal.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Cut-off for live idempotency records: created at or after this (ms since the epoch).
pub(crate) fn live_since(ttl: std::time::Duration) -> i64 {
    crate::now_ms() - ttl.as_millis().min(i64::MAX as u128) as i64
}
