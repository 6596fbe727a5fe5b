//! Session reads: the stored state decoded (the one place an unreadable state is noticed and
//! logged, for reads and merges alike), the session as JSON (`session_id`, `document`,
//! `vector_clock`), and `GET /v1/tests/sessions/{id}`.

use crate::app::SyncApp;
use crate::caller::Caller;
use crate::problems::store_problem;
use crate::shared_reads::{Freshness, Snapshot};
use crate::HttpResponse;
use bytes::Bytes;
use firemode_merge::{CorruptState, SessionRows, SessionState};
use firemode_wire::Problem;
use firemode_worker::json_response;
use http::StatusCode;
use std::sync::Arc;

/// A stored session state that does not load (a 500: it needs an operator, not a retry).
#[derive(Clone, Debug, thiserror::Error)]
#[error("stored session state does not load: {0}")]
pub struct UnreadableState(#[from] CorruptState);

/// The stored rows as a [`SessionState`] (`None`: a new session, empty). An unreadable
/// state is logged here, once.
pub fn decode(
    session_id: &str,
    stored: Option<&SessionRows>,
) -> Result<SessionState, UnreadableState> {
    let Some(rows) = stored else {
        return Ok(SessionState::default());
    };
    SessionState::from_rows(rows).map_err(|e| unreadable(session_id, e))
}

/// [`decode`] of rows read for it alone, each register row dropped once parsed.
pub fn decode_owned(
    session_id: &str,
    stored: Option<SessionRows>,
) -> Result<SessionState, UnreadableState> {
    let Some(rows) = stored else {
        return Ok(SessionState::default());
    };
    SessionState::from_owned_rows(rows).map_err(|e| unreadable(session_id, e))
}

fn unreadable(session_id: &str, e: CorruptState) -> UnreadableState {
    tracing::error!(session_id, error = %e, "stored session state does not load");
    UnreadableState(e)
}

/// The caller's session and its version (a session never written is empty, version 0), read
/// once for all the requests that want it at this moment and this fresh
/// ([`crate::shared_reads`]), at most [`crate::shared_reads::WHOLE_READS_AT_ONCE`] such
/// snapshots held at once.
pub async fn load(
    app: &SyncApp,
    caller: &Caller,
    session_id: &str,
    freshness: Freshness,
) -> Result<Arc<Snapshot>, Problem> {
    app.reads
        .read(&caller.tenant, session_id, freshness, || async {
            let permit = app.whole_reads.acquire().await;
            let stored = app
                .store
                .session(&caller.tenant, session_id)
                .await
                .map_err(store_problem)?;
            let version = stored.as_ref().map_or(0, |s| s.version);
            let state = decode_owned(session_id, stored.map(|s| s.rows))?;
            Ok(match permit {
                Some(permit) => Snapshot::holding(state, version, permit),
                None => Snapshot::new(state, version),
            })
        })
        .await
}

/// The session as its `GET` and the bundle show it: `{"document","session_id","vector_clock"}`,
/// the document serialized from its [`firemode_merge::Document`] (never built as a `Value`).
pub fn session_json(session_id: &str, snapshot: &Snapshot) -> String {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"document\":");
    // Writing JSON with string keys into memory cannot fail.
    let _ = serde_json::to_writer(&mut out, snapshot.document());
    out.extend_from_slice(b",\"session_id\":");
    let _ = serde_json::to_writer(&mut out, session_id);
    out.extend_from_slice(b",\"vector_clock\":");
    let _ = serde_json::to_writer(&mut out, snapshot.state.clock());
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

/// `GET /v1/tests/sessions/{id}`: the merged document and the session clock.
pub async fn get(
    app: &SyncApp,
    caller: &Caller,
    session_id: &str,
) -> Result<HttpResponse, Problem> {
    let snapshot = load(app, caller, session_id, Freshness::Started).await?;
    let body = session_json(session_id, &snapshot);
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}
