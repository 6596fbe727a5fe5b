//! The causal rules of design §3: dots, duplicates, causal delivery, stamps and
//! last-write-wins, one test per rule on hand-written histories.

mod support;

use firemode_merge::{InvalidBatch, MissingDependencies, NotApplied, Outcome, SessionState};
use serde_json::json;
use support::{apply_new, batch, clock, remove, session, set, unnamed_batch};

#[test]
fn an_empty_session_is_an_empty_object() {
    let state = SessionState::default();
    assert_eq!(state.document(), json!({}));
    assert!(state.clock().is_empty());
}

#[test]
fn a_causal_overwrite_beats_a_larger_device_timestamp() {
    let first = batch("a", &[("a", 1)], 1_000_000, vec![set("/x", json!("first"))]);
    // b has seen a's write, but its device clock is far behind.
    let second = batch(
        "b",
        &[("a", 1), ("b", 1)],
        5,
        vec![set("/x", json!("second"))],
    );
    let mut state = session(&[first]);
    let applied = apply_new(&mut state, &second);
    assert_eq!(applied.effective_timestamp, 1_000_001);
    assert!(
        applied.conflicts.is_empty(),
        "a causal overwrite is no conflict"
    );
    assert_eq!(state.document(), json!({"x": "second"}));
}

#[test]
fn equal_stamps_break_ties_by_replica_id_in_either_order() {
    let from_a = batch("a", &[("a", 1)], 100, vec![set("/x", json!("from a"))]);
    let from_b = batch("b", &[("b", 1)], 100, vec![set("/x", json!("from b"))]);
    for order in [[&from_a, &from_b], [&from_b, &from_a]] {
        let mut state = SessionState::default();
        apply_new(&mut state, order[0]);
        let second = apply_new(&mut state, order[1]);
        assert_eq!(state.document(), json!({"x": "from b"}));
        assert_eq!(second.conflicts.len(), 1);
        let conflict = &second.conflicts[0];
        assert_eq!(conflict.path, "/x");
        assert_eq!(conflict.winner.replica_id, "b");
        assert_eq!(conflict.winner.value, Some(json!("from b")));
        assert_eq!(conflict.loser.replica_id, "a");
        assert_eq!(conflict.loser.value, Some(json!("from a")));
    }
}

#[test]
fn the_larger_stamp_wins_a_concurrent_write_whatever_the_replica_id() {
    let from_a = batch("a", &[("a", 1)], 200, vec![set("/x", json!("from a"))]);
    let from_b = batch("b", &[("b", 1)], 100, vec![set("/x", json!("from b"))]);
    let state = session(&[from_b, from_a]);
    assert_eq!(state.document(), json!({"x": "from a"}));
}

#[test]
fn applying_a_batch_twice_equals_applying_it_once() {
    let first = batch("a", &[("a", 1)], 10, vec![set("/x", json!(1))]);
    let mut state = session(std::slice::from_ref(&first));
    let once = state.clone();
    assert_eq!(state.apply(&first), Ok(Outcome::Duplicate));
    assert_eq!(state, once);
    // An older dot of the same replica is a duplicate too, whatever its content.
    apply_new(
        &mut state,
        &batch("a", &[("a", 2)], 20, vec![set("/x", json!(2))]),
    );
    let twice = state.clone();
    let replay = batch("a", &[("a", 1)], 99, vec![set("/x", json!("changed"))]);
    assert_eq!(state.apply(&replay), Ok(Outcome::Duplicate));
    assert_eq!(state, twice);
}

#[test]
fn two_concurrent_batches_commute() {
    let from_a = batch(
        "a",
        &[("a", 1)],
        50,
        vec![
            set("/a", json!({"k": 1})),
            remove("/x"),
            set("/y", json!(1)),
        ],
    );
    let from_b = batch(
        "b",
        &[("b", 1)],
        40,
        vec![set("/a/b", json!(2)), set("/x", json!("b")), remove("/y")],
    );
    let one_way = session(&[from_a.clone(), from_b.clone()]);
    let other_way = session(&[from_b, from_a]);
    assert_eq!(one_way, other_way);
    assert_eq!(
        serde_json::to_string(&one_way).expect("serializes"),
        serde_json::to_string(&other_way).expect("serializes")
    );
    // a's /a (stamp 50) hides b's /a/b (40); a's tombstone at /x beats b's value, and a's
    // value at /y beats b's tombstone.
    assert_eq!(one_way.document(), json!({"a": {"k": 1}, "y": 1}));
}

