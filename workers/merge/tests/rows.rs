//! Property tests of the row layout (design §3: a merge reads and writes only what its batch
//! touches): for random multi-replica histories delivered in random orders with duplicates,
//! compacted at random points, a session kept as rows — each batch applied to a state loaded
//! from only the rows [`Batch::reads`] names, and only [`SessionState::written_rows`] written
//! back (the same rows as [`SessionState::changed_rows`] against a copy of the loaded state
//! makes) — answers every batch exactly as the whole session in memory does, and ends with the
//! same registers, clock, head and document. A state kept as one value (the older layout)
//! moves to rows whole.

mod support;

use std::collections::BTreeMap;

use firemode_merge::{
    path_key, Batch, Pointer, ReportLimits, RowChanges, SessionRows, SessionState, StampRow,
};
use proptest::prelude::*;
use serde_json::json;
use support::history::{delivery_order, generate, script, Generated};
use support::{batch, set};

/// A store of one session's rows, as `firemode-store` keeps them.
#[derive(Clone, Default)]
struct RowStore {
    head: Option<String>,
    base: Option<String>,
    registers: BTreeMap<Vec<u8>, String>,
    stamps: BTreeMap<(String, u64), u64>,
}

impl RowStore {
    /// The rows a merge of `batch` reads.
    fn read_for(&self, batch: &Batch) -> SessionRows {
        let reads = batch.reads();
        let registers = reads
            .registers
            .iter()
            .flat_map(|range| {
                self.registers
                    .range(range.start.clone()..range.end.clone())
                    .map(|(_, register)| register.clone())
            })
            .chain(
                reads
                    .ancestor_keys()
                    .filter_map(|key| self.registers.get(key).cloned()),
            )
            .collect();
        let stamps = reads
            .stamps
            .iter()
            .filter_map(|(replica, sequence)| {
                let stamp = self.stamps.get(&(replica.clone(), *sequence))?;
                Some(StampRow {
                    replica_id: replica.clone(),
                    sequence: *sequence,
                    stamp: *stamp,
                })
            })
            .collect();
        SessionRows {
            head: self.head.clone().unwrap_or_else(|| "{}".to_owned()),
            base: self.base.clone(),
            registers,
            stamps,
        }
    }

    /// Every register and the head: what the session's reads load.
    fn read_all(&self) -> SessionRows {
        SessionRows {
            head: self.head.clone().unwrap_or_else(|| "{}".to_owned()),
            base: self.base.clone(),
            registers: self.registers.values().cloned().collect(),
            stamps: Vec::new(),
        }
    }

    fn write(&mut self, changes: RowChanges) {
        self.head = Some(changes.head);
        if let Some(base) = changes.base {
            self.base = Some(base);
        }
        for key in changes.deletes {
            self.registers.remove(&key);
        }
        for row in changes.upserts {
            self.registers.insert(row.key, row.register);
        }
        for row in changes.stamps {
            let previous = self
                .stamps
                .insert((row.replica_id, row.sequence), row.stamp);
            assert!(previous.is_none(), "a stamp row was written twice");
        }
        self.stamps.retain(|(replica, sequence), _| {
            *sequence >= changes.stamps_below.get(replica).copied().unwrap_or(0)
        });
    }
}

/// Every register key names its register's path.
fn keys_match(store: &RowStore) -> Result<(), TestCaseError> {
    for (key, text) in &store.registers {
        let value: serde_json::Value = serde_json::from_str(text).expect("register JSON");
        let path = Pointer::parse(value["path"].as_str().expect("a path")).expect("pointer");
        prop_assert_eq!(&path_key(&path), key);
    }
    Ok(())
}

const LIMITS: ReportLimits = ReportLimits {
    max_conflicts: 3,
    max_bytes: 400,
};

