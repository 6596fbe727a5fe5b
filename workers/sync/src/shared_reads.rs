//! Whole-session reads shared by the requests that wake up together.
//!
//! A merge wakes every long-poll of its session at once; each then reads the session to
//! compute its changes. Without sharing, a thousand waiters on a 20,000-path session would
//! read it a thousand times and materialise its document a thousand times (design §3: the
//! store work a merge causes must not grow with the number of waiters). Here a woken
//! request joins the read already in flight for its session and shares its [`Snapshot`]
//! (document materialised and [`DeltaIndex`] built once, on first use, so each waiter's
//! changes cost what it has not seen rather than a walk over every register), or starts the
//! read the others then join.
//!
//! Two rules keep every answer as fresh as a read of its own would be:
//! * [`Freshness::Started`]: a request that arrives (a `GET`, the first look of a `changes`)
//!   starts a read of its own, which later requests may join. Joining an older read could
//!   miss the caller's own merge that was answered a moment ago (read-your-writes).
//! * [`Freshness::Beyond`]: a woken waiter needs a version beyond the one it waited on. It
//!   joins the read in flight, and reads again if that read turns out older.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use firemode_merge::{DeltaIndex, Document, SessionState};
use firemode_wire::Problem;
use tokio::sync::OnceCell;

/// One read of a session: its state, its version and, once asked for, its document and its
/// delta index.
pub struct Snapshot {
    pub state: SessionState,
    /// `sync_sessions.version` of this read (0 for a session never written).
    pub version: i64,
    /// How much of the session `state` holds.
    pub reach: Reach,
    /// A whole-session read holds one of the process's [`WholeReads`] permits for as long as
    /// anyone uses its snapshot.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    document: OnceLock<Document>,
    delta_index: OnceLock<DeltaIndex>,
    /// Says, once the snapshot is gone, how many registers it held ([`crate::memory`]).
    _freed: FreedOnDrop,
}

/// Tells [`crate::memory`] on drop that work holding this many registers ended.
struct FreedOnDrop(usize);

impl Drop for FreedOnDrop {
    fn drop(&mut self) {
        crate::memory::freed_much(self.0);
    }
}

impl Snapshot {
    pub fn new(state: SessionState, version: i64) -> Snapshot {
        Snapshot {
            _freed: FreedOnDrop(state.register_count()),
            state,
            version,
            reach: Reach::Whole,
            _permit: None,
            document: OnceLock::new(),
            delta_index: OnceLock::new(),
        }
    }

    /// A whole-session snapshot holding `permit` of [`WholeReads`] until it is dropped.
    pub fn holding(state: SessionState, version: i64, permit: WholeReadPermit) -> Snapshot {
        Snapshot {
            _permit: Some(permit.0),
            ..Snapshot::new(state, version)
        }
    }

    /// A state of the registers around those new to one clock ([`Reach::AroundNew`]).
    pub fn around_new(state: SessionState, version: i64) -> Snapshot {
        Snapshot {
            reach: Reach::AroundNew,
            ..Snapshot::new(state, version)
        }
    }

    /// No state: the catch-up read found the whole session must be read ([`Reach::Declined`]).
    /// As fresh as any read (its version is the largest), so a request that joins it does not
    /// ask the store again only to be told the same.
    pub fn declined() -> Snapshot {
        Snapshot {
            reach: Reach::Declined,
            ..Snapshot::new(SessionState::default(), i64::MAX)
        }
    }

    /// The merged document, materialised once for everyone sharing this snapshot.
    pub fn document(&self) -> &Document {
        self.document.get_or_init(|| self.state.materialised())
    }

    /// The registers by dot, built once for everyone sharing this snapshot: each catching-up
    /// request then visits only the registers new to its `since`
    /// (`SessionState::changes_since_indexed`).
    pub fn delta_index(&self) -> &DeltaIndex {
        self.delta_index
            .get_or_init(|| DeltaIndex::new(&self.state))
    }
}

/// How many whole-session snapshots (read, decoded, materialised, answered) and
/// compactions (which load the whole session too) a process holds at once: the rest queue,
/// first come first served. So a worker's memory for them is bounded by this many sessions
/// whatever the number of requests or of sessions due for compaction together, and a crowd
/// of heavy reads completes one after another instead of all at the end (the supervisor
/// sees answers, not a hung worker).
pub const WHOLE_READS_AT_ONCE: usize = 4;