#[test]
fn a_missing_dependency_is_refused_with_the_session_clock() {
    let mut state = session(&[batch("a", &[("a", 1)], 10, vec![set("/x", json!(1))])]);
    let before = state.clone();
    let expected = Err(NotApplied::MissingDependencies(MissingDependencies {
        session_clock: clock(&[("a", 1)]),
    }));
    // b claims a's second event, which the session has not seen.
    let claims_unseen = batch("b", &[("a", 2), ("b", 1)], 10, vec![set("/y", json!(1))]);
    assert_eq!(state.apply(&claims_unseen), expected);
    // a skips its own second event.
    let skips_own = batch("a", &[("a", 3)], 10, vec![set("/y", json!(1))]);
    assert_eq!(state.apply(&skips_own), expected);
    // c claims a replica the session has never heard of.
    let unknown = batch("c", &[("z", 1)], 10, vec![]);
    assert_eq!(state.apply(&unknown), expected);
    assert_eq!(state, before, "a refused batch changes nothing");
    // Once the dependency arrives, the retry goes through.
    apply_new(&mut state, &batch("a", &[("a", 2)], 10, vec![]));
    apply_new(&mut state, &claims_unseen);
}

#[test]
fn the_server_assigns_the_sequence_number_when_the_own_entry_is_missing() {
    let mut state = SessionState::default();
    let first = apply_new(&mut state, &batch("a", &[], 500, vec![set("/x", json!(1))]));
    assert_eq!(first.dot, ("a".to_owned(), 1));
    // The seeds' shape: `{"vector_clock": {}}` again; the replica's own past still counts.
    let second = apply_new(&mut state, &batch("a", &[], 100, vec![set("/x", json!(2))]));
    assert_eq!(second.dot, ("a".to_owned(), 2));
    assert_eq!(second.effective_timestamp, 501);
    assert!(second.conflicts.is_empty());
    assert_eq!(state.clock(), &clock(&[("a", 2)]));
    assert_eq!(state.document(), json!({"x": 2}));
}

#[test]
fn a_replicas_own_past_is_covered_whatever_its_clock_says() {
    let mut state = session(&[batch("a", &[("a", 1)], 900, vec![set("/x", json!(1))])]);
    // The clock sent names only the dot itself, yet (a, 1) is in the batch's past.
    let applied = apply_new(
        &mut state,
        &batch("a", &[("a", 2)], 10, vec![set("/x", json!(2))]),
    );
    assert_eq!(applied.effective_timestamp, 901);
    assert!(applied.conflicts.is_empty());
    assert_eq!(state.document(), json!({"x": 2}));
}

#[test]
fn a_zero_sequence_is_invalid_and_changes_nothing() {
    let zero = batch("a", &[("a", 0)], 10, vec![set("/x", json!(1))]);
    assert_eq!(
        zero.validate(),
        Err(InvalidBatch::ZeroSequence {
            replica_id: "a".to_owned()
        })
    );
    let mut state = SessionState::default();
    assert_eq!(state.apply(&zero), Ok(Outcome::Duplicate));
    assert_eq!(state, SessionState::default());
    assert_eq!(batch("a", &[("b", 0)], 10, vec![]).validate(), Ok(()));
}

#[test]
fn stamps_are_lifted_over_every_event_the_clock_covers() {
    let mut state = session(&[
        batch("a", &[("a", 1)], 100, vec![]),
        batch("a", &[("a", 2)], 700, vec![]),
        batch("b", &[("b", 1)], 400, vec![]),
    ]);
    // Covers (a, 1) stamped 100 and (b, 1) stamped 400, not (a, 2).
    let applied = apply_new(&mut state, &batch("c", &[("a", 1), ("b", 1)], 3, vec![]));
    assert_eq!(applied.effective_timestamp, 401);
    assert_eq!(applied.applied, 0);
    assert_eq!(state.clock(), &clock(&[("a", 2), ("b", 1), ("c", 1)]));
}