/// One delivery attempt, to the whole session and to the rows; `Ok(false)` when the batch
/// was refused or held back and must wait.
fn attempt(
    whole: &mut SessionState,
    rows: &mut RowStore,
    generated: &Generated,
    delivered: &mut bool,
) -> Result<bool, TestCaseError> {
    let seen = whole
        .clock()
        .get(&generated.batch.replica_id)
        .copied()
        .unwrap_or(0);
    if generated.assigned && (*delivered || seen + 1 != generated.sequence) {
        // A batch without its own entry is sent once, after its predecessor.
        return Ok(*delivered);
    }
    let expected = whole.apply_reporting(&generated.batch, LIMITS);
    let mut slice = SessionState::from_rows(&rows.read_for(&generated.batch))
        .map_err(|e| TestCaseError::fail(format!("rows do not load: {e}")))?;
    let (head, copy) = (slice.head_snapshot(), slice.clone());
    let got = slice.apply_reporting(&generated.batch, LIMITS);
    prop_assert_eq!(&got, &expected, "the rows answered otherwise");
    let changes = slice.written_rows(&head);
    let mut compared = rows.clone();
    compared.write(slice.changed_rows(&copy));
    match got {
        Ok(firemode_merge::Outcome::Applied(_)) => {
            rows.write(changes);
            prop_assert_eq!(&rows.registers, &compared.registers);
            prop_assert_eq!(&rows.head, &compared.head);
            prop_assert_eq!(&rows.stamps, &compared.stamps);
        }
        Ok(firemode_merge::Outcome::Duplicate) | Err(_) => {
            prop_assert!(
                changes.upserts.is_empty()
                    && changes.deletes.is_empty()
                    && changes.stamps.is_empty()
            );
        }
    }
    *delivered |= got.is_ok();
    Ok(got.is_ok())
}

/// A checkpoint now, compacted at once: the whole session in memory, and the rows loaded
/// whole, compacted and written back.
fn compact_both(
    whole: &mut SessionState,
    rows: &mut RowStore,
    at: u64,
) -> Result<(), TestCaseError> {
    whole.checkpoint(at, 1);
    whole.compact_before(at);
    let mut loaded = SessionState::from_rows(&rows.read_all())
        .map_err(|e| TestCaseError::fail(format!("rows do not load whole: {e}")))?;
    let before = loaded.clone();
    loaded.checkpoint(at, 1);
    prop_assert!(loaded.compaction_due(at) || loaded.clock().is_empty());
    loaded.compact_before(at);
    prop_assert!(!loaded.compaction_due(at));
    rows.write(loaded.changed_rows(&before));
    Ok(())
}

