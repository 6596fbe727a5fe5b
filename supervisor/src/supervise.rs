//! The life of one instance, as one task that owns its state (after watchexec's
//! supervisor: `job/state.rs`, `job/messages.rs`, one `select!` in `job/task.rs`).
//!
//! ```text
//! from          event                                          sender   to
//! ───────────── ────────────────────────────────────────────── ──────── ─────────────────
//! (new)         task start: spawn                                        Starting
//! Backoff       delay over: spawn                                        Starting
//! Starting      health check: ready                                      Ready
//! Ready         check failed (siblings all ready¹), not ready            Unhealthy
//! Unhealthy     health check: ready                                      Ready
//! running²      exited; killed (start_timeout, unhealthy_threshold)      Backoff
//! Starting      spawn failed                                             Backoff
//! running²      Condemn { reason }                             front    Draining → Backoff
//! running²      Recycle { reason }: ask the fleet, once        front    (unchanged)
//! running²      max_requests, max_rss, socket gone: the same   itself   (unchanged)
//! running²      Drain { deadline }                             fleet    Draining → Stopped
//! Backoff       Drain { deadline }                             fleet    Stopped
//! Draining      nothing in flight: SIGTERM; exit: done; deadline: SIGKILL
//!
//! ¹ `registry::KindSet` never takes the last ready instance out, nor two at once.
//! ² Starting, Ready or Unhealthy: a process runs.
//! ```
//!
//! * [`Life`] is the task's state, held by the task alone; [`InstanceState`] is what it
//!   publishes (through [`Owner::publish`], called only from [`Task::publish`]).
//! * Events: a [`Command`] (the fleet's `Drain`, the front's `Condemn` and `Recycle`), the
//!   process's exit, a timer (the next health check, the end of the backoff, the drain
//!   deadline), and "no request in flight any more" while draining. [`next_event`] is the
//!   one `select!`; [`Task::step`] is the one transition function.
//! * Restart timing is [`RestartPolicy`] (pure); health verdicts that take an instance out
//!   of rotation go through `registry::KindSet` (never the last ready one).

use crate::backoff::RestartPolicy;
use crate::health::{next_probe_after, probe, Probe, FIRST_PROBE_AFTER};
use crate::instance::{Command, Instance, InstanceState, Kind, Owner, Snapshot};
use crate::registry::Registry;
use crate::spawn::{describe_exit, spawn, SpawnSpec};
use firemode_config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Child;
use tokio::time::Instant;

