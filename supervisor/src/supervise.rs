//! The life of one instance, as one task: spawn → starting → ready ⇄ unhealthy → (exit or
//! too many failed checks) → backoff → spawn again; on drain: SIGTERM, wait, SIGKILL at the
//! deadline. The state machine is [`InstanceState`]; the restart timing is [`RestartPolicy`].

use crate::backoff::RestartPolicy;
use crate::health::{next_probe_after, probe, Probe, FIRST_PROBE_AFTER};
use crate::instance::{Instance, InstanceState};
use crate::registry::Registry;
use crate::spawn::{describe_exit, spawn, SpawnSpec};
use firemode_config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

/// What the supervisor as a whole is doing; instance tasks watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop every instance: SIGTERM now, SIGKILL at `deadline`.
    Drain {
        deadline: Instant,
    },
}

pub struct SuperviseCtx {
    pub spec: SpawnSpec,
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Where an instance past `max_requests` / `max_rss` asks for its rolling replacement.
    pub recycle: tokio::sync::mpsc::UnboundedSender<Arc<Instance>>,
}

enum End {
    Exited(ExitStatus),
    /// Unresponsive: killed at once.
    Unhealthy(String),
    /// Responsive but failing real requests: drained gracefully, then restarted.
    Condemned(String),
    /// Stopped on the drain phase; `true` when it exited without SIGKILL.
    Drained(bool),
}

fn drain_deadline(phase: &watch::Receiver<Phase>) -> Option<Instant> {
    match *phase.borrow() {
        Phase::Running => None,
        Phase::Drain { deadline } => Some(deadline),
    }
}

/// Supervises `inst` until the drain phase has stopped it. Returns whether the final stop
/// was clean (no SIGKILL needed).
pub async fn supervise(
    inst: Arc<Instance>,
    ctx: Arc<SuperviseCtx>,
    mut phase: watch::Receiver<Phase>,
) -> bool {
    let mut clean = true;
    let kind = inst.kind.name();
    let index = inst.index;
    let mut policy = RestartPolicy::new(ctx.config.supervisor.backoff);
    loop {
        if drain_deadline(&phase).is_some() {
            break;
        }
        inst.set_state(InstanceState::Starting);
        let _ = std::fs::remove_file(&inst.socket);
        match spawn(&ctx.spec, &inst) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                inst.on_spawned(pid);
                tracing::info!(kind, instance = index, pid, "instance started");
                let end = run_child(&inst, &mut child, &ctx, &mut policy, &mut phase).await;
                inst.pool.clear();
                match end {
                    End::Drained(c) => {
                        clean = c;
                        break;
                    }
                    End::Condemned(reason) => {
                        let grace = sup_grace(&ctx);
                        let clean_stop = drain(&inst, &mut child, Instant::now() + grace).await;
                        tracing::warn!(kind, instance = index, pid, reason = %reason, clean_stop, "instance failing real requests; replaced it");
                        inst.on_exited(format!("replaced: {reason}"));
                    }
                    End::Exited(status) => {
                        let how = describe_exit(status);
                        tracing::warn!(kind, instance = index, pid, exit = %how, "instance exited");
                        inst.on_exited(how);
                    }
                    End::Unhealthy(reason) => {
                        inst.mark_stopping();
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        tracing::warn!(kind, instance = index, pid, reason = %reason, "instance unhealthy; killed it");
                        inst.on_exited(format!("killed: unhealthy ({reason})"));
                    }
                }
            }
            Err(e) => {
                tracing::error!(
                    kind,
                    instance = index,
                    program = %ctx.spec.program.display(),
                    error = %e,
                    hint = "build every binary with `cargo build --release` (workers live beside firemode) or set workers.<kind>.command",
                    "cannot start worker"
                );
                inst.on_exited(format!(
                    "could not start {}: {e}",
                    ctx.spec.program.display()
                ));
            }
        }
        metrics::counter!("firemode_worker_restarts_total", "kind" => kind).increment(1);
        let delay = policy.on_stop(Instant::now(), rand::random::<f64>());
        inst.on_backoff(delay, policy.is_degraded());
        if policy.is_degraded() {
            tracing::error!(
                kind,
                instance = index,
                attempts = policy.attempts(),
                delay_ms = delay.as_millis() as u64,
                "instance is crash-looping; backing off"
            );
        } else {
            tracing::info!(
                kind,
                instance = index,
                delay_ms = delay.as_millis() as u64,
                "restarting after delay"
            );
        }
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                changed = phase.changed() => {
                    if changed.is_err() || drain_deadline(&phase).is_some() {
                        break;
                    }
                }
            }
        }
    }
    inst.set_state(InstanceState::Stopped);
    clean
}

