//! The accept loop shared by the front and the admin listener: HTTP/1.1 connections served
//! until the stop signal, then a graceful close that lets in-flight requests finish.

use crate::send_timeout::SendTimeout;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves `listener` until `stop` turns true, then waits up to `grace` for open requests.
/// Returns whether every connection closed within the grace period.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, F, B>(
    name: &'static str,
    listener: TcpListener,
    handler: Arc<S>,
    call: F,
    mut stop: watch::Receiver<bool>,
    grace: impl Fn() -> Duration,
    header_read_timeout: Duration,
    send_timeout: impl Fn() -> Duration,
) -> bool
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<B>> + Send>>
        + Send
        + Sync
        + Copy
        + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gauge = metrics::gauge!("active_connections", "listener" => name);
                gauge.increment(1.0);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let fut = call(handler.clone(), req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(SendTimeout::new(stream, send_timeout())), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    gauge.decrement(1.0);
                });
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tokio::time::timeout(grace(), graceful.shutdown())
        .await
        .is_ok()
}
