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
//! * the path holds nothing: `remove path`, preceded by `set path null` when the register's
//!   remembered `set` is new to the client and the parent is an object in the session (that
//!   `set` turned the parents into objects; `set` + `remove` does the same on the client).
//!
//! So the answer grows with the registers the client has not seen, never with the session.

use serde_json::Value;

use crate::register::Register;
use crate::{Change, Pointer, VectorClock};

/// A `since` clock that names events the session has not applied (HTTP 409 with the session
/// clock): the client is ahead of this session, or talks to the wrong one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`since` names events this session has not seen; send a vector clock this session gave you (the session clock is in the answer)")]
pub struct SinceAhead {
    /// The session's clock.
    pub session_clock: VectorClock,
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

/// The changes for a client at `since`, given the registers in path order and the session's
/// current document. See the module documentation for the rules.
pub(crate) fn changes_since<'a>(
    registers: impl IntoIterator<Item = &'a Register>,
    document: &Value,
    since: &VectorClock,
) -> Vec<Change> {
    let mut changes = Vec::new();
    // The last path answered whole: registers under it are already in its value.
    let mut answered: Option<&Pointer> = None;
    for register in registers {
        if answered.is_some_and(|above| above.is_ancestor_of(&register.path)) {
            continue;
        }
        if !is_new(register, since) {
            continue;
        }
        let tokens = register.path.tokens();
        let (parents, _) = tokens.split_at(tokens.len().saturating_sub(1));
        match value_at(document, tokens) {
            Some(value) => changes.push(Change::Set {
                path: register.path.clone(),
                value: value.clone(),
            }),
            None => {
                let parent_is_object = value_at(document, parents).is_some_and(Value::is_object);
                let made_is_new = register
                    .parents_made
                    .as_ref()
                    .is_some_and(|made| !covered(since, &made.replica_id, made.sequence));
                if parent_is_object && made_is_new && !parents.is_empty() {
                    changes.push(Change::Set {
                        path: register.path.clone(),
                        value: Value::Null,
                    });
                }
                changes.push(Change::Remove {
                    path: register.path.clone(),
                });
            }
        }
        answered = Some(&register.path);
    }
    changes
}

/// The value at `tokens` in `document`, following object keys only.
fn value_at<'v>(document: &'v Value, tokens: &[String]) -> Option<&'v Value> {
    tokens
        .iter()
        .try_fold(document, |node, token| node.as_object()?.get(token))
}
