//! `GET /v1/tests/sessions/{id}/offline_bundle` over HTTP: the catalog as the bundle embeds
//! it (rendered once per version), `If-None-Match` → 304, the size cap, gzip when the client
//! accepts it, `ETag` and `Vary`. The bundle's pure parts (ETag, negotiation, rendering) are
//! in [`crate::bundle`].

use crate::app::SyncApp;
use crate::bundle;
use crate::caller::Caller;
use crate::session::{self, session_json};
use crate::shared_reads::Freshness;
use crate::HttpResponse;
use bytes::Bytes;
use firemode_wire::Problem;
use firemode_worker::json_response;
use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use std::time::SystemTime;

/// The catalog as the bundle embeds it, rendered once per version.
pub struct RenderedCatalog {
    pub version: String,
    pub json: Bytes,
}

/// Why there is no bundle to send (`problems` maps each to its answer).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the catalog is not loaded yet; retry shortly")]
    CatalogNotLoaded,
    #[error("the bundle for this session would be {bytes} bytes, over sync.max_bundle_bytes ({limit}); split the session or raise the limit")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("compressing the bundle: {0}")]
    Compressing(#[from] std::io::Error),
}

/// `GET /v1/tests/sessions/{id}/offline_bundle`.
pub async fn get(
    app: &SyncApp,
    req: &Parts,
    caller: &Caller,
    session_id: &str,
) -> Result<HttpResponse, Problem> {
    let catalog = app
        .catalog
        .load_full()
        .ok_or(BundleError::CatalogNotLoaded)?;
    let snapshot = session::load(app, caller, session_id, Freshness::Started).await?;
    let etag = bundle::etag(
        &caller.tenant,
        session_id,
        snapshot.version,
        &catalog.version,
    );
    let header = |name: header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
    if header(header::IF_NONE_MATCH).is_some_and(|h| bundle::if_none_match(h, &etag)) {
        return Ok(not_modified(&etag));
    }
    let generated_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let body = bundle::render(
        &generated_at,
        session_json(session_id, &snapshot).as_bytes(),
        &catalog.json,
    );
    metrics::histogram!("offline_bundle_bytes").record(body.len() as f64);
    let limit = app.config.sync.max_bundle_bytes;
    if body.len() as u64 > limit {
        let bytes = body.len() as u64;
        return Err(BundleError::TooLarge { bytes, limit }.into());
    }
    let gzip = header(header::ACCEPT_ENCODING).is_some_and(bundle::accepts_gzip);
    let mut resp = if gzip {
        let compressed = bundle::gzip(&body).map_err(BundleError::from)?;
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

/// 304: the client's copy is current.
fn not_modified(etag: &str) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}
