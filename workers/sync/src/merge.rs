//! The merge step: the closure the store runs under the session's lock on the stored state.
//! It checks the replica's owner, applies the batch with `firemode-merge`, and decides the
//! answer and whether it is remembered under the idempotency key. No I/O.

use crate::session;
use firemode_merge::{
    Applied, Batch, Conflict, ConflictSide, MissingDependencies, MustRefetch, NotApplied, Outcome,
    ReportLimits, SessionState,
};
use firemode_store::{MergeFn, MergeStep, SessionRows};
use firemode_wire::Problem;
use serde_json::json;

/// The listed conflicts of an answer take at most about this many bytes, or the request
/// body's size when larger: an answer stays within a small multiple of its request.
pub const CONFLICT_BYTES_FLOOR: usize = 64 * 1024;

/// What the merge closure needs besides the stored state.
pub struct MergeInput {
    pub session_id: String,
    /// The caller's `sub`: the owner a new replica gets, and who must own an old one.
    pub subject: String,
    pub batch: Batch,
    /// `sync.max_conflicts_reported`, and a byte budget for the listed conflicts.
    pub limits: ReportLimits,
    /// The request's `x-request-id`, kept with its conflicts in the journal.
    pub request_id: String,
    /// When the merge was asked for (ms since the epoch), kept with its conflicts.
    pub at_ms: u64,
    /// `sync.tombstone_retention`, in ms: history older than this is compacted.
    pub tombstone_retention_ms: u64,
}

/// A session keeps about this many candidate horizons over its retention.
const CHECKPOINTS_PER_RETENTION: u64 = 30;

