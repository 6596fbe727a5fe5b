//! The merge step: the closures the store runs under the session's lock on the stored rows,
//! for a group of merges of one session (see `merge_queue`) and for a compaction.
//! It checks the replica's owner, applies the batch with `firemode-merge`, and decides the
//! answer and whether it is remembered under the idempotency key. No I/O.

use crate::session;
use firemode_merge::{
    Applied, Batch, Conflict, ConflictSide, MissingDependencies, MustRefetch, NotApplied, Outcome,
    ReportLimits, SessionState,
};
use firemode_store::{GroupFn, GroupStep, IdempotencyKey, MergeOutcome, MergeStep, SessionRows};
use firemode_wire::Problem;
use serde_json::json;

/// The listed conflicts of an answer take at most about this many bytes, or the request
/// body's size when larger: an answer stays within a small multiple of its request.
pub const CONFLICT_BYTES_FLOOR: usize = 64 * 1024;

/// The journal keeps every conflict a merge finds while they take at most this many times the
/// answer's byte budget (design §3 "every conflict", with a request's cost bounded by its
/// size: one 41 KB batch can meet a million older-or-newer writes).
pub const JOURNAL_BUDGET_FACTOR: usize = 8;

/// The limits of what a merge journals: no cap on the count, [`JOURNAL_BUDGET_FACTOR`] times
/// the answer's bytes. Wider than `answer` in both, so the answer's list is its prefix.
fn journal_limits(answer: ReportLimits) -> ReportLimits {
    ReportLimits {
        max_conflicts: usize::MAX,
        max_bytes: answer.max_bytes.saturating_mul(JOURNAL_BUDGET_FACTOR),
    }
}

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

/// One merge alone on the rows its batch reads (a group of one; the tests' short form).
pub fn merge_batch(input: &MergeInput, stored: Option<&SessionRows>) -> MergeStep {
    apply(input, stored).unwrap_or_else(refused)
}

/// One member of a group of merges of one session (see `merge_queue`): its key, to tell a
/// key used twice in the group, and its input.
pub struct GroupMember {
    pub idem: IdempotencyKey,
    pub input: MergeInput,
}

/// The closure for `Store::merge_group`.
pub fn group_closure(members: Vec<GroupMember>) -> GroupFn {
    Box::new(move |stored: Option<SessionRows>, recorded| merge_group(&members, stored, recorded))
}

/// A group of merges of one session, run by the store under the session's lock: each member
/// in order on the state the ones before it left, as if each had its own transaction. A
/// member whose key already has a record gets that answer; one whose key an earlier member
/// of the group used and recorded gets that member's answer again (the same request) or
/// "key reused" (another one).
pub fn merge_group(
    members: &[GroupMember],
    stored: Option<SessionRows>,
    recorded: Vec<Option<MergeOutcome>>,
) -> GroupStep {
    let session_id = members.first().map_or("", |m| m.input.session_id.as_str());
    // The loaded rows and the state made of them are freed when this returns.
    crate::memory::freed_much(stored.as_ref().map_or(0, |rows| rows.registers.len()));
    let mut state = match session::decode_owned(session_id, stored) {
        Ok(state) => state,
        Err(unreadable) => {
            let answers = recorded
                .into_iter()
                .map(|pre| {
                    pre.unwrap_or_else(|| {
                        MergeOutcome::Ran(refused(Refusal::Unreadable(unreadable.clone())))
                    })
                })
                .collect();
            return GroupStep {
                changes: None,
                answers,
                compact: false,
            };
        }
    };
    let before = state.head_snapshot();
    let (mut changed, mut compact) = (false, false);
    let mut answers: Vec<MergeOutcome> = Vec::with_capacity(members.len());
    for (member, pre) in members.iter().zip(recorded) {
        if let Some(pre) = pre {
            answers.push(pre);
            continue;
        }
        if let Some(again) = recorded_in_group(members, &answers, &member.idem) {
            answers.push(again);
            continue;
        }
        let step = match apply_to(&member.input, &mut state) {
            Ok((step, applied)) => {
                changed |= applied;
                compact |= step.compact;
                step
            }
            Err(refusal) => refused(refusal),
        };
        answers.push(MergeOutcome::Ran(step));
    }
    GroupStep {
        changes: changed.then(|| state.written_rows(&before)),
        answers,
        compact,
    }
}