pub struct SuperviseCtx {
    pub spec: SpawnSpec,
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Where an instance asks the fleet for its rolling replacement (`max_requests`,
    /// `max_rss`, its socket gone, or a `Recycle` command).
    pub recycle: tokio::sync::mpsc::UnboundedSender<Arc<Instance>>,
}

/// What the task is doing.
enum Life {
    /// No process; the next start is due at `wake` (published as `Backoff`).
    Waiting { wake: Instant },
    /// A process runs and is health-checked (published as `Starting`, `Ready` or
    /// `Unhealthy`).
    Running(Process),
    /// A process is being stopped gracefully (published as `Draining`).
    Stopping(Stopping),
    /// Drained for good; `clean` when no SIGKILL was needed (published as `Stopped`).
    Ended { clean: bool },
}

/// One running worker process and its health bookkeeping.
struct Process {
    child: Child,
    pid: u32,
    started: Instant,
    /// Failed health checks in a row without progress.
    failures: u32,
    /// Answered "ready" at least once.
    ever_ready: bool,
    /// Answered a health check at all (ready or not): past the start_timeout's reach.
    alive: bool,
    next_check: Instant,
    probe_pause: Duration,
    /// Answers completed as of the previous health check: progress means alive.
    answered_at_check: u64,
    /// A rolling replacement was asked for (once per process).
    recycle_asked: bool,
}

struct Stopping {
    process: Process,
    /// SIGKILL then.
    deadline: Instant,
    /// SIGTERM sent (once nothing was in flight at it any more).
    terminated: bool,
    then: Then,
}

/// What follows a graceful stop.
enum Then {
    /// The task ends (retired, or the supervisor is stopping).
    End,
    /// A new process starts after the restart delay (a `Condemn`ed process).
    Restart { reason: String },
}

enum Event {
    Command(Command),
    Exited(std::io::Result<ExitStatus>),
    /// The state's timer: next health check, end of backoff, drain deadline.
    Due,
    /// Nothing in flight at a draining instance any more.
    Idle,
}

/// Supervises one instance until a `Drain` has stopped it. Returns whether the final stop
/// was clean (no SIGKILL needed).
pub async fn supervise(owner: Owner, ctx: Arc<SuperviseCtx>) -> bool {
    let inst = owner.instance().clone();
    let mut task = Task {
        policy: RestartPolicy::new(ctx.config.supervisor.backoff),
        owner,
        ctx,
        inst,
    };
    let mut life = task.start();
    loop {
        if let Life::Ended { clean } = life {
            task.publish(|s| s.state = InstanceState::Stopped);
            return clean;
        }
        let event = next_event(&mut life, &mut task.owner).await;
        life = task.step(life, event).await;
    }
}

/// The one place the task waits: for a command, or for what its current state waits on.
async fn next_event(life: &mut Life, owner: &mut Owner) -> Event {
    let inst = owner.instance().clone();
    let command = async {
        match owner.command().await {
            Some(c) => Event::Command(c),
            // Cannot happen while the instance exists (it holds a sender); stop at once.
            None => Event::Command(Command::Drain {
                deadline: Instant::now(),
            }),
        }
    };
    match life {
        Life::Waiting { wake } => tokio::select! {
            e = command => e,
            _ = tokio::time::sleep_until(*wake) => Event::Due,
        },
        Life::Running(p) => tokio::select! {
            e = command => e,
            status = p.child.wait() => Event::Exited(status),
            _ = tokio::time::sleep_until(p.next_check) => Event::Due,
        },
        Life::Stopping(s) => tokio::select! {
            e = command => e,
            status = s.process.child.wait() => Event::Exited(status),
            _ = tokio::time::sleep_until(s.deadline) => Event::Due,
            _ = inst.idle(), if !s.terminated => Event::Idle,
        },
        Life::Ended { .. } => std::future::pending().await,
    }
}

struct Task {
    owner: Owner,
    inst: Arc<Instance>,
    ctx: Arc<SuperviseCtx>,
    policy: RestartPolicy,
}

impl Task {
    /// The one transition function: the next state from the current one and an event.
    async fn step(&mut self, life: Life, event: Event) -> Life {
        match (life, event) {
            (life, Event::Command(command)) => self.on_command(life, command),
            (Life::Waiting { .. }, Event::Due) => self.start(),
            (Life::Running(p), Event::Exited(Ok(status))) => self.exited(p, status),
            (Life::Running(p), Event::Exited(Err(e))) => {
                self.kill(p, format!("cannot wait for the process: {e}"))
                    .await
            }
            (Life::Running(p), Event::Due) => self.check_health(p).await,
            (Life::Stopping(s), Event::Idle) => self.terminate(s),
            (Life::Stopping(s), Event::Exited(status)) => self.stopped(s, status),
            (Life::Stopping(s), Event::Due) => self.kill_at_deadline(s).await,
            // Nothing else reaches these states.
            (life, _) => life,
        }
    }

    /// Every state change goes through here.
    fn publish(&self, change: impl FnOnce(&mut Snapshot)) {
        self.owner.publish(change);
    }

    fn on_command(&mut self, life: Life, command: Command) -> Life {
        match (life, command) {
            (Life::Waiting { .. }, Command::Drain { .. }) => Life::Ended { clean: true },
            (Life::Running(p), Command::Drain { deadline }) => {
                self.begin_stop(p, deadline, Then::End)
            }
            (Life::Stopping(mut s), Command::Drain { deadline }) => {
                s.deadline = s.deadline.min(deadline);
                s.then = Then::End;
                Life::Stopping(s)
            }
            (Life::Running(p), Command::Condemn { reason }) => {
                metrics::counter!("firemode_traffic_replacements_total", "kind" => self.inst.kind.name()).increment(1);
                let deadline = Instant::now() + self.condemned_grace();
                self.begin_stop(p, deadline, Then::Restart { reason })
            }
            (Life::Running(mut p), Command::Recycle { reason }) => {
                if self.ask_fleet(&mut p) {
                    metrics::counter!("firemode_traffic_replacements_total", "kind" => self.inst.kind.name()).increment(1);
                    tracing::warn!(
                        kind = self.inst.kind.name(),
                        instance = self.inst.index,
                        "{reason}; replacing the only instance the rolling way"
                    );
                }
                Life::Running(p)
            }
            (Life::Running(p), Command::ReleaseWaiters) => {
                self.release_waiters(&p);
                Life::Running(p)
            }
            // A verdict about a process that is already stopping or gone; a drain of a
            // task that has ended.
            (life, _) => life,
        }
    }