/// Why a batch was refused without changing the session. Refusals are not remembered under
/// the idempotency key: the client's retry, after fixing what was wrong, must be merged.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the stored session is unreadable; the batch was not applied")]
    Unreadable(#[from] session::UnreadableState),
    #[error("replica_id {replica:?} was first used in this session by another user; every device sends its own replica_id (or none, to write as your own user)")]
    ReplicaOwned { replica: String },
    /// "Sync first": the batch's clock names events the session lacks.
    #[error("the batch's vector clock names events this session has not seen; fetch the session, merge, and send again")]
    MissingDependencies(#[from] MissingDependencies),
    /// The batch's clock predates the compaction horizon (410).
    #[error(transparent)]
    MustRefetch(#[from] MustRefetch),
}

impl From<NotApplied> for Refusal {
    fn from(e: NotApplied) -> Refusal {
        match e {
            NotApplied::MissingDependencies(e) => Refusal::MissingDependencies(e),
            NotApplied::MustRefetch(e) => Refusal::MustRefetch(e),
            NotApplied::Corrupt(e) => Refusal::Unreadable(session::UnreadableState::from(e)),
        }
    }
}

/// The closure for `Store::merge_session`.
pub fn closure(input: MergeInput) -> MergeFn {
    Box::new(move |stored: Option<SessionRows>| merge_batch(&input, stored.as_ref()))
}

/// The merge, run by the store under the session's lock on the rows the batch reads.
pub fn merge_batch(input: &MergeInput, stored: Option<&SessionRows>) -> MergeStep {
    apply(input, stored).unwrap_or_else(|refusal| {
        let problem = Problem::from(refusal);
        MergeStep {
            changes: None,
            status: problem.status.as_u16(),
            body: String::from_utf8_lossy(&problem.to_bytes()).into_owned(),
            remember: false,
            journal: Vec::new(),
            compact: false,
        }
    })
}

fn apply(input: &MergeInput, stored: Option<&SessionRows>) -> Result<MergeStep, Refusal> {
    let session_id = input.session_id.as_str();
    let mut state = session::decode(session_id, stored)?;
    let before = state.clone();
    let replica = input.batch.replica_id.as_str();
    if state
        .owner(replica)
        .is_some_and(|owner| owner != input.subject)
    {
        return Err(Refusal::ReplicaOwned {
            replica: replica.to_owned(),
        });
    }
    let outcome = state
        .apply_reporting(&input.batch, input.limits)
        .inspect_err(|e| {
            if let NotApplied::Corrupt(corrupt) = e {
                tracing::error!(session_id, error = %corrupt, "stored session state does not load");
            }
        })?;
    Ok(match outcome {
        Outcome::Applied(applied) => {
            record_conflicts(session_id, &applied);
            state.claim(replica, &input.subject);
            let compact = checkpoint(&mut state, input);
            let (count, listed, total) =
                (applied.applied, &applied.conflicts, applied.conflicts_total);
            MergeStep {
                changes: Some(state.changed_rows(&before)),
                status: 200,
                body: answer(session_id, &state, count, listed, total),
                remember: true,
                journal: journal(input, listed),
                compact,
            }
        }
        // Already applied: nothing changes, and the answer says so.
        Outcome::Duplicate => MergeStep {
            changes: None,
            status: 200,
            body: answer(session_id, &state, 0, &[], 0),
            remember: true,
            journal: Vec::new(),
            compact: false,
        },
    })
}

/// Notes the session clock as a candidate horizon now and then; says whether a checkpoint is
/// older than `sync.tombstone_retention`, so the session is due for compaction (design §3:
/// storage grows with the live document), which [`compact`] does on the whole session.
fn checkpoint(state: &mut SessionState, input: &MergeInput) -> bool {
    let retention = input.tombstone_retention_ms.max(1);
    state.checkpoint(input.at_ms, (retention / CHECKPOINTS_PER_RETENTION).max(1));
    state.compaction_due(input.at_ms.saturating_sub(retention))
}

/// The closure for `Store::compact_session`: compacts the history older than `retention_ms`
/// (at `now_ms`) and returns the rows that changed.
pub fn compact(session_id: String, now_ms: u64, retention_ms: u64) -> firemode_store::CompactFn {
    Box::new(move |rows: SessionRows| {
        let mut state = session::decode(&session_id, Some(&rows)).ok()?;
        let before = state.clone();
        let compacted = state.compact_before(now_ms.saturating_sub(retention_ms.max(1)))?;
        tracing::info!(
            session_id,
            folded = compacted.folded,
            tombstones = compacted.tombstones,
            "session history compacted"
        );
        Some(state.changed_rows(&before))
    })
}

/// The journal entries of the listed conflicts (design §3 "conflicts kept"): the store numbers
/// them (`seq`) in the merge's transaction. The same conflicts the answer lists, so the
/// journal's cost is bounded like the answer's.
fn journal(input: &MergeInput, conflicts: &[Conflict]) -> Vec<String> {
    conflicts
        .iter()
        .map(|conflict| {
            json!({
                "path": conflict.path,
                "winner": journal_side(&conflict.winner),
                "loser": journal_side(&conflict.loser),
                "request_id": input.request_id,
                "at": input.at_ms,
            })
            .to_string()
        })
        .collect()
}

/// One side of a kept conflict: the answer's fields plus the write's effective timestamp.
fn journal_side(side: &ConflictSide) -> serde_json::Value {
    let mut value = json!(side);
    value["timestamp"] = json!(side.timestamp);
    value
}

/// The `crdt_conflicts_total` counter and a log line when writes were resolved.
fn record_conflicts(session_id: &str, applied: &Applied) {
    metrics::counter!("crdt_conflicts_total").increment(applied.conflicts_total);
    if applied.conflicts_total > 0 {
        tracing::info!(
            session_id,
            conflicts = applied.conflicts_total,
            "concurrent writes resolved"
        );
    }
}

/// The 200 answer: the session clock after the batch, how many changes took effect, the
/// conflicts listed and how many there were in all.
fn answer(
    session_id: &str,
    state: &SessionState,
    applied: usize,
    conflicts: &[Conflict],
    conflicts_total: u64,
) -> String {
    json!({
        "session_id": session_id,
        "vector_clock": state.clock(),
        "applied": applied,
        "conflicts": conflicts,
        "conflicts_total": conflicts_total,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse_batch, RequestContext};
    use serde_json::Value;
    use std::time::Duration;

    fn input(subject: &str, body: &str) -> MergeInput {
        let ctx = RequestContext {
            subject,
            now_ms: 1_000,
            max_clock_skew: Duration::from_secs(300),
            max_changes: 10,
        };
        MergeInput {
            session_id: "S".into(),
            subject: subject.into(),
            batch: parse_batch(body.as_bytes(), &ctx).expect("test batch"),
            limits: ReportLimits {
                max_conflicts: 10,
                max_bytes: CONFLICT_BYTES_FLOOR,
            },
            request_id: "req-1".into(),
            at_ms: 1_000,
            tombstone_retention_ms: 30 * 24 * 3600 * 1000,
        }
    }

    /// The rows a first merge wrote: every row of the new session.
    fn rows(step: &MergeStep) -> SessionRows {
        let changes = step
            .changes
            .as_ref()
            .expect("a merge that changed the session");
        SessionRows {
            head: changes.head.clone(),
            base: changes.base.clone(),
            registers: changes.upserts.iter().map(|r| r.register.clone()).collect(),
            stamps: changes.stamps.clone(),
        }
    }

    fn body(step: &MergeStep) -> Value {
        serde_json::from_str(&step.body).expect("answer is JSON")
    }

    const SET: &str =
        r#"{"changes":[{"op":"set","path":"/a","value":1}],"_sync_meta":{"replica_id":"t1"}}"#;

    #[test]
    fn a_batch_is_applied_then_a_duplicate_changes_nothing() {
        let first = merge_batch(&input("alice", SET), None);
        assert_eq!((first.status, first.remember), (200, true));
        assert_eq!(body(&first)["applied"], 1);
        assert_eq!(body(&first)["vector_clock"]["t1"], 1);
        let stored = rows(&first);
        let dup = r#"{"changes":[{"op":"set","path":"/a","value":1}],"_sync_meta":{"replica_id":"t1","vector_clock":{"t1":1}}}"#;
        let again = merge_batch(&input("alice", dup), Some(&stored));
        assert_eq!((again.status, again.remember), (200, true));
        assert!(again.changes.is_none());
        assert_eq!(body(&again)["applied"], 0);
        assert_eq!(body(&again)["conflicts"], serde_json::json!([]));
    }

    /// Refusals change nothing and are not remembered under the key.
    #[test]
    fn refusals_are_problems_that_are_not_remembered() {
        let corrupt = SessionRows {
            head: "{not json".to_owned(),
            ..SessionRows::default()
        };
        let unreadable = merge_batch(&input("alice", SET), Some(&corrupt));
        assert_eq!((unreadable.status, unreadable.remember), (500, false));
        assert!(unreadable.changes.is_none());
        assert_eq!(
            body(&unreadable)["detail"],
            "the stored session is unreadable; the batch was not applied"
        );

        let stored = rows(&merge_batch(&input("alice", SET), None));
        let owned = merge_batch(&input("bob", SET), Some(&stored));
        assert_eq!((owned.status, owned.remember), (403, false));
        assert_eq!(
            body(&owned)["type"],
            "tag:firemode,2026:problem/replica-owned"
        );
        assert!(body(&owned)["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("replica_id \"t1\" was first used")));

        let ahead = r#"{"changes":[],"_sync_meta":{"replica_id":"t2","vector_clock":{"t9":3}}}"#;
        let sync_first = merge_batch(&input("alice", ahead), Some(&stored));
        assert_eq!((sync_first.status, sync_first.remember), (409, false));
        assert_eq!(body(&sync_first)["title"], "Sync first");
        assert_eq!(body(&sync_first)["vector_clock"]["t1"], 1);
    }
}