/// The answer an earlier member of the group recorded under `idem`'s key, if any: its answer
/// again for the same request, "key reused" for another.
fn recorded_in_group(
    members: &[GroupMember],
    answers: &[MergeOutcome],
    idem: &IdempotencyKey,
) -> Option<MergeOutcome> {
    members
        .iter()
        .zip(answers)
        .find_map(|(earlier, answer)| match answer {
            MergeOutcome::Ran(step)
                if step.remember
                    && earlier.idem.subject == idem.subject
                    && earlier.idem.key == idem.key =>
            {
                Some(if earlier.idem.request_hash == idem.request_hash {
                    MergeOutcome::Replay {
                        status: step.status,
                        body: step.body.clone(),
                    }
                } else {
                    MergeOutcome::KeyReused
                })
            }
            _ => None,
        })
}

/// A refusal as the member's answer: a problem, not remembered under the key.
fn refused(refusal: Refusal) -> MergeStep {
    let problem = Problem::from(refusal);
    MergeStep {
        changes: None,
        status: problem.status.as_u16(),
        body: String::from_utf8_lossy(&problem.to_bytes()).into_owned(),
        remember: false,
        journal: Vec::new(),
        compact: false,
    }
}

fn apply(input: &MergeInput, stored: Option<&SessionRows>) -> Result<MergeStep, Refusal> {
    let mut state = session::decode(&input.session_id, stored)?;
    let before = state.head_snapshot();
    let (mut step, applied) = apply_to(input, &mut state)?;
    if applied {
        step.changes = Some(state.written_rows(&before));
    }
    Ok(step)
}

/// Applies one batch to `state`: its answer (without rows: the caller writes them) and
/// whether it changed the session.
fn apply_to(input: &MergeInput, state: &mut SessionState) -> Result<(MergeStep, bool), Refusal> {
    let session_id = input.session_id.as_str();
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
        .apply_reporting(&input.batch, journal_limits(input.limits))
        .inspect_err(|e| {
            if let NotApplied::Corrupt(corrupt) = e {
                tracing::error!(session_id, error = %corrupt, "stored session state does not load");
            }
        })?;
    Ok(match outcome {
        Outcome::Applied(applied) => {
            record_conflicts(session_id, &applied);
            state.claim(replica, &input.subject);
            let compact = checkpoint(state, input);
            let (count, kept, total) =
                (applied.applied, &applied.conflicts, applied.conflicts_total);
            let listed = &kept[..input.limits.fitting(kept)];
            let step = MergeStep {
                changes: None,
                status: 200,
                body: answer(session_id, state, count, listed, total),
                remember: true,
                journal: journal_within_budget(input, kept, total),
                compact,
            };
            (step, true)
        }
        // Already applied: nothing changes, and the answer says so.
        Outcome::Duplicate => {
            let step = MergeStep {
                changes: None,
                status: 200,
                body: answer(session_id, state, 0, &[], 0),
                remember: true,
                journal: Vec::new(),
                compact: false,
            };
            (step, false)
        }
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
        crate::memory::freed_much(rows.registers.len());
        let mut state = session::decode(&session_id, Some(&rows)).ok()?;
        let before = state.clone();
        let compacted = state.compact_before(now_ms.saturating_sub(retention_ms.max(1)))?;
        if compacted.folded > 0 {
            tracing::info!(
                session_id,
                folded = compacted.folded,
                tombstones = compacted.tombstones,
                "session history compacted"
            );
        }
        Some(state.changed_rows(&before))
    })
}

/// The journal entries of a merge's conflicts (design §3 "conflicts kept"): the store numbers
/// them (`seq`) in the merge's transaction. Every conflict, unless they outgrow
/// [`journal_limits`]: then the first ones, as the answer lists the first ones.
///
/// The bound holds on the entries as stored: their JSON takes at most
/// `journal_limits(..).max_bytes` bytes in all (the conflicts were chosen by their answer
/// form; an entry adds the request id, the time and both timestamps).
fn journal(input: &MergeInput, conflicts: &[Conflict]) -> Vec<String> {
    let budget = journal_limits(input.limits).max_bytes;
    let mut used = 0usize;
    let mut entries = Vec::with_capacity(conflicts.len());
    for conflict in conflicts {
        let entry = json!({
            "path": conflict.path,
            "winner": journal_side(&conflict.winner),
            "loser": journal_side(&conflict.loser),
            "request_id": input.request_id,
            "at": input.at_ms,
        })
        .to_string();
        used = used.saturating_add(entry.len());
        if used > budget {
            break;
        }
        entries.push(entry);
    }
    entries
}

