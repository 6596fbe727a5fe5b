//! `firemode-sync`: merges offline test-session edits from many tablets and serves offline
//! bundles.
//!
//! * `POST /v1/tests/sessions/{id}/results` — one batch, merged by the CRDT of
//!   `firemode-merge` inside one store transaction with its `Idempotency-Key` record.
//! * `GET /v1/tests/sessions/{id}` — the merged document and the session clock.
//! * `GET /v1/tests/sessions/{id}/offline_bundle` — session + catalog for offline work.
//!
//! Sessions belong to a tenant: the token's `org` (`org:<org>`), or for a token without one
//! its subject alone (`sub:<sub>`), byte for byte (`firemode_wire::identity`). No request can
//! name another tenant's session.

#![forbid(unsafe_code)]

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use firemode_config::Config;
use firemode_merge::{Outcome, ReportLimits, SessionState};
use firemode_store::{IdempotencyKey, MergeOutcome, MergeStep, Store, StoreError};
use firemode_sync::bundle;
use firemode_sync::request::{batch_from_value, parse_json, RequestContext};
use firemode_wire::{ids, Identity, Problem, IDENTITY, PROBLEM_JSON};
use firemode_worker::{json_response, App, WorkerContext};
use http::request::Parts;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// mimalloc rather than glibc malloc: the request path allocates per request (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--check-store") => return check_store(),
        Some("--backup") => return backup(args.next()),
        _ => {}
    }
    firemode_worker::run("sync", SyncApp::start)
}

/// The effective config a one-shot command gets on stdin from `firemode`.
fn config_from_stdin(what: &str) -> Result<Config, ExitCode> {
    use std::io::Read as _;
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("firemode-sync {what}: cannot read the config on stdin: {e}");
        return Err(ExitCode::from(2));
    }
    Config::from_json(&text).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// `firemode-sync --backup FILE`, run by `firemode backup FILE`: an online copy of the
/// embedded SQLite store (the supervisor does not link the store).
fn backup(dest: Option<String>) -> ExitCode {
    let Some(dest) = dest else {
        eprintln!("firemode-sync --backup: name the file to write");
        return ExitCode::from(2);
    };
    let config = match config_from_stdin("--backup") {
        Ok(c) => c,
        Err(code) => return code,
    };
    use firemode_store::backup::{backup_sqlite, BackupError};
    match backup_sqlite(
        &config.database.url,
        &config.data_dir,
        std::path::Path::new(&dest),
    ) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e @ BackupError::Failed { .. }) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `firemode-sync --check-store`, run by `firemode check-config --connect` (the supervisor
/// does not link the store): the effective config as JSON on stdin; connects once, reads the
/// schema version, prints a summary (exit 0) or what is wrong (stderr, exit 2).
fn check_store() -> ExitCode {
    let config = match config_from_stdin("--check-store") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("firemode-sync --check-store: cannot start the async runtime");
        return ExitCode::from(1);
    };
    let checking = firemode_store::check::check_connection(
        &config.database.url,
        &config.data_dir,
        Duration::from_secs(5),
    );
    match runtime.block_on(checking) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("{problem}");
            ExitCode::from(2)
        }
    }
}

/// The catalog as the bundle embeds it, rendered once per version.
struct RenderedCatalog {
    version: String,
    json: Bytes,
}

struct SyncApp {
    store: Store,
    config: Arc<Config>,
    catalog: Arc<ArcSwapOption<RenderedCatalog>>,
}

/// The verified caller, from the headers the front set.
struct Caller {
    subject: String,
    tenant: String,
}

