//! The floor for the front's cost: a bare hyper 1.x reverse proxy from TCP to worker Unix
//! sockets, with no auth, routing, metrics, tracing, limits or retries. Each client
//! connection gets its own worker connection (round robin over the sockets), and requests
//! stream through untouched. `bench/run.py` measures it beside the front and nginx, so the
//! front's CPU per request can be read against what hyper and the kernel cost on the same
//! machine. Not a product: never deploy it.
//!
//!     cargo run --release --example bare_proxy -- 127.0.0.1:28082 run/classify-0.1.sock …

#![forbid(unsafe_code)]

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::Mutex;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bare_proxy ADDR SOCKET..."))?;
    let sockets: Arc<Vec<PathBuf>> = Arc::new(args.map(PathBuf::from).collect());
    anyhow::ensure!(!sockets.is_empty(), "usage: bare_proxy ADDR SOCKET...");
    let listener = TcpListener::bind(&listen).await?;
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let socket = sockets[next.fetch_add(1, Ordering::Relaxed) % sockets.len()].clone();
        tokio::spawn(async move {
            let Ok(upstream) = UnixStream::connect(&socket).await else {
                return;
            };
            let Ok((sender, conn)) = client::handshake(TokioIo::new(upstream)).await else {
                return;
            };
            tokio::spawn(conn);
            let sender = Arc::new(Mutex::new(sender));
            let service = service_fn(move |req: Request<Incoming>| {
                let sender = sender.clone();
                async move { sender.lock().await.send_request(req).await }
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
