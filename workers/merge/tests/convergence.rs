//! Property tests: every causally valid delivery order converges to one state.
//!
//! A history is a script of steps for 3–5 replicas: an *edit* makes one batch of sets and
//! removes over deliberately overlapping paths, stamped with the replica's current knowledge and
//! a random device time (which goes backwards as often as forwards); a *learn* step copies one
//! replica's knowledge into another, as a sync would. The batches are then delivered to fresh
//! sessions in shuffled orders, with duplicates, where a refused batch waits and is retried
//! after the next success. Every run must end in the same state, and that state must match a
//! reference model computed from the whole set of writes at once.

mod support;

use firemode_merge::{Outcome, SessionState};
use proptest::prelude::*;
use serde_json::Value;
use support::history::{deliver, delivery_order, edit, generate, script, Generated, Step};
use support::model;

/// A state as JSON without what tombstones remember of the sets they hid.
fn comparable(state: &SessionState) -> Value {
    let mut value = serde_json::to_value(state).expect("state serializes");
    if let Some(registers) = value.get_mut("registers").and_then(Value::as_array_mut) {
        for register in registers {
            if let Some(register) = register.as_object_mut() {
                register.remove("parents_made");
            }
        }
    }
    value
}

/// A script with its batches and two delivery orders.
fn scenario(max_steps: usize) -> impl Strategy<Value = (Vec<Generated>, Vec<usize>, Vec<usize>)> {
    script(max_steps).prop_flat_map(|steps| {
        let batches = generate(&steps);
        let count = batches.len();
        (Just(batches), delivery_order(count), delivery_order(count))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Two sessions fed the same batches in different causally valid orders (with duplicates
    /// and retries) end byte-identical, equal to in-order delivery and to the reference model.
    #[test]
    fn any_causal_delivery_order_converges((batches, first, second) in scenario(32)) {
        let one = deliver(&batches, &first)?;
        let two = deliver(&batches, &second)?;
        let in_order = deliver(&batches, &(0..batches.len()).collect::<Vec<_>>())?;

        // The same registers, clock and stamps in every order. What a tombstone remembers of
        // the sets it hid may differ (it is a latest key, found from whichever hider was there
        // first); it never changes the document, checked against the model below.
        let one_json = serde_json::to_string(&one).expect("state serializes");
        prop_assert_eq!(comparable(&one), comparable(&two));
        prop_assert_eq!(comparable(&one), comparable(&in_order));
        prop_assert_eq!(one.document(), two.document());
        prop_assert_eq!(one.document(), in_order.document());
        prop_assert_eq!(one.clock(), two.clock());

        let (document, clock) = model::reference(batches.iter().map(|generated| (&generated.batch, generated.sequence)));
        prop_assert_eq!(one.document(), document);
        prop_assert_eq!(one.clock(), &clock);

        let loaded: SessionState = serde_json::from_str(&one_json).expect("a saved state loads");
        prop_assert_eq!(&loaded, &one);
    }

    /// Two batches concurrent with each other, after a common history, commute.
    #[test]
    fn concurrent_batches_commute((batches, _, _) in scenario(12), left in edit(5), right in edit(5)) {
        let base = deliver(&batches, &(0..batches.len()).collect::<Vec<_>>())?;
        let concurrent = |step: &Step, replica: &str| {
            let mut generated = generate(std::slice::from_ref(step)).remove(0);
            generated.batch.replica_id = replica.to_owned();
            generated.batch.replica_named = true;
            generated.batch.clock = base.clock().clone();
            generated.batch.clock.insert(replica.to_owned(), base.clock().get(replica).copied().unwrap_or(0) + 1);
            generated.batch
        };
        let left = concurrent(&left, "left");
        let right = concurrent(&right, "right");
        let mut one_way = base.clone();
        let mut other_way = base;
        for (state, order) in [(&mut one_way, [&left, &right]), (&mut other_way, [&right, &left])] {
            for batch in order {
                prop_assert!(matches!(state.apply(batch), Ok(Outcome::Applied(_))));
            }
        }
        prop_assert_eq!(one_way.document(), other_way.document());
        prop_assert_eq!(comparable(&one_way), comparable(&other_way));
        // Re-applying either is a no-op.
        let settled = one_way.clone();
        prop_assert_eq!(one_way.apply(&left), Ok(Outcome::Duplicate));
        prop_assert_eq!(one_way, settled);
    }
}