enum Route<'a> {
    Results(&'a str),
    Session(&'a str),
    Bundle(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v1/tests/sessions/")?;
    Some(match rest.split_once('/') {
        None => Route::Session(rest),
        Some((id, "results")) => Route::Results(id),
        Some((id, "offline_bundle")) => Route::Bundle(id),
        Some(_) => return None,
    })
}

impl SyncApp {
    async fn start(ctx: WorkerContext) -> anyhow::Result<SyncApp> {
        use metrics::{describe_counter, describe_histogram, Unit};
        describe_counter!(
            "crdt_conflicts_total",
            "Concurrent writes resolved by the merge"
        );
        describe_histogram!(
            "sync_latency_seconds",
            Unit::Seconds,
            "Sync merge requests, by client type"
        );
        describe_histogram!(
            "offline_bundle_bytes",
            Unit::Bytes,
            "Offline bundle sizes before compression"
        );
        metrics::counter!("crdt_conflicts_total").absolute(0);
        // Ready once the catalog the bundle embeds is loaded.
        let configured = firemode_worker::catalog::configured_catalog(&ctx.config.catalog.file)?;
        let catalog: Arc<ArcSwapOption<RenderedCatalog>> = Arc::default();
        let (slot, readiness) = (catalog.clone(), ctx.readiness.clone());
        tokio::spawn(firemode_worker::catalog::install_and_follow(
            ctx.store.clone(),
            configured,
            ctx.config.catalog.refresh_interval.get(),
            move |stored| {
                slot.store(Some(Arc::new(RenderedCatalog {
                    version: stored.version,
                    json: Bytes::from(stored.catalog.to_json()),
                })));
                readiness.set_app_ready(true);
            },
        ));
        // Expired idempotency records go away in the background (lookups ignore them anyway).
        let (store, ttl) = (ctx.store.clone(), ctx.config.sync.idempotency_ttl.get());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Err(e) = store.purge_idempotency(ttl).await {
                    tracing::debug!(error = %e, "purging idempotency records failed");
                }
            }
        });
        Ok(SyncApp {
            store: ctx.store,
            config: ctx.config,
            catalog,
        })
    }
}

impl App for SyncApp {
    async fn handle(&self, req: Parts, body: Bytes) -> Response<Full<Bytes>> {
        let path = req.uri.path();
        let Some(route) = route(path) else {
            return Problem::not_found(format!("no route for {path}")).into_response();
        };
        let id = match &route {
            Route::Results(id) | Route::Session(id) | Route::Bundle(id) => *id,
        };
        if !ids::is_valid_session_id(id) {
            return Problem::bad_request(
                "a session id is 1-64 characters of A-Z, a-z, 0-9, '_' and '-'",
            )
            .into_response();
        }
        let caller = match caller(&req) {
            Ok(c) => c,
            Err(p) => return p.into_response(),
        };
        // HEAD is GET without the body: the HTTP layer drops the body and keeps the headers.
        let read = req.method == Method::GET || req.method == Method::HEAD;
        let result = match route {
            Route::Results(_) if req.method == Method::POST => {
                self.post_results(&req, &caller, id, &body).await
            }
            Route::Session(_) if read => self.get_session(&caller, id).await,
            Route::Bundle(_) if read => self.get_bundle(&req, &caller, id).await,
            Route::Results(_) => Ok(method_not_allowed("POST")),
            Route::Session(_) | Route::Bundle(_) => Ok(method_not_allowed("GET, HEAD")),
        };
        result.unwrap_or_else(Problem::into_response)
    }
}

