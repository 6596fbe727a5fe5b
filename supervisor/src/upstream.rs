//! The hop to a worker: HTTP/1.1 over the instance's Unix socket, with at most `limit`
//! connections per instance, kept alive on a stack while idle. A request takes a permit
//! first (waiting, within its deadline, while all are in use), so 500 client connections
//! make at most `limit` worker connections instead of opening and closing hundreds: memory
//! stays bounded and no CPU goes to connection churn. Long-polls have a pool of their own
//! ([`PoolKind`]).
//!
//! A worker connection has no task of its own: the request using it drives its I/O (the
//! hyper connection future) in the request's own task, beside sending the request and
//! reading the answer ([`WorkerConn::exchange`]). So a request never hands work to another
//! task and waits for it to be scheduled, perhaps on another thread; an idle connection is
//! just data on the stack. [`exchange`] reads the answer to its end at once (see
//! `buffered`), then puts the connection back and releases the permit, whatever the client
//! does next. A connection that closed, failed, or was dropped mid-answer (the request's
//! deadline) is not put back.

use crate::buffered::{Budget, Buffered, TakeError};
use crate::instance::{Instance, Outstanding};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// One HTTP/1.1 connection to a worker: the handle requests go through and the connection's
/// I/O, which whoever uses it drives (see the module docs).
struct WorkerConn {
    sender: SendRequest<Full<Bytes>>,
    io: Pin<Box<Connection<TokioIo<UnixStream>, Full<Bytes>>>>,
}

pub struct UpstreamPool {
    socket: PathBuf,
    idle: Mutex<Vec<WorkerConn>>,
    /// One permit per connection that may exist (idle or in use).
    permits: Arc<Semaphore>,
    /// The most connections kept while idle (the rest are closed when their answer is in).
    max_idle: usize,
}

/// Which of an instance's two pools a request uses: long-polls (`GET …/changes?wait=` with
/// a wait) are held at the worker for up to a minute each, so they get their own, larger
/// pool and never take the connections every other request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Requests,
    LongPolls,
}

impl PoolKind {
    /// The pool for `req`: a `GET`/`HEAD` of a session's `changes` with a `wait` above 0.
    pub fn of<B>(req: &Request<B>) -> PoolKind {
        let read = req.method() == http::Method::GET || req.method() == http::Method::HEAD;
        let changes = req.uri().path().ends_with("/changes");
        let waits = req.uri().query().is_some_and(|query| {
            query
                .split('&')
                .filter_map(|pair| pair.strip_prefix("wait="))
                .any(|seconds| seconds.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s)))
        });
        if read && changes && waits {
            PoolKind::LongPolls
        } else {
            PoolKind::Requests
        }
    }
}

/// Why a request did not get a whole answer from the worker. In every case no byte of it
/// reached the client, so a safe request may be retried on another instance (except after
/// a [`TakeError::Spill`], which is the front's own trouble).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the worker socket: {0}")]
    Connect(std::io::Error),
    #[error("HTTP handshake with the worker failed: {0}")]
    Handshake(hyper::Error),
    #[error("the worker connection failed before a response: {0}")]
    Exchange(hyper::Error),
    #[error(transparent)]
    Answer(#[from] TakeError),
}

impl UpstreamError {
    /// The worker connection died under the request (what poison strikes count).
    pub fn died_under_request(&self) -> bool {
        matches!(
            self,
            UpstreamError::Exchange(_) | UpstreamError::Answer(TakeError::Worker(_))
        )
    }

    /// Nothing of the request reached a worker (the connection or its handshake failed):
    /// safe to send anywhere else, whatever the method.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::Handshake(_)
        )
    }

    /// The worker is not to blame (the front could not store the answer).
    pub fn is_local(&self) -> bool {
        matches!(self, UpstreamError::Answer(TakeError::Spill { .. }))
    }
}

