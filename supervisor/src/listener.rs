//! The accept loop shared by the front and the admin listener: HTTP/1.1 connections served
//! until the stop signal, then a graceful close that lets in-flight requests finish.
//!
//! **The close loses no accepted connection.** Closing a TCP listener resets every
//! connection still in the kernel's accept queue — connections whose clients have already
//! connected and sent their request — and every handshake still under way (the kernel sent
//! its SYN-ACK, so the client's connect succeeded, but the client's last ACK has not arrived).
//! So at the stop, when the socket is ours, a socket filter first drops every new SYN (a
//! client connecting now sees its connect refused once the listener is gone, never a reset
//! after a successful connect) while letting the handshakes under way complete; then
//! everything queued is accepted (non-blocking, until `WouldBlock`), again while the kernel
//! still lists a half-open handshake to our port (at most [`HANDSHAKE_WAIT`]), and served
//! like any other connection — its first request answered with `Connection: close` (hyper
//! alone would close a connection it has read nothing from yet; [`serve_connection`] gives it
//! [`FIRST_REQUEST_GRACE`] to begin its request). A socket passed by systemd stays open in
//! systemd after we close our copy, so it gets no filter (the next start would inherit it):
//! what is queued there waits for the next start.

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

/// How long the close waits, at most, for handshakes under way at the stop to complete (a
/// client's last ACK or first data segment; the kernel lists the handshake until then). One
/// round trip normally; a lost segment is sent again after ~200 ms. A half-open handshake
/// whose client went away stays listed for a minute, hence the bound.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(1);

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
    for stream in take_queued(name, listener, from_systemd).await {
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
/// refused first (our own socket only), then the accept queue emptied, also of the
/// handshakes that were under way. Returns the queued connections.
async fn take_queued(
    name: &'static str,
    listener: TcpListener,
    from_systemd: bool,
) -> Vec<TcpStream> {
    let filtered = !from_systemd
        && match refuse_new_handshakes(&listener) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot filter the listening socket; connections arriving during the close may be reset");
                false
            }
        };
    let port = listener.local_addr().map(|a| a.port()).ok();
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(listener = name, error = %e, "cannot take the queued connections");
            return Vec::new();
        }
    };
    let deadline = tokio::time::Instant::now() + HANDSHAKE_WAIT;
    let mut queued = Vec::new();
    loop {
        accept_queued(name, &listener, &mut queued);
        // Only behind our filter can the handshakes under way be waited for: otherwise new
        // ones keep arriving.
        let under_way = filtered && port.is_some_and(|port| not_yet_accepted(port) > 0);
        if !under_way || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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

/// Accepts what the kernel has queued on `listener` (non-blocking), into `queued`.
fn accept_queued(name: &str, listener: &std::net::TcpListener, queued: &mut Vec<TcpStream>) {
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
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed while closing");
                return;
            }
        }
    }
}

/// How many connections to local `port` the kernel holds that no process accepted yet:
/// handshakes half-open (state SYN_RECV: it sent its SYN-ACK, waits for the client's ACK)
/// and completed ones in the accept queue (ESTABLISHED or CLOSE_WAIT with no socket inode),
/// from `/proc/net/tcp` and `/proc/net/tcp6`. A handshake completing is listed one way or
/// the other throughout, so "none" after an accept pass means every one was taken. There is
/// no readiness signal for "none left", so the close asks this between accept passes.
fn not_yet_accepted(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| is_unaccepted_to(line, port))
                .count()
        })
        .sum()
}

/// Whether a line of `/proc/net/tcp{,6}` is a connection to local `port` no process has
/// accepted (see [`not_yet_accepted`]; `local_address` is `ADDRESS:PORT` in hex, `st` the
/// state in hex, `inode` 0 for a socket no process holds).
fn is_unaccepted_to(line: &str, port: u16) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (Some(local), Some(&state), Some(&inode)) = (fields.get(1), fields.get(3), fields.get(9))
    else {
        return false;
    };
    let to_port = local
        .rsplit_once(':')
        .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
        == Some(port);
    let unaccepted = match state {
        "03" => true,
        "01" | "08" => inode == "0",
        _ => false,
    };
    to_port && unaccepted
}

/// Attaches a classic BPF filter that drops every SYN without ACK to the listening socket
/// (a socket filter on TCP sees the segment from its TCP header: byte 13 holds the flags), so
/// the kernel starts no new handshake: clients retransmit their SYN and are refused once the
/// socket is closed. The last ACK of a handshake under way, and its client's first data,
/// pass, so that handshake completes into the accept queue. Connections already queued are
/// separate sockets and keep working.
fn refuse_new_handshakes(listener: &TcpListener) -> std::io::Result<()> {
    attach_filter(listener, &mut by_syn(0, u32::MAX))
}

