//! A reference model of the merge, for the property tests: the document and clock computed
//! from a whole history at once, in the most direct way, without the session's incremental
//! pruning.

use std::collections::BTreeMap;

use firemode_merge::{Batch, VectorClock};
use serde_json::{json, Map, Value};

/// A write as the reference model sees it, with its order key.
struct ModelWrite {
    tokens: Vec<String>,
    value: Option<Value>,
    key: (u64, String, u64, usize),
}

/// The document and clock computed from the whole history at once, without the session's
/// incremental pruning: stamps by the design's formula, then per the survivor rule.
///
/// `batches` come in a causally valid order, each with the sequence number it must get.
pub fn reference<'b>(batches: impl IntoIterator<Item = (&'b Batch, u64)>) -> (Value, VectorClock) {
    let mut stamps: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut writes = Vec::new();
    for (batch, sequence) in batches {
        let stamp_of = |replica: &str, sequence: u64| {
            sequence
                .checked_sub(1)
                .and_then(|position| stamps.get(replica)?.get(position as usize).copied())
        };
        let covered = batch
            .clock
            .iter()
            .filter(|(replica, _)| **replica != batch.replica_id)
            .filter_map(|(replica, count)| stamp_of(replica, *count))
            .chain(stamp_of(&batch.replica_id, sequence - 1));
        let stamp = match covered.max() {
            Some(floor) => batch.timestamp_ms.max(floor.saturating_add(1)),
            None => batch.timestamp_ms,
        };
        stamps
            .entry(batch.replica_id.clone())
            .or_default()
            .push(stamp);
        for (index, change) in batch.changes.iter().enumerate() {
            writes.push(ModelWrite {
                tokens: change.path().tokens().to_vec(),
                value: change.value().cloned(),
                key: (stamp, batch.replica_id.clone(), sequence, index),
            });
        }
    }
    let mut survivors: Vec<&ModelWrite> = writes
        .iter()
        .filter(|write| {
            !writes
                .iter()
                .any(|other| write.tokens.starts_with(&other.tokens) && other.key > write.key)
        })
        .collect();
    survivors.sort_by(|left, right| left.key.cmp(&right.key));
    let mut document = Value::Object(Map::new());
    for write in survivors {
        let (last, parents) = write.tokens.split_last().expect("pointers are never empty");
        match &write.value {
            Some(value) => {
                let mut node = &mut document;
                for token in parents {
                    if !node[token.as_str()].is_object() {
                        node[token.as_str()] = json!({});
                    }
                    node = &mut node[token.as_str()];
                }
                node[last.as_str()] = value.clone();
            }
            None => {
                if let Some(object) = existing_object(&mut document, parents) {
                    object.remove(last);
                }
            }
        }
    }
    let clock = stamps
        .iter()
        .map(|(replica, list)| (replica.clone(), list.len() as u64))
        .collect();
    (document, clock)
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
