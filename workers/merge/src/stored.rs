//! Reading a saved [`SessionState`] back, refusing one that breaks the state's invariants.
//!
//! A store hands back whatever JSON it kept; a hand-edited or truncated value must fail here
//! with a message rather than make a later merge diverge.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::register::Register;
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
}

/// Why a saved session state was refused.
#[derive(Debug)]
pub(crate) struct CorruptState(String);

impl fmt::Display for CorruptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt session state: {}", self.0)
    }
}

impl TryFrom<StoredSession> for SessionState {
    type Error = CorruptState;

    fn try_from(stored: StoredSession) -> Result<Self, Self::Error> {
        check_clock_and_stamps(&stored.clock, &stored.stamps)?;
        let mut registers: BTreeMap<Pointer, Register> = BTreeMap::new();
        for register in stored.registers {
            let stamp = usize::try_from(register.sequence)
                .ok()
                .and_then(|sequence| sequence.checked_sub(1))
                .and_then(|position| stored.stamps.get(&register.replica_id)?.get(position));
            if stamp != Some(&register.timestamp) {
                return Err(CorruptState(format!(
                    "register {} claims event ({:?}, {}) stamped {}, which the stamps do not record",
                    register.path, register.replica_id, register.sequence, register.timestamp
                )));
            }
            if let Some(previous) = registers.insert(register.path.clone(), register) {
                return Err(CorruptState(format!("two registers at {}", previous.path)));
            }
        }
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
        Ok(SessionState {
            clock: stored.clock,
            stamps: stored.stamps,
            registers,
            owners: stored.owners,
        })
    }
}

/// `clock[r]` must count `stamps[r]`, with no empty entries, and stamps must increase (they can
/// only repeat once saturated at `u64::MAX`).
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
        let increasing = replica_stamps
            .windows(2)
            .all(|pair| pair[0] < pair[1] || pair[1] == u64::MAX);
        if !increasing {
            return Err(CorruptState(format!(
                "the stamps of {replica:?} do not increase"
            )));
        }
    }
    Ok(())
}
