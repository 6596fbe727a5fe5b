//! One supervised worker instance as the rest of the supervisor sees it: who it is, the
//! state its task publishes, the commands it takes, and the load the front counts on it.
//!
//! **Who writes what.** The instance's state is written by one party only: its task in
//! `supervise`, through the [`Owner`] that [`Instance::new`] hands out once. It is
//! published as a [`Snapshot`] on a `watch` channel (what `/status`, the fleet's "wait
//! until ready" and the 503 path read) and mirrored into two atomics (state and pid) that
//! the request path reads on every request without a lock. Everybody else (the fleet, the
//! front) acts on an instance by sending it a [`Command`]. The load counters (requests in
//! flight, served, answered, failures in a row) are not state: the front counts them, the
//! task reads them (and resets them for a new process).

use crate::upstream::{PoolKind, UpstreamPool};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// The worker kinds FireMode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Classify,
    Sync,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Classify, Kind::Sync];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Classify => "classify",
            Kind::Sync => "sync",
        }
    }

    /// The worker binary installed beside `firemode`.
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Classify => "firemode-classify",
            Kind::Sync => "firemode-sync",
        }
    }
}

/// Lifecycle states, as `/status` reports them (the transitions: `supervise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum InstanceState {
    /// Spawned, not yet passing a health check.
    Starting = 0,
    /// Passing health checks: receives requests.
    Ready = 1,
    /// Running but failing health checks, or not ready (e.g. its store is down).
    Unhealthy = 2,
    /// Stopped; waiting out the restart delay.
    Backoff = 3,
    /// Asked to stop; finishing its in-flight requests.
    Draining = 4,
    /// Gone for good (retired, or the supervisor is shutting down); its task has ended.
    Stopped = 5,
}

impl InstanceState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Ready,
            2 => Self::Unhealthy,
            3 => Self::Backoff,
            4 => Self::Draining,
            _ => Self::Stopped,
        }
    }
}

/// What an instance's task is asked to do. Senders: the fleet (`Drain`: retiring an
/// instance on reload, scaling or recycling, and the shutdown) and the front (`Condemn`,
/// `Recycle`: real requests keep failing there, see `registry::KindSet::record_outcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Leave rotation, let the front finish what it has in flight there, SIGTERM, SIGKILL
    /// at `deadline`; then the task ends. A second `Drain` can only bring the deadline
    /// closer.
    Drain { deadline: Instant },
    /// The current process is broken (real requests fail there while its siblings serve):
    /// drain it gracefully, then start a new one.
    Condemn { reason: String },
    /// The current process is broken but is its kind's only instance: ask the fleet for a
    /// rolling replacement (the new process ready before this one leaves rotation).
    Recycle { reason: String },
    /// The supervisor is stopping: a sync process answers its held long-polls now (SIGUSR1)
    /// instead of holding the drain up; it keeps serving.
    ReleaseWaiters,
}

/// An instance's state as its task last published it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub started_at: Option<Instant>,
    pub last_exit: Option<String>,
    /// When the next start is due, while in backoff.
    pub next_start_at: Option<Instant>,
    /// In a crash loop (restarting repeatedly without staying healthy).
    pub degraded: bool,
    /// The last health check said "alive, not ready" (its store is down).
    pub not_ready: bool,
    /// The pid the supervisor itself is stopping (health kill, replacement, recycling,
    /// drain): requests that die with it are not poison strikes.
    pub stopping_pid: Option<u32>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            state: InstanceState::Starting,
            pid: None,
            restarts: 0,
            started_at: None,
            last_exit: None,
            next_start_at: None,
            degraded: false,
            not_ready: false,
            stopping_pid: None,
        }
    }
}

pub struct Instance {
    pub kind: Kind,
    pub index: u32,
    pub socket: PathBuf,
    /// The published state (written only through [`Owner::publish`]).
    published: watch::Sender<Snapshot>,
    /// `published.state` and `published.pid` (0: none), for the request path.
    state: AtomicU8,
    pid: AtomicU32,
    /// Where commands reach the instance's task.
    commands: mpsc::UnboundedSender<Command>,
    /// Requests sent to this instance and not yet answered (the routing load signal).
    outstanding: AtomicUsize,
    /// Woken when `outstanding` drops to zero while the instance drains.
    idle: Notify,
    /// Requests routed to the current process (for `max_requests` recycling).
    served: AtomicU64,
    /// Answers (any status) the current process completed: progress, which the health
    /// verdict reads as "alive" even when a check timed out behind real work.
    answered: AtomicU64,
    /// Real requests that failed in a row (see `traffic`).
    traffic_failures: AtomicU32,
    /// Connections for ordinary requests.
    pub pool: UpstreamPool,
    /// Connections for long-polls, which the worker holds for up to a minute each.
    pub long_polls: UpstreamPool,
}

