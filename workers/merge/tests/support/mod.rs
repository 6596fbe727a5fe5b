//! Builders shared by the integration tests.

#![allow(dead_code)] // Each test binary uses its own subset.

pub mod history;
pub mod model;

use firemode_merge::{
    Applied, Batch, Change, Dot, Outcome, Pointer, Reads, SessionRows, SessionState, SinceRefused,
    VectorClock,
};
use serde_json::{json, Value};

/// A parsed pointer; panics on a bad literal, which is a bug in the test.
pub fn pointer(text: &str) -> Pointer {
    Pointer::parse(text).unwrap_or_else(|error| panic!("bad test pointer {text:?}: {error}"))
}

/// `{"op":"set","path":path,"value":value}`.
pub fn set(path: &str, value: Value) -> Change {
    Change::Set {
        path: pointer(path),
        value,
    }
}

/// `{"op":"remove","path":path}`.
pub fn remove(path: &str) -> Change {
    Change::Remove {
        path: pointer(path),
    }
}

/// A clock from `(replica, count)` pairs.
pub fn clock(entries: &[(&str, u64)]) -> VectorClock {
    entries
        .iter()
        .map(|(replica, count)| ((*replica).to_owned(), *count))
        .collect()
}

/// A batch of `replica` with the given clock (as sent), device timestamp and changes.
pub fn batch(
    replica: &str,
    sent_clock: &[(&str, u64)],
    timestamp_ms: u64,
    changes: Vec<Change>,
) -> Batch {
    Batch {
        replica_id: replica.to_owned(),
        replica_named: true,
        clock: clock(sent_clock),
        timestamp_ms,
        changes,
    }
}

/// A batch sent without `replica_id`: the server used the token's `sub` (`subject`).
pub fn unnamed_batch(
    subject: &str,
    sent_clock: &[(&str, u64)],
    timestamp_ms: u64,
    changes: Vec<Change>,
) -> Batch {
    Batch {
        replica_named: false,
        ..batch(subject, sent_clock, timestamp_ms, changes)
    }
}

/// A session with `batches` applied in order, each expected to be new.
pub fn session(batches: &[Batch]) -> SessionState {
    let mut state = SessionState::default();
    for batch in batches {
        apply_new(&mut state, batch);
    }
    state
}

/// Applies `batch`, expecting it to be new.
pub fn apply_new(state: &mut SessionState, batch: &Batch) -> Applied {
    match state.apply(batch) {
        Ok(Outcome::Applied(applied)) => applied,
        other => panic!("expected {batch:?} to apply, got {other:?}"),
    }
}

/// Applies `changes` to `document` with the client's rules: `set` writes the value, creating
/// missing parents and replacing non-object ones; `remove` deletes the key if present.
pub fn apply_changes(document: &mut Value, changes: &[Change]) {
    for change in changes {
        let tokens = change.path().tokens();
        let (last, parents) = tokens.split_last().expect("pointers are never empty");
        match change.value() {
            Some(value) => {
                let mut node = &mut *document;
                for token in parents {
                    if !node[token.as_str()].is_object() {
                        node[token.as_str()] = json!({});
                    }
                    node = &mut node[token.as_str()];
                }
                node[last.as_str()] = value.clone();
            }
            None => {
                let parent = parents
                    .iter()
                    .try_fold(&mut *document, |node, token| node.get_mut(token.as_str()));
                if let Some(Value::Object(object)) = parent {
                    object.remove(last);
                }
            }
        }
    }
}

/// What a store answers a catch-up from: the rows whose dots are new to `since`, found by
/// those dots alone, the rows `Reads::around_keys` names around them, the head and the base;
/// then `SessionState::changes_from_part` (`None`: the whole session must be read).
pub fn changes_from_rows(
    state: &SessionState,
    since: &VectorClock,
) -> Result<Option<Vec<Change>>, SinceRefused> {
    let all = state.all_rows();
    let new_to = |dot: &Dot| dot.sequence > since.get(&dot.replica_id).copied().unwrap_or(0);
    let new_keys: Vec<Vec<u8>> = all
        .upserts
        .iter()
        .filter(|row| new_to(&row.dot) || row.made.as_ref().is_some_and(new_to))
        .map(|row| row.key.clone())
        .collect();
    let reads = Reads::around_keys(new_keys);
    let registers = all
        .upserts
        .iter()
        .filter(|row| reads.covers(&row.key))
        .map(|row| row.register.clone())
        .collect();
    let rows = SessionRows {
        head: all.head,
        base: state.base_row(),
        registers,
        stamps: Vec::new(),
    };
    let part = SessionState::from_rows(&rows)
        .unwrap_or_else(|e| panic!("the rows around the new registers do not load: {e}"));
    part.changes_from_part(since)
}
