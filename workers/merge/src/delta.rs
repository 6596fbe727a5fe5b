//! Catching up: the changes that take a client from the document of the batches its clock
//! covers to the session's document (design §3, `GET …/changes?since=`).
//!
//! A register is *new to* a clock when its own event, or the hidden `set` it remembers
//! (`Register::parents_made`), is not covered by it. Only new registers can make the
//! client's document differ from the session's: every other write the client has, with the
//! same effect. For each new register, shallowest first, the answer carries the session's
//! current state at its path:
//!
//! * the path holds a value: `set path <the value>` (the whole subtree, so nothing under it is
//!   sent again);
//! * the path holds nothing: `remove path`; or, when the register's remembered `set` is new
//!   to the client (it turned the path's parents into objects), `set q/next null` + `remove
//!   q/next` where `q` is the deepest parent the session's document still holds, if it is an
//!   object: the same parents exist on the client, and the rest of the way stays absent.
//!
//! So the answer grows with the registers the client has not seen, never with the session.
//!
//! Finding those registers need not visit the others either: a [`DeltaIndex`], built once per
//! loaded session, lists per replica the dots the registers carry, sorted by sequence, so the
//! registers new to a clock are one range per replica
//! ([`SessionState::changes_since_indexed`]). Only new registers can start a skip (a `set` of
//! a whole subtree), so walking just them, in path order, gives the same answer as walking all.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::document::{Document, NodeRef};
use crate::register::Register;
use crate::{Change, Pointer, SessionState, VectorClock};

/// A `since` clock that names events the session has not applied (HTTP 409 with the session
/// clock): the client is ahead of this session, or talks to the wrong one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`since` names events this session has not seen; send a vector clock this session gave you (the session clock is in the answer)")]
pub struct SinceAhead {
    /// The session's clock.
    pub session_clock: VectorClock,
}

/// Why a `since` gets no changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinceRefused {
    /// It names events the session has not seen (HTTP 409).
    #[error(transparent)]
    Ahead(#[from] SinceAhead),
    /// It predates the compaction horizon (HTTP 410 `must-refetch`).
    #[error(transparent)]
    MustRefetch(#[from] crate::compaction::MustRefetch),
}

/// Whether `clock` covers the event `(replica, sequence)`.
fn covered(clock: &VectorClock, replica: &str, sequence: u64) -> bool {
    sequence <= clock.get(replica).copied().unwrap_or(0)
}

/// Whether the client at `since` lacks `register`'s write or the `set` it remembers.
fn is_new(register: &Register, since: &VectorClock) -> bool {
    !covered(since, &register.replica_id, register.sequence)
        || register
            .parents_made
            .as_ref()
            .is_some_and(|made| !covered(since, &made.replica_id, made.sequence))
}

/// The registers of one [`SessionState`] by the dots they carry, to find the registers new
/// to a clock without visiting the others ([`SessionState::changes_since_indexed`]).
///
/// Built once per loaded session ([`DeltaIndex::new`]) and shared by every client catching
/// up on it. It holds one copy of every register's path (in path order) and, per replica,
/// one `(sequence, position)` entry per dot a register carries (its own, and the one of the
/// `set` a tombstone remembers), sorted: memory linear in the registers (their paths plus at
/// most two 16-byte entries each), time `O(n log n)` to build. An answer then costs
/// `O(replicas · log n + new · log n)`.
///
/// It describes the state as it was when built: a state changed since (a merge, a
/// compaction) needs a new index.
#[derive(Clone, Debug, Default)]
pub struct DeltaIndex {
    /// The session clock when built (an index of another state is not used; see
    /// [`DeltaIndex::describes`]).
    clock: VectorClock,
    /// Every register's path, in path order: a register's position is its index here.
    paths: Vec<Pointer>,
    /// Per replica, `(sequence, position)` of every dot a register carries, sorted.
    dots: BTreeMap<String, Vec<(u64, usize)>>,
}

impl DeltaIndex {
    /// Indexes the registers of `state`.
    pub fn new(state: &SessionState) -> DeltaIndex {
        let mut paths = Vec::with_capacity(state.registers.len());
        let mut dots: BTreeMap<String, Vec<(u64, usize)>> = BTreeMap::new();
        let mut add = |replica: &str, sequence: u64, position: usize| match dots.get_mut(replica) {
            Some(entries) => entries.push((sequence, position)),
            None => {
                dots.insert(replica.to_owned(), vec![(sequence, position)]);
            }
        };
        for (position, register) in state.registers.values().enumerate() {
            paths.push(register.path.clone());
            add(&register.replica_id, register.sequence, position);
            if let Some(made) = &register.parents_made {
                add(&made.replica_id, made.sequence, position);
            }
        }
        for entries in dots.values_mut() {
            entries.sort_unstable();
        }
        DeltaIndex {
            clock: state.clock.clone(),
            paths,
            dots,
        }
    }

    /// Whether this index was built from `state` as it is: the same clock (no write since)
    /// and the same number of registers (no compaction since). A path of the index that
    /// `state` lacks is caught when it is looked up.
    pub(crate) fn describes(&self, state: &SessionState) -> bool {
        self.clock == state.clock && self.paths.len() == state.registers.len()
    }

    /// The paths of the registers new to `since` (see [`is_new`]), in path order, each once.
    pub(crate) fn new_paths<'i>(
        &'i self,
        since: &VectorClock,
    ) -> impl Iterator<Item = &'i Pointer> {
        let mut positions: Vec<usize> = Vec::new();
        for (replica, entries) in &self.dots {
            let seen = since.get(replica).copied().unwrap_or(0);
            let first_new = entries.partition_point(|&(sequence, _)| sequence <= seen);
            positions.extend(entries[first_new..].iter().map(|&(_, position)| position));
        }
        positions.sort_unstable();
        positions.dedup();
        positions
            .into_iter()
            .filter_map(|position| self.paths.get(position))
    }
}

