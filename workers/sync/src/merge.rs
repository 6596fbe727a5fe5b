//! The merge step: the closure the store runs under the session's lock on the stored state.
//! It checks the replica's owner, applies the batch with `firemode-merge`, and decides the
//! answer and whether it is remembered under the idempotency key. No I/O.

use crate::session;
use firemode_merge::{
    Applied, Batch, Conflict, MissingDependencies, Outcome, ReportLimits, SessionState,
};
use firemode_store::{MergeFn, MergeStep};
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
}

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
}

/// The closure for `Store::merge_session`.
pub fn closure(input: MergeInput) -> MergeFn {
    Box::new(move |stored: Option<&str>| merge_batch(&input, stored))
}

/// The merge, run by the store under the session's lock.
pub fn merge_batch(input: &MergeInput, stored: Option<&str>) -> MergeStep {
    apply(input, stored).unwrap_or_else(|refusal| {
        let problem = Problem::from(refusal);
        MergeStep {
            new_state: None,
            status: problem.status.as_u16(),
            body: String::from_utf8_lossy(&problem.to_bytes()).into_owned(),
            remember: false,
        }
    })
}

fn apply(input: &MergeInput, stored: Option<&str>) -> Result<MergeStep, Refusal> {
    let session_id = input.session_id.as_str();
    let mut state = session::decode(session_id, stored)?;
    let replica = input.batch.replica_id.as_str();
    if state
        .owner(replica)
        .is_some_and(|owner| owner != input.subject)
    {
        return Err(Refusal::ReplicaOwned {
            replica: replica.to_owned(),
        });
    }
    Ok(match state.apply_reporting(&input.batch, input.limits)? {
        Outcome::Applied(applied) => {
            record_conflicts(session_id, &applied);
            state.claim(replica, &input.subject);
            let (count, listed, total) =
                (applied.applied, &applied.conflicts, applied.conflicts_total);
            MergeStep {
                new_state: Some(serde_json::to_string(&state).unwrap_or_default()),
                status: 200,
                body: answer(session_id, &state, count, listed, total),
                remember: true,
            }
        }
        // Already applied: nothing changes, and the answer says so.
        Outcome::Duplicate => MergeStep {
            new_state: None,
            status: 200,
            body: answer(session_id, &state, 0, &[], 0),
            remember: true,
        },
    })
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