/// The permits of [`WHOLE_READS_AT_ONCE`], shared by the process's reads and compactions.
#[derive(Clone)]
pub struct WholeReads(Arc<tokio::sync::Semaphore>);

/// One whole-session read's place among [`WholeReads`].
pub struct WholeReadPermit(tokio::sync::OwnedSemaphorePermit);

impl Default for WholeReads {
    fn default() -> Self {
        WholeReads(Arc::new(tokio::sync::Semaphore::new(WHOLE_READS_AT_ONCE)))
    }
}

impl WholeReads {
    /// Waits for a place (the semaphore is never closed).
    pub async fn acquire(&self) -> Option<WholeReadPermit> {
        Arc::clone(&self.0)
            .acquire_owned()
            .await
            .ok()
            .map(WholeReadPermit)
    }
}

/// How much of the session a [`Snapshot`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every register.
    Whole,
    /// The registers around those new to one clock (`firemode_store::CatchUpRead::Part`).
    AroundNew,
    /// Nothing: too much is new to that clock; the whole session is to be read.
    Declined,
}

/// A read in flight: every request that joins it gets its result.
type InFlight = Arc<OnceCell<Result<Arc<Snapshot>, Problem>>>;

/// How fresh a request needs its snapshot.
#[derive(Clone, Copy, Debug)]
pub enum Freshness {
    /// Read after this request arrived: start a read (others may join it).
    Started,
    /// A version beyond this one: join the read in flight if it has one.
    Beyond(i64),
}

/// The reads in flight, per key: (tenant, session id) for whole-session reads; (tenant,
/// session id, clock) for catch-up reads around the registers new to a clock.
pub struct SharedReads<K = (String, String)> {
    in_flight: Mutex<HashMap<K, InFlight>>,
}

