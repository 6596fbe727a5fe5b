//! The accept loop on the worker's Unix socket and the graceful drain on SIGTERM/SIGINT
//! (SIGUSR1 only releases held requests such as long-polls; the process keeps serving):
//! stop accepting, remove the socket, let every connection finish its in-flight request,
//! then return so the process exits 0.
//!
//! Two runtimes: the accept loop, the connections, `/healthz`, `/readyz` and `/metrics`
//! run on a control thread of their own; the kind's routes run on the multi-threaded app
//! runtime. So a health check never queues behind real work (a burst of heavy answers
//! keeping every app thread busy), and a busy worker is not mistaken for a dead one.

use crate::{json_response, App, Readiness, WorkerError};
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

/// Serves until SIGTERM/SIGINT and the drain are done. Called on the app runtime, whose
/// handle runs the kind's routes; the serving itself moves to a control thread.
pub async fn serve<A: App>(
    kind: &'static str,
    socket: &Path,
    app: Arc<A>,
    readiness: Readiness,
) -> Result<(), WorkerError> {
    let app_runtime = tokio::runtime::Handle::current();
    let socket = socket.to_path_buf();
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(WorkerError::ControlThread)
                .and_then(|rt| {
                    rt.block_on(accept_loop(kind, &socket, app, readiness, app_runtime))
                });
            let _ = done.send(result);
        })
        .map_err(WorkerError::ControlThread)?;
    finished
        .await
        .unwrap_or(Err(WorkerError::ControlThreadLost))
}

async fn accept_loop<A: App>(
    kind: &'static str,
    socket: &Path,
    app: Arc<A>,
    readiness: Readiness,
    app_runtime: tokio::runtime::Handle,
) -> Result<(), WorkerError> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(WorkerError::RemoveStaleSocket {
                path: socket.to_path_buf(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(socket).map_err(|source| WorkerError::Bind {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut term = signal(SignalKind::terminate()).map_err(WorkerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(WorkerError::Signals)?;
    // The supervisor takes this process out of rotation: answer held requests, keep serving.
    let mut release = signal(SignalKind::user_defined1()).map_err(WorkerError::Signals)?;
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
                let app_runtime = app_runtime.clone();
                let service = service_fn(move |req| {
                    let app = app.clone();
                    let readiness = readiness.clone();
                    let app_runtime = app_runtime.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(kind, app, &readiness, &app_runtime, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = release.recv() => readiness.release_waiters(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("draining");
    readiness.release_waiters();
    drop(listener);
    let _ = std::fs::remove_file(socket);
    graceful.shutdown().await;
    tracing::info!("drained");
    Ok(())
}

/// The runtime's own routes answer GET and HEAD (hyper leaves out a HEAD answer's body).
const OWN_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

async fn route<A: App>(
    kind: &'static str,
    app: Arc<A>,
    readiness: &Readiness,
    app_runtime: &tokio::runtime::Handle,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !OWN_ROUTES.contains(&path) {
        return on_app_runtime(kind, app, app_runtime, req).await;
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut resp = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("{path} answers GET and HEAD"),
        )
        .into_response::<Full<Bytes>>();
        resp.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return resp;
    }
    match path {
        "/healthz" => {
            let body = if readiness.is_ready() {
                r#"{"status":"ok","ready":true}"#
            } else {
                r#"{"status":"ok","ready":false}"#
            };
            json_response(StatusCode::OK, Bytes::from_static(body.as_bytes()))
        }
        "/metrics" => {
            let text = firemode_telemetry::render_metrics();
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => {
            if readiness.is_ready() {
                json_response(StatusCode::OK, Bytes::from_static(br#"{"ready":true}"#))
            } else {
                Problem::unavailable("the worker is not ready (store unreachable or still loading)")
                    .into_response()
            }
        }
    }
}

/// Runs one request of the kind's routes on the app runtime. The task is aborted when the
/// connection goes away first, as the request future itself would have been dropped.
async fn on_app_runtime<A: App>(
    kind: &'static str,
    app: Arc<A>,
    app_runtime: &tokio::runtime::Handle,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    // One span per request, continuing the front's trace; its request_id field is on every
    // log line of the request.
    let request_id = req
        .headers()
        .get(firemode_wire::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!("worker", otel.name = kind, otel.kind = "server", request_id = %request_id);
    firemode_telemetry::traces::continue_trace(&span, req.headers());
    let mut task = AbortOnDrop(
        app_runtime.spawn(async move { handle_app(&*app, req).await }.instrument(span)),
    );
    match (&mut task.0).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            Problem::internal("the worker failed while answering").into_response()
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle_app<A: App>(app: &A, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => app.handle(parts, collected.to_bytes()).await,
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
                format!("the body is over {MAX_BODY} bytes"),
            )
            .into_response()
        }
        Err(e) => {
            Problem::bad_request(format!("could not read the request body: {e}")).into_response()
        }
    }
}