    /// Spawns a process (state `Starting`); a failed spawn goes to the backoff.
    fn start(&mut self) -> Life {
        let (inst, ctx) = (&self.inst, &self.ctx);
        self.publish(|s| s.state = InstanceState::Starting);
        let _ = std::fs::remove_file(&inst.socket);
        match spawn(&ctx.spec, inst) {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                self.owner.reset_counters();
                self.publish(|s| {
                    s.pid = Some(pid).filter(|&p| p != 0);
                    s.started_at = Some(Instant::now());
                    s.next_start_at = None;
                });
                tracing::info!(
                    kind = inst.kind.name(),
                    instance = inst.index,
                    pid,
                    "instance started"
                );
                Life::Running(Process::new(child, pid, inst.answered()))
            }
            Err(e) => {
                tracing::error!(
                    kind = inst.kind.name(),
                    instance = inst.index,
                    program = %ctx.spec.program.display(),
                    error = %e,
                    hint = "build every binary with `cargo build --release` (workers live beside firemode) or set workers.<kind>.command",
                    "cannot start worker"
                );
                let how = format!("could not start {}: {e}", ctx.spec.program.display());
                self.on_exited(how);
                self.backoff()
            }
        }
    }

    /// The process is gone: no pid, why it ended, no idle connections to it.
    fn on_exited(&self, how: String) {
        self.inst.pool.clear();
        self.publish(|s| {
            s.pid = None;
            s.started_at = None;
            s.last_exit = Some(how);
        });
    }

    /// Counts the restart and waits out the delay the policy gives (state `Backoff`).
    fn backoff(&mut self) -> Life {
        let (kind, index) = (self.inst.kind.name(), self.inst.index);
        metrics::counter!("firemode_worker_restarts_total", "kind" => kind).increment(1);
        let delay = self.policy.on_stop(Instant::now(), rand::random::<f64>());
        let degraded = self.policy.is_degraded();
        let wake = Instant::now() + delay;
        self.publish(|s| {
            s.restarts += 1;
            s.state = InstanceState::Backoff;
            s.next_start_at = Some(wake);
            s.degraded = degraded;
        });
        let delay_ms = delay.as_millis() as u64;
        if degraded {
            let attempts = self.policy.attempts();
            tracing::error!(
                kind,
                instance = index,
                attempts,
                delay_ms,
                "instance is crash-looping; backing off"
            );
        } else {
            tracing::info!(kind, instance = index, delay_ms, "restarting after delay");
        }
        Life::Waiting { wake }
    }

    fn exited(&mut self, p: Process, status: ExitStatus) -> Life {
        let how = describe_exit(status);
        tracing::warn!(kind = self.inst.kind.name(), instance = self.inst.index, pid = p.pid, exit = %how, "instance exited");
        self.on_exited(how);
        self.backoff()
    }

    /// Unresponsive: SIGKILL now, then the backoff.
    async fn kill(&mut self, mut p: Process, reason: String) -> Life {
        self.publish(|s| s.stopping_pid = s.pid);
        let _ = p.child.start_kill();
        let _ = p.child.wait().await;
        tracing::warn!(kind = self.inst.kind.name(), instance = self.inst.index, pid = p.pid, reason = %reason, "instance unhealthy; killed it");
        self.on_exited(format!("killed: unhealthy ({reason})"));
        self.backoff()
    }

    /// How long a condemned instance gets to finish what it has in flight.
    fn condemned_grace(&self) -> Duration {
        let drain = self.ctx.config.supervisor.drain_timeout.get();
        drain.min(Duration::from_secs(10))
    }

    /// Out of rotation (state `Draining`); SIGTERM once the front has nothing in flight
    /// at it (see [`Task::terminate`]), SIGKILL at `deadline`.
    fn begin_stop(&mut self, process: Process, deadline: Instant, then: Then) -> Life {
        self.inst.pool.clear();
        // Held long-polls would keep "something in flight" until the deadline.
        self.release_waiters(&process);
        self.publish(|s| {
            s.state = InstanceState::Draining;
            s.stopping_pid = s.pid;
        });
        Life::Stopping(Stopping {
            process,
            deadline,
            terminated: false,
            then,
        })
    }

