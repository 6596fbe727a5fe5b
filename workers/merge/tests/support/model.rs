//! A reference model of the merge, for the property tests: the document and clock computed
//! from a whole history at once, in the most direct way: every write replayed in stamp order.

use std::collections::BTreeMap;

use firemode_merge::{Batch, VectorClock};
use serde_json::{json, Map, Value};

/// A write as the reference model sees it, with its order key.
struct ModelWrite {
    tokens: Vec<String>,
    value: Option<Value>,
    key: (u64, String, u64, usize),
}

/// The document and clock computed from the whole history at once by the rule of design §3,
/// written independently of the session's registers: every write of every batch, stamped by
/// the design's formula, replayed on `{}` in stamp order (a `set` writes its value, turning
/// missing and non-object parents into objects; a `remove` deletes the key if its parent
/// exists). Nothing is pruned, so a value overwritten once never comes back.
///
/// `batches` come in a causally valid order, each with the sequence number it must get.
pub fn reference<'b>(batches: impl IntoIterator<Item = (&'b Batch, u64)>) -> (Value, VectorClock) {
    let (writes, stamps) = stamped_writes(batches);
    (replay(writes), clock_of(&stamps))
}

/// The document of exactly `batches` (a causally closed subset, in a causally valid order):
/// the document a client holds at the clock those batches make.
pub fn document_of<'b>(batches: impl IntoIterator<Item = (&'b Batch, u64)>) -> Value {
    replay(stamped_writes(batches).0)
}

type Stamps = BTreeMap<String, Vec<u64>>;

/// Every write with its order key: (effective timestamp, replica, sequence, index).
fn stamped_writes<'b>(
    batches: impl IntoIterator<Item = (&'b Batch, u64)>,
) -> (Vec<ModelWrite>, Stamps) {
    let mut stamps: Stamps = BTreeMap::new();
    let mut writes = Vec::new();
    for (batch, sequence) in batches {
        // The causal past: every event the clock names, and a named replica's own earlier
        // events; the floor is the largest stamp among them.
        let own_past = if batch.replica_named { sequence - 1 } else { 0 };
        let past = batch
            .clock
            .iter()
            .map(|(replica, count)| (replica.as_str(), *count))
            .chain([(batch.replica_id.as_str(), own_past)]);
        let mut floor: Option<u64> = None;
        for (replica, count) in past {
            let list = stamps.get(replica).map(Vec::as_slice).unwrap_or(&[]);
            let covered = list.iter().take(count as usize).copied().max();
            floor = floor.max(covered);
        }
        let stamp = match floor {
            Some(floor) => batch.timestamp_ms.max(floor.saturating_add(1)),
            None => batch.timestamp_ms,
        };
        let list = stamps.entry(batch.replica_id.clone()).or_default();
        // A sequence number the model is told must be the next one of its replica.
        assert_eq!(
            list.len() as u64 + 1,
            sequence,
            "batches out of causal order"
        );
        list.push(stamp);
        for (index, change) in batch.changes.iter().enumerate() {
            writes.push(ModelWrite {
                tokens: change.path().tokens().to_vec(),
                value: change.value().cloned(),
                key: (stamp, batch.replica_id.clone(), sequence, index),
            });
        }
    }
    (writes, stamps)
}

fn clock_of(stamps: &Stamps) -> VectorClock {
    stamps
        .iter()
        .map(|(replica, list)| (replica.clone(), list.len() as u64))
        .collect()
}

/// Every write, in key order, on `{}`.
fn replay(mut writes: Vec<ModelWrite>) -> Value {
    writes.sort_by(|left, right| left.key.cmp(&right.key));
    let mut document = Value::Object(Map::new());
    for write in writes {
        let (last, parents) = write.tokens.split_last().expect("pointers are never empty");
        match write.value {
            Some(value) => {
                let mut node = &mut document;
                for token in parents {
                    if !node[token.as_str()].is_object() {
                        node[token.as_str()] = json!({});
                    }
                    node = &mut node[token.as_str()];
                }
                node[last.as_str()] = value;
            }
            None => {
                if let Some(object) = existing_object(&mut document, parents) {
                    object.remove(last);
                }
            }
        }
    }
    document
}

/// The object at `tokens`, if every step exists and is an object.
fn existing_object<'v>(
    mut node: &'v mut Value,
    tokens: &[String],
) -> Option<&'v mut Map<String, Value>> {
    for token in tokens {
        node = node.get_mut(token.as_str())?;
    }
    node.as_object_mut()
}
