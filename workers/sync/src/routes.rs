//! Routing: which handler answers a request. In order: the path (`firemode_wire::SessionPath`,
//! the parser the front shares; 404), the session id (400), the caller (401), the method
//! (405 with `Allow`), then one handler per [`Endpoint`]. A new route is one resource in
//! `firemode_wire::route`, one `Endpoint`, and one arm in [`Endpoint::of`] and [`serve`].

use crate::app::SyncApp;
use crate::caller::caller;
use crate::problems::{invalid_session_id, method_not_allowed};
use crate::{bundle_http, catch_up, results, session, HttpResponse};
use bytes::Bytes;
use firemode_wire::{ids, Problem, SessionPath, SessionResource};
use http::request::Parts;
use http::Method;

/// What a request asks for, once its path and method are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    /// `POST …/results`: merge a batch.
    PostResults,
    /// `GET`/`HEAD …/{id}`: the merged document.
    GetSession,
    /// `GET`/`HEAD …/offline_bundle`: session + catalog.
    GetBundle,
    /// `GET`/`HEAD …/changes?since=&wait=`: catching up, long-polled.
    GetChanges,
    /// `GET`/`HEAD …/conflicts?after=&limit=`: the conflict journal.
    GetConflicts,
}

impl Endpoint {
    /// The endpoint for this resource and method, or the `Allow` value of its 405. HEAD is GET
    /// without the body: the HTTP layer drops the body and keeps the headers.
    fn of(resource: SessionResource, method: &Method) -> Result<Endpoint, &'static str> {
        let read = method == Method::GET || method == Method::HEAD;
        match resource {
            SessionResource::Results if method == Method::POST => Ok(Endpoint::PostResults),
            SessionResource::Document if read => Ok(Endpoint::GetSession),
            SessionResource::OfflineBundle if read => Ok(Endpoint::GetBundle),
            SessionResource::Changes if read => Ok(Endpoint::GetChanges),
            SessionResource::Conflicts if read => Ok(Endpoint::GetConflicts),
            SessionResource::Results => Err("POST"),
            SessionResource::Document
            | SessionResource::OfflineBundle
            | SessionResource::Changes
            | SessionResource::Conflicts => Err("GET, HEAD"),
        }
    }
}

/// Answers one request (the worker runtime has already answered `/healthz` and `/readyz`).
pub async fn handle(app: &SyncApp, req: Parts, body: Bytes) -> HttpResponse {
    route(app, &req, &body).await.unwrap_or_else(|problem| {
        let data_fault = problem.kind == crate::problems::SESSION_UNREADABLE;
        let mut response = problem.into_response();
        if data_fault {
            crate::problems::mark_data_fault(&mut response);
        }
        response
    })
}

async fn route(app: &SyncApp, req: &Parts, body: &[u8]) -> Result<HttpResponse, Problem> {
    let path = req.uri.path();
    let target = SessionPath::parse(path)
        .ok_or_else(|| Problem::not_found(format!("no route for {path}")))?;
    if !ids::is_valid_session_id(target.id) {
        return Err(invalid_session_id());
    }
    let caller = caller(req)?;
    let endpoint = match Endpoint::of(target.resource, &req.method) {
        Ok(endpoint) => endpoint,
        Err(allowed) => return Ok(method_not_allowed(allowed)),
    };
    serve(app, endpoint, req, &caller, target.id, body).await
}

async fn serve(
    app: &SyncApp,
    endpoint: Endpoint,
    req: &Parts,
    caller: &crate::caller::Caller,
    id: &str,
    body: &[u8],
) -> Result<HttpResponse, Problem> {
    match endpoint {
        Endpoint::PostResults => results::post(app, req, caller, id, body).await,
        Endpoint::GetSession => session::get(app, caller, id).await,
        Endpoint::GetBundle => bundle_http::get(app, req, caller, id).await,
        Endpoint::GetChanges => catch_up::changes(app, req, caller, id).await,
        Endpoint::GetConflicts => catch_up::conflicts(app, req, caller, id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_per_resource() {
        use SessionResource::*;
        assert_eq!(
            Endpoint::of(Results, &Method::POST),
            Ok(Endpoint::PostResults)
        );
        assert_eq!(Endpoint::of(Results, &Method::GET), Err("POST"));
        assert_eq!(
            Endpoint::of(Document, &Method::GET),
            Ok(Endpoint::GetSession)
        );
        assert_eq!(
            Endpoint::of(Document, &Method::HEAD),
            Ok(Endpoint::GetSession)
        );
        assert_eq!(Endpoint::of(Document, &Method::POST), Err("GET, HEAD"));
        assert_eq!(
            Endpoint::of(OfflineBundle, &Method::HEAD),
            Ok(Endpoint::GetBundle)
        );
        assert_eq!(
            Endpoint::of(OfflineBundle, &Method::DELETE),
            Err("GET, HEAD")
        );
    }
}