/// 405 with the `Allow` header RFC 9110 requires.
fn method_not_allowed(allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("use {allowed} on this route"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// The caller from the front's identity header. A request without one, or with one that does
/// not decode, is refused: there is no fallback tenant.
fn caller(req: &Parts) -> Result<Caller, Problem> {
    let refuse = |detail: &str| {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail.to_owned(),
        )
    };
    let header = req.headers.get(IDENTITY).ok_or_else(|| {
        refuse("no verified identity on the request (it must come through the front)")
    })?;
    let identity = Identity::decode(header.as_bytes())
        .map_err(|e| refuse(&format!("the verified identity is unreadable: {e}")))?;
    Ok(Caller {
        tenant: identity.tenant(),
        subject: identity.sub,
    })
}

/// A merge that could not get its session's lock in time is a 409 "still in flight"; any
/// other busy store is a 503.
fn merge_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Busy(detail) => Problem::new(
            StatusCode::CONFLICT,
            "in-flight",
            "Still in flight",
            format!("{detail}; a request with this session (or this Idempotency-Key) is still being applied — retry shortly"),
        ),
        other => store_problem(other),
    }
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Busy(detail) => {
            tracing::warn!(error = %detail, "store busy");
            Problem::unavailable("the store is busy; retry shortly")
        }
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "store unavailable");
            Problem::unavailable("the store is unavailable; retry shortly")
        }
        other => {
            tracing::error!(error = %other, "store error");
            Problem::internal("the store failed; the request was not applied")
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The same key with the same request replays; the fingerprint covers method, session and the
/// body's JSON value (design §3: key order and whitespace do not matter). The workspace's
/// `serde_json` maps are sorted (no `preserve_order`), so serialising the parsed value is a
/// canonical form: sorted keys, no whitespace, the last of duplicate keys (which is also the
/// one the merge reads).
fn fingerprint(method: &Method, session_id: &str, body: &serde_json::Value) -> String {
    let canonical = serde_json::to_vec(body).unwrap_or_default();
    hex_sha256(&[
        b"json\0",
        method.as_str().as_bytes(),
        b"\0",
        session_id.as_bytes(),
        b"\0",
        &canonical,
    ])
}

/// The fingerprint of releases that compared bytes: a retry of a request accepted just before
/// an upgrade, with the same bytes, still replays instead of answering 422.
fn legacy_fingerprint(method: &Method, session_id: &str, body: &[u8]) -> String {
    hex_sha256(&[
        method.as_str().as_bytes(),
        b"\0",
        session_id.as_bytes(),
        b"\0",
        body,
    ])
}

fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
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

/// Idempotency keys: 1-255 visible ASCII characters.
fn idempotency_key(req: &Parts) -> Result<String, Problem> {
    let value = req.headers.get("idempotency-key").ok_or_else(|| {
        Problem::bad_request(
            "the Idempotency-Key header is required (a unique string per batch, reused on retries)",
        )
    })?;
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Problem::bad_request(
            "Idempotency-Key must be 1-255 visible ASCII characters",
        ));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn answer(status: u16, body: String, replayed: bool) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut resp = json_response(status, Bytes::from(body));
    if !status.is_success() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    }
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

