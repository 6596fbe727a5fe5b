//! Property tests of compaction (design §3): for random multi-replica histories compacted at
//! random points to a clock the session had, the document never changes by compacting; every
//! later batch that covers the horizon is applied and every one that does not is refused with
//! `MustRefetch`; the document then equals the reference model's replay of exactly the
//! accepted batches (nothing removed comes back, no acknowledged write is lost); catching up
//! from any clock that covers the horizon still rebuilds the document, and older clocks get
//! `MustRefetch`; a compacted state saves and loads.

mod support;

use firemode_merge::{DeltaIndex, NotApplied, Outcome, SessionState, SinceRefused, VectorClock};
use proptest::prelude::*;
use serde_json::Value;
use support::history::{generate, script, Generated};
use support::model;

/// The clock after each prefix of `batches` (each causally closed).
fn prefix_clocks(batches: &[Generated]) -> Vec<VectorClock> {
    let mut clocks = vec![VectorClock::new()];
    let mut clock = VectorClock::new();
    for generated in batches {
        clock.insert(generated.batch.replica_id.clone(), generated.sequence);
        clocks.push(clock.clone());
    }
    clocks
}

fn covers(clock: &VectorClock, replica: &str, sequence: u64) -> bool {
    sequence <= clock.get(replica).copied().unwrap_or(0)
}

/// The batch's causal past as a clock: what it names, and a named replica's own past.
fn past(generated: &Generated) -> VectorClock {
    let batch = &generated.batch;
    let mut past = batch.clock.clone();
    if batch.replica_named {
        past.insert(batch.replica_id.clone(), generated.sequence - 1);
    } else {
        past.retain(|_, count| *count > 0);
    }
    past
}

fn covers_clock(outer: &VectorClock, inner: &VectorClock) -> bool {
    inner
        .iter()
        .all(|(replica, &count)| covers(outer, replica, count))
}

/// Applies `batch` expecting it to be new.
fn apply_new(state: &mut SessionState, generated: &Generated) -> Result<(), TestCaseError> {
    match state.apply(&generated.batch) {
        Ok(Outcome::Applied(applied)) => {
            prop_assert_eq!(applied.dot.1, generated.sequence);
            Ok(())
        }
        other => Err(TestCaseError::fail(format!("expected applied: {other:?}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compaction_changes_no_document_and_loses_no_acknowledged_write(
        steps in script(32),
        split in 0.0f64..=1.0,
        horizon_at in 0.0f64..=1.0,
        second in 0.0f64..=1.0,
    ) {
        let batches = generate(&steps);
        let split = ((batches.len() as f64) * split) as usize;
        let clocks = prefix_clocks(&batches);
        let mut state = SessionState::default();
        for generated in &batches[..split] {
            apply_new(&mut state, generated)?;
        }
        let horizon = clocks[((split as f64) * horizon_at) as usize].clone();
        let before = state.document();
        state.compact_to(horizon.clone());
        prop_assert_eq!(state.document(), before, "compacting changed the document");

        // The rest: a batch is sent unless it depends on one that was refused (its client
        // would refetch first); it is applied if it covers the horizon, else refused.
        let mut accepted: Vec<&Generated> = batches[..split].iter().collect();
        let mut refused: Vec<(String, u64)> = Vec::new();
        for (position, generated) in batches.iter().enumerate().skip(split) {
            let replica = generated.batch.replica_id.as_str();
            let depends_on_refused = refused.iter().any(|(r, s)| {
                covers(&past(generated), r, *s) || (r == replica && *s < generated.sequence)
            });
            if depends_on_refused {
                refused.push((replica.to_owned(), generated.sequence));
                continue;
            }
            let saved = state.clone();
            match state.apply(&generated.batch) {
                Ok(Outcome::Applied(_)) => {
                    prop_assert!(covers_clock(&past(generated), state.horizon()) || past(generated) == *state.horizon());
                    accepted.push(generated);
                }
                Err(NotApplied::MustRefetch(refusal)) => {
                    prop_assert_eq!(&state, &saved, "a refused batch changed the state");
                    prop_assert!(!covers_clock(&past(generated), &refusal.horizon));
                    refused.push((replica.to_owned(), generated.sequence));
                }
                other => return Err(TestCaseError::fail(format!("batch {position}: {other:?}"))),
            }
            // A second compaction somewhere later.
            if position == split + ((batches.len() - split) as f64 * second) as usize {
                let now = state.clock().clone();
                let later = prefix_clocks(&accepted.iter().map(|g| (*g).clone()).collect::<Vec<_>>())
                    .into_iter()
                    .rfind(|clock| covers_clock(clock, state.horizon()) && covers_clock(&now, clock));
                if let Some(later) = later {
                    let before = state.document();
                    state.compact_to(later);
                    prop_assert_eq!(state.document(), before, "the second compaction changed it");
                }
            }
        }
        let expected = model::document_of(accepted.iter().map(|g| (&g.batch, g.sequence)));
        prop_assert_eq!(state.document(), expected, "not the replay of the accepted batches");

        // Catching up: from the current clock nothing; from any clock of the accepted
        // history that covers the horizon, the changes rebuild the document; older: 410.
        let accepted_owned: Vec<Generated> = accepted.iter().map(|g| (*g).clone()).collect();
        let (index, document) = (DeltaIndex::new(&state), state.materialised());
        for since in prefix_clocks(&accepted_owned) {
            let answer = state.changes_since(&since);
            prop_assert_eq!(
                &state.changes_since_indexed(&since, &document, &index),
                &answer,
                "since {:?}: the index disagrees",
                since
            );
            // From the rows around the new registers (base included): the same, or none.
            match support::changes_from_rows(&state, &since) {
                Ok(None) => {}
                part => prop_assert_eq!(part.map(Option::unwrap_or_default), answer.clone(), "since {:?}: from rows", since),
            }
            match answer {
                Ok(changes) => {
                    prop_assert!(covers_clock(&since, state.horizon()));
                    let seen = accepted_owned
                        .iter()
                        .filter(|g| covers(&since, &g.batch.replica_id, g.sequence))
                        .map(|g| (&g.batch, g.sequence));
                    let mut document = model::document_of(seen);
                    support::apply_changes(&mut document, &changes);
                    prop_assert_eq!(&document, &state.document(), "since {:?}", since);
                }
                Err(SinceRefused::MustRefetch(_)) => {
                    prop_assert!(!covers_clock(&since, state.horizon()));
                }
                Err(other) => return Err(TestCaseError::fail(format!("{other}"))),
            }
        }
        let saved: Value = serde_json::to_value(&state).expect("serializes");
        let loaded: SessionState = serde_json::from_value(saved).expect("a compacted state loads");
        prop_assert_eq!(loaded, state);
    }
}
