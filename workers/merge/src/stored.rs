//! Reading a saved [`SessionState`] back, refusing one that breaks the state's invariants.
//!
//! A store hands back whatever JSON it kept; a hand-edited or truncated value must fail here
//! with a message rather than make a later merge diverge.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::register::Register;
use crate::stamps::Stamps;
use crate::state::Touched;
use crate::{Pointer, SessionState, VectorClock};

/// The serialized shape of a [`SessionState`], before its invariants are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredSession {
    #[serde(default)]
    clock: VectorClock,
    #[serde(default)]
    stamps: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    registers: Vec<Register>,
    /// Absent in states saved before replicas had owners.
    #[serde(default)]
    owners: BTreeMap<String, String>,
    /// Absent before the first compaction.
    #[serde(default)]
    base: Option<serde_json::Value>,
    #[serde(default)]
    horizon: VectorClock,
    #[serde(default)]
    checkpoints: Vec<crate::Checkpoint>,
}

/// Why a saved session state (one value, or its rows) was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptState(pub(crate) String);

impl std::error::Error for CorruptState {}

impl fmt::Display for CorruptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt session state: {}", self.0)
    }
}

impl TryFrom<StoredSession> for SessionState {
    type Error = CorruptState;

    fn try_from(stored: StoredSession) -> Result<Self, Self::Error> {
        check_clock_and_stamps(&stored.clock, &stored.stamps)?;
        let mut stamps = Stamps::default();
        for (replica, list) in &stored.stamps {
            for (sequence, &stamp) in (1u64..).zip(list) {
                stamps.insert(replica, sequence, stamp);
            }
        }
        let mut registers: BTreeMap<Pointer, Register> = BTreeMap::new();
        for register in stored.registers {
            check_register(&register, &stamps)?;
            if let Some(previous) = registers.insert(register.path.clone(), register) {
                return Err(CorruptState(format!("two registers at {}", previous.path)));
            }
        }
        check_none_hidden(&registers)?;
        let base = check_base(stored.base)?;
        check_within_clock(&stored.clock, &stored.horizon, &stored.checkpoints)?;
        Ok(SessionState {
            clock: stored.clock,
            stamps,
            registers,
            owners: stored.owners,
            base,
            horizon: stored.horizon,
            checkpoints: stored.checkpoints,
            touched: Touched::default(),
        })
    }
}

/// No register may sit below a larger write at an ancestor path (that write hid it).
pub(crate) fn check_none_hidden(
    registers: &BTreeMap<Pointer, Register>,
) -> Result<(), CorruptState> {
    for register in registers.values() {
        let tokens = register.path.tokens();
        let hidden_by = (1..tokens.len())
            .filter_map(|depth| registers.get(&tokens[..depth]))
            .find(|ancestor| ancestor.cmp_order(register).is_gt());
        if let Some(ancestor) = hidden_by {
            return Err(CorruptState(format!(
                "register {} is hidden by the larger write at {}",
                register.path, ancestor.path
            )));
        }
    }
    Ok(())
}

/// The compacted base document: `{}` when absent, and always an object.
pub(crate) fn check_base(
    base: Option<serde_json::Value>,
) -> Result<serde_json::Value, CorruptState> {
    let base = base.unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new()));
    if !base.is_object() {
        return Err(CorruptState(
            "the base document is not an object".to_owned(),
        ));
    }
    Ok(base)
}

/// The horizon and every checkpoint name only applied events.
pub(crate) fn check_within_clock(
    clock: &VectorClock,
    horizon: &VectorClock,
    checkpoints: &[crate::Checkpoint],
) -> Result<(), CorruptState> {
    let ahead = |other: &VectorClock| {
        other
            .iter()
            .any(|(replica, &count)| count > clock.get(replica).copied().unwrap_or(0))
    };
    if ahead(horizon) || checkpoints.iter().any(|c| ahead(&c.clock)) {
        return Err(CorruptState(
            "the horizon or a checkpoint names events the clock does not".to_owned(),
        ));
    }
    Ok(())
}

/// A register's event, and the hidden `set` a tombstone remembers, must be applied events with
/// the stamps recorded for them; only a tombstone remembers, and only an earlier write.
pub(crate) fn check_register(register: &Register, stamps: &Stamps) -> Result<(), CorruptState> {
    check_register_within(register, |replica, sequence, timestamp| {
        stamps
            .get(replica, sequence)
            .is_some_and(|largest| timestamp <= largest)
    })
}

/// [`check_register`] with `within(replica, sequence, timestamp)` saying whether that event
/// is applied and may carry that stamp.
pub(crate) fn check_register_within(
    register: &Register,
    within: impl Fn(&str, u64, u64) -> bool,
) -> Result<(), CorruptState> {
    if !within(&register.replica_id, register.sequence, register.timestamp) {
        return Err(CorruptState(format!(
            "register {} claims event ({:?}, {}) stamped {}, which the stamps do not allow",
            register.path, register.replica_id, register.sequence, register.timestamp
        )));
    }
    if let Some(made) = &register.parents_made {
        let known = within(&made.replica_id, made.sequence, made.timestamp);
        let earlier = made.order_key() < register.order_key();
        if register.value.is_some() || !known || !earlier {
            return Err(CorruptState(format!(
                "register {} remembers a hidden write ({:?}, {}) that is not an earlier applied event, or is not a tombstone",
                register.path, made.replica_id, made.sequence
            )));
        }
    }
    Ok(())
}

/// `clock[r]` must count `stamps[r]`, with no empty entries, and the stamps (running maxima)
/// must not decrease.
fn check_clock_and_stamps(
    clock: &VectorClock,
    stamps: &BTreeMap<String, Vec<u64>>,
) -> Result<(), CorruptState> {
    if clock.len() != stamps.len() {
        return Err(CorruptState(
            "the clock and the stamps name different replicas".to_owned(),
        ));
    }
    for (replica, replica_stamps) in stamps {
        let count = u64::try_from(replica_stamps.len()).ok();
        if replica_stamps.is_empty() || clock.get(replica).copied() != count {
            return Err(CorruptState(format!(
                "clock[{replica:?}] does not count its {} stamps",
                replica_stamps.len()
            )));
        }
        let increasing = replica_stamps.windows(2).all(|pair| pair[0] <= pair[1]);
        if !increasing {
            return Err(CorruptState(format!("the stamps of {replica:?} decrease")));
        }
    }
    Ok(())
}