impl SyncApp {
    async fn post_results(
        &self,
        req: &Parts,
        caller: &Caller,
        session_id: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, Problem> {
        let key = idempotency_key(req)?;
        let sync = &self.config.sync;
        let started = std::time::Instant::now();
        let client_type = client_type(req);
        let value = parse_json(body).map_err(Problem::bad_request)?;
        let batch = batch_from_value(
            &value,
            &RequestContext {
                subject: &caller.subject,
                now_ms: now_ms(),
                max_clock_skew: sync.max_clock_skew.get(),
                max_changes: sync.max_changes_per_batch as usize,
            },
        )
        .map_err(Problem::bad_request)?;
        let idem = IdempotencyKey {
            subject: caller.subject.clone(),
            key,
            request_hash: fingerprint(&req.method, session_id, &value),
            legacy_request_hash: Some(legacy_fingerprint(&req.method, session_id, body)),
        };
        drop(value);
        let input = MergeInput {
            session_id: session_id.to_string(),
            subject: caller.subject.clone(),
            batch,
            limits: ReportLimits {
                max_conflicts: sync.max_conflicts_reported as usize,
                max_bytes: body.len().max(CONFLICT_BYTES_FLOOR),
            },
        };
        let merge = Box::new(move |stored: Option<&str>| merge_batch(&input, stored));
        let outcome = self
            .store
            .merge_session(
                &caller.tenant,
                session_id,
                idem,
                sync.idempotency_ttl.get(),
                merge,
            )
            .await
            .map_err(merge_problem)?;
        metrics::histogram!("sync_latency_seconds", "client_type" => client_type)
            .record(started.elapsed().as_secs_f64());
        Ok(match outcome {
            MergeOutcome::Ran(step) => answer(step.status, step.body, false),
            MergeOutcome::Replay { status, body } => answer(status, body, true),
            MergeOutcome::KeyReused => {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-key-reused",
                    "Idempotency key reused",
                    "this Idempotency-Key was already used for a different request; use a new key for a new batch",
                ))
            }
        })
    }

    async fn load_state(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<(SessionState, i64), Problem> {
        let stored = self
            .store
            .session(&caller.tenant, session_id)
            .await
            .map_err(store_problem)?;
        match stored {
            None => Ok((SessionState::default(), 0)),
            Some(s) => serde_json::from_str(&s.state)
                .map(|state| (state, s.version))
                .map_err(|e| {
                    tracing::error!(session_id, error = %e, "stored session state does not load");
                    Problem::internal("the stored session is unreadable")
                }),
        }
    }

    async fn get_session(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Response<Full<Bytes>>, Problem> {
        let (state, _) = self.load_state(caller, session_id).await?;
        let body = session_json(session_id, &state);
        Ok(json_response(StatusCode::OK, Bytes::from(body)))
    }

    async fn get_bundle(
        &self,
        req: &Parts,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Response<Full<Bytes>>, Problem> {
        let catalog = self
            .catalog
            .load_full()
            .ok_or_else(|| Problem::unavailable("the catalog is not loaded yet; retry shortly"))?;
        let (state, version) = self.load_state(caller, session_id).await?;
        let etag = bundle::etag(&caller.tenant, session_id, version, &catalog.version);
        let header = |name: header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        if header(header::IF_NONE_MATCH).is_some_and(|h| bundle::if_none_match(h, &etag)) {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            if let Ok(v) = HeaderValue::from_str(&etag) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            return Ok(resp);
        }
        let generated_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let body = bundle::render(
            &generated_at,
            session_json(session_id, &state).as_bytes(),
            &catalog.json,
        );
        metrics::histogram!("offline_bundle_bytes").record(body.len() as f64);
        let limit = self.config.sync.max_bundle_bytes;
        if body.len() as u64 > limit {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bundle-too-large",
                "Offline bundle too large",
                format!(
                    "the bundle for this session would be {} bytes, over sync.max_bundle_bytes ({limit}); split the session or raise the limit",
                    body.len()
                ),
            )
            .with("bundle_bytes", body.len() as u64)
            .with("max_bundle_bytes", limit));
        }
        let gzip = header(header::ACCEPT_ENCODING).is_some_and(bundle::accepts_gzip);
        let mut resp = if gzip {
            let compressed = bundle::gzip(&body)
                .map_err(|e| Problem::internal(format!("compressing the bundle: {e}")))?;
            let mut r = json_response(StatusCode::OK, compressed);
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        } else {
            json_response(StatusCode::OK, Bytes::from(body))
        };
        let headers = resp.headers_mut();
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        if let Ok(v) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, v);
        }
        Ok(resp)
    }
}

fn session_json(session_id: &str, state: &SessionState) -> String {
    json!({
        "session_id": session_id,
        "document": state.document(),
        "vector_clock": state.clock(),
    })
    .to_string()
}

/// What the merge closure needs besides the stored state.
struct MergeInput {
    session_id: String,
    /// The caller's `sub`: the owner a new replica gets, and who must own an old one.
    subject: String,
    batch: firemode_merge::Batch,
    /// `sync.max_conflicts_reported`, and a byte budget for the listed conflicts.
    limits: ReportLimits,
}

/// The listed conflicts of an answer take at most about this many bytes, or the request
/// body's size when larger: an answer stays within a small multiple of its request.
const CONFLICT_BYTES_FLOOR: usize = 64 * 1024;