/// Refuses a `since` that names events beyond `session_clock`.
pub(crate) fn check_since(
    since: &VectorClock,
    session_clock: &VectorClock,
) -> Result<(), SinceAhead> {
    let ahead = since
        .iter()
        .any(|(replica, &count)| count > session_clock.get(replica).copied().unwrap_or(0));
    if ahead {
        return Err(SinceAhead {
            session_clock: session_clock.clone(),
        });
    }
    Ok(())
}

/// The changes for a client at `since`, given the registers in path order (all of them, or
/// any subset holding every register new to `since`: the others are passed over, and only a
/// new register can start a skip) and the session's current document. See the module
/// documentation for the rules.
pub(crate) fn changes_since<'a>(
    registers: impl IntoIterator<Item = &'a Register>,
    document: &Document,
    since: &VectorClock,
) -> Vec<Change> {
    changes_within(registers, document, since, true).unwrap_or_default()
}

/// [`changes_since`] where `document` may be the session's only at the new registers' paths,
/// their subtrees and their ancestors' own registers (`whole_above` false: the document of a
/// state loaded from [`crate::Reads::around_keys`] of the new registers). `None` when the
/// answer needs more: a removed path whose remembered `set` is new, whose deepest existing
/// parent that part cannot tell (see [`parents_known`]).
pub(crate) fn changes_within<'a>(
    registers: impl IntoIterator<Item = &'a Register>,
    document: &Document,
    since: &VectorClock,
    whole_above: bool,
) -> Option<Vec<Change>> {
    let mut changes = Vec::new();
    // The last path answered whole (a `set` of its value): registers under it are already in
    // that value. Under a removed path they are not skipped: a tombstone below may remember a
    // `set` that made parents above the removed path objects.
    let mut answered: Option<&Pointer> = None;
    // The new registers at and above the current path, outermost first: their subtrees are
    // whole in a part (path order visits a subtree's paths together, right after its root).
    let mut new_above: Vec<&Pointer> = Vec::new();
    for register in registers {
        while new_above
            .last()
            .is_some_and(|top| !register.path.tokens().starts_with(top.tokens()))
        {
            new_above.pop();
        }
        if answered.is_some_and(|above| above.is_ancestor_of(&register.path)) {
            continue;
        }
        if !is_new(register, since) {
            continue;
        }
        new_above.push(&register.path);
        match document.get(register.path.tokens()) {
            Some(value) => {
                changes.push(Change::Set {
                    path: register.path.clone(),
                    value: value.to_value(),
                });
                answered = Some(&register.path);
            }
            None => {
                let made_is_new = register
                    .parents_made
                    .as_ref()
                    .is_some_and(|made| !covered(since, &made.replica_id, made.sequence));
                let whole_from = new_above.first().map(|root| root.tokens().len());
                if made_is_new
                    && !whole_above
                    && !parents_known(document, &register.path, whole_from)
                {
                    return None;
                }
                changes.extend(absent(document, &register.path, made_is_new));
            }
        }
    }
    Some(changes)
}