    /// SIGUSR1 to a sync process: answer every held long-poll now (with what is new, often
    /// nothing); the client polls again and reaches an instance that stays. Other kinds hold
    /// no requests and are not signalled.
    fn release_waiters(&self, process: &Process) {
        if self.inst.kind != Kind::Sync {
            return;
        }
        if let Some(pid) = process.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1);
        }
    }

    /// Nothing in flight at the draining process any more (the count lives in response
    /// bodies, so a streaming answer counts): SIGTERM, so the worker finishes its own.
    fn terminate(&mut self, mut s: Stopping) -> Life {
        if let Some(pid) = s.process.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        s.terminated = true;
        Life::Stopping(s)
    }

    /// The draining process exited by itself.
    fn stopped(&mut self, s: Stopping, status: std::io::Result<ExitStatus>) -> Life {
        let how = status.map(describe_exit).unwrap_or_else(|e| e.to_string());
        tracing::info!(kind = self.inst.kind.name(), instance = self.inst.index, exit = %how, "instance drained");
        self.on_exited(how);
        self.after_stop(s.process.pid, s.then, true)
    }

    async fn kill_at_deadline(&mut self, mut s: Stopping) -> Life {
        tracing::warn!(
            kind = self.inst.kind.name(),
            instance = self.inst.index,
            "drain timeout; killing instance"
        );
        let _ = s.process.child.start_kill();
        let _ = s.process.child.wait().await;
        self.on_exited("killed: drain timeout".into());
        self.after_stop(s.process.pid, s.then, false)
    }

    fn after_stop(&mut self, pid: u32, then: Then, clean: bool) -> Life {
        match then {
            Then::End => Life::Ended { clean },
            Then::Restart { reason } => {
                tracing::warn!(kind = self.inst.kind.name(), instance = self.inst.index, pid, reason = %reason, clean_stop = clean, "instance failing real requests; replaced it");
                self.on_exited(format!("replaced: {reason}"));
                self.backoff()
            }
        }
    }

    /// Asks the fleet for a rolling replacement of this process, once; returns whether it
    /// asked now.
    fn ask_fleet(&self, p: &mut Process) -> bool {
        if p.recycle_asked {
            return false;
        }
        p.recycle_asked = true;
        let _ = self.ctx.recycle.send(self.inst.clone());
        true
    }
}

impl Process {
    fn new(child: Child, pid: u32, answered: u64) -> Self {
        Self {
            child,
            pid,
            started: Instant::now(),
            failures: 0,
            ever_ready: false,
            alive: false,
            // The first check at once; then from FIRST_PROBE_AFTER, doubling.
            next_check: Instant::now(),
            probe_pause: FIRST_PROBE_AFTER,
            answered_at_check: answered,
            recycle_asked: false,
        }
    }
}

/// Health checks: what one probe's answer does to a running process.
impl Task {
    async fn check_health(&mut self, mut p: Process) -> Life {
        let sup = &self.ctx.config.supervisor;
        let result = probe(&self.inst.socket, sup.health_timeout.get()).await;
        if let Some(reason) = self.judge(&mut p, result) {
            return self.kill(p, reason).await;
        }
        if p.ever_ready {
            self.check_recycle(&mut p);
        }
        let sup = &self.ctx.config.supervisor;
        if !p.alive && p.started.elapsed() > sup.start_timeout.get() {
            let reason = format!(
                "not ready within supervisor.start_timeout ({})",
                sup.start_timeout
            );
            return self.kill(p, reason).await;
        }
        p.answered_at_check = self.inst.answered();
        p.probe_pause = next_probe_after(p.ever_ready, p.probe_pause, sup.health_interval.get());
        p.next_check = Instant::now() + p.probe_pause;
        Life::Running(p)
    }

