//! `POST /v1/tests/sessions/{id}/results`: one batch, from its idempotency key and body to
//! the answer. Reads the key and the batch (400s), hands the merge to the session's
//! [`crate::merge_queue`] (one transaction with the key's record, shared with the merges of
//! the same session waiting with it), marks replayed answers, and records
//! `sync_latency_seconds` by client type.

use crate::app::SyncApp;
use crate::caller::Caller;
use crate::idempotency;
use crate::merge::{GroupMember, MergeInput, CONFLICT_BYTES_FLOOR};
use crate::merge_queue::GroupSettings;
use crate::problems::{key_reused, merge_problem};
use crate::request::{batch_from_value, parse_json, RequestContext};
use crate::HttpResponse;
use bytes::Bytes;
use firemode_merge::ReportLimits;
use firemode_store::MergeOutcome;
use firemode_wire::{Problem, PROBLEM_JSON};
use firemode_worker::json_response;
use http::request::Parts;
use http::{header, HeaderValue, StatusCode};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Merges one batch into the caller's session.
pub async fn post(
    app: &SyncApp,
    req: &Parts,
    caller: &Caller,
    session_id: &str,
    body: &[u8],
) -> Result<HttpResponse, Problem> {
    let key = idempotency::key(req)?;
    let sync = &app.config.sync;
    let started = Instant::now();
    let client_type = client_type(req);
    let value = parse_json(body).map_err(Problem::bad_request)?;
    let received_ms = now_ms();
    let context = RequestContext {
        subject: &caller.subject,
        now_ms: received_ms,
        max_clock_skew: sync.max_clock_skew.get(),
        max_changes: sync.max_changes_per_batch as usize,
    };
    // The fingerprint first: the batch takes the written values out of `value`.
    let idem = idempotency::record(&caller.subject, key, &req.method, session_id, &value, body);
    let batch = batch_from_value(value, &context).map_err(Problem::bad_request)?;
    let input = MergeInput {
        session_id: session_id.to_string(),
        subject: caller.subject.clone(),
        batch,
        limits: ReportLimits {
            max_conflicts: sync.max_conflicts_reported as usize,
            max_bytes: body.len().max(CONFLICT_BYTES_FLOOR),
        },
        request_id: request_id(req),
        at_ms: received_ms,
        tombstone_retention_ms: u64::try_from(sync.tombstone_retention.get().as_millis())
            .unwrap_or(u64::MAX),
    };
    let settings = GroupSettings {
        store: app.store.clone(),
        tenant: caller.tenant.clone(),
        idempotency_ttl: sync.idempotency_ttl.get(),
        whole_reads: app.whole_reads.clone(),
    };
    let outcome = app
        .merges
        .merge(settings, GroupMember { idem, input })
        .await
        .map_err(merge_problem)?;
    metrics::histogram!("sync_latency_seconds", "client_type" => client_type)
        .record(started.elapsed().as_secs_f64());
    match outcome {
        MergeOutcome::Ran(step) => Ok(answer(step.status, step.body, false)),
        MergeOutcome::Replay { status, body } => Ok(answer(status, body, true)),
        MergeOutcome::KeyReused => Err(key_reused()),
    }
}

/// The merge step's (or the remembered) answer; a replay says so in `idempotent-replayed`.
fn answer(status: u16, body: String, replayed: bool) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut resp = json_response(status, Bytes::from(body));
    if !status.is_success() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    }
    // The merge answers 500 only for a session that does not load (its refusal
    // `Unreadable`; refusals are never replayed).
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        crate::problems::mark_data_fault(&mut resp);
    }
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// The `client_type` label of `sync_latency_seconds`: the `x-client-type` header when it is
/// one of a few known kinds, else "other" (labels stay bounded whatever clients send).
fn client_type(req: &Parts) -> &'static str {
    match req.headers.get("x-client-type").map(|v| v.as_bytes()) {
        Some(b"tablet") => "tablet",
        Some(b"web") => "web",
        Some(b"mobile") => "mobile",
        Some(b"cli") => "cli",
        _ => "other",
    }
}

/// The request's id as the front set it (always present behind the front).
fn request_id(req: &Parts) -> String {
    req.headers
        .get(firemode_wire::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
