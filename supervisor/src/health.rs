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

/// The first health check of a new instance comes this soon after its start.
pub const FIRST_PROBE_AFTER: Duration = Duration::from_millis(10);

/// The pause before the next health check. Until an instance's first ready answer the checks
/// start at [`FIRST_PROBE_AFTER`] and double up to `health_interval`: a restarted worker that
/// is ready within a few milliseconds is routed to within a few more, and one that waits for
/// its store is not asked a hundred times a second. Once it has been ready: `health_interval`.
pub fn next_probe_after(
    ever_ready: bool,
    previous: Duration,
    health_interval: Duration,
) -> Duration {
    if ever_ready {
        health_interval
    } else {
        previous.saturating_mul(2).min(health_interval)
    }
}

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

/// Why [`fetch`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No socket file, or nobody listening on it (not started yet, or gone).
    #[error("connect: {0}")]
    NoSocket(std::io::Error),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Request(http::Error),
    #[error("request: {0}")]
    Send(hyper::Error),
    #[error("reading the answer: {0}")]
    Read(hyper::Error),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// `GET path` on a worker's socket over a fresh connection, within `timeout`: the status
/// and the whole body. The health check and the worker's `/metrics` scrape.
pub async fn fetch(
    socket: &Path,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), FetchError> {
    tokio::time::timeout(timeout, get(socket, path))
        .await
        .unwrap_or(Err(FetchError::Timeout(timeout)))
}

async fn get(socket: &Path, path: &str) -> Result<(StatusCode, Bytes), FetchError> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            NotFound | ConnectionRefused => FetchError::NoSocket(e),
            _ => FetchError::Connect(e),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(FetchError::Handshake)?;
    let conn = tokio::spawn(conn);
    let answer = async {
        let req = Request::get(path)
            .header(http::header::HOST, "worker")
            .body(Empty::<Bytes>::new())
            .map_err(FetchError::Request)?;
        let resp = sender.send_request(req).await.map_err(FetchError::Send)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(FetchError::Read)?;
        Ok((status, body.to_bytes()))
    }
    .await;
    conn.abort();
    answer
}

/// One health check: `GET /healthz` within `timeout`.
pub async fn probe(socket: &Path, timeout: Duration) -> Probe {
    match fetch(socket, "/healthz", timeout).await {
        Ok((StatusCode::OK, body)) => {
            let ready = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("ready").and_then(|r| r.as_bool()))
                .unwrap_or(true);
            if ready {
                Probe::Ready
            } else {
                Probe::NotReady
            }
        }
        Ok((status, _)) => Probe::Failed(format!("status {status}")),
        Err(FetchError::NoSocket(_)) => Probe::NoSocket,
        Err(e) => Probe::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_probes_double_up_to_the_health_interval() {
        let interval = Duration::from_secs(1);
        let mut pause = FIRST_PROBE_AFTER;
        let mut pauses = vec![pause];
        for _ in 0..8 {
            pause = next_probe_after(false, pause, interval);
            pauses.push(pause);
        }
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn a_ready_instance_is_checked_every_health_interval() {
        let interval = Duration::from_millis(500);
        assert_eq!(
            next_probe_after(true, FIRST_PROBE_AFTER, interval),
            interval
        );
        assert_eq!(
            next_probe_after(false, Duration::from_millis(5), Duration::from_millis(3)),
            Duration::from_millis(3)
        );
    }
}