/// The merge, run by the store under the session's lock.
fn merge_batch(input: &MergeInput, stored: Option<&str>) -> MergeStep {
    let session_id = input.session_id.as_str();
    let mut state = match stored {
        None => SessionState::default(),
        Some(text) => match serde_json::from_str::<SessionState>(text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(session_id, error = %e, "stored session state does not load");
                let p = Problem::internal(
                    "the stored session is unreadable; the batch was not applied",
                );
                return refusal(&p);
            }
        },
    };
    let replica = input.batch.replica_id.as_str();
    if state
        .owner(replica)
        .is_some_and(|owner| owner != input.subject)
    {
        return refusal(&Problem::new(
            StatusCode::FORBIDDEN,
            "replica-owned",
            "Replica belongs to another user",
            format!("replica_id {replica:?} was first used in this session by another user; every device sends its own replica_id (or none, to write as your own user)"),
        ));
    }
    match state.apply_reporting(&input.batch, input.limits) {
        Ok(Outcome::Applied(applied)) => {
            metrics::counter!("crdt_conflicts_total").increment(applied.conflicts_total);
            if applied.conflicts_total > 0 {
                tracing::info!(
                    session_id,
                    conflicts = applied.conflicts_total,
                    "concurrent writes resolved"
                );
            }
            state.claim(replica, &input.subject);
            let body = json!({
                "session_id": session_id,
                "vector_clock": state.clock(),
                "applied": applied.applied,
                "conflicts": applied.conflicts,
                "conflicts_total": applied.conflicts_total,
            });
            MergeStep {
                new_state: Some(serde_json::to_string(&state).unwrap_or_default()),
                status: 200,
                body: body.to_string(),
                remember: true,
            }
        }
        Ok(Outcome::Duplicate) => MergeStep {
            new_state: None,
            status: 200,
            body: json!({
                "session_id": session_id,
                "vector_clock": state.clock(),
                "applied": 0,
                "conflicts": [],
                "conflicts_total": 0,
            })
            .to_string(),
            remember: true,
        },
        Err(missing) => {
            let p = Problem::new(
                StatusCode::CONFLICT,
                "missing-dependencies",
                "Sync first",
                "the batch's vector clock names events this session has not seen; fetch the session, merge, and send again",
            )
            .with("vector_clock", serde_json::to_value(&missing.session_clock).unwrap_or_default());
            // "Sync first" is not the final answer: a retry with this key must be merged.
            refusal(&p)
        }
    }
}

/// An answer that changes nothing and is not remembered under the idempotency key (the
/// client's retry, after fixing what was wrong, must be merged).
fn refusal(problem: &Problem) -> MergeStep {
    MergeStep {
        new_state: None,
        status: problem.status.as_u16(),
        body: String::from_utf8_lossy(&problem.to_bytes()).into_owned(),
        remember: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> serde_json::Value {
        serde_json::from_str(text).expect("test JSON")
    }

    #[test]
    fn the_fingerprint_is_the_json_value() {
        let post = Method::POST;
        let one = fingerprint(&post, "S", &value(r#"{"a":1,"b":[1,{"c":2,"d":3}]}"#));
        let same = value("{ \"b\" : [1, {\"d\":3, \"c\":2}],\n \"a\" : 1 }");
        assert_eq!(fingerprint(&post, "S", &same), one);
        assert_ne!(fingerprint(&post, "T", &same), one, "the session counts");
        let other = value(r#"{"a":1,"b":[{"c":2,"d":3},1]}"#);
        assert_ne!(fingerprint(&post, "S", &other), one, "list order counts");
        let big = |n: &str| fingerprint(&post, "S", &value(&format!(r#"{{"a":{n}}}"#)));
        assert_ne!(
            big("123456789012345678901234567890"),
            big("123456789012345678901234567891"),
            "numbers keep their digits"
        );
    }

    /// Records written by releases that hashed the bytes still match a retry with those bytes.
    #[test]
    fn the_legacy_fingerprint_is_the_old_one() {
        let body = br#"{"changes":[]}"#;
        let mut h = Sha256::new();
        h.update(b"POST");
        h.update([0]);
        h.update(b"S");
        h.update([0]);
        h.update(body);
        let old: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(legacy_fingerprint(&Method::POST, "S", body), old);
    }
}
