//! The admin listener (default 127.0.0.1:9090): `/healthz` (the supervisor is alive and no
//! kind is entirely crash-looping), `/readyz` (every kind has a ready instance, and the
//! supervisor is not draining: a load balancer checking it stops sending work the moment a
//! drain begins), `/status` (every instance as JSON),
//! `/metrics` (Prometheus: the supervisor's series and every worker's, one scrape). Each
//! answers GET and HEAD. `POST /reload` asks for a rolling reload and answers once it has
//! settled (what `firemode reload` calls).

use crate::health::fetch;
use crate::instance::InstanceState;
use crate::registry::Registry;
use bytes::Bytes;
use firemode_telemetry::scrape::Merged;
use firemode_wire::Problem;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Admin {
    pub registry: Arc<Registry>,
    /// Where `POST /reload` hands its request to the run loop.
    pub reload: tokio::sync::mpsc::Sender<crate::control::ReloadRequest>,
    /// Set when the drain begins: the front takes no new connections from then on.
    pub draining: Arc<AtomicBool>,
    /// The slots whose per-slot gauges the last scrape set, so a retired one is zeroed.
    pub published_slots: Mutex<HashSet<(&'static str, u32)>>,
}

#[derive(Serialize)]
struct Status {
    instances: Vec<crate::instance::InstanceStatus>,
    ready: bool,
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

fn set_slot_gauges((kind, index): (&'static str, u32), up: bool, backoff: bool) {
    let labels = [("kind", kind.to_string()), ("instance", index.to_string())];
    metrics::gauge!("firemode_worker_up", &labels).set(if up { 1.0 } else { 0.0 });
    metrics::gauge!("firemode_worker_backoff", &labels).set(if backoff { 1.0 } else { 0.0 });
}

/// How long the scrape waits for one worker's `/metrics`.
const WORKER_SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

impl Admin {
    /// One scrape of the whole system: the supervisor's series, then every running
    /// worker's, fetched over its socket and labelled with `kind` and `instance`.
    async fn metrics(&self) -> String {
        let members = self.registry.members();
        self.publish_slot_gauges();
        let mut merged = Merged::default();
        merged.add(&firemode_telemetry::render_metrics(), &[]);
        let mut scrapes = tokio::task::JoinSet::new();
        for inst in members.iter().filter(|i| !i.is_gone() && i.pid().is_some()) {
            let inst = inst.clone();
            scrapes.spawn(async move {
                let got = fetch(&inst.socket, "/metrics", WORKER_SCRAPE_TIMEOUT).await;
                (inst, got)
            });
        }
        let mut results = Vec::new();
        while let Some(Ok(r)) = scrapes.join_next().await {
            results.push(r);
        }
        results.sort_by_key(|(i, _)| (i.kind.name(), i.index));
        for (inst, got) in results {
            match got {
                Ok((status, body)) if status == StatusCode::OK => {
                    let index = inst.index.to_string();
                    merged.add(
                        &String::from_utf8_lossy(&body),
                        &[("kind", inst.kind.name()), ("instance", &index)],
                    );
                }
                Ok((status, _)) => {
                    tracing::debug!(kind = inst.kind.name(), instance = inst.index, %status, "worker metrics unavailable")
                }
                Err(e) => {
                    tracing::debug!(kind = inst.kind.name(), instance = inst.index, error = %e, "worker metrics unavailable")
                }
            }
        }
        merged.render()
    }

    /// Sets `firemode_worker_up` and `firemode_worker_backoff` for every slot, and zeroes
    /// those of slots retired since the last scrape (scaled down): the recorder cannot
    /// drop a series, and a retired slot must not look up (or backing off) forever.
    fn publish_slot_gauges(&self) {
        let mut now = HashSet::new();
        for set in self.registry.kinds() {
            for inst in set.instances().iter() {
                let slot = (inst.kind.name(), inst.index);
                let backoff = inst.state() == InstanceState::Backoff;
                set_slot_gauges(slot, inst.is_ready(), backoff);
                now.insert(slot);
            }
        }
        let mut published = self
            .published_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for &slot in published.difference(&now) {
            set_slot_gauges(slot, false, false);
        }
        *published = now;
    }

    /// Liveness: the supervisor answers, and no kind is down with every instance
    /// crash-looping (a 503 then names the kinds; see README "Health endpoints").
    fn healthz(&self) -> Response<Full<Bytes>> {
        let looping = self.registry.crash_looping_kinds();
        if looping.is_empty() {
            return json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec());
        }
        Problem::unavailable(format!(
            "every instance of {} is crash-looping (restarting with backoff); nothing of that kind can serve, see /status and the log",
            looping.join(", ")
        ))
        .into_response()
    }

    /// Ready: not draining, and every kind has a ready instance.
    fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.registry.all_kinds_ready()
    }

    /// `/readyz`: 200 when ready; otherwise a 503 saying why (draining, or the kinds
    /// without a ready instance).
    fn readyz(&self) -> Response<Full<Bytes>> {
        if self.draining.load(Ordering::Acquire) {
            return Problem::unavailable(
                "draining: this host is stopping; it finishes its open requests but takes no new ones",
            )
            .into_response();
        }
        if self.is_ready() {
            return json(StatusCode::OK, br#"{"ready":true}"#.to_vec());
        }
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

    /// `POST /reload`: 200 with the outcome once the reload has settled; 409 when it was
    /// refused, 500 when the roll failed (the body says why either way).
    async fn reload(&self, method: &Method) -> Response<Full<Bytes>> {
        use crate::control::{ReloadOutcome, ReloadRequest};
        if method != Method::POST {
            let mut resp = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "POST /reload asks for a rolling reload",
            )
            .into_response::<Full<Bytes>>();
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        let (reply, outcome) = tokio::sync::oneshot::channel();
        if self.reload.send(ReloadRequest { reply }).await.is_err() {
            return Problem::unavailable("the supervisor is stopping; nothing to reload")
                .into_response();
        }
        let outcome = outcome.await.unwrap_or_else(|_| {
            ReloadOutcome::Failed("the supervisor stopped before the reload settled".into())
        });
        let status = match outcome {
            ReloadOutcome::Applied => StatusCode::OK,
            ReloadOutcome::Refused(_) => StatusCode::CONFLICT,
            ReloadOutcome::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        json(status, serde_json::to_vec(&outcome).unwrap_or_default())
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/reload" {
            return self.reload(req.method()).await;
        }
        // HEAD works wherever GET does (hyper leaves out the body); every 405 says `Allow`.
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut resp = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "the admin endpoints answer GET and HEAD",
            )
            .into_response::<Full<Bytes>>();
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match req.uri().path() {
            "/healthz" => self.healthz(),
            "/readyz" => self.readyz(),
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics().await)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
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
                    ready: self.is_ready(),
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