/// Sends `req` to `instance` and takes the whole answer off the worker connection (see
/// `buffered`), reusing an idle connection when one is alive: a request that a dead idle
/// connection refused before sending moves to the next one, then to a new connection. On
/// return the connection is back on the stack.
pub async fn exchange(
    instance: &Arc<Instance>,
    mut req: Request<Full<Bytes>>,
    budget: &Arc<Budget>,
    spill_dir: &Path,
) -> Result<Response<Buffered>, UpstreamError> {
    let _outstanding: Outstanding = instance.begin_request();
    let pool = instance.pool(PoolKind::of(&req));
    // The semaphore is never closed; the error arm only keeps this free of panics.
    let _permit = pool.permits.acquire().await.map_err(|_| {
        UpstreamError::Connect(std::io::Error::other("the upstream pool is closed"))
    })?;
    while let Some(conn) = pool.take_idle() {
        match conn.exchange(req, budget, spill_dir).await {
            Ok((resp, conn)) => {
                pool.put_back(conn);
                return Ok(resp);
            }
            Err(Failed::Unsent(unsent)) => req = *unsent,
            Err(Failed::Upstream(e)) => return Err(e),
        }
    }
    let conn = pool.connect().await?;
    match conn.exchange(req, budget, spill_dir).await {
        Ok((resp, conn)) => {
            pool.put_back(conn);
            Ok(resp)
        }
        Err(Failed::Unsent(_)) => Err(UpstreamError::Connect(std::io::Error::other(
            "the new worker connection closed before the request was sent",
        ))),
        Err(Failed::Upstream(e)) => Err(e),
    }
}

/// Why [`WorkerConn::exchange`] gave no answer.
enum Failed {
    /// The connection was closed before the request went out: here it is, to send elsewhere.
    Unsent(Box<Request<Full<Bytes>>>),
    Upstream(UpstreamError),
}

impl WorkerConn {
    /// One request and its whole answer, driving the connection's I/O meanwhile. The
    /// connection comes back unless it ended on the way.
    async fn exchange(
        self,
        req: Request<Full<Bytes>>,
        budget: &Arc<Budget>,
        spill_dir: &Path,
    ) -> Result<(Response<Buffered>, Option<WorkerConn>), Failed> {
        let WorkerConn { mut sender, io } = self;
        let mut io = Some(io);
        let answer = {
            let work = async {
                if sender.ready().await.is_err() {
                    return Err(Failed::Unsent(Box::new(req)));
                }
                let resp = match sender.try_send_request(req).await {
                    Ok(resp) => resp,
                    Err(mut e) => {
                        return Err(match e.take_message() {
                            Some(unsent) => Failed::Unsent(Box::new(unsent)),
                            None => Failed::Upstream(UpstreamError::Exchange(e.into_error())),
                        })
                    }
                };
                let (parts, body) = resp.into_parts();
                let body = Buffered::take(body, budget, spill_dir)
                    .await
                    .map_err(|e| Failed::Upstream(e.into()))?;
                Ok(Response::from_parts(parts, body))
            };
            tokio::pin!(work);
            let first = match io.as_mut() {
                Some(driver) => tokio::select! {
                    biased;
                    answer = &mut work => Some(answer),
                    _ = driver.as_mut() => None,
                },
                None => None,
            };
            match first {
                Some(answer) => answer,
                None => {
                    // The connection ended (closed or failed) first. Dropping it fails what
                    // it still held for this request (the answer's callback, the body), so
                    // the request's own future now finishes at once: with the whole answer
                    // if it had it, else with the error.
                    io = None;
                    (&mut work).await
                }
            }
        };
        let resp = answer?;
        Ok((resp, io.map(|io| WorkerConn { sender, io })))
    }
}

impl UpstreamPool {
    pub fn new(socket: PathBuf, limit: usize, max_idle: usize) -> Self {
        Self {
            socket,
            idle: Mutex::new(Vec::with_capacity(max_idle.min(limit))),
            permits: Arc::new(Semaphore::new(limit.max(1))),
            max_idle,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<WorkerConn>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self) -> Option<WorkerConn> {
        let mut idle = self.idle();
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// Called while the request's permit is still held: the stack never outgrows the permits.
    fn put_back(&self, conn: Option<WorkerConn>) {
        let Some(conn) = conn.filter(|c| !c.sender.is_closed()) else {
            return;
        };
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Forgets every idle connection (the instance was replaced).
    pub fn clear(&self) {
        self.idle().clear();
    }

    async fn connect(&self) -> Result<WorkerConn, UpstreamError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(UpstreamError::Connect)?;
        // A small read buffer: a pooled connection keeps it while idle, and 64 of them per
        // instance at hyper's default (~400 KiB) would be tens of MiB after one burst of
        // large answers.
        let (sender, io) = http1::Builder::new()
            .max_buf_size(crate::listener::MAX_BUF)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        Ok(WorkerConn {
            sender,
            io: Box::pin(io),
        })
    }
}
