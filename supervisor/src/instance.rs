//! One supervised worker instance as the rest of the supervisor sees it: its state, pid,
//! restart count and load, readable without locks on the request path, and its pool of
//! upstream connections.

use crate::upstream::UpstreamPool;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Lifecycle states, as `/status` reports them.
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
    /// Gone for good (supervisor shutting down).
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

/// Status details that change rarely; behind a mutex the request path never takes.
#[derive(Debug, Default)]
struct Details {
    started_at: Option<Instant>,
    last_exit: Option<String>,
    next_start_at: Option<Instant>,
    degraded: bool,
}

pub struct Instance {
    pub kind: Kind,
    pub index: u32,
    pub socket: PathBuf,
    state: AtomicU8,
    pid: AtomicU32,
    restarts: AtomicU32,
    /// Replaced or scaled away by a reload: once stopped it leaves `/status`.
    retired: AtomicBool,
    /// Requests routed to the current process (for `max_requests` recycling).
    served: AtomicU64,
    /// Real requests that failed in a row (see `traffic`).
    traffic_failures: AtomicU32,
    /// Set when real traffic says the instance is broken; the supervision task acts on it.
    traffic_verdict: AtomicBool,
    /// Like `traffic_verdict` for the only instance of its kind: replaced the rolling way
    /// (the new process ready before this one leaves rotation).
    replace_verdict: AtomicBool,
    /// The last health check said "alive, not ready" (store down).
    not_ready: AtomicBool,
    /// A replacement was asked for (recycling); asked once per process.
    recycling: AtomicBool,
    /// Wakes the supervision task early (a traffic verdict).
    pub attention: tokio::sync::Notify,
    /// Requests sent to this instance and not yet answered (the routing load signal).
    outstanding: AtomicUsize,
    /// Answers (any status) the current process completed: progress, which the health
    /// verdict reads as "alive" even when a check timed out behind real work.
    answered: AtomicU64,
    /// The pid the supervisor itself is stopping (health kill, replacement, recycling,
    /// drain): requests that die with it are not poison strikes.
    stopping_pid: AtomicU32,
    details: Mutex<Details>,
    pub pool: UpstreamPool,
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
    pub fn new(kind: Kind, index: u32, socket: PathBuf, upstream_limit: usize) -> Self {
        Self {
            kind,
            index,
            pool: UpstreamPool::new(socket.clone(), upstream_limit),
            socket,
            state: AtomicU8::new(InstanceState::Starting as u8),
            pid: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            served: AtomicU64::new(0),
            traffic_failures: AtomicU32::new(0),
            traffic_verdict: AtomicBool::new(false),
            replace_verdict: AtomicBool::new(false),
            recycling: AtomicBool::new(false),
            not_ready: AtomicBool::new(false),
            attention: tokio::sync::Notify::new(),
            outstanding: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            stopping_pid: AtomicU32::new(0),
            details: Mutex::new(Details::default()),
        }
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: InstanceState) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Taken out for good (replaced, scaled down, stopping), whether or not it has exited.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Retired and stopped: nothing left to report.
    pub fn is_gone(&self) -> bool {
        self.retired.load(Ordering::Acquire) && self.state() == InstanceState::Stopped
    }

    pub fn is_ready(&self) -> bool {
        self.state() == InstanceState::Ready
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request against this instance until the guard drops.
    pub fn track(&self) -> OutstandingGuard<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        OutstandingGuard(self)
    }