/// Design §3: the document is every write applied in stamp order, so a value overwritten by
/// a `set` below it never comes back when that `set` is removed, whatever the arrival order.
#[test]
fn a_value_overwritten_from_below_never_comes_back() {
    let histories = [
        // One replica, in order.
        vec![
            batch("a", &[], 1, vec![set("/a", json!(5))]),
            batch("a", &[], 2, vec![set("/a/b", json!(1))]),
            batch("a", &[], 3, vec![remove("/a/b")]),
        ],
        // Three replicas, each having seen the one before.
        vec![
            batch("x", &[], 1, vec![set("/a", json!(5))]),
            batch("y", &[("x", 1)], 1, vec![set("/a/b/c", json!(1))]),
            batch("z", &[("x", 1), ("y", 1)], 1, vec![remove("/a/b")]),
        ],
        // Within one batch.
        vec![batch(
            "a",
            &[],
            1,
            vec![set("/a", json!(5)), set("/a/b", json!(1)), remove("/a/b")],
        )],
    ];
    for history in histories {
        assert_eq!(
            session(&history).document(),
            json!({"a": {}}),
            "{history:?}"
        );
        let mut reversed_deliveries = SessionState::default();
        // Concurrent copies of the same writes, delivered newest first.
        for (position, original) in history.iter().enumerate().rev() {
            let mut concurrent = original.clone();
            concurrent.replica_id = format!("r{position}");
            concurrent.clock = clock(&[]);
            concurrent.timestamp_ms = 10 + position as u64;
            apply_new(&mut reversed_deliveries, &concurrent);
        }
        assert_eq!(reversed_deliveries.document(), json!({"a": {}}));
    }
}

/// A conflict's loser never reappears when the winner's child is later removed.
#[test]
fn a_conflict_loser_never_reappears() {
    let loser = batch("a", &[], 10, vec![set("/pump", json!("ok"))]);
    let winner = batch("b", &[], 20, vec![set("/pump/pressure", json!("low"))]);
    let cleanup = batch(
        "b",
        &[("a", 1), ("b", 2)],
        30,
        vec![remove("/pump/pressure")],
    );
    for order in [
        [&loser, &winner, &cleanup],
        [&winner, &loser, &cleanup],
        [&winner, &cleanup, &loser],
    ] {
        let mut state = SessionState::default();
        let mut pending: Vec<&_> = order.to_vec();
        while !pending.is_empty() {
            // The cleanup waits for the loser it depends on.
            pending.retain(|batch| state.apply(batch).is_err());
        }
        assert_eq!(state.document(), json!({"pump": {}}), "{order:?}");
    }
}

/// Two tablets of one technician, neither sending `replica_id`: the second batch is not
/// taken as having seen the first, so the edit made later wins and the conflict is reported.
#[test]
fn two_devices_without_replica_id_are_concurrent() {
    // Tablet A edits at t=200, tablet B at t=100; B's batch arrives last.
    let tablet_a = unnamed_batch("tech", &[], 200, vec![set("/door", json!("closed"))]);
    let tablet_b = unnamed_batch("tech", &[], 100, vec![set("/door", json!("open"))]);
    let mut state = session(&[tablet_a]);
    let second = apply_new(&mut state, &tablet_b);
    assert_eq!(second.dot, ("tech".to_owned(), 2));
    assert_eq!(second.effective_timestamp, 100, "not lifted above tablet A");
    assert_eq!(state.document(), json!({"door": "closed"}));
    assert_eq!(second.conflicts.len(), 1);
    assert_eq!(second.conflicts[0].winner.value, Some(json!("closed")));
    assert_eq!(state.clock(), &clock(&[("tech", 2)]));

    // A tablet that names what it saw ("tech": 2) is ordered after it, with no conflict.
    let seen = unnamed_batch(
        "tech",
        &[("tech", 2)],
        50,
        vec![set("/door", json!("fixed"))],
    );
    let third = apply_new(&mut state, &seen);
    assert_eq!(third.dot, ("tech".to_owned(), 3));
    assert_eq!(third.effective_timestamp, 201);
    assert!(third.conflicts.is_empty());
    assert_eq!(state.document(), json!({"door": "fixed"}));

    // Naming an event the session has not seen is refused.
    let ahead = unnamed_batch("tech", &[("tech", 9)], 50, vec![]);
    assert!(state.apply(&ahead).is_err());
    // With replica_id, the same sender is one device that has seen its own past.
    let named = batch("tech", &[], 10, vec![set("/door", json!("named"))]);
    let fourth = apply_new(&mut state, &named);
    assert_eq!(fourth.effective_timestamp, 202);
}
