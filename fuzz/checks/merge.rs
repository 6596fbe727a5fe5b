// Fuzz check `merge`: the sync CRDT converges whatever the delivery order.
//
// The input bytes drive a history script for three replicas over overlapping paths (an edit
// makes one batch of sets and removes, stamped with the replica's current knowledge, possibly
// understating other replicas or leaving its own entry out; a learn step copies one replica's
// knowledge into another, as a sync would). The batches are then delivered to fresh sessions in
// two byte-chosen shuffled orders and in generation order, with duplicates re-sent, where a
// refused batch waits and is retried after every later success.
//
// Invariants: every batch is eventually applied exactly once with the dot it must get; a refused
// batch or a duplicate changes nothing; all three sessions end with the same `document()`,
// `clock()` and serialized JSON; the clock counts each replica's batches; the saved state loads
// back equal.
//
// Shared by `fuzz/fuzz_targets/merge.rs` and `tests/e2e/fuzz_corpus.rs` (through `include!`),
// so it uses only firemode-merge and serde_json.

use firemode_merge::{Batch, Change, Outcome, Pointer, SessionState, VectorClock};
use serde_json::{json, Value};

/// Replica names, deliberately not in index order.
const REPLICAS: [&str; 3] = ["tablet-7", "b", "a"];

/// Overlapping paths: ancestors, descendants and a sibling.
const PATHS: [&str; 4] = ["/a", "/a/b", "/a/b/c", "/x"];

/// The most history steps one input makes (keeps each run fast).
const MAX_STEPS: usize = 40;

/// Reads the input a byte at a time; zeros once it runs out, so every input is a full script.
struct Bytes<'a> {
    data: &'a [u8],
    position: usize,
}

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        let byte = self.data.get(self.position).copied().unwrap_or(0);
        self.position += 1;
        byte
    }

    fn exhausted(&self) -> bool {
        self.position >= self.data.len()
    }

    /// A number in `0..n` (`n` at most 256).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.next()) % n
    }
}

fn value(choice: usize) -> Value {
    match choice % 7 {
        0 => json!(0),
        1 => json!(1),
        2 => json!("s"),
        3 => json!(null),
        4 => json!({"k": 1}),
        5 => json!([1, 2]),
        _ => json!({"b": {"c": 3}}),
    }
}

fn timestamp(choice: u8) -> u64 {
    match choice {
        254 => u64::MAX - 1,
        255 => u64::MAX,
        // Device clocks go backwards as often as forwards.
        other => u64::from(other % 40),
    }
}

/// A generated batch and the sequence number (dot) it must get.
struct Generated {
    batch: Batch,
    sequence: u64,
    omit_own: bool,
}

/// Runs the script the bytes describe; returns the batches in generation order (causally valid).
fn generate(bytes: &mut Bytes<'_>) -> Vec<Generated> {
    let mut knowledge: Vec<VectorClock> = vec![VectorClock::new(); REPLICAS.len()];
    let mut generated = Vec::new();
    let steps = 1 + bytes.below(MAX_STEPS);
    for step in 0..steps {
        if step > 0 && bytes.exhausted() {
            break;
        }
        // The first step is always an edit, so every script makes a batch.
        if step > 0 && bytes.below(5) >= 3 {
            let from = bytes.below(REPLICAS.len());
            let to = bytes.below(REPLICAS.len());
            let learned = knowledge[from].clone();
            for (replica, count) in learned {
                let entry = knowledge[to].entry(replica).or_insert(0);
                *entry = (*entry).max(count);
            }
            continue;
        }
        let replica = bytes.below(REPLICAS.len());
        let name = REPLICAS[replica];
        let timestamp_ms = timestamp(bytes.next());
        let flags = bytes.next();
        let omit_own = flags.is_multiple_of(8);
        let sequence = knowledge[replica].get(name).copied().unwrap_or(0) + 1;
        knowledge[replica].insert(name.to_owned(), sequence);
        let mut clock = knowledge[replica].clone();
        for (other, count) in clock.iter_mut() {
            let position = REPLICAS
                .iter()
                .position(|known| known == other)
                .unwrap_or(0);
            // Bits 3..: send a smaller entry than known (a partial causal past).
            if other != name && (flags >> (3 + position)) & 1 == 1 {
                *count /= 2;
            }
        }
        if omit_own {
            clock.remove(name);
        }
        let changes = (0..bytes.below(4))
            .map(|_| {
                let path = Pointer::parse(PATHS[bytes.below(PATHS.len())])
                    .unwrap_or_else(|e| panic!("a fixed path parses: {e}"));
                let op = bytes.next();
                if op < 180 {
                    Change::Set {
                        path,
                        value: value(usize::from(op)),
                    }
                } else {
                    Change::Remove { path }
                }
            })
            .collect();
        let batch = Batch {
            replica_id: name.to_owned(),
            replica_named: true,
            clock,
            timestamp_ms,
            changes,
        };
        if let Err(e) = batch.validate() {
            panic!("a generated batch is valid: {e}");
        }
        generated.push(Generated {
            batch,
            sequence,
            omit_own,
        });
    }
    generated
}