/// A classic BPF program for a TCP socket: `on_syn` for a SYN without ACK, `otherwise` for
/// any other segment (a socket filter returns how many bytes to keep: 0 drops, `u32::MAX`
/// keeps the segment whole). It sees the segment from its TCP header: byte 13 holds the
/// flags.
fn by_syn(on_syn: u32, otherwise: u32) -> [nix::libc::sock_filter; 5] {
    use nix::libc::{
        sock_filter, BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET,
    };
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    // The opcodes all fit the 16 bits of `code`.
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    [
        op(BPF_LD | BPF_B | BPF_ABS, 13, 0, 0),
        op(BPF_ALU | BPF_AND | BPF_K, SYN | ACK, 0, 0),
        op(BPF_JMP | BPF_JEQ | BPF_K, SYN, 0, 1),
        op(BPF_RET | BPF_K, on_syn, 0, 0),
        op(BPF_RET | BPF_K, otherwise, 0, 0),
    ]
}

/// Attaches the classic BPF `program` to `listener` (`SO_ATTACH_FILTER`), replacing any.
fn attach_filter(
    listener: &TcpListener,
    program: &mut [nix::libc::sock_filter],
) -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let program = libc::sock_fprog {
        len: libc::c_ushort::try_from(program.len())
            .map_err(|_| std::io::ErrorKind::InvalidInput)?,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `program` points at the caller's instructions, both alive for the call; the kernel copies the
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A filter that keeps only SYNs without ACK: the kernel answers a connect (the client's
    /// connect succeeds) but never sees the handshake's last ACK nor the client's data, so
    /// the handshake stays half-open until another filter lets the client's retransmission in.
    fn hold_handshakes_half_open(listener: &TcpListener) {
        attach_filter(listener, &mut by_syn(u32::MAX, 0)).unwrap();
    }

    /// A client whose connect succeeded just before the stop, whose last ACK and request the
    /// kernel had not yet taken in, is served: the close lets the handshake complete and
    /// accepts it (closing at once would reset it: the flake of
    /// `sigterm_serves_every_connection_the_kernel_accepted`, one CI run in several).
    #[tokio::test]
    async fn the_close_takes_in_handshakes_under_way() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        hold_handshakes_half_open(&listener);
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(b"request").unwrap();
        assert_eq!(not_yet_accepted(port), 1, "the handshake is under way");

        let mut queued = take_queued("test", listener, false).await;

        assert_eq!(
            queued.len(),
            1,
            "the connection under way at the stop is taken in"
        );
        let mut got = [0u8; 7];
        let stream = queued.pop().unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        (&stream).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"request");
        // And no new handshake starts once the close began.
        assert_eq!(not_yet_accepted(port), 0);
    }

    /// After the close began, a new client's connect is not answered (it is refused once the
    /// listener is gone), and nothing is waited for when no handshake is under way.
    #[tokio::test]
    async fn the_close_starts_no_new_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        refuse_new_handshakes(&listener).unwrap();
        let connect = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(address),
        )
        .await;
        assert!(
            connect.is_err(),
            "a new connect is not answered: {connect:?}"
        );
        let started = std::time::Instant::now();
        let queued = take_queued("test", listener, false).await;
        assert!(queued.is_empty());
        assert!(
            started.elapsed() < HANDSHAKE_WAIT,
            "nothing was under way to wait for"
        );
    }

    #[test]
    fn unaccepted_connections_are_read_by_state_port_and_inode() {
        let half_open = "   3: 0100007F:1F90 0100007F:C350 03 00000000:00000000 01:00000066 00000000     0        0 0 1 0000000000000000";
        assert!(is_unaccepted_to(half_open, 0x1F90));
        assert!(!is_unaccepted_to(half_open, 0x1F91));
        let queued = "   4: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000";
        assert!(is_unaccepted_to(queued, 0x1F90));
        let accepted = queued.replace(" 0 1 0000", " 4242 1 0000");
        assert!(!is_unaccepted_to(&accepted, 0x1F90));
        let closing = queued.replace(" 01 ", " 05 ");
        assert!(
            !is_unaccepted_to(&closing, 0x1F90),
            "our own closed connections"
        );
        assert!(!is_unaccepted_to("", 1));
    }
}
