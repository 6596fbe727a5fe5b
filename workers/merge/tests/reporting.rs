//! Conflicts reported under a cap: the state is the same whatever the cap, the list is a prefix
//! of the full list, and the count is the full count. Also the shape that once made a million
//! conflicts out of one 41 KB batch (issue #11, item 3).

mod support;

use firemode_merge::{Outcome, ReportLimits, SessionState};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::json;
use support::{batch, set};

const REPLICAS: [&str; 3] = ["b", "a", "c"];
const PATHS: [&str; 7] = ["/a", "/a/b", "/a/b/c", "/a/d", "/x", "/x/y", "/a/b/c/d"];

/// One generated batch: replica, device timestamp, changes as (path, remove?).
type Script = Vec<(usize, u64, Vec<(usize, bool)>)>;

/// Every batch is concurrent with the other replicas' batches, so overlaps make conflicts.
fn batches() -> impl Strategy<Value = Script> {
    let change = (0..PATHS.len(), prop::bool::weighted(0.2));
    vec((0..REPLICAS.len(), 0u64..40, vec(change, 0..6)), 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_limits_change_only_what_is_reported(
        script in batches(),
        cap in select(vec![0usize, 1, 2, 5, usize::MAX]),
        max_bytes in select(vec![0usize, 300, 1000, usize::MAX]),
    ) {
        let limits = ReportLimits { max_conflicts: cap, max_bytes };
        let mut full = SessionState::default();
        let mut capped = SessionState::default();
        let mut sequences = [0u64; REPLICAS.len()];
        for (replica, timestamp, changes) in script {
            sequences[replica] += 1;
            let changes = changes
                .iter()
                .map(|&(path, remove)| if remove {
                    support::remove(PATHS[path])
                } else {
                    set(PATHS[path], json!(path))
                })
                .collect();
            let b = batch(REPLICAS[replica], &[(REPLICAS[replica], sequences[replica])], timestamp, changes);
            let (Ok(Outcome::Applied(all)), Ok(Outcome::Applied(some))) =
                (full.apply(&b), capped.apply_reporting(&b, limits))
            else {
                return Err(TestCaseError::fail("a new batch was not applied"));
            };
            prop_assert_eq!(&full, &capped);
            prop_assert_eq!(all.conflicts_total, all.conflicts.len() as u64);
            prop_assert_eq!(some.conflicts_total, all.conflicts_total);
            prop_assert!(some.conflicts.len() <= cap);
            prop_assert_eq!(&some.conflicts[..], &all.conflicts[..some.conflicts.len()]);
            let bytes = serde_json::to_string(&some.conflicts).map(|t| t.len()).unwrap_or(0);
            // The limit counts the entries; the list adds its brackets.
            prop_assert!(bytes <= max_bytes.saturating_add(2), "{} bytes listed", bytes);
            if max_bytes == usize::MAX {
                prop_assert_eq!(some.conflicts.len(), cap.min(all.conflicts.len()));
            }
            prop_assert_eq!(some.applied, all.applied);
        }
    }
}

/// 1,000 writes at `/x` with an old timestamp, each meeting 1,000 newer concurrent writes below
/// it: a million conflicts, counted, a hundred materialised, the newer writes kept.
#[test]
fn a_million_overlapping_pairs_are_counted_not_listed() {
    let mut state = SessionState::default();
    let below = (0..1000)
        .map(|i| set(&format!("/x/{i}"), json!(i)))
        .collect();
    let first = batch("A", &[("A", 1)], 1_000_000, below);
    assert!(matches!(state.apply(&first), Ok(Outcome::Applied(_))));
    let over = (0..1000).map(|i| set("/x", json!(i))).collect();
    let second = batch("B", &[("B", 1)], 0, over);
    let limits = ReportLimits {
        max_conflicts: 100,
        max_bytes: usize::MAX,
    };
    let Ok(Outcome::Applied(applied)) = state.apply_reporting(&second, limits) else {
        panic!("the batch is new");
    };
    assert_eq!(applied.conflicts_total, 1_000_000);
    assert_eq!(applied.conflicts.len(), 100);
    assert_eq!(applied.applied, 1000);
    let document = state.document();
    assert_eq!(document["x"]["999"], json!(999));
    assert_eq!(document["x"].as_object().map(|o| o.len()), Some(1000));
}

/// A hundred conflicts against one large value would repeat it a hundred times: the byte limit
/// lists only what fits.
#[test]
fn a_large_value_is_not_repeated_past_the_byte_limit() {
    let big = "v".repeat(100_000);
    let mut state = SessionState::default();
    let first = batch("A", &[("A", 1)], 1_000_000, vec![set("/x", json!(big))]);
    assert!(matches!(state.apply(&first), Ok(Outcome::Applied(_))));
    let over = (0..1000).map(|i| set("/x", json!(i))).collect();
    let second = batch("B", &[("B", 1)], 0, over);
    let limits = ReportLimits {
        max_conflicts: 100,
        max_bytes: 1 << 20,
    };
    let Ok(Outcome::Applied(applied)) = state.apply_reporting(&second, limits) else {
        panic!("the batch is new");
    };
    assert_eq!(applied.conflicts_total, 1000);
    let listed = serde_json::to_string(&applied.conflicts).map_or(usize::MAX, |t| t.len());
    assert!(listed <= 1 << 20, "{listed} bytes listed");
    assert_eq!(applied.conflicts.len(), 10);
}
