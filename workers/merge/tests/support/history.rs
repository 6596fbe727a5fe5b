//! Random multi-replica histories for the property tests, and their delivery to a session.
//!
//! A history is a script of steps for 3–5 replicas and one technician with two tablets that
//! send no `replica_id`: an *edit* makes one batch of sets and removes over deliberately
//! overlapping paths, stamped with the actor's current knowledge and a random device time
//! (which goes backwards as often as forwards); a *learn* step copies one actor's knowledge
//! into another, as a sync would.

use firemode_merge::{Batch, Change, Outcome, SessionState, VectorClock};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Value};

use super::pointer;

/// Replica names, deliberately not in index order.
pub const REPLICAS: [&str; 5] = ["tablet-7", "tablet-3", "b", "zz", "a"];

/// The technician who sends without `replica_id` from two tablets (devices 0 and 1): the
/// server names both `TECH` and numbers their batches in arrival order.
pub const TECH: &str = "m";

/// Where a device's knowledge is kept: the named replicas first, then the two tablets.
pub fn actor_slot(actor: Actor) -> usize {
    match actor {
        Actor::Named(replica) => replica,
        Actor::Device(device) => REPLICAS.len() + device,
    }
}

/// Who makes an edit.
#[derive(Clone, Copy, Debug)]
pub enum Actor {
    /// A replica that names itself.
    Named(usize),
    /// One of `TECH`'s two tablets, sending no `replica_id`.
    Device(usize),
}

/// Overlapping paths: ancestors, descendants, siblings and an escaped key.
pub const PATHS: [&str; 10] = [
    "/a",
    "/a/b",
    "/a/b/c",
    "/a/d",
    "/x",
    "/x/y",
    "/a~1b",
    "/a/b/c/d",
    // Keys over 16 bytes: stored by digest in the row layout.
    "/a/a-key-longer-than-sixteen-bytes",
    "/a/a-key-longer-than-sixteen-bytes/z",
];

pub fn values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!("s"),
        json!(null),
        json!({"k": 1}),
        json!([1, 2]),
        json!({"b": {"c": 3}}),
    ]
}

/// One step of a history script.
#[derive(Clone, Debug)]
pub enum Step {
    Edit {
        actor: Actor,
        timestamp: u64,
        /// Path index, and a value for a set or `None` for a remove.
        changes: Vec<(usize, Option<Value>)>,
        /// Send no own clock entry: the server assigns the sequence number.
        omit_own: bool,
        /// Per replica (and `TECH` last), whether to send a smaller entry than known (a partial
        /// causal past).
        understate: Vec<bool>,
    },
    Learn {
        from: Actor,
        to: Actor,
    },
}

/// A generated batch and the dot it must get.
#[derive(Clone, Debug)]
pub struct Generated {
    pub batch: Batch,
    pub sequence: u64,
    /// The server assigns the sequence number: delivered once, in its replica's order.
    pub assigned: bool,
}

pub fn actor(replicas: usize) -> impl Strategy<Value = Actor> {
    prop_oneof![
        5 => (0..replicas).prop_map(Actor::Named),
        1 => (0..2usize).prop_map(Actor::Device),
    ]
}

pub fn edit(replicas: usize) -> impl Strategy<Value = Step> {
    let timestamp = prop_oneof![20 => 0u64..40, 1 => Just(u64::MAX - 1), 1 => Just(u64::MAX)];
    let change = (
        0..PATHS.len(),
        prop::option::weighted(0.7, select(values())),
    );
    (
        actor(replicas),
        timestamp,
        vec(change, 0..4),
        prop::bool::weighted(0.15),
        vec(prop::bool::weighted(0.2), REPLICAS.len() + 1),
    )
        .prop_map(
            |(actor, timestamp, changes, omit_own, understate)| Step::Edit {
                actor,
                timestamp,
                changes,
                omit_own,
                understate,
            },
        )
}

pub fn step(replicas: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => edit(replicas),
        2 => (actor(replicas), actor(replicas)).prop_map(|(from, to)| Step::Learn { from, to }),
    ]
}

/// A script that makes at least one batch.
pub fn script(max_steps: usize) -> impl Strategy<Value = Vec<Step>> {
    (3usize..=5).prop_flat_map(move |replicas| {
        (edit(replicas), vec(step(replicas), 0..max_steps)).prop_map(|(first, mut rest)| {
            rest.insert(0, first);
            rest
        })
    })
}

/// Runs a script, returning its batches in generation order (a causally valid order).
pub fn generate(script: &[Step]) -> Vec<Generated> {
    generate_with_knowledge(script).0
}