/// The write side of one instance: its state and its command queue. Exactly one exists
/// per instance, owned by the instance's task.
pub struct Owner {
    inst: Arc<Instance>,
    commands: mpsc::UnboundedReceiver<Command>,
}

/// One row of `/status`.
#[derive(Serialize, Debug)]
pub struct InstanceStatus {
    pub kind: Kind,
    pub instance: u32,
    pub pid: Option<u32>,
    pub state: InstanceState,
    pub restarts: u32,
    pub uptime_s: Option<f64>,
    pub last_exit: Option<String>,
    /// In a crash loop (restarting repeatedly without staying healthy).
    pub degraded: bool,
    /// Seconds until the next start attempt, while in backoff.
    pub next_start_in_s: Option<f64>,
    /// Resident memory of the process, from `/proc`.
    pub rss_bytes: Option<u64>,
}

impl Instance {
    /// A new instance (state `Starting`, no process yet) and the one [`Owner`] its task
    /// drives it with.
    pub fn new(
        kind: Kind,
        index: u32,
        socket: PathBuf,
        upstream_limit: usize,
        long_poll_limit: usize,
    ) -> (Arc<Self>, Owner) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let inst = Arc::new(Self {
            kind,
            index,
            pool: UpstreamPool::new(socket.clone(), upstream_limit, upstream_limit),
            long_polls: UpstreamPool::new(socket.clone(), long_poll_limit, upstream_limit),
            socket,
            published: watch::Sender::new(Snapshot::default()),
            state: AtomicU8::new(InstanceState::Starting as u8),
            pid: AtomicU32::new(0),
            commands,
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            served: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            traffic_failures: AtomicU32::new(0),
        });
        let owner = Owner {
            inst: inst.clone(),
            commands: receiver,
        };
        (inst, owner)
    }

    /// The connection pool a request of `kind` uses.
    pub fn pool(&self, kind: PoolKind) -> &UpstreamPool {
        match kind {
            PoolKind::Requests => &self.pool,
            PoolKind::LongPolls => &self.long_polls,
        }
    }

    /// Asks the instance's task to do something (see [`Command`]).
    pub fn send(&self, command: Command) {
        // The receiver lives as long as the task; a command to an ended task has nothing
        // left to act on.
        let _ = self.commands.send(command);
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub fn is_ready(&self) -> bool {
        self.state() == InstanceState::Ready
    }

    /// Its task has ended: nothing left to report.
    pub fn is_gone(&self) -> bool {
        self.state() == InstanceState::Stopped
    }

    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }

    /// The last published state, whole.
    pub fn snapshot(&self) -> Snapshot {
        self.published.borrow().clone()
    }

    /// Waits up to `timeout` until the instance is ready; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut published = self.published.subscribe();
        let ready = published.wait_for(|s| s.state == InstanceState::Ready);
        let became_ready = matches!(tokio::time::timeout(timeout, ready).await, Ok(Ok(_)));
        became_ready
    }

    /// Waits until the instance's task has taken it out of rotation for good (`Draining`
    /// or `Stopped`), at most `timeout` (a task that cannot answer must not stall the
    /// caller).
    pub async fn wait_leaving(&self, timeout: Duration) {
        let mut published = self.published.subscribe();
        let leaving = published
            .wait_for(|s| matches!(s.state, InstanceState::Draining | InstanceState::Stopped));
        let _ = tokio::time::timeout(timeout, leaving).await;
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Resolves once no request is in flight at this instance. Woken by the last
    /// [`Outstanding`] guard to drop while the instance is draining.
    pub async fn idle(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            // Register before checking, so a wake-up between the check and the wait is kept.
            woken.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            woken.await;
        }
    }

    /// Counts a request against this instance (load, and `max_requests`) until the guard
    /// drops.
    pub fn begin_request(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }

    /// Requests routed to the current process.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Answers completed by the current process so far (a progress counter).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Counts a real request's outcome (`None`: no response). Returns true when real
    /// traffic says the instance is broken (`threshold` failures in a row); the caller
    /// decides what to ask of it (see `KindSet::record_outcome`).
    pub fn count_outcome(&self, outcome: crate::traffic::Outcome, threshold: u32) -> bool {
        if outcome != crate::traffic::Outcome::Lost {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        let failed = outcome.is_failure();
        crate::traffic::record(&self.traffic_failures, failed, threshold)
    }

    /// A verdict was sent: failures count from zero again.
    pub fn reset_failures(&self) {
        self.traffic_failures.store(0, Ordering::Relaxed);
    }

    /// Whether the supervisor stopped (or is stopping) the process `pid`.
    pub fn stopped_by_supervisor(&self, pid: Option<u32>) -> bool {
        pid.is_some_and(|p| p != 0 && self.published.borrow().stopping_pid == Some(p))
    }

    /// Alive but says it cannot serve (its store?), and out of rotation for it.
    pub fn reports_not_ready(&self) -> bool {
        let s = self.published.borrow();
        s.not_ready && s.state == InstanceState::Unhealthy
    }

    /// Crash-looping: restarted several times in a row without a healthy stretch (cleared
    /// when it becomes ready).
    pub fn is_degraded(&self) -> bool {
        self.published.borrow().degraded
    }

    /// Time until the next start attempt, if this instance is waiting for one.
    pub fn next_start_in(&self) -> Option<Duration> {
        let s = self.published.borrow();
        if s.state != InstanceState::Backoff {
            return None;
        }
        s.next_start_at
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    pub fn status(&self) -> InstanceStatus {
        let s = self.snapshot();
        InstanceStatus {
            kind: self.kind,
            instance: self.index,
            pid: s.pid,
            state: s.state,
            restarts: s.restarts,
            uptime_s: s.started_at.map(|t| t.elapsed().as_secs_f64()),
            last_exit: s.last_exit,
            degraded: s.degraded,
            next_start_in_s: (s.state == InstanceState::Backoff)
                .then(|| {
                    s.next_start_at
                        .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64())
                })
                .flatten(),
            rss_bytes: s.pid.and_then(crate::supervise::rss_bytes),
        }
    }
}