    /// Applies one probe's answer; `Some(reason)` when the process is to be killed.
    fn judge(&mut self, p: &mut Process, result: Probe) -> Option<String> {
        let (kind, index) = (self.inst.kind.name(), self.inst.index);
        let not_ready = result == Probe::NotReady;
        let was_not_ready = self.owner.published().not_ready;
        if was_not_ready != not_ready {
            self.publish(|s| s.not_ready = not_ready);
        }
        let starting = !p.alive;
        let ready_now = self.inst.is_ready();
        match result {
            Probe::Ready => {
                p.failures = 0;
                if !ready_now {
                    self.publish(|s| {
                        s.state = InstanceState::Ready;
                        s.degraded = false;
                    });
                    self.policy.mark_ready(Instant::now());
                    self.ctx.registry.notify_ready(self.inst.kind);
                    let startup_ms = p.started.elapsed().as_millis() as u64;
                    tracing::info!(kind, instance = index, startup_ms, "instance ready");
                }
                p.ever_ready = true;
                p.alive = true;
            }
            Probe::NotReady => {
                // Alive, but cannot serve (its store?): out of rotation, no restart. Before
                // its first ready answer it is still starting (and now safe from
                // start_timeout); after, it is unhealthy.
                p.failures = 0;
                if ready_now {
                    tracing::warn!(
                        kind,
                        instance = index,
                        "instance reports not ready (its store?)"
                    );
                }
                if p.ever_ready {
                    self.publish(|s| s.state = InstanceState::Unhealthy);
                }
                p.alive = true;
            }
            Probe::NoSocket if starting => {}
            // Its socket file is gone (a tmp cleaner, a deleted runtime dir): it serves the
            // connections it has but can take no new one. Replaced the rolling way (the new
            // process ready first), so nothing in flight fails.
            // Refused with the file still there is a process that died (its exit is the
            // task's next event, and restarts it), not a vanished socket: no replacement.
            Probe::NoSocket if !p.recycle_asked && !self.inst.socket.exists() => {
                tracing::warn!(
                    kind,
                    instance = index,
                    "its socket is gone; replacing the instance"
                );
                self.ask_fleet(p);
            }
            Probe::NoSocket => {
                let reason = if self.inst.socket.exists() {
                    "its socket refuses connections"
                } else {
                    "its socket is gone"
                };
                return self.failed_check(p, reason.into());
            }
            Probe::Failed(reason) => return self.failed_check(p, reason),
        }
        None
    }

    /// A failed check of a process past its start. One that completed answers since the
    /// last check is busy, not dead. Otherwise the failure counts: the instance leaves
    /// rotation only while every other instance of its kind is ready (so a cause they
    /// share never empties the kind); at `unhealthy_threshold` failures in a row it is hung
    /// whatever its siblings do, and killed (`Some(reason)`).
    fn failed_check(&mut self, p: &mut Process, reason: String) -> Option<String> {
        let (kind, index) = (self.inst.kind.name(), self.inst.index);
        if !p.alive {
            return None;
        }
        if self.inst.answered() != p.answered_at_check {
            p.failures = 0;
            tracing::info!(kind, instance = index, reason = %reason, "health check failed, but the instance is answering requests: alive");
            return None;
        }
        p.failures += 1;
        metrics::counter!("firemode_health_check_failures_total", "kind" => kind).increment(1);
        let registry = self.ctx.registry.clone();
        let out = match registry.kind(self.inst.kind) {
            Some(set) => match set.may_leave_rotation(&self.inst) {
                Some(_verdicts) => {
                    self.publish(|s| s.state = InstanceState::Unhealthy);
                    true
                }
                None => false,
            },
            None => {
                self.publish(|s| s.state = InstanceState::Unhealthy);
                true
            }
        };
        tracing::warn!(
            kind,
            instance = index,
            failures = p.failures,
            out_of_rotation = out,
            reason = %reason,
            "health check failed"
        );
        (p.failures >= self.ctx.config.supervisor.unhealthy_threshold).then_some(reason)
    }

    /// Asks for a rolling replacement once the process has served `max_requests` or grown
    /// to `max_rss` (after gunicorn's `max_requests` and Passenger's memory limit).
    fn check_recycle(&self, p: &mut Process) {
        let Some(worker) = self.ctx.config.worker(self.inst.kind.name()) else {
            return;
        };
        let served = self.inst.served();
        let reason = if worker.max_requests > 0 && served >= worker.max_requests {
            format!(
                "served {served} requests (max_requests {})",
                worker.max_requests
            )
        } else if worker.max_rss.0 > 0 {
            match rss_bytes(p.pid) {
                Some(rss) if rss >= worker.max_rss.0 => format!(
                    "resident memory {} reached max_rss {}",
                    firemode_config::ByteSize(rss),
                    worker.max_rss
                ),
                _ => return,
            }
        } else {
            return;
        };
        if self.ask_fleet(p) {
            tracing::info!(kind = self.inst.kind.name(), instance = self.inst.index, %reason, "recycling instance");
        }
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