/// Every batch once plus up to half as many duplicates, shuffled by the bytes.
fn delivery_order(bytes: &mut Bytes<'_>, batches: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batches).collect();
    for _ in 0..bytes.below(batches / 2 + 1) {
        order.push(bytes.below(batches));
    }
    for i in (1..order.len()).rev() {
        let j = bytes.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// Delivers in `order`; a refused batch waits and is retried after each later success.
fn deliver(batches: &[Generated], order: &[usize]) -> SessionState {
    let mut state = SessionState::default();
    let mut delivered = vec![false; batches.len()];
    let mut waiting: Vec<usize> = Vec::new();
    for &index in order {
        if attempt(&mut state, batches, &mut delivered, index) {
            // Retry the waiting batches until a full pass makes no progress.
            loop {
                let before = waiting.len();
                waiting.retain(|&waiter| !attempt(&mut state, batches, &mut delivered, waiter));
                if waiting.len() == before {
                    break;
                }
            }
        } else {
            waiting.push(index);
        }
    }
    assert!(
        waiting.is_empty(),
        "batches of a causally valid history were never delivered: {waiting:?}"
    );
    assert!(delivered.iter().all(|done| *done));
    state
}

/// One delivery attempt; `false` when the batch was refused (or held back) and must wait.
fn attempt(
    state: &mut SessionState,
    batches: &[Generated],
    delivered: &mut [bool],
    index: usize,
) -> bool {
    let generated = &batches[index];
    let replica = generated.batch.replica_id.as_str();
    if generated.omit_own {
        // Without its own entry a batch is only an event relative to the server's clock: the
        // client (through its Idempotency-Key) sends it once, after its predecessor.
        if delivered[index] {
            return true;
        }
        if state.clock().get(replica).copied().unwrap_or(0) + 1 != generated.sequence {
            return false;
        }
    }
    let before = state.clone();
    match state.apply(&generated.batch) {
        Err(refusal) => {
            let firemode_merge::NotApplied::MissingDependencies(refusal) = refusal else {
                panic!("a session never compacted refused with {refusal}");
            };
            assert_eq!(&refusal.session_clock, before.clock());
            assert_eq!(*state, before, "a refused batch changed the state");
            assert!(!delivered[index], "a delivered batch was refused");
            false
        }
        Ok(Outcome::Duplicate) => {
            assert!(delivered[index], "a new batch was taken for a duplicate");
            assert_eq!(*state, before, "a duplicate changed the state");
            true
        }
        Ok(Outcome::Applied(applied)) => {
            assert!(!delivered[index], "a batch was applied twice");
            assert_eq!(applied.dot, (replica.to_owned(), generated.sequence));
            assert!(applied.effective_timestamp >= generated.batch.timestamp_ms);
            assert!(applied.applied <= generated.batch.changes.len());
            for conflict in &applied.conflicts {
                assert_ne!(conflict.winner.replica_id, conflict.loser.replica_id);
                assert!(
                    conflict.winner.replica_id == replica || conflict.loser.replica_id == replica
                );
            }
            assert_eq!(state.clock().get(replica), Some(&generated.sequence));
            delivered[index] = true;
            true
        }
    }
}

fn saved(state: &SessionState) -> String {
    serde_json::to_string(state).unwrap_or_else(|e| panic!("a session state serializes: {e}"))
}

/// Checks one fuzz input; panics when an invariant breaks.
pub fn check(data: &[u8]) {
    let mut bytes = Bytes { data, position: 0 };
    let batches = generate(&mut bytes);
    let first = delivery_order(&mut bytes, batches.len());
    let second = delivery_order(&mut bytes, batches.len());

    let one = deliver(&batches, &first);
    let two = deliver(&batches, &second);
    let in_order = deliver(&batches, &(0..batches.len()).collect::<Vec<_>>());

    let one_json = saved(&one);
    assert_eq!(
        one_json,
        saved(&two),
        "orders {first:?} and {second:?} diverge"
    );
    assert_eq!(
        one_json,
        saved(&in_order),
        "order {first:?} diverges from in-order"
    );
    assert_eq!(one, two);
    assert_eq!(one.document(), two.document());
    assert_eq!(one.document(), in_order.document());
    assert_eq!(one.clock(), two.clock());
    assert!(one.document().is_object(), "the document is an object");

    // The session clock is the pointwise max of the dots: each replica's number of batches.
    let mut expected = VectorClock::new();
    for generated in &batches {
        let entry = expected
            .entry(generated.batch.replica_id.clone())
            .or_insert(0);
        *entry = (*entry).max(generated.sequence);
    }
    assert_eq!(one.clock(), &expected);

    let loaded: SessionState = serde_json::from_str(&one_json)
        .unwrap_or_else(|e| panic!("a saved state loads back: {e}\n{one_json}"));
    assert_eq!(loaded, one, "the state changed through save and load");
    assert_eq!(saved(&loaded), one_json);
}