fn history_and_order() -> impl Strategy<Value = (Vec<Generated>, Vec<usize>)> {
    script(32).prop_flat_map(|steps| {
        let batches = generate(&steps);
        let count = batches.len();
        (Just(batches), delivery_order(count))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_session_kept_as_rows_merges_as_the_whole_session(
        (batches, order) in history_and_order(),
        compact_every in 2usize..16,
    ) {
        let mut whole = SessionState::default();
        let mut rows = RowStore::default();
        let mut delivered = vec![false; batches.len()];
        let mut waiting: Vec<usize> = Vec::new();
        let mut attempts = 0usize;
        for &index in &order {
            let mut queue = vec![index];
            while let Some(next) = queue.pop() {
                attempts += 1;
                if attempts.is_multiple_of(compact_every) {
                    compact_both(&mut whole, &mut rows, attempts as u64)?;
                }
                if attempt(&mut whole, &mut rows, &batches[next], &mut delivered[next])? {
                    // Progress: every waiting batch gets another try.
                    queue.append(&mut waiting);
                } else if !waiting.contains(&next) {
                    waiting.push(next);
                }
            }
        }
        keys_match(&rows)?;
        let loaded = SessionState::from_rows(&rows.read_all()).expect("the rows load whole");
        prop_assert_eq!(loaded.clock(), whole.clock());
        prop_assert_eq!(loaded.horizon(), whole.horizon());
        prop_assert_eq!(loaded.document(), whole.document());
        prop_assert_eq!(loaded.head_row(), whole.head_row());
        prop_assert_eq!(
            loaded.changes_since(&Default::default()).ok(),
            whole.changes_since(&Default::default()).ok()
        );
        // One stamp row per applied event not behind the horizon (compaction trims the rest,
        // and merging went on as the whole session's did without them).
        let behind = |replica: &str, sequence: u64| {
            sequence < whole.horizon().get(replica).copied().unwrap_or(0)
        };
        let kept = whole_stamps(&whole)
            .into_iter()
            .filter(|(replica, sequence)| !behind(replica, *sequence))
            .count();
        prop_assert_eq!(rows.stamps.len(), kept);
        prop_assert!(rows.stamps.keys().all(|(replica, sequence)| !behind(replica, *sequence)));
        // The whole session moved to rows at once is the same rows.
        let mut moved = RowStore::default();
        moved.write(whole.all_rows());
        prop_assert_eq!(&moved.registers, &rows.registers);
        prop_assert_eq!(&moved.head, &rows.head);
        prop_assert_eq!(&moved.stamps, &rows.stamps);
        let base = |store: &RowStore| store.base.clone().filter(|base| base != "{}");
        prop_assert_eq!(base(&moved), base(&rows));
    }
}

/// The events whose stamps the whole session keeps (every applied one), as one value lists
/// them.
fn whole_stamps(whole: &SessionState) -> Vec<(String, u64)> {
    let value = serde_json::to_value(whole).expect("a whole session serializes");
    value["stamps"]
        .as_object()
        .map(|replicas| {
            replicas
                .iter()
                .flat_map(|(replica, list)| {
                    let count = list.as_array().map_or(0, Vec::len) as u64;
                    (1..=count).map(move |sequence| (replica.clone(), sequence))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_batch_reads_its_ancestors_and_its_subtree_only() {
    let batch = batch(
        "a",
        &[("b", 2), ("a", 3)],
        10,
        vec![
            set("/x/y", json!(1)),
            set("/x/y/z", json!(2)),
            set("/q", json!(3)),
        ],
    );
    let reads = batch.reads();
    let inside = |path: &str| reads.covers(&path_key(&Pointer::parse(path).expect("pointer")));
    for read in ["/x", "/x/y", "/x/y/z", "/x/y/w/v", "/q", "/q/r"] {
        assert!(inside(read), "{read} is not read");
    }
    for unread in ["/a", "/x/z", "/xy", "/x/y\u{0}", "/p", "/r", "/x~1y"] {
        assert!(!inside(unread), "{unread} is read");
    }
    // Disjoint and sorted.
    assert!(reads
        .registers
        .windows(2)
        .all(|pair| pair[0].end < pair[1].start));
    // What a batch reads stays small whatever its keys and depth: a 64-deep path of
    // 14,000-byte keys (an 875 KiB body) is one key of 1,216 bytes and 63 prefix lengths;
    // 1,000 paths 64 deep (`/p{i}/k/…/k`) name 63,000 ancestors in about 0.5 MB, not the
    // 8 MB of a key each.
    let token = "t".repeat(14_000);
    let deep = format!("/{}", vec![token.as_str(); 64].join("/"));
    let deep = support::batch("a", &[], 10, vec![set(&deep, json!(1))]).reads();
    assert_eq!((deep.registers.len(), deep.ancestors.len()), (1, 63));
    let wide: Vec<_> = (0..1000)
        .map(|i| set(&format!("/p{i}{}", "/k".repeat(63)), json!(1)))
        .collect();
    let wide = support::batch("a", &[], 10, wide).reads();
    assert_eq!(wide.ancestors.len(), 63_000);
    let bytes: usize = [&deep, &wide]
        .iter()
        .map(|reads| {
            let ranges: usize = reads
                .registers
                .iter()
                .map(|r| r.start.len() + r.end.len())
                .sum();
            let keys: usize = reads.keys.iter().map(Vec::len).sum();
            ranges + keys + reads.ancestors.len() * 8
        })
        .sum();
    assert!(bytes < 1_000_000, "{bytes} bytes of keys");
    assert_eq!(
        reads.stamps,
        vec![
            ("a".to_owned(), 2),
            ("a".to_owned(), 3),
            ("b".to_owned(), 2)
        ]
    );
}

#[test]
fn keys_are_short_distinct_and_subtrees_are_contiguous() {
    let long = "k".repeat(3000);
    let long_nul = format!("{}\u{0}", "k".repeat(15));
    let mut paths: Vec<String> = [
        "/a",
        "/a/b",
        "/a/b/c",
        "/a\u{0}",
        "/a\u{1}",
        "/a\u{1}b",
        "/a~1b",
        "/ab",
        "/b",
        "/",
        "//",
        "/\u{0}/x",
        "/kkkkkkkkkkkkkkkk",
        "/kkkkkkkkkkkkkkkkk",
    ]
    .iter()
    .map(|p| (*p).to_owned())
    .collect();
    paths.push(format!("/{long}"));
    paths.push(format!("/{long}/x"));
    paths.push(format!("/{long}k"));
    paths.push(format!("/{long_nul}"));
    paths.push(format!("/{long_nul}/{long}"));
    paths.push(format!("/a/{}", vec![long.as_str(); 63].join("/")));
    let pointers: Vec<Pointer> = paths
        .iter()
        .map(|p| Pointer::parse(p).expect("pointer"))
        .collect();
    let keys: Vec<Vec<u8>> = pointers.iter().map(path_key).collect();
    for (pointer, key) in pointers.iter().zip(&keys) {
        // At most 19 bytes a token: a 64-deep path of 3,000-byte keys fits a btree entry.
        assert!(
            key.len() <= 19 * pointer.tokens().len(),
            "{} bytes",
            key.len()
        );
    }
    for (outer, outer_key) in pointers.iter().zip(&keys) {
        let range = firemode_merge::KeyRange::subtree(outer);
        for (inner, inner_key) in pointers.iter().zip(&keys) {
            let below = inner.tokens().starts_with(outer.tokens());
            assert_eq!(range.contains(inner_key), below, "{outer:?} vs {inner:?}");
            let same = inner.tokens() == outer.tokens();
            assert_eq!(inner_key == outer_key, same, "{outer:?} vs {inner:?}");
            assert_eq!(
                firemode_merge::KeyRange::at(outer).contains(inner_key),
                same
            );
        }
    }
}

#[test]
fn rows_that_break_the_invariants_are_refused() {
    let mut whole = SessionState::default();
    whole
        .apply(&batch("a", &[], 10, vec![set("/x", json!(1))]))
        .expect("applies");
    let mut store = RowStore::default();
    store.write(whole.all_rows());
    let good = store.read_all();
    let loaded = SessionState::from_rows(&good).expect("loads");
    let owned = SessionState::from_owned_rows(good.clone()).expect("loads");
    assert_eq!(owned.document(), loaded.document());
    assert_eq!(owned.all_rows(), loaded.all_rows());
    let refused = |edit: &dyn Fn(&mut SessionRows)| {
        let mut rows = good.clone();
        edit(&mut rows);
        let owned = SessionState::from_owned_rows(rows.clone()).expect_err("refused");
        assert_eq!(SessionState::from_rows(&rows).expect_err("refused"), owned);
    };
    refused(&|rows| rows.head = r#"{"clock":{"a":1},"stamps":{"a":[10]}}"#.to_owned());
    refused(&|rows| rows.head = r#"{"clock":{"a":0},"latest":{"a":10}}"#.to_owned());
    refused(&|rows| rows.head = r#"{"clock":{"a":1},"latest":{}}"#.to_owned());
    refused(&|rows| rows.registers.push(rows.registers[0].clone()));
    refused(&|rows| {
        rows.registers[0] = rows.registers[0].replace("\"timestamp\":10", "\"timestamp\":11")
    });
    refused(&|rows| rows.base = Some("[1]".to_owned()));
    refused(&|rows| {
        rows.stamps.push(StampRow {
            replica_id: "a".to_owned(),
            sequence: 2,
            stamp: 10,
        })
    });
}

/// A stamp row a batch must read and the store no longer has is corruption, never a lower
/// stamp guessed for the batch.
#[test]
fn a_missing_stamp_is_refused_not_guessed() {
    let mut whole = SessionState::default();
    for (replica, timestamp) in [("a", 10), ("b", 50), ("b", 60)] {
        let applied = whole
            .apply(&batch(replica, &[], timestamp, vec![set("/x", json!(1))]))
            .expect("applies");
        assert!(matches!(applied, firemode_merge::Outcome::Applied(_)));
    }
    let mut store = RowStore::default();
    store.write(whole.all_rows());
    // A batch that has seen (b, 1) only: its stamp must be read.
    let late = batch("c", &[("b", 1)], 5, vec![set("/y", json!(2))]);
    let mut rows = store.read_for(&late);
    assert!(rows
        .stamps
        .iter()
        .any(|row| row.replica_id == "b" && row.sequence == 1));
    let mut slice = SessionState::from_rows(&rows).expect("loads");
    assert!(slice.apply(&late).is_ok());
    rows.stamps.clear();
    let mut slice = SessionState::from_rows(&rows).expect("loads");
    assert!(matches!(
        slice.apply(&late),
        Err(firemode_merge::NotApplied::Corrupt(_))
    ));
}