/// How long a condemned instance gets to finish what it has in flight.
fn sup_grace(ctx: &SuperviseCtx) -> Duration {
    ctx.config
        .supervisor
        .drain_timeout
        .get()
        .min(Duration::from_secs(10))
}

async fn run_child(
    inst: &Arc<Instance>,
    child: &mut Child,
    ctx: &SuperviseCtx,
    policy: &mut RestartPolicy,
    phase: &mut watch::Receiver<Phase>,
) -> End {
    let sup = &ctx.config.supervisor;
    let started = Instant::now();
    let mut failures = 0u32;
    let mut ever_ready = false;
    // Answered a health check at all (ready or not): past the start_timeout's reach.
    let mut alive = false;
    let mut next_check = Instant::now();
    let mut probe_pause = FIRST_PROBE_AFTER;
    // Answers completed as of the previous health check: progress means alive.
    let mut answered_at_check = inst.answered();
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => End::Exited(s),
                    Err(e) => End::Unhealthy(format!("cannot wait for the process: {e}")),
                };
            }
            _ = inst.attention.notified() => {
                if inst.take_replace_verdict() && inst.ask_recycle() {
                    metrics::counter!("firemode_traffic_replacements_total", "kind" => inst.kind.name()).increment(1);
                    tracing::warn!(kind = inst.kind.name(), instance = inst.index, "{} real requests failed in a row (supervisor.traffic_failure_threshold); replacing the only instance the rolling way", sup.traffic_failure_threshold);
                    let _ = ctx.recycle.send(inst.clone());
                }
                if inst.take_traffic_verdict() {
                    metrics::counter!("firemode_traffic_replacements_total", "kind" => inst.kind.name()).increment(1);
                    return End::Condemned(format!(
                        "{} real requests failed in a row (supervisor.traffic_failure_threshold)",
                        sup.traffic_failure_threshold
                    ));
                }
            }
            changed = phase.changed() => {
                let deadline = match (changed, drain_deadline(phase)) {
                    (Ok(()), Some(d)) => d,
                    (Err(_), _) => Instant::now(),
                    _ => continue,
                };
                return End::Drained(drain(inst, child, deadline).await);
            }
            _ = tokio::time::sleep_until(next_check) => {
                let result = probe(&inst.socket, sup.health_timeout.get()).await;
                inst.set_reports_not_ready(result == Probe::NotReady);
                let starting = !alive;
                match result {
                    Probe::Ready => {
                        failures = 0;
                        if !inst.is_ready() {
                            inst.set_state(InstanceState::Ready);
                            policy.mark_ready(Instant::now());
                            inst.set_degraded(false);
                            ctx.registry.notify_ready(inst.kind);
                            tracing::info!(kind = inst.kind.name(), instance = inst.index, startup_ms = started.elapsed().as_millis() as u64, "instance ready");
                        }
                        ever_ready = true;
                        alive = true;
                    }
                    Probe::NotReady => {
                        // Alive, but cannot serve (its store?): out of rotation, no restart.
                        // Before its first ready answer it is still starting (and now safe
                        // from start_timeout); after, it is unhealthy.
                        failures = 0;
                        if inst.is_ready() {
                            tracing::warn!(kind = inst.kind.name(), instance = inst.index, "instance reports not ready (its store?)");
                        }
                        if ever_ready {
                            inst.set_state(InstanceState::Unhealthy);
                        }
                        alive = true;
                    }
                    Probe::NoSocket if starting => {}
                    // Its socket file is gone (a tmp cleaner, a deleted runtime dir): it serves
                    // the connections it has but can take no new one. Replaced the rolling
                    // way (the new process ready first), so nothing in flight fails.
                    Probe::NoSocket if inst.ask_recycle() => {
                        tracing::warn!(kind = inst.kind.name(), instance = inst.index, "its socket is gone; replacing the instance");
                        let _ = ctx.recycle.send(inst.clone());
                    }
                    Probe::NoSocket | Probe::Failed(_) => {
                        let reason = match result {
                            Probe::Failed(r) => r,
                            _ => "its socket is gone".to_string(),
                        };
                        if !starting {
                            let answered = inst.answered();
                            if answered != answered_at_check {
                                // Busy, not dead: it completed answers since the last check.
                                failures = 0;
                                tracing::info!(kind = inst.kind.name(), instance = inst.index, reason = %reason, "health check failed, but the instance is answering requests: alive");
                            } else {
                                failures += 1;
                                if on_failed_check(inst, ctx, failures, &reason) {
                                    return End::Unhealthy(reason);
                                }
                            }
                        }
                    }
                }
                if ever_ready {
                    check_recycle(inst, ctx);
                }
                if !alive && started.elapsed() > sup.start_timeout.get() {
                    return End::Unhealthy(format!(
                        "not ready within supervisor.start_timeout ({})",
                        sup.start_timeout
                    ));
                }
                answered_at_check = inst.answered();
                probe_pause = next_probe_after(ever_ready, probe_pause, sup.health_interval.get());
                next_check = Instant::now() + probe_pause;
            }
        }
    }
}

