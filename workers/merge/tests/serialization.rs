//! Serialization: the saved state round-trips (and a corrupt one is refused), changes parse
//! from the request vocabulary, conflicts serialize with `op` so `null` and removal differ.

mod support;

use firemode_merge::{Change, SessionState};
use serde_json::json;
use support::{apply_new, batch, remove, session, set};

#[test]
fn a_null_value_is_not_a_removal() {
    let mut state = session(&[batch(
        "a",
        &[],
        10,
        vec![set("/x", json!(null)), remove("/y")],
    )]);
    assert_eq!(state.document(), json!({"x": null}));
    let saved = serde_json::to_string(&state).expect("serializes");
    let loaded: SessionState = serde_json::from_str(&saved).expect("round trips");
    assert_eq!(loaded, state);
    assert_eq!(loaded.document(), json!({"x": null}));
    let applied = apply_new(
        &mut state,
        &batch(
            "b",
            &[("b", 1)],
            5,
            vec![set("/x", json!(1)), set("/y", json!(1))],
        ),
    );
    let sides = serde_json::to_value(&applied.conflicts).expect("serializes");
    assert_eq!(
        sides,
        json!([
            {"path": "/x",
             "winner": {"replica_id": "a", "path": "/x", "op": "set", "value": null},
             "loser": {"replica_id": "b", "path": "/x", "op": "set", "value": 1}},
            {"path": "/y",
             "winner": {"replica_id": "a", "path": "/y", "op": "remove"},
             "loser": {"replica_id": "b", "path": "/y", "op": "set", "value": 1}}
        ])
    );
}

#[test]
fn a_saved_state_round_trips_and_a_corrupt_one_is_refused() {
    let state = session(&[
        batch("a", &[], 10, vec![set("/a", json!(1)), remove("/b")]),
        batch("b", &[("a", 1)], 5, vec![set("/a/c", json!([1]))]),
    ]);
    let saved = serde_json::to_value(&state).expect("serializes");
    let loaded: SessionState = serde_json::from_value(saved.clone()).expect("loads");
    assert_eq!(loaded, state);
    assert_eq!(
        serde_json::from_value::<SessionState>(json!({})).expect("empty"),
        SessionState::default()
    );

    let corrupt = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut value = saved.clone();
        edit(&mut value);
        serde_json::from_value::<SessionState>(value).expect_err("refused")
    };
    corrupt(&|value| value["clock"]["a"] = json!(2));
    corrupt(&|value| value["stamps"]["b"] = json!([11, 12]));
    corrupt(&|value| {
        value["clock"]["b"] = json!(2);
        value["stamps"]["b"] = json!([11, 10]);
    });
    corrupt(&|value| value["registers"][0]["timestamp"] = json!(99));
    // What a tombstone remembers must be an earlier applied write, and only tombstones remember.
    let made = json!({"timestamp": 10, "replica_id": "a", "sequence": 1, "index": 0});
    corrupt(&|value| value["registers"][0]["parents_made"] = made.clone());
    corrupt(&|value| {
        value["registers"][2]["parents_made"] =
            json!({"timestamp": 11, "replica_id": "b", "sequence": 1, "index": 0})
    });
    corrupt(&|value| {
        value["registers"][2]["parents_made"] =
            json!({"timestamp": 10, "replica_id": "zz", "sequence": 1, "index": 0})
    });
    corrupt(&|value| value["registers"][0]["sequence"] = json!(0));
    corrupt(&|value| value["registers"][0]["path"] = json!("no-slash"));
    corrupt(&|value| value["surprise"] = json!(1));
    let duplicate = saved["registers"][0].clone();
    corrupt(&move |value| {
        if let Some(list) = value["registers"].as_array_mut() {
            list.push(duplicate.clone());
        }
    });
}

#[test]
fn changes_deserialize_from_the_request_vocabulary() {
    let changes: Vec<Change> = serde_json::from_value(json!([
        {"op": "set", "path": "/extinguishers/FE-01/pressure", "value": "low"},
        {"op": "set", "path": "/n", "value": null},
        {"op": "remove", "path": "/notes/draft"}
    ]))
    .expect("valid changes");
    assert_eq!(
        changes,
        [
            set("/extinguishers/FE-01/pressure", json!("low")),
            set("/n", json!(null)),
            remove("/notes/draft")
        ]
    );
    for bad in [
        json!({"op": "set", "path": "/a"}),
        json!({"op": "move", "path": "/a"}),
        json!({"op": "set", "path": "a", "value": 1}),
        json!({"op": "remove", "path": ""}),
        json!({"path": "/a"}),
    ] {
        assert!(
            serde_json::from_value::<Change>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn replica_owners_are_saved_and_old_states_load_without_them() {
    let mut state = session(&[batch(
        "tab-a",
        &[("tab-a", 1)],
        10,
        vec![set("/x", json!(1))],
    )]);
    // A state saved before replicas had owners: no "owners" key, and none is written.
    let old = serde_json::to_value(&state).expect("serializes");
    assert!(old.get("owners").is_none(), "{old}");
    let mut loaded: SessionState = serde_json::from_value(old).expect("an old state loads");
    assert_eq!(loaded.owner("tab-a"), None);
    // The first user to write with it claims it; a later claim changes nothing.
    assert_eq!(loaded.claim("tab-a", "alice"), "alice");
    assert_eq!(loaded.claim("tab-a", "mallory"), "alice");
    let saved = serde_json::to_string(&loaded).expect("serializes");
    let again: SessionState = serde_json::from_str(&saved).expect("round trips");
    assert_eq!(again.owner("tab-a"), Some("alice"));
    assert_eq!(again, loaded);
    state.claim("tab-a", "alice");
    assert_eq!(state, again);
}
