//! The health check of one instance: `GET /healthz` over a fresh connection to its socket,
//! within `health_timeout`. A 200 says the process serves; its `ready` member says whether
//! it can do real work (its store answers).

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    Ready,
    /// Alive but not able to serve (e.g. its store is down): not routed to, not restarted.
    NotReady,
    /// No socket yet (still starting).
    NoSocket,
    /// Refused, timed out, or answered wrongly: counts toward `unhealthy_threshold`.
    Failed(String),
}

/// `GET path` on a worker's socket over a fresh connection, within `timeout`: the status
/// and the whole body. Used for the worker's `/metrics` too.
pub async fn fetch(
    socket: &Path,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, "worker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        conn.abort();
        result
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })
}

pub async fn probe(socket: &Path, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, exchange(socket)).await {
        Ok(p) => p,
        Err(_) => Probe::Failed(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn exchange(socket: &Path) -> Probe {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Probe::NoSocket
        }
        Err(e) => return Probe::Failed(format!("connect: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(p) => p,
        Err(e) => return Probe::Failed(format!("handshake: {e}")),
    };
    let conn = tokio::spawn(conn);
    let req = match Request::get("/healthz")
        .header(http::header::HOST, "worker")
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Probe::Failed(e.to_string()),
    };
    let result = match sender.send_request(req).await {
        Ok(resp) if resp.status() == StatusCode::OK => match resp.into_body().collect().await {
            Ok(body) => {
                let ready = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
                    .ok()
                    .and_then(|v| v.get("ready").and_then(|r| r.as_bool()))
                    .unwrap_or(true);
                if ready {
                    Probe::Ready
                } else {
                    Probe::NotReady
                }
            }
            Err(e) => Probe::Failed(format!("reading the answer: {e}")),
        },
        Ok(resp) => Probe::Failed(format!("status {}", resp.status())),
        Err(e) => Probe::Failed(format!("request: {e}")),
    };
    conn.abort();
    result
}