/// Runs a script: its batches in generation order, and what every actor knows at the end
/// (each a causally closed clock).
pub fn generate_with_knowledge(script: &[Step]) -> (Vec<Generated>, Vec<VectorClock>) {
    let mut knowledge: Vec<VectorClock> = vec![VectorClock::new(); REPLICAS.len() + 2];
    let mut tech_events = 0;
    let mut generated = Vec::new();
    for step in script {
        match step {
            Step::Edit {
                actor,
                timestamp,
                changes,
                omit_own,
                understate,
            } => {
                let slot = actor_slot(*actor);
                let (name, named) = match actor {
                    Actor::Named(replica) => (REPLICAS[*replica], true),
                    Actor::Device(_) => (TECH, false),
                };
                let sequence = if named {
                    knowledge[slot].get(name).copied().unwrap_or(0) + 1
                } else {
                    tech_events += 1;
                    tech_events
                };
                let mut clock = knowledge[slot].clone();
                for (other, count) in clock.iter_mut() {
                    let position = REPLICAS
                        .iter()
                        .position(|known| known == other)
                        .unwrap_or(REPLICAS.len());
                    if (other != name || !named) && understate[position] {
                        *count /= 2;
                    }
                }
                clock.retain(|_, count| *count > 0);
                if named {
                    clock.insert(name.to_owned(), sequence);
                    if *omit_own {
                        clock.remove(name);
                    }
                }
                // The device knows its own event once the server answered its number.
                knowledge[slot].insert(name.to_owned(), sequence);
                let changes = changes
                    .iter()
                    .map(|(path, value)| match value {
                        Some(value) => Change::Set {
                            path: pointer(PATHS[*path]),
                            value: value.clone(),
                        },
                        None => Change::Remove {
                            path: pointer(PATHS[*path]),
                        },
                    })
                    .collect();
                let batch = Batch {
                    replica_id: name.to_owned(),
                    replica_named: named,
                    clock,
                    timestamp_ms: *timestamp,
                    changes,
                };
                generated.push(Generated {
                    batch,
                    sequence,
                    assigned: *omit_own || !named,
                });
            }
            Step::Learn { from, to } => {
                let learned = knowledge[actor_slot(*from)].clone();
                for (replica, count) in learned {
                    let entry = knowledge[actor_slot(*to)].entry(replica).or_insert(0);
                    *entry = (*entry).max(count);
                }
            }
        }
    }
    (generated, knowledge)
}

/// Every batch once, plus some duplicates, shuffled.
pub fn delivery_order(batches: usize) -> impl Strategy<Value = Vec<usize>> {
    vec(0..batches, 0..=batches / 2).prop_flat_map(move |duplicates| {
        let mut order: Vec<usize> = (0..batches).collect();
        order.extend(duplicates);
        Just(order).prop_shuffle()
    })
}

/// Delivers in `order`; a refused batch waits and is retried after each later success.
pub fn deliver(batches: &[Generated], order: &[usize]) -> Result<SessionState, TestCaseError> {
    let mut state = SessionState::default();
    let mut delivered = vec![false; batches.len()];
    let mut waiting: Vec<usize> = Vec::new();
    for &index in order {
        if attempt(&mut state, batches, &mut delivered, index)? {
            // Retry the waiting batches until a full pass makes no progress.
            loop {
                let before = waiting.len();
                let mut still_waiting = Vec::new();
                for waiter in waiting {
                    if !attempt(&mut state, batches, &mut delivered, waiter)? {
                        still_waiting.push(waiter);
                    }
                }
                waiting = still_waiting;
                if waiting.len() == before {
                    break;
                }
            }
        } else {
            waiting.push(index);
        }
    }
    prop_assert!(waiting.is_empty(), "batches never delivered: {:?}", waiting);
    prop_assert!(delivered.iter().all(|done| *done));
    Ok(state)
}

/// One delivery attempt; `Ok(false)` when the batch was refused (or held back) and must wait.
pub fn attempt(
    state: &mut SessionState,
    batches: &[Generated],
    delivered: &mut [bool],
    index: usize,
) -> Result<bool, TestCaseError> {
    let generated = &batches[index];
    let replica = generated.batch.replica_id.as_str();
    if generated.assigned {
        // Without its own entry a batch is only an event relative to the server's clock: the
        // client (through its Idempotency-Key) sends it once, after its predecessor.
        if delivered[index] {
            return Ok(true);
        }
        if state.clock().get(replica).copied().unwrap_or(0) + 1 != generated.sequence {
            return Ok(false);
        }
    }
    let before = state.clone();
    match state.apply(&generated.batch) {
        Err(refusal) => {
            let firemode_merge::NotApplied::MissingDependencies(refusal) = refusal else {
                return Err(TestCaseError::fail(format!("refused: {refusal}")));
            };
            prop_assert_eq!(&refusal.session_clock, before.clock());
            prop_assert_eq!(&*state, &before, "a refused batch changed the state");
            prop_assert!(!delivered[index]);
            Ok(false)
        }
        Ok(Outcome::Duplicate) => {
            prop_assert!(delivered[index], "a new batch was taken for a duplicate");
            prop_assert_eq!(&*state, &before, "a duplicate changed the state");
            Ok(true)
        }
        Ok(Outcome::Applied(applied)) => {
            prop_assert!(!delivered[index], "a batch was applied twice");
            prop_assert_eq!(applied.dot, (replica.to_owned(), generated.sequence));
            prop_assert!(applied.effective_timestamp >= generated.batch.timestamp_ms);
            prop_assert!(applied.applied <= generated.batch.changes.len());
            for conflict in &applied.conflicts {
                if generated.batch.replica_named {
                    prop_assert_ne!(&conflict.winner.replica_id, &conflict.loser.replica_id);
                }
                prop_assert!(
                    conflict.winner.replica_id == replica || conflict.loser.replica_id == replica
                );
            }
            delivered[index] = true;
            Ok(true)
        }
    }
}