impl SessionState {
    /// [`SessionState::changes_since`] from part of the session: this state loaded from the
    /// head, the base and the registers [`crate::Reads::around_keys`] names around every
    /// register new to `since` (a store finds those by the dots of their rows,
    /// [`crate::RegisterRow::dot`] and [`crate::RegisterRow::made`]). So a client one change
    /// behind costs what it has not seen, not the whole session.
    ///
    /// `Ok(None)` when the answer needs more of the session than such a state holds: a
    /// removed path whose hidden `set` is new to the client, whose parent is not an object in
    /// this part (a later write above took it away) and was not itself written since
    /// `since`, where the answer depends on which of the path's parents still exist (their
    /// whole subtrees). Read the whole session then.
    pub fn changes_from_part(
        &self,
        since: &VectorClock,
    ) -> Result<Option<Vec<Change>>, SinceRefused> {
        check_since(since, &self.clock)?;
        self.check_horizon(since, None)?;
        Ok(changes_within(
            self.registers.values(),
            &self.materialised(),
            since,
            false,
        ))
    }
}

/// The dots of a stored register (its JSON as [`crate::RegisterRow::register`] holds it):
/// its own, and the one of the hidden `set` a tombstone remembers. For a store to index rows
/// written before it kept the dots beside them.
pub fn register_dots(
    register: &str,
) -> Result<(crate::rows::Dot, Option<crate::rows::Dot>), crate::CorruptState> {
    let register: Register = serde_json::from_str(register)
        .map_err(|e| crate::CorruptState(format!("a register does not parse: {e}")))?;
    let dot = crate::rows::Dot {
        replica_id: register.replica_id,
        sequence: register.sequence,
    };
    let made = register.parents_made.map(|made| crate::rows::Dot {
        replica_id: made.replica_id,
        sequence: made.sequence,
    });
    Ok((dot, made))
}

/// Whether [`absent`] finds in `document` the session's deepest existing parent of `path`
/// and whether it is an object, when `document` holds only part of the session
/// ([`changes_within`]): every register at and above `path`'s parents, and whole subtrees
/// from depth `whole_from` down (the subtree of the shallowest new register at or above
/// `path`, in tokens), but only some registers below a parent above that depth.
///
/// Registers below a parent can only make it an object, never take that away, and the ones
/// at and above it are all there: so a parent that is an object in the part is one in the
/// session, and the deepest one answers. A parent that is not, or is absent, is known only
/// when its whole subtree is there; absent, the next one up is asked. The root always is an
/// object.
///
/// The usual case: the remembered `set` new to the client made the parents objects, and its
/// tombstone (read, as a new register) keeps them so unless a later write above took them;
/// or the write that took them is itself new, so its subtree was read whole.
fn parents_known(document: &Document, path: &Pointer, whole_from: Option<usize>) -> bool {
    let tokens = path.tokens();
    for depth in (1..tokens.len()).rev() {
        let node = document.get(&tokens[..depth]);
        if node.is_some_and(NodeRef::is_object) {
            return true;
        }
        if whole_from.is_none_or(|from| from > depth) {
            return false;
        }
        if node.is_some() {
            return true;
        }
    }
    true
}

/// The changes for a path the session's document does not hold. A hidden `set` new to the
/// client made the path's parents objects; of those, the ones that still exist do so from
/// the deepest existing one (`q`) up. `set q/next null` + `remove q/next` makes them exist on
/// the client too and leaves the rest of the way absent, as in the session; `remove path`
/// alone otherwise.
fn absent(document: &Document, path: &Pointer, made_is_new: bool) -> Vec<Change> {
    let tokens = path.tokens();
    let remove = Change::Remove { path: path.clone() };
    if !made_is_new {
        return vec![remove];
    }
    // The deepest strict ancestor present in the document (the root always is).
    let depth = (0..tokens.len())
        .rev()
        .find(|&depth| document.get(&tokens[..depth]).is_some())
        .unwrap_or(0);
    let is_object = document
        .get(&tokens[..depth])
        .is_some_and(NodeRef::is_object);
    let Ok(next) = Pointer::from_tokens(tokens[..=depth].iter()) else {
        return vec![remove];
    };
    if depth == 0 || !is_object {
        return vec![remove];
    }
    vec![
        Change::Set {
            path: next.clone(),
            value: Value::Null,
        },
        Change::Remove { path: next },
    ]
}
