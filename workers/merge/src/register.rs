//! One surviving write: a value or a tombstone at one path, with the dot and stamp it came with.

use std::cmp::Ordering;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::Pointer;

/// A write the session keeps: the largest-keyed write at its path that no write at an
/// ancestor path hides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Register {
    /// Where the write landed.
    pub(crate) path: Pointer,
    /// The value written; absent for a tombstone (`remove`). A `null` value is `Some(Null)`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub(crate) value: Option<Value>,
    /// The writer; with `sequence` this is the batch's dot.
    pub(crate) replica_id: String,
    /// The writer's sequence number of the batch.
    pub(crate) sequence: u64,
    /// The batch's effective timestamp (ms).
    pub(crate) timestamp: u64,
    /// Position of the change within its batch.
    pub(crate) index: usize,
    /// Tombstones only: the largest key of a `set` at this path or below that this tombstone
    /// hid or replaced. At that key the set turned every parent of `path` into an object, and
    /// that stays so after the set is gone (design §3: `set /a 5`, `set /a/b 1`, `remove /a/b`
    /// reads `{"a":{}}`). `None` when no hidden set is known. Boxed: most registers have none,
    /// and inline it took 40 of a register's 144 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) parents_made: Option<Box<WriteKey>>,
}

/// A write's place in the order that decides races, owned: (effective timestamp, replica id,
/// sequence, index in its batch).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct WriteKey {
    pub(crate) timestamp: u64,
    pub(crate) replica_id: String,
    pub(crate) sequence: u64,
    pub(crate) index: usize,
}

impl WriteKey {
    /// The key in its borrowed form, to compare with [`Register::order_key`].
    pub(crate) fn order_key(&self) -> OrderKey<'_> {
        OrderKey {
            timestamp: self.timestamp,
            replica_id: &self.replica_id,
            sequence: self.sequence,
            index: self.index,
        }
    }
}

/// A field that is present in the stored JSON is a value, even when it is `null`.
fn present_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// The total order that decides every race: (effective timestamp, replica id, sequence, index).
///
/// The design orders writes by (effective timestamp, replica id) and, inside a batch, by list
/// position. The sequence number only matters if a replica's stamps stop increasing, which
/// takes a timestamp saturating at `u64::MAX`; it keeps the order total even then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct OrderKey<'a> {
    timestamp: u64,
    replica_id: &'a str,
    sequence: u64,
    index: usize,
}

impl Register {
    /// This write's place in the order that decides races.
    pub(crate) fn order_key(&self) -> OrderKey<'_> {
        OrderKey {
            timestamp: self.timestamp,
            replica_id: &self.replica_id,
            sequence: self.sequence,
            index: self.index,
        }
    }

    /// Orders two writes by their keys.
    pub(crate) fn cmp_order(&self, other: &Register) -> Ordering {
        self.order_key().cmp(&other.order_key())
    }

    /// This write's key, owned.
    pub(crate) fn write_key(&self) -> WriteKey {
        WriteKey {
            timestamp: self.timestamp,
            replica_id: self.replica_id.clone(),
            sequence: self.sequence,
            index: self.index,
        }
    }

    /// The latest key at which this write, or a `set` it hid, made the parents of its path
    /// objects: its own key for a `set`, what it remembers for a tombstone.
    pub(crate) fn parents_made_key(&self) -> Option<WriteKey> {
        match self.value {
            Some(_) => Some(self.write_key()),
            None => self.parents_made.as_deref().cloned(),
        }
    }

    /// A tombstone remembers `key` if it is later than what it knew; a `set` needs nothing:
    /// its own, larger key makes the same parents objects later.
    pub(crate) fn remember_parents_made(&mut self, key: Option<WriteKey>) {
        if self.value.is_some() {
            return;
        }
        if key.as_ref() > self.parents_made.as_deref() {
            self.parents_made = key.map(Box::new);
        }
    }
}
