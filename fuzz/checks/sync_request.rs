// Fuzz check `sync_request`: reading a sync request body (`firemode_sync::request::parse_batch`).
//
// Invariants: `parse_batch` never panics on any bytes; when it accepts a body, the batch has at
// most `max_changes` changes, a replica id of 1-128 characters (the token's subject when the body
// names none), clock entries with 1-128 character replica ids, a timestamp no later than
// now + the allowed skew, and `Batch::validate()` is Ok. The batch written back as a request
// body parses to the same batch. Applying it to a new session either applies it or refuses it
// without a change, and the resulting state saves and loads back equal.
//
// Shared by `fuzz/fuzz_targets/sync_request.rs` and `tests/e2e/fuzz_corpus.rs` (through
// `include!`), so it uses only workspace crates and serde_json.

use firemode_merge::{Change, Outcome, SessionState};
use firemode_sync::request::{parse_batch, RequestContext};
use serde_json::{json, Value};
use std::time::Duration;

const SUBJECT: &str = "fuzz-subject";
const NOW_MS: u64 = 1_763_800_000_000;
const MAX_CHANGES: usize = 8;
const MAX_SKEW: Duration = Duration::from_secs(300);

fn context() -> RequestContext<'static> {
    RequestContext {
        subject: SUBJECT,
        now_ms: NOW_MS,
        max_clock_skew: MAX_SKEW,
        max_changes: MAX_CHANGES,
    }
}

fn id_length_ok(id: &str) -> bool {
    (1..=128).contains(&id.chars().count())
}

/// Checks one fuzz input; panics when an invariant breaks.
pub fn check(data: &[u8]) {
    let ctx = context();
    let Ok(batch) = parse_batch(data, &ctx) else {
        return;
    };
    assert!(
        batch.changes.len() <= MAX_CHANGES,
        "too many changes accepted"
    );
    assert!(
        id_length_ok(&batch.replica_id),
        "bad replica id {:?}",
        batch.replica_id
    );
    for replica in batch.clock.keys() {
        assert!(id_length_ok(replica), "bad clock replica id {replica:?}");
    }
    let ceiling = NOW_MS + u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
    assert!(
        batch.timestamp_ms <= ceiling,
        "timestamp beyond the allowed skew"
    );
    if let Err(e) = batch.validate() {
        panic!("an accepted batch does not validate: {e}");
    }
    let body: Value =
        serde_json::from_slice(data).unwrap_or_else(|e| panic!("accepted non-JSON: {e}"));
    let named_replica = body
        .get("_sync_meta")
        .and_then(|meta| meta.get("replica_id"))
        .and_then(Value::as_str);
    if named_replica.is_none() {
        assert_eq!(
            batch.replica_id, SUBJECT,
            "the subject is the default replica"
        );
    }

    // The batch written back in the request's vocabulary reads the same.
    let changes: Vec<Value> = batch
        .changes
        .iter()
        .map(|change| match change {
            Change::Set { path, value } => {
                json!({"op": "set", "path": path.as_str(), "value": value})
            }
            Change::Remove { path } => json!({"op": "remove", "path": path.as_str()}),
        })
        .collect();
    let mut written = json!({
        "changes": changes,
        "_sync_meta": {
            "vector_clock": batch.clock,
            "timestamp": batch.timestamp_ms,
        },
    });
    if batch.replica_named {
        written["_sync_meta"]["replica_id"] = json!(batch.replica_id);
    }
    let written =
        serde_json::to_vec(&written).unwrap_or_else(|e| panic!("a batch serializes: {e}"));
    match parse_batch(&written, &ctx) {
        Ok(again) => assert_eq!(again, batch, "the batch changed when written back"),
        Err(e) => panic!("the batch written back is refused: {e}"),
    }

    // A new session either takes the batch or refuses it without a change; either way its
    // state saves and loads back.
    let mut state = SessionState::default();
    match state.apply(&batch) {
        Ok(Outcome::Applied(applied)) => {
            assert_eq!(applied.dot.0, batch.replica_id);
            assert!(applied.effective_timestamp >= batch.timestamp_ms);
            assert!(applied.applied <= batch.changes.len());
            assert!(applied.conflicts.is_empty(), "a first batch met a conflict");
        }
        Ok(Outcome::Duplicate) => panic!("a new session took a batch for a duplicate"),
        Err(refusal) => {
            let firemode_merge::NotApplied::MissingDependencies(refusal) = refusal else {
                panic!("a new session refused with {refusal}");
            };
            assert!(refusal.session_clock.is_empty());
            assert_eq!(
                state,
                SessionState::default(),
                "a refused batch changed the state"
            );
        }
    }
    assert!(state.document().is_object());
    let saved = serde_json::to_string(&state).unwrap_or_else(|e| panic!("a state serializes: {e}"));
    let loaded: SessionState = serde_json::from_str(&saved)
        .unwrap_or_else(|e| panic!("a state made from an accepted request does not load: {e}"));
    assert_eq!(loaded, state);
}