impl Owner {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.inst
    }

    /// The next command (never `None` while the instance exists: it holds a sender).
    pub async fn command(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    /// The next command if one is queued (tests).
    #[cfg(test)]
    pub fn try_command(&mut self) -> Option<Command> {
        self.commands.try_recv().ok()
    }

    /// The state as last published.
    pub fn published(&self) -> watch::Ref<'_, Snapshot> {
        self.inst.published.borrow()
    }

    /// Changes the published state: the only write to an instance's state.
    pub fn publish(&self, change: impl FnOnce(&mut Snapshot)) {
        self.inst.published.send_modify(|s| {
            change(s);
            self.inst.pid.store(s.pid.unwrap_or(0), Ordering::Release);
            // SeqCst: pairs with the load in `Outstanding::drop` (see `Instance::idle`).
            self.inst.state.store(s.state as u8, Ordering::SeqCst);
        });
    }

    /// A new process: its load counters start from zero.
    pub fn reset_counters(&self) {
        self.inst.served.store(0, Ordering::Relaxed);
        self.inst.answered.store(0, Ordering::Relaxed);
        self.inst.traffic_failures.store(0, Ordering::Relaxed);
    }
}

/// One request in flight at an instance, carried by its response body until it ends.
pub struct Outstanding(Arc<Instance>);

impl Outstanding {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let inst = &self.0;
        // Only a draining instance is waited on; others skip the wake-up's lock.
        if inst.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && inst.state() == InstanceState::Draining
        {
            inst.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> (Arc<Instance>, Owner) {
        Instance::new(Kind::Sync, 0, PathBuf::from("/nonexistent"), 1, 1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_instance_is_idle_when_its_last_request_ends() {
        let (inst, owner) = instance();
        let first = inst.begin_request();
        let second = inst.begin_request();
        owner.publish(|s| s.state = InstanceState::Draining);
        let idle = tokio::spawn({
            let inst = inst.clone();
            async move { inst.idle().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "a request is still in flight");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), idle)
            .await
            .expect("woken by the last request, not by a timer")
            .expect("the waiting task");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_readiness_ends_on_the_published_event() {
        let (inst, owner) = instance();
        assert!(!inst.wait_ready(Duration::from_millis(50)).await);
        let waiting = tokio::spawn({
            let inst = inst.clone();
            async move { inst.wait_ready(Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        owner.publish(|s| {
            s.state = InstanceState::Ready;
            s.pid = Some(42);
        });
        assert!(waiting.await.expect("the waiting task"));
        assert!(inst.is_ready());
        assert_eq!(inst.pid(), Some(42));
    }

    #[tokio::test]
    async fn commands_reach_the_owner_in_order() {
        let (inst, mut owner) = instance();
        let deadline = Instant::now();
        inst.send(Command::Condemn { reason: "r".into() });
        inst.send(Command::Drain { deadline });
        assert_eq!(
            owner.command().await,
            Some(Command::Condemn { reason: "r".into() })
        );
        assert_eq!(owner.command().await, Some(Command::Drain { deadline }));
    }
}