/// Counts one failed health check of an instance that made no progress since the last
/// check. It leaves rotation only while every other instance of its kind is ready (so a
/// cause they share never empties the kind); returns whether to kill it now: at
/// `unhealthy_threshold` failures in a row, without a single answer in between, it is hung
/// whatever its siblings do.
fn on_failed_check(inst: &Arc<Instance>, ctx: &SuperviseCtx, failures: u32, reason: &str) -> bool {
    let kind = inst.kind.name();
    metrics::counter!("firemode_health_check_failures_total", "kind" => kind).increment(1);
    let out = match ctx.registry.set(inst.kind) {
        Some(set) => set.try_take_out(inst, InstanceState::Unhealthy),
        None => {
            inst.set_state(InstanceState::Unhealthy);
            true
        }
    };
    tracing::warn!(
        kind,
        instance = inst.index,
        failures,
        out_of_rotation = out,
        reason = %reason,
        "health check failed"
    );
    failures >= ctx.config.supervisor.unhealthy_threshold
}

/// Asks for a rolling replacement once the process has served `max_requests` or grown to
/// `max_rss` (after gunicorn's `max_requests` and Passenger's memory limit).
fn check_recycle(inst: &Arc<Instance>, ctx: &SuperviseCtx) {
    let Some(worker) = ctx.config.worker(inst.kind.name()) else {
        return;
    };
    let reason = if worker.max_requests > 0 && inst.served() >= worker.max_requests {
        format!(
            "served {} requests (max_requests {})",
            inst.served(),
            worker.max_requests
        )
    } else if worker.max_rss.0 > 0 {
        match inst.pid().and_then(rss_bytes) {
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
    if inst.ask_recycle() {
        tracing::info!(kind = inst.kind.name(), instance = inst.index, %reason, "recycling instance");
        let _ = ctx.recycle.send(inst.clone());
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Stops a worker gracefully: out of rotation, let the front finish what it has in flight
/// at it (including response bodies), SIGTERM so the worker finishes its own, and SIGKILL at
/// `deadline`. Returns whether it exited without SIGKILL.
async fn drain(inst: &Instance, child: &mut Child, deadline: Instant) -> bool {
    inst.set_state(InstanceState::Draining);
    inst.mark_stopping();
    let kind = inst.kind.name();
    while inst.outstanding() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    tokio::select! {
        status = child.wait() => {
            let how = status.map(describe_exit).unwrap_or_else(|e| e.to_string());
            tracing::info!(kind, instance = inst.index, exit = %how, "instance drained");
            inst.on_exited(how);
            true
        }
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(kind, instance = inst.index, "drain timeout; killing instance");
            let _ = child.start_kill();
            let _ = child.wait().await;
            inst.on_exited("killed: drain timeout".into());
            false
        }
    }
}
