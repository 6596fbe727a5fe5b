//! The sync merge: a convergent last-write-wins map over JSON Pointer paths (design §3).
//!
//! This crate is pure: no files, no network, no clock reads, no randomness. The caller parses
//! the request, defaults and clamps the device timestamp against its own clock, loads the
//! [`SessionState`], calls [`SessionState::apply`] and saves the state, all inside one
//! transaction per session.
//!
//! ```
//! use firemode_merge::{Batch, Change, Outcome, Pointer, SessionState};
//! use serde_json::json;
//!
//! let mut session = SessionState::default();
//! let batch = Batch {
//!     replica_id: "tablet-7".to_owned(),
//!     replica_named: true, // `_sync_meta.replica_id` was sent: one device
//!     clock: Default::default(), // `{"vector_clock": {}}`: the server assigns the sequence
//!     timestamp_ms: 1_763_800_000_000,
//!     changes: vec![Change::Set {
//!         path: Pointer::parse("/extinguishers/FE-01/pressure")?,
//!         value: json!("low"),
//!     }],
//! };
//! batch.validate()?; // 400 on Err
//! match session.apply(&batch)? { // 409 with the session clock on Err
//!     Outcome::Applied(applied) => assert_eq!(applied.dot, ("tablet-7".to_owned(), 1)),
//!     Outcome::Duplicate => unreachable!("a first batch is new"),
//! }
//! assert_eq!(session.document(), json!({"extinguishers": {"FE-01": {"pressure": "low"}}}));
//! assert_eq!(session.clock().get("tablet-7"), Some(&1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Model
//!
//! * A [`Batch`] is one **event** of replica `r`. Its **dot** is `(r, c)`, where
//!   `c = batch.clock[r]`, or `session_clock[r] + 1` when the client leaves its own entry out.
//!   The batch's causal past is every `(q, 1..=clock[q])` plus `(r, 1..c)`: a replica has
//!   always seen its own earlier events. A batch whose client sent no `replica_id`
//!   ([`Batch::replica_named`] false) always gets `c = session_clock[r] + 1` and its causal
//!   past is only what its clock names: two tablets of one user are concurrent.
//! * **Causal delivery.** A dot the session already covers (`c <= session_clock[r]`) is a
//!   duplicate and changes nothing. A batch naming events the session has not applied
//!   (`clock[q] > session_clock[q]` for `q != r`, or `c > session_clock[r] + 1`) is refused
//!   with [`MissingDependencies`] (HTTP 409) and changes nothing. So every replica's applied
//!   events are exactly `1..=session_clock[r]`.
//! * **Stamps.** A batch's effective timestamp is
//!   `max(timestamp_ms, 1 + the largest stamp of any event in its causal past)`, fixed once
//!   applied. A write made after seeing another therefore always has the larger stamp, whatever
//!   the device clocks say, and a replica's stamps increase with its sequence numbers.
//! * **Order key.** Every write is ordered by (effective timestamp, replica id, sequence, index
//!   of the change in its batch). Within one batch the list order decides; the sequence number
//!   only breaks ties once a stamp has saturated at `u64::MAX`. The key is total and unique.
//! * **Registers.** Per path the largest-keyed write survives; a write at `/a` (a value or a
//!   `remove` tombstone) also hides every write under `/a/…` with a smaller key, and hidden
//!   writes are dropped for good. The surviving set depends only on the set of applied writes.
//!   A tombstone remembers the largest key of a `set` it hid or replaced: at that key the set
//!   turned the tombstone's parents into objects, which stays true after the set is gone.
//! * **Conflicts.** A write conflicts with every held write at its path, an ancestor or a
//!   descendant whose dot the batch does not cover. Each pair is reported with its winner and
//!   loser; the order key alone decides who wins.
//! * **Document.** The surviving writes replayed on `{}` in key order, with each tombstone's
//!   remembered parent-making ([`document`] has the rules). This equals replaying *every*
//!   applied write in key order, so a value overwritten once never comes back. Every pointer token is an object key: `/a/0` makes `{"a":{"0":…}}`, never an array
//!   element.
//!
//! # Invariants
//!
//! * Applying any set of batches in any causally valid order, with duplicates and refused
//!   batches retried later, yields the same registers, clock and document; only what a
//!   tombstone remembers of the sets it hid may differ, never changing the document.
//!   `tests/convergence.rs` checks it against a model that replays every write.
//! * `apply` either applies the whole batch or changes nothing.
//! * The session clock is the pointwise max of the applied dots.
//!
//! # Layout
//!
//! * [`mod@pointer`]: RFC 6901 paths ([`Pointer`]).
//! * `batch`: what a client sends ([`Batch`], [`Change`]) and its validation.
//! * [`state`]: [`SessionState`] and [`SessionState::apply`], registers and conflicts.
//! * [`document`]: replaying the registers into plain JSON.
//! * [`delta`]: the changes a client at an older clock needs ([`SessionState::changes_since`]),
//!   found by range in a [`DeltaIndex`] built once per loaded session.
//! * [`compaction`]: folding the replay's old prefix into a base document; the horizon.
//! * `overlap`: a write's overlapping registers found by range, conflicts capped and counted.
//! * [`rows`]: the session as rows a store keeps (head, registers by path key, stamps, base),
//!   what a batch reads ([`Batch::reads`]) and what a change writes ([`RowChanges`]).
//! * `register`, `stored`: the stored write and the checked deserialization of a saved state.

#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod batch;
pub mod compaction;
pub mod delta;
pub mod document;
mod overlap;
pub mod pointer;
mod register;
pub mod rows;
mod stamps;
pub mod state;
mod stored;

pub use batch::{Batch, Change, InvalidBatch};
pub use compaction::{Checkpoint, Compacted, MustRefetch};
pub use delta::{register_dots, DeltaIndex, SinceAhead, SinceRefused};
pub use document::Document;
pub use overlap::ReportLimits;
pub use pointer::{Pointer, PointerError, MAX_POINTER_DEPTH};
pub use rows::{path_key, Dot, KeyRange, Reads, RegisterRow, RowChanges, SessionRows, StampRow};
pub use state::{
    Applied, Conflict, ConflictSide, MissingDependencies, NotApplied, Outcome, SessionState,
};
pub use stored::CorruptState;

/// Per replica id, a count of events: a client's view, or the session's applied events.
pub type VectorClock = std::collections::BTreeMap<String, u64>;