    /// Like [`Instance::track`], owning a handle to the instance; also counts the request
    /// toward `max_requests`.
    pub fn track_owned(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }

    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }

    fn details(&self) -> std::sync::MutexGuard<'_, Details> {
        // A poisoned lock only means a panic elsewhere; the data is plain values.
        self.details.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests routed to the current process.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Reports a real request's outcome (`None`: no response). Returns true when real
    /// traffic says the instance is broken (`threshold` failures in a row); the caller
    /// decides whether it may leave rotation (see `KindSet::record_outcome`).
    pub fn count_outcome(&self, status: Option<u16>, threshold: u32) -> bool {
        if status.is_some() {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        let failed = crate::traffic::is_failure(status);
        crate::traffic::record(&self.traffic_failures, failed, threshold)
    }

    /// Executes a traffic verdict: out of rotation now, replaced by the supervision task.
    pub fn condemn(&self) {
        self.traffic_failures.store(0, Ordering::Relaxed);
        self.set_state(InstanceState::Unhealthy);
        self.traffic_verdict.store(true, Ordering::Release);
        self.attention.notify_one();
    }

    /// Executes a traffic verdict on the only instance of its kind: a rolling replacement,
    /// so the kind is never without a ready instance.
    pub fn ask_replacement(&self) {
        self.traffic_failures.store(0, Ordering::Relaxed);
        self.replace_verdict.store(true, Ordering::Release);
        self.attention.notify_one();
    }

    /// Takes the rolling-replacement verdict, if real requests asked for one.
    pub fn take_replace_verdict(&self) -> bool {
        self.replace_verdict.swap(false, Ordering::AcqRel)
    }

    /// Answers completed by the current process so far (a progress counter).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// The supervisor is about to stop the current process itself.
    pub fn mark_stopping(&self) {
        self.stopping_pid
            .store(self.pid.load(Ordering::Acquire), Ordering::Release);
    }

    /// Whether the supervisor stopped (or is stopping) the process `pid`.
    pub fn stopped_by_supervisor(&self, pid: Option<u32>) -> bool {
        pid.is_some_and(|p| p != 0 && self.stopping_pid.load(Ordering::Acquire) == p)
    }

    pub fn set_reports_not_ready(&self, v: bool) {
        self.not_ready.store(v, Ordering::Relaxed);
    }

    pub fn reports_not_ready(&self) -> bool {
        self.not_ready.load(Ordering::Relaxed) && self.state() == InstanceState::Unhealthy
    }

    /// Takes the traffic verdict, if real requests condemned this process.
    pub fn take_traffic_verdict(&self) -> bool {
        self.traffic_verdict.swap(false, Ordering::AcqRel)
    }

    /// True the first time a recycle is asked for this process.
    pub fn ask_recycle(&self) -> bool {
        !self.recycling.swap(true, Ordering::AcqRel)
    }

    pub fn on_spawned(&self, pid: u32) {
        self.pid.store(pid, Ordering::Release);
        self.served.store(0, Ordering::Relaxed);
        self.answered.store(0, Ordering::Relaxed);
        self.traffic_failures.store(0, Ordering::Relaxed);
        self.traffic_verdict.store(false, Ordering::Release);
        self.replace_verdict.store(false, Ordering::Release);
        let mut d = self.details();
        d.started_at = Some(Instant::now());
        d.next_start_at = None;
    }

    pub fn on_exited(&self, how: String) {
        self.pid.store(0, Ordering::Release);
        let mut d = self.details();
        d.started_at = None;
        d.last_exit = Some(how);
    }

    pub fn on_backoff(&self, delay: Duration, degraded: bool) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.set_state(InstanceState::Backoff);
        let mut d = self.details();
        d.next_start_at = Some(Instant::now() + delay);
        d.degraded = degraded;
    }

    /// Crash-looping: restarted several times in a row without a healthy stretch (cleared
    /// when it becomes ready).
    pub fn is_degraded(&self) -> bool {
        self.details().degraded
    }

    pub fn set_degraded(&self, degraded: bool) {
        self.details().degraded = degraded;
    }

    /// Time until the next start attempt, if this instance is waiting for one.
    pub fn next_start_in(&self) -> Option<Duration> {
        if self.state() != InstanceState::Backoff {
            return None;
        }
        self.details()
            .next_start_at
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    pub fn status(&self) -> InstanceStatus {
        let d = self.details();
        // A retired instance is out of rotation from the moment it is retired, before its
        // task has acted on the drain: report it as draining.
        let state = match self.state() {
            InstanceState::Stopped => InstanceState::Stopped,
            _ if self.retired.load(Ordering::Acquire) => InstanceState::Draining,
            state => state,
        };
        InstanceStatus {
            kind: self.kind,
            instance: self.index,
            pid: self.pid(),
            state,
            restarts: self.restarts.load(Ordering::Relaxed),
            uptime_s: d.started_at.map(|t| t.elapsed().as_secs_f64()),
            last_exit: d.last_exit.clone(),
            degraded: d.degraded,
            next_start_in_s: (self.state() == InstanceState::Backoff)
                .then(|| {
                    d.next_start_at
                        .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64())
                })
                .flatten(),
            rss_bytes: self.pid().and_then(crate::supervise::rss_bytes),
        }
    }
}

/// Owned form of the load count, carried by a response body until it ends.
pub struct Outstanding(Arc<Instance>);

impl Outstanding {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct OutstandingGuard<'a>(&'a Instance);

impl Drop for OutstandingGuard<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
