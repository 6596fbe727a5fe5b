//! The accept loop on the worker's Unix socket and the graceful drain on SIGTERM/SIGINT:
//! stop accepting, remove the socket, let every connection finish its in-flight request,
//! then return so the process exits 0.

use crate::{json_response, App, Readiness};
use bytes::Bytes;
use firemode_wire::Problem;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument;

/// Upper bound on a request body a worker will read; the front enforces the configured
/// `max_body_bytes` first, this only protects a worker reached directly.
const MAX_BODY: usize = 64 * 1024 * 1024;

pub async fn serve<A: App>(
    kind: &'static str,
    socket: &Path,
    app: Arc<A>,
    readiness: Readiness,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let graceful = GracefulShutdown::new();
    let builder = hyper::server::conn::http1::Builder::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let readiness = readiness.clone();
                let service = service_fn(move |req| {
                    let app = app.clone();
                    let readiness = readiness.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(kind, &*app, &readiness, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("draining");
    drop(listener);
    let _ = std::fs::remove_file(socket);
    graceful.shutdown().await;
    tracing::info!("drained");
    Ok(())
}

async fn route<A: App>(
    kind: &'static str,
    app: &A,
    readiness: &Readiness,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            let body = if readiness.is_ready() {
                r#"{"status":"ok","ready":true}"#
            } else {
                r#"{"status":"ok","ready":false}"#
            };
            json_response(StatusCode::OK, Bytes::from_static(body.as_bytes()))
        }
        (&Method::GET, "/metrics") => {
            let text = firemode_telemetry::metrics_handle()
                .map(|h| h.render())
                .unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/readyz") => {
            if readiness.is_ready() {
                json_response(StatusCode::OK, Bytes::from_static(br#"{"ready":true}"#))
            } else {
                Problem::unavailable("the worker is not ready (store unreachable or still loading)")
                    .into_response()
            }
        }
        _ => {
            // One span per request, continuing the front's trace; its request_id field is on
            // every log line of the request.
            let request_id = req
                .headers()
                .get(firemode_wire::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let span = tracing::info_span!("worker", otel.name = kind, otel.kind = "server", request_id = %request_id);
            firemode_telemetry::traces::continue_trace(&span, req.headers());
            handle_app(app, req).instrument(span).await
        }
    }
}

async fn handle_app<A: App>(app: &A, req: Request<Incoming>) -> Response<Full<Bytes>> {
    {
        {
            let (parts, body) = req.into_parts();
            match Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => app.handle(parts, collected.to_bytes()).await,
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        Problem::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "body-too-large",
                            "Request body too large",
                            format!("the body is over {MAX_BODY} bytes"),
                        )
                        .into_response()
                    } else {
                        Problem::bad_request(format!("could not read the request body: {e}"))
                            .into_response()
                    }
                }
            }
        }
    }
}
