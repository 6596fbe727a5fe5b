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
}
