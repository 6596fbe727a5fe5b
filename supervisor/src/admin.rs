//! The admin listener (default 127.0.0.1:9090): `/healthz` (the supervisor is alive),
//! `/readyz` (every kind has a ready instance), `/status` (every instance as JSON).

use crate::registry::Registry;
use bytes::Bytes;
use firemode_wire::Problem;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use std::sync::Arc;

pub struct Admin {
    pub registry: Arc<Registry>,
}

#[derive(Serialize)]
struct Status<'a> {
    instances: Vec<crate::instance::InstanceStatus>,
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "the admin endpoints answer GET",
            )
            .into_response();
        }
        match req.uri().path() {
            "/healthz" => json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => {
                if self.registry.all_kinds_ready() {
                    json(StatusCode::OK, br#"{"ready":true}"#.to_vec())
                } else {
                    let waiting: Vec<&str> = self
                        .registry
                        .kinds()
                        .iter()
                        .filter(|k| k.ready_count() == 0)
                        .map(|k| k.kind.name())
                        .collect();
                    Problem::unavailable(format!("no ready instance of: {}", waiting.join(", ")))
                        .into_response()
                }
            }
            "/status" => {
                let status = Status {
                    instances: self
                        .registry
                        .members()
                        .iter()
                        .filter(|i| !i.is_gone())
                        .map(|i| i.status())
                        .collect(),
                    ready: self.registry.all_kinds_ready(),
                    note: None,
                };
                json(
                    StatusCode::OK,
                    serde_json::to_vec(&status).unwrap_or_default(),
                )
            }
            other => Problem::not_found(format!("no admin endpoint {other}")).into_response(),
        }
    }
}