impl<K> Default for SharedReads<K> {
    fn default() -> Self {
        SharedReads {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

impl SharedReads {
    /// A snapshot of `(tenant, session_id)` as fresh as `freshness` asks, from a read in flight
    /// or one started with `read`. Cancel-safe: if the request running a read goes away, one
    /// waiting for it runs it.
    pub async fn read<F, Fut>(
        &self,
        tenant: &str,
        session_id: &str,
        freshness: Freshness,
        read: F,
    ) -> Result<Arc<Snapshot>, Problem>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, Problem>>,
    {
        self.read_keyed((tenant.to_owned(), session_id.to_owned()), freshness, read)
            .await
    }
}

impl<K: std::hash::Hash + Eq + Clone> SharedReads<K> {
    /// [`SharedReads::read`] of the read named `key`.
    pub async fn read_keyed<F, Fut>(
        &self,
        key: K,
        freshness: Freshness,
        read: F,
    ) -> Result<Arc<Snapshot>, Problem>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, Problem>>,
    {
        if let Freshness::Beyond(seen) = freshness {
            let joined = self.run(&key, self.current(&key), &read).await?;
            if joined.version > seen {
                return Ok(joined);
            }
        }
        self.run(&key, self.started(&key), &read).await
    }

    /// The read in flight for `key`, or a new one.
    fn current(&self, key: &K) -> InFlight {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(in_flight.entry(key.clone()).or_default())
    }

    /// A new read for `key`, which later requests join.
    fn started(&self, key: &K) -> InFlight {
        let cell = InFlight::default();
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.insert(key.clone(), Arc::clone(&cell));
        cell
    }

    /// Runs (or waits for) the read of `cell`, then forgets it if it is still the current one.
    async fn run<F, Fut>(&self, key: &K, cell: InFlight, read: &F) -> Result<Arc<Snapshot>, Problem>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, Problem>>,
    {
        let result = cell
            .get_or_init(|| async { read().await.map(Arc::new) })
            .await
            .clone();
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            in_flight.remove(key);
        }
        result
    }

    /// How many sessions have a read in flight (for tests).
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_requests_share_one_read_and_later_ones_read_again() {
        let shared = Arc::new(SharedReads::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (shared, reads, gate) = (shared.clone(), reads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let read = || {
                    let (reads, gate) = (reads.clone(), gate.clone());
                    async move {
                        reads.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(Snapshot::new(SessionState::default(), 7))
                    }
                };
                shared.read("t", "S", Freshness::Beyond(3), read).await
            }));
        }
        // Let every task join, then finish the one read (a stored permit if it is not
        // waiting yet).
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_one();
        for task in tasks {
            let snapshot = task.await.expect("joins").expect("reads");
            assert_eq!(snapshot.version, 7);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read for all");
        assert_eq!(shared.in_flight(), 0);
        // A request after it reads afresh.
        let again = shared
            .read("t", "S", Freshness::Beyond(7), || async {
                Ok(Snapshot::new(SessionState::default(), 8))
            })
            .await
            .expect("reads");
        assert_eq!(again.version, 8);
    }

    /// A woken waiter that joins a read older than the version it waited on reads again; an
    /// arriving request never joins a read in flight.
    #[tokio::test]
    async fn no_request_gets_a_snapshot_older_than_it_needs() {
        let shared = Arc::new(SharedReads::default());
        let gate = Arc::new(tokio::sync::Notify::new());
        let versions = Arc::new(Mutex::new(vec![4, 5, 6, 7]));
        // Reads return 4, 5, 6, 7 in turn; 4 and 6 wait for the gate.
        let read = {
            let (gate, versions) = (gate.clone(), versions.clone());
            move || {
                let (gate, versions) = (gate.clone(), versions.clone());
                async move {
                    let version = versions.lock().expect("lock").remove(0);
                    if version % 2 == 0 {
                        gate.notified().await;
                    }
                    Ok(Snapshot::new(SessionState::default(), version))
                }
            }
        };
        let spawn = |freshness: Freshness| {
            let (shared, read) = (shared.clone(), read.clone());
            tokio::spawn(async move { shared.read("t", "S", freshness, read).await })
        };
        let version = |task: tokio::task::JoinHandle<Result<Arc<Snapshot>, Problem>>| async {
            task.await.expect("joins").expect("reads").version
        };
        // A woken waiter that needs beyond 4 joins the read in flight (4), then reads 5.
        let old = spawn(Freshness::Started);
        while shared.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let woken = spawn(Freshness::Beyond(4));
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_one();
        assert_eq!(version(old).await, 4);
        assert_eq!(version(woken).await, 5);
        // An arriving request does not wait for the read in flight (6): it reads 7.
        let older = spawn(Freshness::Started);
        while shared.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let arriving = tokio::time::timeout(
            Duration::from_secs(5),
            shared.read("t", "S", Freshness::Started, read.clone()),
        )
        .await
        .expect("not held by the read in flight")
        .expect("reads");
        assert_eq!(arriving.version, 7);
        gate.notify_one();
        assert_eq!(version(older).await, 6);
    }

    /// Whole-session snapshots beyond the limit wait until one is dropped, in arrival order.
    #[tokio::test]
    async fn whole_reads_wait_for_a_place() {
        let places = Arc::new(WholeReads::default());
        let mut held = Vec::new();
        for version in 0..WHOLE_READS_AT_ONCE {
            let permit = places.acquire().await.expect("a place");
            held.push(Snapshot::holding(
                SessionState::default(),
                version as i64,
                permit,
            ));
        }
        let next = {
            let places = places.clone();
            tokio::spawn(async move { places.acquire().await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "a fifth whole read waits");
        held.pop();
        let placed = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("placed once a snapshot is dropped")
            .expect("joins");
        assert!(placed);
    }

    #[tokio::test]
    async fn a_cancelled_reader_hands_the_read_to_a_waiting_one() {
        let shared = Arc::new(SharedReads::default());
        let first = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .read("t", "S", Freshness::Started, || async {
                        std::future::pending::<()>().await;
                        Ok(Snapshot::new(SessionState::default(), 1))
                    })
                    .await
            })
        };
        while shared.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let second = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .read("t", "S", Freshness::Beyond(0), || async {
                        Ok(Snapshot::new(SessionState::default(), 2))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let snapshot = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiting request takes the read over")
            .expect("joins")
            .expect("reads");
        assert_eq!(snapshot.version, 2);
    }
}
