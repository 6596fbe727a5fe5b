//! Materialising the surviving writes into one plain JSON document.
//!
//! The writes are replayed on an empty object in order-key order:
//!
//! * `set /a/b v` walks from the root, turning every missing or non-object parent (a scalar, an
//!   array, `null`) into an object, then puts `v` at key `b`, replacing whatever was there.
//! * `remove /a/b` (a tombstone) deletes key `b` of the object at `/a`; when `/a` is missing or
//!   not an object there is nothing to delete and the document is left as it is.
//! * A tombstone that hid a `set` at or below its path also replays, at that set's key, the
//!   set's effect on the parents (missing or non-object parents become objects), so a value
//!   the set overwrote never comes back when the set itself is removed.
//!
//! Tokens are always object keys (`/a/0` is key `"0"`), never array positions. Because the
//! writes are sorted by their keys first, the document depends only on the set of surviving
//! writes, never on the order they arrived in.

use serde_json::{Map, Value};

use crate::register::{OrderKey, Register};

/// One step of the replay: a register's own write, or the moment a `set` a tombstone hid made
/// the tombstone's parents objects.
enum Step<'a> {
    Write(&'a Register),
    MakeParents(&'a Register),
}

/// Replays `writes` in order-key order on `base` (the session's compacted prefix, `{}` when
/// never compacted).
pub(crate) fn materialise<'a>(
    base: &Value,
    writes: impl IntoIterator<Item = &'a Register>,
) -> Value {
    materialise_with(base, writes, std::iter::empty())
}

/// [`materialise`], plus only the remembered parent-making of `parents_only` (compaction
/// folds those steps into the base while their tombstones stay).
pub(crate) fn materialise_with<'a>(
    base: &Value,
    writes: impl IntoIterator<Item = &'a Register>,
    parents_only: impl IntoIterator<Item = &'a Register>,
) -> Value {
    let mut steps: Vec<(OrderKey<'a>, Step<'a>)> = Vec::new();
    for write in writes {
        steps.push((write.order_key(), Step::Write(write)));
        if let (None, Some(made)) = (&write.value, &write.parents_made) {
            steps.push((made.order_key(), Step::MakeParents(write)));
        }
    }
    for tombstone in parents_only {
        if let Some(made) = &tombstone.parents_made {
            steps.push((made.order_key(), Step::MakeParents(tombstone)));
        }
    }
    // Keys are unique per write; a hidden set's key is remembered by one tombstone at most
    // once, and making parents objects twice is the same as once, so ties cannot matter.
    steps.sort_by(|left, right| left.0.cmp(&right.0));
    let mut root = base.as_object().cloned().unwrap_or_default();
    for (_, step) in steps {
        match step {
            Step::Write(write) => replay(&mut root, write),
            Step::MakeParents(write) => {
                let tokens = write.path.tokens();
                let parents = &tokens[..tokens.len().saturating_sub(1)];
                // Creating is the point; the object found is not needed.
                let _ = object_at_creating(&mut root, parents);
            }
        }
    }
    Value::Object(root)
}

/// Applies one write to the document being built.
fn replay(root: &mut Map<String, Value>, write: &Register) {
    let tokens = write.path.tokens();
    let Some((last, parents)) = tokens.split_last() else {
        // Pointers are never empty; nothing to replay for the root.
        return;
    };
    match &write.value {
        Some(value) => {
            if let Some(parent) = object_at_creating(root, parents) {
                parent.insert(last.clone(), value.clone());
            }
        }
        None => {
            if let Some(parent) = object_at_existing(root, parents) {
                parent.remove(last);
            }
        }
    }
}

/// The object at `tokens` below `root`, creating objects (and replacing non-objects) on the way.
/// Always `Some`; the `Option` only spares a panic path.
fn object_at_creating<'m>(
    root: &'m mut Map<String, Value>,
    tokens: &[String],
) -> Option<&'m mut Map<String, Value>> {
    let mut current = root;
    for token in tokens {
        let slot = current.entry(token.clone()).or_insert(Value::Null);
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        current = slot.as_object_mut()?;
    }
    Some(current)
}

/// The object at `tokens` below `root`, if every step exists and is an object.
fn object_at_existing<'m>(
    root: &'m mut Map<String, Value>,
    tokens: &[String],
) -> Option<&'m mut Map<String, Value>> {
    let mut current = root;
    for token in tokens {
        current = current.get_mut(token)?.as_object_mut()?;
    }
    Some(current)
}
