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
