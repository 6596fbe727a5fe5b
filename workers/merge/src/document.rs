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
//!
//! The replay builds a [`Document`], not a `serde_json::Value`: an object a write went into
//! holds its keys in a sorted vector while it is small. A `serde_json::Map` is a B-tree whose
//! first node takes ~600 bytes, so 1,000 writes 64 levels deep (a 389 KB document) took
//! 35 MB as `Value`s and take ~5 MB as a `Document`. It serializes to the same JSON, keys in
//! the same order, without building a `Value`.

use std::collections::BTreeMap;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::register::{OrderKey, Register};

/// An object this small keeps its keys in a sorted vector; a larger one in a B-tree (so
/// inserting into an object of 20,000 keys stays `O(log n)`).
const FEW_KEYS: usize = 16;

/// A materialised document (see the module documentation). Serializes as the JSON object it
/// stands for; [`Document::to_value`] builds that as a `Value`.
#[derive(Clone, Debug)]
pub struct Document(Entries);

/// A place in the document: a value as written (or from the base), or an object a write went
/// into.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Value(Value),
    Object(Entries),
}

/// The keys of an object a write went into, sorted.
#[derive(Clone, Debug)]
pub(crate) enum Entries {
    Few(Vec<(String, Node)>),
    Many(BTreeMap<String, Node>),
}

impl Document {
    /// The document as a `serde_json::Value` (objects as `Map`s: for tests and the compacted
    /// base, not for answers).
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.to_map())
    }

    /// The place at `tokens`, following object keys only; the root for no tokens.
    pub(crate) fn get(&self, tokens: &[String]) -> Option<NodeRef<'_>> {
        let mut current = NodeRef::Entries(&self.0);
        for token in tokens {
            current = current.child(token)?;
        }
        Some(current)
    }
}

/// A borrowed place in a [`Document`].
#[derive(Clone, Copy)]
pub(crate) enum NodeRef<'d> {
    Value(&'d Value),
    Entries(&'d Entries),
}

impl<'d> NodeRef<'d> {
    fn child(self, token: &str) -> Option<NodeRef<'d>> {
        match self {
            NodeRef::Value(value) => value.as_object()?.get(token).map(NodeRef::Value),
            NodeRef::Entries(entries) => entries.get(token).map(Node::as_ref),
        }
    }

    pub(crate) fn is_object(self) -> bool {
        match self {
            NodeRef::Value(value) => value.is_object(),
            NodeRef::Entries(_) => true,
        }
    }

    /// This place as a `Value` (a change's value: bounded by what the change carries).
    pub(crate) fn to_value(self) -> Value {
        match self {
            NodeRef::Value(value) => value.clone(),
            NodeRef::Entries(entries) => Value::Object(entries.to_map()),
        }
    }
}

impl Node {
    fn as_ref(&self) -> NodeRef<'_> {
        match self {
            Node::Value(value) => NodeRef::Value(value),
            Node::Object(entries) => NodeRef::Entries(entries),
        }
    }

    fn to_value(&self) -> Value {
        self.as_ref().to_value()
    }

    /// This place as an object a write can go into: a `Value` object is opened up (its keys
    /// kept), anything else replaced by an empty object.
    fn make_object(&mut self) -> &mut Entries {
        if let Node::Value(value) = self {
            let entries = match std::mem::take(value) {
                Value::Object(map) => Entries::from_map(map),
                _ => Entries::Few(Vec::with_capacity(1)),
            };
            *self = Node::Object(entries);
        }
        match self {
            Node::Object(entries) => entries,
            // Replaced by an object just above.
            Node::Value(_) => unreachable!("a node just made an object"),
        }
    }

    /// This place as an object if it is one, opened up for a removal.
    fn existing_object(&mut self) -> Option<&mut Entries> {
        match self {
            Node::Value(Value::Object(_)) => Some(self.make_object()),
            Node::Value(_) => None,
            Node::Object(entries) => Some(entries),
        }
    }
}

impl Entries {
    fn from_map(map: Map<String, Value>) -> Entries {
        let few = map.len() <= FEW_KEYS;
        let entries = map.into_iter().map(|(k, v)| (k, Node::Value(v)));
        if few {
            // A `Map` iterates in key order: the vector is sorted.
            Entries::Few(entries.collect())
        } else {
            Entries::Many(entries.collect())
        }
    }

    fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.clone(), v.to_value()))
            .collect()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&String, &Node)> + '_> {
        match self {
            Entries::Few(few) => Box::new(few.iter().map(|(k, v)| (k, v))),
            Entries::Many(many) => Box::new(many.iter()),
        }
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Entries::Few(few) => few
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|i| &few[i].1),
            Entries::Many(many) => many.get(key),
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match self {
            Entries::Few(few) => few
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|i| &mut few[i].1),
            Entries::Many(many) => many.get_mut(key),
        }
    }

    /// The node at `key`, inserted as `null` when missing.
    fn entry(&mut self, key: &str) -> &mut Node {
        if let Entries::Few(few) = self {
            if few.len() >= FEW_KEYS && few.binary_search_by(|(k, _)| k.as_str().cmp(key)).is_err()
            {
                *self = Entries::Many(std::mem::take(few).into_iter().collect());
            }
        }
        match self {
            Entries::Few(few) => {
                let i = match few.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
                    Ok(i) => i,
                    Err(i) => {
                        few.insert(i, (key.to_owned(), Node::Value(Value::Null)));
                        i
                    }
                };
                &mut few[i].1
            }
            Entries::Many(many) => many
                .entry(key.to_owned())
                .or_insert(Node::Value(Value::Null)),
        }
    }

    fn insert(&mut self, key: &str, value: Value) {
        *self.entry(key) = Node::Value(value);
    }

    fn remove(&mut self, key: &str) {
        match self {
            Entries::Few(few) => {
                if let Ok(i) = few.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
                    few.remove(i);
                }
            }
            Entries::Many(many) => {
                many.remove(key);
            }
        }
    }
}

impl Serialize for Document {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl Serialize for Entries {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, node) in self.iter() {
            map.serialize_entry(key, node)?;
        }
        map.end()
    }
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Value(value) => value.serialize(serializer),
            Node::Object(entries) => entries.serialize(serializer),
        }
    }
}

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
) -> Document {
    materialise_with(base, writes, std::iter::empty())
}

/// [`materialise`], plus only the remembered parent-making of `parents_only` (compaction
/// folds those steps into the base while their tombstones stay).
pub(crate) fn materialise_with<'a>(
    base: &Value,
    writes: impl IntoIterator<Item = &'a Register>,
    parents_only: impl IntoIterator<Item = &'a Register>,
) -> Document {
    let writes = writes.into_iter();
    let mut steps: Vec<(OrderKey<'a>, Step<'a>)> = Vec::with_capacity(writes.size_hint().0);
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
    let mut root = Node::Value(match base {
        Value::Object(_) => base.clone(),
        _ => Value::Object(Map::new()),
    });
    let entries = root.make_object();
    for (_, step) in steps {
        match step {
            Step::Write(write) => replay(entries, write),
            Step::MakeParents(write) => {
                let tokens = write.path.tokens();
                let parents = &tokens[..tokens.len().saturating_sub(1)];
                // Creating is the point; the object found is not needed.
                let _ = object_at_creating(entries, parents);
            }
        }
    }
    match root {
        Node::Object(entries) => Document(entries),
        Node::Value(_) => Document(Entries::Few(Vec::new())),
    }
}

/// Applies one write to the document being built.
fn replay(root: &mut Entries, write: &Register) {
    let tokens = write.path.tokens();
    let Some((last, parents)) = tokens.split_last() else {
        // Pointers are never empty; nothing to replay for the root.
        return;
    };
    match &write.value {
        Some(value) => object_at_creating(root, parents).insert(last, value.clone()),
        None => {
            if let Some(parent) = object_at_existing(root, parents) {
                parent.remove(last);
            }
        }
    }
}

/// The object at `tokens` below `root`, creating objects (and replacing non-objects) on the way.
fn object_at_creating<'m>(root: &'m mut Entries, tokens: &[String]) -> &'m mut Entries {
    let mut current = root;
    for token in tokens {
        current = current.entry(token).make_object();
    }
    current
}

/// The object at `tokens` below `root`, if every step exists and is an object.
fn object_at_existing<'m>(root: &'m mut Entries, tokens: &[String]) -> Option<&'m mut Entries> {
    let mut current = root;
    for token in tokens {
        current = current.get_mut(token)?.existing_object()?;
    }
    Some(current)
}
