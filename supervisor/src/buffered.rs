//! A worker's answer, taken off the worker connection at worker speed before the client
//! sees a byte of it, so a slow or stalled client never holds a worker connection (design
//! §3). The body is kept in memory up to [`MEMORY_PER_RESPONSE`] per answer and
//! [`MEMORY_BUDGET`] across every answer in flight; the rest is spilled to an unlinked file
//! in the runtime dir (mode 0600), which disappears when the answer is dropped. The client
//! then gets it at its own pace, within the front's send timeout (see `send_timeout`).

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt, ReadBuf};

/// An answer up to this size stays in memory (when the budget allows).
pub const MEMORY_PER_RESPONSE: usize = 1024 * 1024;
/// Memory all buffered answers may hold together; beyond it they spill to disk.
pub const MEMORY_BUDGET: usize = 64 * 1024 * 1024;
/// How much of a spilled answer is written or read back at a time. Small: a stalled client
/// holds one chunk here, one in the file's buffer and up to the connection's write buffer in
/// hyper (`listener::MAX_BUF`), so hundreds of stalled readers cost little memory.
const READ_CHUNK: usize = 32 * 1024;

/// The memory every buffered answer shares.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held in memory by buffered answers right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A whole answer, ready for the client: in memory, then (if it was large) in a file.
pub struct Buffered {
    memory: VecDeque<Bytes>,
    spill: Option<Spill>,
    /// Bytes not yet handed to the client.
    left: u64,
    reserved: usize,
    budget: Arc<Budget>,
}

struct Spill {
    file: tokio::fs::File,
    left: u64,
}

/// Why an answer could not be taken off the worker connection.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("the worker connection failed while sending the answer: {0}")]
    Worker(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot spill a large answer to {dir}: {error}")]
    Spill { dir: PathBuf, error: io::Error },
}

impl Buffered {
    /// Reads `body` to its end: into memory while the budgets allow, then into a spill
    /// file in `spill_dir`.
    pub async fn take<B>(body: B, budget: &Arc<Budget>, spill_dir: &Path) -> Result<Self, TakeError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut out = Buffered {
            memory: VecDeque::new(),
            spill: None,
            left: 0,
            reserved: 0,
            budget: budget.clone(),
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| TakeError::Worker(e.into()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: workers send none, and clients do not need them
            };
            out.push(data, spill_dir).await?;
        }
        if let Some(spill) = &mut out.spill {
            let spilled = |error| TakeError::Spill {
                dir: spill_dir.to_path_buf(),
                error,
            };
            spill.file.flush().await.map_err(spilled)?;
            spill.file.rewind().await.map_err(spilled)?;
        }
        Ok(out)
    }

    async fn push(&mut self, data: Bytes, spill_dir: &Path) -> Result<(), TakeError> {
        let n = data.len();
        self.left += n as u64;
        if self.spill.is_none()
            && self.reserved + n <= MEMORY_PER_RESPONSE
            && self.budget.try_take(n)
        {
            self.reserved += n;
            self.memory.push_back(data);
            return Ok(());
        }
        let spilled = |error| TakeError::Spill {
            dir: spill_dir.to_path_buf(),
            error,
        };
        if self.spill.is_none() {
            self.spill = Some(Spill {
                file: tokio::fs::File::from_std(spill_file(spill_dir).map_err(spilled)?),
                left: 0,
            });
        }
        if let Some(spill) = &mut self.spill {
            // In small slices: tokio's file keeps a buffer as large as the largest write for
            // as long as the answer lives (the whole time a stalled client takes to read).
            for slice in data.chunks(READ_CHUNK) {
                spill.file.write_all(slice).await.map_err(spilled)?;
            }
            spill.left += n as u64;
        }
        Ok(())
    }

    /// Bytes of this answer held in memory.
    pub fn in_memory(&self) -> usize {
        self.reserved
    }
}

/// A new file only this process can reach: created exclusively (mode 0600) and unlinked at
/// once, so nothing is left behind whatever happens to the process. In `dir`, or in the
/// system's temporary directory when `dir` cannot take it.
fn spill_file(dir: &Path) -> io::Result<std::fs::File> {
    spill_file_in(dir).or_else(|e| {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot spill into the runtime dir; using the temporary directory");
        spill_file_in(&std::env::temp_dir())
    })
}

fn spill_file_in(dir: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(".answer-{:016x}", rand::random::<u64>()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(chunk) = this.memory.pop_front() {
            let n = chunk.len();
            this.reserved -= n;
            this.budget.give_back(n);
            this.left -= n as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(spill) = this.spill.as_mut() else {
            return Poll::Ready(None);
        };
        if spill.left == 0 {
            this.spill = None;
            return Poll::Ready(None);
        }
        let want = READ_CHUNK.min(usize::try_from(spill.left).unwrap_or(READ_CHUNK));
        // A fresh buffer per chunk, handed to hyper without a copy; nothing is kept here
        // between chunks.
        let mut chunk = vec![0u8; want];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut spill.file).poll_read(cx, &mut buf))?;
        let got = buf.filled().len();
        if got == 0 {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spilled answer ended early",
            ))));
        }
        chunk.truncate(got);
        let chunk = Bytes::from(chunk);
        spill.left -= got as u64;
        this.left -= got as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.budget.give_back(self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    async fn collect(b: Buffered) -> Vec<u8> {
        b.collect().await.map(|c| c.to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn small_answers_stay_in_memory_and_give_the_budget_back() {
        let budget = Budget::new(MEMORY_BUDGET);
        let dir = std::env::temp_dir();
        let b = Buffered::take(Full::new(Bytes::from_static(b"hello")), &budget, &dir)
            .await
            .unwrap();
        assert_eq!(b.in_memory(), 5);
        assert_eq!(budget.used(), 5);
        assert_eq!(b.size_hint().exact(), Some(5));
        assert_eq!(collect(b).await, b"hello");
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn large_answers_and_an_exhausted_budget_spill() {
        let dir = std::env::temp_dir();
        let big: Vec<u8> = (0..(MEMORY_PER_RESPONSE * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let budget = Budget::new(MEMORY_BUDGET);
        let b = Buffered::take(Full::new(Bytes::from(big.clone())), &budget, &dir)
            .await
            .unwrap();
        assert_eq!(
            b.in_memory(),
            0,
            "one frame over the bound goes to disk whole"
        );
        assert_eq!(collect(b).await, big);
        let tight = Budget::new(3);
        let b = Buffered::take(Full::new(Bytes::from_static(b"four")), &tight, &dir)
            .await
            .unwrap();
        assert_eq!(tight.used(), 0);
        assert_eq!(collect(b).await, b"four");
    }

    #[tokio::test]
    async fn a_dropped_answer_gives_its_memory_back() {
        let budget = Budget::new(MEMORY_BUDGET);
        let b = Buffered::take(
            Full::new(Bytes::from_static(b"abc")),
            &budget,
            &std::env::temp_dir(),
        )
        .await
        .unwrap();
        assert_eq!(budget.used(), 3);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
