//! Materialising the surviving writes into one plain JSON document.
//!
//! The writes are replayed on an empty object in order-key order:
//!
//! * `set /a/b v` walks from the root, turning every missing or non-object parent (a scalar, an
//!   array, `null`) into an object, then puts `v` at key `b`, replacing whatever was there.
//! * `remove /a/b` (a tombstone) deletes key `b` of the object at `/a`; when `/a` is missing or
//!   not an object there is nothing to delete and the document is left as it is.
//!
//! Tokens are always object keys (`/a/0` is key `"0"`), never array positions. Because the
//! writes are sorted by their keys first, the document depends only on the set of surviving
//! writes, never on the order they arrived in.

use serde_json::{Map, Value};

use crate::register::Register;

/// Replays `writes` in order-key order on `{}`.
pub(crate) fn materialise<'a>(writes: impl IntoIterator<Item = &'a Register>) -> Value {
    let mut ordered: Vec<&Register> = writes.into_iter().collect();
    ordered.sort_by(|left, right| left.cmp_order(right));
    let mut root = Map::new();
    for write in ordered {
        let tokens = write.path.tokens();
        let Some((last, parents)) = tokens.split_last() else {
            // Pointers are never empty; nothing to replay for the root.
            continue;
        };
        match &write.value {
            Some(value) => {
                if let Some(parent) = object_at_creating(&mut root, parents) {
                    parent.insert(last.clone(), value.clone());
                }
            }
            None => {
                if let Some(parent) = object_at_existing(&mut root, parents) {
                    parent.remove(last);
                }
            }
        }
    }
    Value::Object(root)
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
