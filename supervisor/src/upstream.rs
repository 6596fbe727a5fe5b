//! The hop to a worker: HTTP/1.1 over the instance's Unix socket, with at most `limit`
//! connections per instance, kept alive on a stack while idle. A request takes a permit
//! first (waiting, within its deadline, while all are in use), so 500 client connections
//! make at most `limit` worker connections instead of opening and closing hundreds: memory
//! stays bounded and no CPU goes to connection churn. A connection goes back on the stack
//! when its response body has been read to the end; one that is closed is dropped.
//! Long-polls have a pool of their own ([`PoolKind`]).
//! [`exchange`] reads that body to its end at once (see `buffered`), so the connection and
//! permit go back as soon as the worker has answered, whatever the client does.

use crate::buffered::{Budget, Buffered, TakeError};
use crate::instance::{Instance, Outstanding};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type Sender = SendRequest<Full<Bytes>>;

pub struct UpstreamPool {
    socket: PathBuf,
    idle: Mutex<Vec<Sender>>,
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
/// `buffered`): on return the connection is back in the pool.
pub async fn exchange(
    instance: &Arc<Instance>,
    req: Request<Full<Bytes>>,
    budget: &Arc<Budget>,
    spill_dir: &Path,
) -> Result<Response<Buffered>, UpstreamError> {
    let (parts, body) = send(instance, req).await?.into_parts();
    let body = Buffered::take(body, budget, spill_dir).await?;
    Ok(Response::from_parts(parts, body))
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

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle();
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Called while the request's permit is still held: the stack never outgrows the permits.
    fn put_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }

    /// Forgets every idle connection (the instance was replaced).
    pub fn clear(&self) {
        self.idle().clear();
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(UpstreamError::Connect)?;
        // A small read buffer: a pooled connection keeps it while idle, and 64 of them per
        // instance at hyper's default (~400 KiB) would be tens of MiB after one burst of
        // large answers.
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(crate::listener::MAX_BUF)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Sends `req` to `instance`, reusing an idle connection when one is alive. A request that
/// a dead idle connection refused before sending is moved to the next one, then to a new
/// connection.
pub async fn send(
    instance: &Arc<Instance>,
    mut req: Request<Full<Bytes>>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let guard = instance.begin_request();
    let kind = PoolKind::of(&req);
    let pool = instance.pool(kind);
    // The semaphore is never closed; the error arm only keeps this free of panics.
    let permit = pool.permits.clone().acquire_owned().await.map_err(|_| {
        UpstreamError::Connect(std::io::Error::other("the upstream pool is closed"))
    })?;
    let release = (guard, permit);
    while let Some(mut sender) = pool.take_idle() {
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(wrap(resp, sender, kind, release)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(UpstreamError::Exchange(e.into_error())),
            },
        }
    }
    let mut sender = pool.connect().await?;
    match sender.try_send_request(req).await {
        Ok(resp) => Ok(wrap(resp, sender, kind, release)),
        Err(e) => Err(UpstreamError::Exchange(e.into_error())),
    }
}

fn wrap(
    resp: Response<Incoming>,
    sender: Sender,
    kind: PoolKind,
    (guard, permit): (Outstanding, OwnedSemaphorePermit),
) -> Response<PooledBody> {
    resp.map(|body| PooledBody {
        body,
        kind,
        release: Some((sender, guard, permit)),
    })
}

/// A worker's response body on its way to the client. When it has been read to the end,
/// its connection returns to the instance's idle stack and the request stops counting
/// against the instance's load.
pub struct PooledBody {
    body: Incoming,
    kind: PoolKind,
    release: Option<(Sender, Outstanding, OwnedSemaphorePermit)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, guard, permit)) = self.release.take() {
            guard.instance().pool(self.kind).put_back(sender);
            drop(permit);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a fully read body leaves the connection reusable.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
