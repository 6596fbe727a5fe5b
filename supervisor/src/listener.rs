//! The accept loop shared by the front and the admin listener: HTTP/1.1 connections served
//! until the stop signal, then a graceful close that lets in-flight requests finish.
//!
//! **The close loses no accepted connection.** Closing a TCP listener resets every
//! connection still in the kernel's accept queue — connections whose clients have already
//! connected and sent their request. So at the stop, when the socket is ours, a drop-all
//! socket filter first makes the kernel complete no new handshake (a client connecting now
//! sees its connect refused once the listener is gone, never a reset after a successful
//! connect); then everything already queued is accepted (non-blocking, until `WouldBlock`)
//! and served like any other connection — its first request answered with
//! `Connection: close` (hyper alone would close a connection it has read nothing from yet;
//! [`serve_connection`] gives it [`FIRST_REQUEST_GRACE`] to begin its request). A socket passed by systemd stays open in systemd after we close our
//! copy, so it gets no filter (the next start would inherit it): what is queued there waits
//! for the next start.

use crate::send_timeout::SendTimeout;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

/// A bound listening socket and where it came from.
pub struct Listening {
    /// `front` or `admin`, for logs and metrics.
    pub name: &'static str,
    pub socket: TcpListener,
    /// Passed by systemd (socket activation): systemd keeps the socket after we close it.
    pub from_systemd: bool,
}

/// How long, after the stop, a connection that has not begun its first request is given to
/// send it (its client connected just before the stop, or was queued): it is answered, then
/// closed. A connection silent for longer is closed unanswered.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// Per connection, hyper buffers at most this much of an answer the client has not taken
/// (and reads request heads up to this size). hyper's default (~400 KiB) times hundreds of
/// stalled readers is hundreds of MiB; answers are already buffered (or spilled) whole in
/// `buffered`, so a small window here costs nothing in throughput.
pub const MAX_BUF: usize = 64 * 1024;

/// Serves `listening` until `stop` turns true, then takes what the kernel already accepted
/// and waits up to `grace` for open requests. Returns whether every connection closed
/// within the grace period. A client that takes no bytes for `send_timeout` is dropped.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, F, B>(
    listening: Listening,
    handler: Arc<S>,
    call: F,
    stop: watch::Receiver<bool>,
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
    let Listening {
        name,
        socket: listener,
        from_systemd,
    } = listening;
    // Every connection task holds a sender; `recv` gives `None` once all of them ended.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_BUF);
    let first_request_grace = FIRST_REQUEST_GRACE.min(header_read_timeout);
    let start = |stream: TcpStream| {
        let _ = stream.set_nodelay(true);
        let gauge = metrics::gauge!("active_connections", "listener" => name);
        gauge.increment(1.0);
        let handler = handler.clone();
        let first = Arc::new(FirstRequest::default());
        let seen = first.clone();
        let service = service_fn(move |req| {
            seen.mark();
            let fut = call(handler.clone(), req);
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        let stream = SendTimeout::new(stream, send_timeout());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let ended = serve_connection(conn, stop, &first, first_request_grace).await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            gauge.decrement(1.0);
            drop(open);
        });
    };
    accept_until_stopped(name, &listener, stop.clone(), &start).await;
    for stream in take_queued(name, listener, from_systemd) {
        start(stream);
    }
    drop(open_tx);
    tokio::time::timeout(grace(), open_rx.recv()).await.is_ok()
}

/// Hands every accepted connection to `start` until `stop` turns true.
async fn accept_until_stopped(
    name: &str,
    listener: &TcpListener,
    mut stop: watch::Receiver<bool>,
    start: &impl Fn(TcpStream),
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => start(stream),
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// Whether a connection has begun a request yet, with a wake-up for the first one.
#[derive(Default)]
struct FirstRequest {
    seen: AtomicBool,
    arrived: Notify,
}

impl FirstRequest {
    fn mark(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            // `notify_one` keeps a permit when nobody waits yet: the wake-up is never lost.
            self.arrived.notify_one();
        }
    }
}

/// One connection until it ends. At the stop it closes gracefully: a request in progress is
/// finished (answered with `Connection: close`), an idle keep-alive connection is closed.
/// A connection that has not begun its first request first gets `first_request_grace` to do
/// so — hyper would close it at once, unread, and its client, whose request is already on
/// the wire, would see a reset or an EOF instead of an answer.
async fn serve_connection<C: GracefulConnection>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    first: &FirstRequest,
    first_request_grace: Duration,
) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    if !first.seen.load(Ordering::Acquire) {
        let deadline = tokio::time::sleep(first_request_grace);
        tokio::pin!(deadline);
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = first.arrived.notified() => {}
            _ = &mut deadline => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Closes the listener without resetting a connection the kernel completed: new handshakes
/// refused first (our own socket only), then the accept queue emptied. Returns the queued
/// connections.
fn take_queued(name: &'static str, listener: TcpListener, from_systemd: bool) -> Vec<TcpStream> {
    if !from_systemd {
        if let Err(e) = refuse_new_handshakes(&listener) {
            tracing::warn!(listener = name, error = %e, "cannot filter the listening socket; connections arriving during the close may be reset");
        }
    }
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(listener = name, error = %e, "cannot take the queued connections");
            return Vec::new();
        }
    };
    let mut queued = Vec::new();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                match stream {
                    Ok(s) => queued.push(s),
                    Err(e) => tracing::warn!(listener = name, error = %e, "a queued connection"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed while closing");
                break;
            }
        }
    }
    if !queued.is_empty() {
        tracing::info!(
            listener = name,
            connections = queued.len(),
            "serving the connections queued at the stop"
        );
    }
    queued
}

/// Attaches a classic BPF filter that drops every packet to the listening socket: SYNs and
/// the last ACK of a handshake alike, so the kernel queues no new connection (clients
/// retransmit their SYN and are refused once the socket is closed). Connections already
/// queued are separate sockets and keep working.
fn refuse_new_handshakes(listener: &TcpListener) -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: drop_all.len() as libc::c_ushort,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: `program` points at `drop_all`, both alive for the call; the kernel copies the
    // program; the fd is the listener's own, open for the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&program as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
