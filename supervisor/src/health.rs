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

/// One health check: `GET /healthz` within `timeout`, run on the health checks' own thread
/// ([`checks_runtime`]) so that the front's load cannot make it late.
pub async fn probe(socket: &Path, timeout: Duration) -> Probe {
    let Some(checks) = checks_runtime() else {
        return check(socket, timeout).await;
    };
    let socket = socket.to_owned();
    checks
        .spawn(async move { check(&socket, timeout).await })
        .await
        .unwrap_or_else(|e| Probe::Failed(format!("the health check stopped: {e}")))
}

/// The runtime of the health checks: one thread of their own. On the runtime the front
/// shares, a front busy with its clients (100 reads of 4 MiB being relayed) delayed checks
/// past a 150 ms `health_timeout`, and idle, healthy instances were killed as hung. Here a
/// check waits only for its worker. `None` if the thread cannot be started (then checks run
/// where they are asked, as before).
fn checks_runtime() -> Option<&'static tokio::runtime::Handle> {
    static CHECKS: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    CHECKS
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!(error = %e, "no runtime for the health checks"))
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("health-checks".into())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .map_err(|e| tracing::warn!(error = %e, "no thread for the health checks"))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// [`probe`]'s check itself.
async fn check(socket: &Path, timeout: Duration) -> Probe {
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

    /// A worker that answers `/healthz` at once, on a thread of its own.
    fn answering_worker(socket: &Path) {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().map_while(Result::ok) {
                let mut head = [0u8; 1024];
                let _ = conn.read(&mut head);
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\n{\"ready\":true}");
            }
        });
    }

    /// A check asked from a runtime too busy to run anything for longer than the check's
    /// timeout still sees the worker's prompt answer: it runs on its own thread.
    #[test]
    fn a_busy_runtime_does_not_make_a_check_late() {
        let socket =
            std::env::temp_dir().join(format!("firemode-check-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        answering_worker(&socket);
        let front = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for _ in 0..5 {
            let checked = front.block_on(async {
                let busy = async {
                    tokio::task::yield_now().await;
                    // The front's thread, taken for 300 ms by its clients.
                    std::thread::sleep(Duration::from_millis(300));
                };
                tokio::join!(probe(&socket, Duration::from_millis(100)), busy).0
            });
            assert_eq!(checked, Probe::Ready);
        }
        let _ = std::fs::remove_file(&socket);
    }

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
