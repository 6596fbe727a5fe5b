//! Paths: parent and child writes, tombstones, the list order inside a batch, and conflicts on
//! overlapping paths.

mod support;

use firemode_merge::SessionState;
use serde_json::json;
use support::{apply_new, batch, remove, session, set};

#[test]
fn set_on_a_nested_path_reads_back_as_nested_objects() {
    let state = session(&[batch("a", &[], 10, vec![set("/a/b", json!(1))])]);
    assert_eq!(state.document(), json!({"a": {"b": 1}}));
}

#[test]
fn remove_then_set_and_set_then_remove() {
    let state = session(&[
        batch("a", &[], 10, vec![set("/a", json!(1))]),
        batch("a", &[], 11, vec![remove("/a")]),
    ]);
    assert_eq!(state.document(), json!({}));
    let state = session(&[
        batch("a", &[], 10, vec![set("/a", json!({"old": true}))]),
        batch("a", &[], 11, vec![remove("/a")]),
        batch("a", &[], 12, vec![set("/a/b", json!(2))]),
    ]);
    assert_eq!(state.document(), json!({"a": {"b": 2}}));
}

#[test]
fn a_concurrent_older_write_stays_removed() {
    let removal = batch("a", &[("a", 1)], 200, vec![remove("/x")]);
    let older = batch("b", &[("b", 1)], 100, vec![set("/x", json!("late"))]);
    let mut state = session(&[removal]);
    let applied = apply_new(&mut state, &older);
    assert_eq!(applied.applied, 0, "hidden on arrival by the tombstone");
    assert_eq!(applied.conflicts.len(), 1);
    assert_eq!(applied.conflicts[0].winner.value, None);
    assert_eq!(state.document(), json!({}));
}

#[test]
fn within_a_batch_the_list_order_decides() {
    let cases = [
        (
            vec![set("/a", json!(1)), set("/a", json!(2))],
            json!({"a": 2}),
        ),
        (
            vec![set("/a/b", json!(1)), set("/a", json!(5))],
            json!({"a": 5}),
        ),
        (
            vec![set("/a", json!(5)), set("/a/b", json!(1))],
            json!({"a": {"b": 1}}),
        ),
        (
            vec![remove("/a"), set("/a/b", json!(1))],
            json!({"a": {"b": 1}}),
        ),
        (vec![set("/a/b", json!(1)), remove("/a")], json!({})),
        (
            vec![set("/a", json!({"b": 1, "c": 2})), remove("/a/b")],
            json!({"a": {"c": 2}}),
        ),
    ];
    for (changes, expected) in cases {
        let mut state = SessionState::default();
        let applied = apply_new(&mut state, &batch("a", &[], 10, changes.clone()));
        assert_eq!(state.document(), expected, "{changes:?}");
        assert_eq!(applied.applied, changes.len());
        assert!(
            applied.conflicts.is_empty(),
            "a batch never conflicts with itself"
        );
    }
}

#[test]
fn a_later_child_write_turns_a_scalar_or_array_parent_into_an_object() {
    for parent in [json!(5), json!([1, 2]), json!(null), json!("text")] {
        let state = session(&[
            batch("a", &[], 10, vec![set("/a", parent)]),
            batch("a", &[], 11, vec![set("/a/0", json!("zero"))]),
        ]);
        assert_eq!(state.document(), json!({"a": {"0": "zero"}}));
    }
}

#[test]
fn removing_under_a_scalar_leaves_the_scalar() {
    let state = session(&[
        batch("a", &[], 10, vec![set("/a", json!(5))]),
        batch("a", &[], 11, vec![remove("/a/b"), remove("/missing/key")]),
    ]);
    assert_eq!(state.document(), json!({"a": 5}));
}

#[test]
fn an_ancestor_write_hides_older_concurrent_children_for_good() {
    let parent = batch("a", &[("a", 1)], 300, vec![set("/a", json!({"k": 1}))]);
    let child = batch(
        "b",
        &[("b", 1)],
        100,
        vec![set("/a/b", json!(2)), set("/z", json!(0))],
    );
    let one_way = session(&[parent.clone(), child.clone()]);
    let other_way = session(&[child, parent]);
    assert_eq!(one_way, other_way);
    assert_eq!(one_way.document(), json!({"a": {"k": 1}, "z": 0}));
}

#[test]
fn a_newer_concurrent_child_lands_inside_an_older_parent() {
    let parent = batch("a", &[("a", 1)], 100, vec![set("/a", json!({"k": 1}))]);
    let child = batch("b", &[("b", 1)], 300, vec![set("/a/b", json!(2))]);
    let mut state = session(&[child]);
    let applied = apply_new(&mut state, &parent);
    assert_eq!(state.document(), json!({"a": {"k": 1, "b": 2}}));
    assert_eq!(
        applied.applied, 1,
        "the parent is stored: it still hides older children"
    );
    let conflict = &applied.conflicts[0];
    assert_eq!(conflict.path, "/a");
    assert_eq!(
        (
            conflict.winner.replica_id.as_str(),
            conflict.winner.path.as_str()
        ),
        ("b", "/a/b")
    );
    assert_eq!(
        (
            conflict.loser.replica_id.as_str(),
            conflict.loser.path.as_str()
        ),
        ("a", "/a")
    );
}

#[test]
fn conflicts_cover_ancestors_and_descendants_but_not_siblings_or_the_seen() {
    let mut state = session(&[
        batch(
            "a",
            &[("a", 1)],
            100,
            vec![set("/a/b/c", json!(1)), set("/a/d", json!(1))],
        ),
        batch("b", &[("b", 1)], 50, vec![set("/a", json!(0))]),
    ]);
    // c has seen b's /a but not a's writes; it writes /a/b.
    let applied = apply_new(
        &mut state,
        &batch("c", &[("b", 1), ("c", 1)], 500, vec![set("/a/b", json!(2))]),
    );
    let pairs: Vec<(&str, &str)> = applied
        .conflicts
        .iter()
        .map(|conflict| (conflict.winner.path.as_str(), conflict.loser.path.as_str()))
        .collect();
    // /a (seen, b's) is no conflict; /a/d is a sibling; /a/b/c (a's, unseen) is a descendant.
    assert_eq!(pairs, [("/a/b", "/a/b/c")]);
    assert_eq!(applied.effective_timestamp, 500);
    assert_eq!(state.document(), json!({"a": {"b": 2, "d": 1}}));
}
