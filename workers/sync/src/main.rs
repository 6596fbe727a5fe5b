//! `firemode-sync`: merges offline test-session edits from many tablets (vector-clock CRDT,
//! idempotent) and serves offline bundles.
//!
//! This slice runs under the supervisor with health, readiness (the store) and drain; the
//! session routes answer 501 until the merge endpoints land (issue: sync).

use bytes::Bytes;
use firemode_wire::Problem;
use firemode_worker::{App, WorkerContext};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::Full;
use std::process::ExitCode;

fn main() -> ExitCode {
    firemode_worker::run("sync", SyncApp::start)
}

struct SyncApp;

impl SyncApp {
    async fn start(ctx: WorkerContext) -> anyhow::Result<SyncApp> {
        ctx.readiness.set_app_ready(true);
        Ok(SyncApp)
    }
}

impl App for SyncApp {
    async fn handle(&self, req: Parts, _body: Bytes) -> Response<Full<Bytes>> {
        if req.uri.path().starts_with("/v1/tests/sessions/") {
            Problem::new(
                StatusCode::NOT_IMPLEMENTED,
                "not-implemented",
                "Not implemented yet",
                "session sync is not available in this build",
            )
            .into_response()
        } else {
            Problem::not_found(format!("no route for {}", req.uri.path())).into_response()
        }
    }
}
