//! The materialised document (`SessionState::materialised`, what answers serialize) against a
//! replay of every write in order, on objects large enough to leave the small-object form
//! (more than 16 keys), objects written as values and then written into, and removals.

mod support;

use firemode_merge::SessionState;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use support::{apply_changes, batch, remove, set};

/// One edit: (top-level key, second-level key or none, what to do).
type Edit = (usize, Option<usize>, u8);

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    vec((0usize..40, prop::option::of(0usize..24), 0u8..4), 1..120)
}

/// A value with `keys` keys, to be written into later.
fn object_value(keys: usize) -> Value {
    Value::Object((0..keys).map(|k| (format!("k{k}"), json!(k))).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_materialised_document_is_every_write_replayed_in_order(edits in edits()) {
        let mut state = SessionState::default();
        let mut replayed = Value::Object(Map::new());
        for (sequence, (top, below, what)) in (1u64..).zip(edits) {
            let path = match below {
                Some(below) => format!("/k{top}/k{below}"),
                None => format!("/k{top}"),
            };
            let change = match what {
                0 => remove(&path),
                1 => set(&path, object_value(20)),
                2 => set(&path, object_value(3)),
                _ => set(&path, json!(sequence)),
            };
            apply_changes(&mut replayed, std::slice::from_ref(&change));
            let b = batch("a", &[("a", sequence)], sequence, vec![change]);
            prop_assert!(state.apply(&b).is_ok());
        }
        let materialised = state.materialised();
        prop_assert_eq!(&state.document(), &replayed);
        prop_assert_eq!(
            serde_json::to_string(&materialised).expect("serializes"),
            replayed.to_string()
        );
    }
}