/// [`journal`], with a warning when it could not keep every conflict.
fn journal_within_budget(input: &MergeInput, conflicts: &[Conflict], total: u64) -> Vec<String> {
    let entries = journal(input, conflicts);
    let kept = u64::try_from(entries.len()).unwrap_or(u64::MAX);
    if kept < total {
        tracing::warn!(
            session_id = input.session_id,
            conflicts = total,
            kept,
            "a merge met more conflicts than its journal budget holds (8 times the answer's bytes): the first ones are kept"
        );
    }
    entries
}

/// One side of a kept conflict: the answer's fields plus the write's effective timestamp.
fn journal_side(side: &ConflictSide) -> serde_json::Value {
    let mut value = json!(side);
    value["timestamp"] = json!(side.timestamp);
    value
}

/// The `crdt_conflicts_total` counter and, at debug level, a log line when writes were
/// resolved (conflicts are routine on a busy site: the journal keeps each one and the counter
/// counts them; an INFO line per merge was thousands of lines a second under load).
fn record_conflicts(session_id: &str, applied: &Applied) {
    metrics::counter!("crdt_conflicts_total").increment(applied.conflicts_total);
    if applied.conflicts_total > 0 {
        tracing::debug!(
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

    fn member(subject: &str, key: &str, body: &str) -> GroupMember {
        GroupMember {
            idem: IdempotencyKey {
                subject: subject.into(),
                key: key.into(),
                request_hash: format!("hash of {body}"),
                legacy_request_hash: None,
            },
            input: input(subject, body),
        }
    }

    fn status_and_body(answer: &MergeOutcome) -> (u16, Value) {
        match answer {
            MergeOutcome::Ran(step) => (step.status, body(step)),
            MergeOutcome::Replay { status, body } => {
                (*status, serde_json::from_str(body).expect("JSON"))
            }
            MergeOutcome::KeyReused => (422, Value::Null),
        }
    }

    /// A group answers each member as its own transaction after the ones before it would,
    /// and writes their rows once.
    #[test]
    fn a_group_merges_as_its_members_would_one_by_one() {
        let bodies = [
            r#"{"changes":[{"op":"set","path":"/a","value":1}],"_sync_meta":{"replica_id":"t1"}}"#,
            r#"{"changes":[{"op":"set","path":"/a/b","value":2}],"_sync_meta":{"replica_id":"t2"}}"#,
            // Sync first: names an event the session has not seen.
            r#"{"changes":[],"_sync_meta":{"replica_id":"t3","vector_clock":{"t9":1}}}"#,
            r#"{"changes":[{"op":"remove","path":"/a"}],"_sync_meta":{"replica_id":"t1","vector_clock":{"t1":2,"t2":1}}}"#,
        ];
        let members: Vec<GroupMember> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| member("alice", &format!("k{i}"), b))
            .collect();
        let group = merge_group(&members, None, vec![None, None, None, None]);
        // One by one, each on the rows the one before wrote.
        let mut state = SessionState::default();
        for (member, answer) in members.iter().zip(&group.answers) {
            let (expected, _) =
                apply_to(&member.input, &mut state).unwrap_or_else(|r| (refused(r), false));
            assert_eq!(status_and_body(answer), (expected.status, body(&expected)));
        }
        let changes = group.changes.expect("rows to write");
        let loaded = SessionState::from_rows(&SessionRows {
            head: changes.head,
            base: changes.base,
            registers: changes.upserts.into_iter().map(|r| r.register).collect(),
            stamps: changes.stamps,
        })
        .expect("loads");
        assert_eq!(loaded.document(), state.document());
        assert_eq!(loaded.clock(), state.clock());
        assert_eq!(
            group
                .answers
                .iter()
                .map(|a| status_and_body(a).0)
                .collect::<Vec<_>>(),
            vec![200, 200, 409, 200]
        );
    }

    /// A key used twice in one group: the same request gets the first answer again (applied
    /// once), another request "key reused"; a key with a record gets the record's answer.
    #[test]
    fn a_key_used_twice_in_a_group_is_answered_as_by_its_record() {
        let set = r#"{"changes":[{"op":"set","path":"/a","value":1}]}"#;
        let other = r#"{"changes":[{"op":"set","path":"/a","value":2}]}"#;
        let members = vec![
            member("alice", "k1", set),
            member("alice", "k1", set),
            member("alice", "k1", other),
            member("bob", "k1", other),
            member("alice", "k2", other),
        ];
        let recorded = vec![
            None,
            None,
            None,
            None,
            Some(MergeOutcome::Replay {
                status: 200,
                body: "{\"recorded\":true}".into(),
            }),
        ];
        let group = merge_group(&members, None, recorded);
        let answers: Vec<(u16, Value)> = group.answers.iter().map(status_and_body).collect();
        assert_eq!(answers[0].0, 200);
        assert!(matches!(group.answers[1], MergeOutcome::Replay { .. }));
        assert_eq!(answers[1], answers[0], "the same request, the same answer");
        assert!(matches!(group.answers[2], MergeOutcome::KeyReused));
        // Another user's key of the same name is another key: merged.
        assert_eq!(answers[3].0, 200);
        assert_eq!(answers[4].1, serde_json::json!({"recorded": true}));
        let changes = group.changes.expect("rows");
        let loaded = SessionState::from_rows(&SessionRows {
            head: changes.head,
            base: None,
            registers: changes.upserts.into_iter().map(|r| r.register).collect(),
            stamps: changes.stamps,
        })
        .expect("loads");
        // alice's k1 once and bob's k1: two events of their replicas.
        assert_eq!(loaded.clock().get("alice"), Some(&1));
        assert_eq!(loaded.clock().get("bob"), Some(&1));
    }

    /// The answer lists the first `max_conflicts_reported`; the journal keeps every one, with
    /// the answer's list as its prefix. Past the journal's byte budget, the first ones.
    #[test]
    fn the_journal_keeps_every_conflict_the_answer_does_not_list() {
        let batch = |replica: &str, value: u32| {
            let changes: Vec<String> = (0..10)
                .map(|i| format!(r#"{{"op":"set","path":"/f{i}","value":{value}}}"#))
                .collect();
            format!(
                r#"{{"changes":[{}],"_sync_meta":{{"replica_id":"{replica}"}}}}"#,
                changes.join(",")
            )
        };
        let first = merge_batch(&input("alice", &batch("t1", 1)), None);
        let stored = rows(&first);
        let mut second = input("bob", &batch("t2", 2));
        second.limits.max_conflicts = 3;
        let step = merge_batch(&second, Some(&stored));
        let answer = body(&step);
        assert_eq!(answer["conflicts_total"], 10);
        let listed = answer["conflicts"].as_array().expect("a list").clone();
        assert_eq!(listed.len(), 3);
        assert_eq!(step.journal.len(), 10, "every conflict is journaled");
        for (entry, listed) in step.journal.iter().zip(&listed) {
            let entry: Value = serde_json::from_str(entry).expect("journal entry is JSON");
            assert_eq!(entry["path"], listed["path"]);
            assert_eq!(entry["loser"]["value"], listed["loser"]["value"]);
        }

        // A budget that holds four entries' bytes keeps four; the answer still lists three.
        let one = merge_batch(&second, Some(&stored));
        let entry_bytes = one.journal[0].len();
        second.limits.max_bytes = entry_bytes * 4 / JOURNAL_BUDGET_FACTOR;
        let tight = merge_batch(&second, Some(&stored));
        let bytes: usize = tight.journal.iter().map(String::len).sum();
        assert!(
            bytes <= second.limits.max_bytes * JOURNAL_BUDGET_FACTOR,
            "{bytes} bytes kept"
        );
        assert!(
            (3..=4).contains(&tight.journal.len()),
            "{} kept",
            tight.journal.len()
        );
        assert_eq!(body(&tight)["conflicts_total"], 10);
    }
}
