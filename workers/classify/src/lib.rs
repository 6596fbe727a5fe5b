//! The classify worker (`firemode-classify`): answers `POST /v1/classify` — an AS 1851 item
//! code and an observed condition in, the defect class, its description and the action
//! required out.
//!
//! The catalog lives in the store (the configured file is installed at start); this worker
//! answers from an in-memory [`CatalogIndex`] of the store's current version, swapped
//! atomically when a periodic check (`catalog.refresh_interval`, one indexed single-row
//! query) finds another version current. A lookup costs no database round trip.

#![forbid(unsafe_code)]

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use firemode_catalog::{CatalogIndex, Miss};
use firemode_wire::Problem;
use firemode_worker::catalog::{configured_catalog, install_and_follow};
use firemode_worker::{json_response, App, WorkerContext};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::Arc;

/// The classify worker's routes, answering from the current catalog's index.
pub struct ClassifyApp {
    index: Arc<ArcSwapOption<CatalogIndex>>,
}

#[derive(Deserialize)]
struct ClassifyRequest<'a> {
    #[serde(borrow)]
    item_code: Cow<'a, str>,
    #[serde(borrow)]
    observed_condition: Cow<'a, str>,
}

impl ClassifyApp {
    /// Installs the configured catalog and follows the store's current one; ready once an
    /// index is in memory.
    pub async fn start(ctx: WorkerContext) -> anyhow::Result<ClassifyApp> {
        let catalog = configured_catalog(&ctx.config.catalog.file)?;
        let index: Arc<ArcSwapOption<CatalogIndex>> = Arc::default();
        let (slot, readiness) = (index.clone(), ctx.readiness.clone());
        // Once the catalog is in memory, classify needs no database: it stays ready through
        // a store outage.
        ctx.readiness.set_store_optional();
        tokio::spawn(install_and_follow(
            ctx.store.clone(),
            catalog,
            ctx.config.catalog.refresh_interval.get(),
            move |stored| {
                slot.store(Some(Arc::new(CatalogIndex::new(stored.catalog))));
                readiness.set_app_ready(true);
            },
        ));
        Ok(ClassifyApp { index })
    }
}

impl App for ClassifyApp {
    async fn handle(&self, req: Parts, body: Bytes) -> Response<Full<Bytes>> {
        if req.uri.path() != "/v1/classify" {
            return Problem::not_found(format!("no route for {}", req.uri.path())).into_response();
        }
        if req.method != Method::POST {
            let mut response = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "use POST for /v1/classify",
            )
            .into_response();
            response
                .headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return response;
        }
        self.classify(&body)
    }
}

impl ClassifyApp {
    fn classify(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let req: ClassifyRequest<'_> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return Problem::bad_request(format!(
                    "expected a JSON object {{\"item_code\": string, \"observed_condition\": string}}: {e}"
                ))
                .into_response()
            }
        };
        let guard = self.index.load();
        let Some(index) = guard.as_ref() else {
            return Problem::unavailable("the catalog is not loaded yet").into_response();
        };
        match index.classify(&req.item_code, &req.observed_condition) {
            Ok(answer) => json_response(StatusCode::OK, answer),
            Err(Miss::UnknownItem) => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-item",
                "Unknown item code",
                format!(
                    "item_code {:?} is not in catalog {}",
                    req.item_code,
                    index.version()
                ),
            )
            .with("item_code", req.item_code.as_ref())
            .into_response(),
            Err(Miss::UnknownCondition { allowed }) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-condition",
                "Unknown condition for this item",
                format!(
                    "observed_condition {:?} is not known for item {:?}",
                    req.observed_condition, req.item_code
                ),
            )
            .with("item_code", req.item_code.as_ref())
            .with("allowed_conditions", allowed)
            .into_response(),
        }
    }
}
