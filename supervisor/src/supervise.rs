//! The life of one instance, as one task: spawn → starting → ready ⇄ unhealthy → (exit or
//! too many failed checks) → backoff → spawn again; on drain: SIGTERM, wait, SIGKILL at the
//! deadline. The state machine is [`InstanceState`]; the restart timing is [`RestartPolicy`].

use crate::backoff::RestartPolicy;
use crate::health::{probe, Probe};
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

/// Health checks while an instance starts: often, so a restart is back in service fast.
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(10);

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
}

enum End {
    Exited(ExitStatus),
    Unhealthy(String),
    Drained,
}

fn drain_deadline(phase: &watch::Receiver<Phase>) -> Option<Instant> {
    match *phase.borrow() {
        Phase::Running => None,
        Phase::Drain { deadline } => Some(deadline),
    }
}

/// Supervises `inst` until the drain phase has stopped it.
pub async fn supervise(
    inst: Arc<Instance>,
    ctx: Arc<SuperviseCtx>,
    mut phase: watch::Receiver<Phase>,
) {
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
                    End::Drained => break,
                    End::Exited(status) => {
                        let how = describe_exit(status);
                        tracing::warn!(kind, instance = index, pid, exit = %how, "instance exited");
                        inst.on_exited(how);
                    }
                    End::Unhealthy(reason) => {
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
    let mut next_check = Instant::now();
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => End::Exited(s),
                    Err(e) => End::Unhealthy(format!("cannot wait for the process: {e}")),
                };
            }
            changed = phase.changed() => {
                let deadline = match (changed, drain_deadline(phase)) {
                    (Ok(()), Some(d)) => d,
                    (Err(_), _) => Instant::now(),
                    _ => continue,
                };
                drain(inst, child, deadline).await;
                return End::Drained;
            }
            _ = tokio::time::sleep_until(next_check) => {
                let result = probe(&inst.socket, sup.health_timeout.get()).await;
                let starting = !ever_ready;
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
                    }
                    Probe::NotReady => {
                        failures = 0;
                        if inst.is_ready() {
                            tracing::warn!(kind = inst.kind.name(), instance = inst.index, "instance reports not ready (its store?)");
                        }
                        if !starting {
                            inst.set_state(InstanceState::Unhealthy);
                        }
                    }
                    Probe::NoSocket if starting => {}
                    Probe::NoSocket | Probe::Failed(_) => {
                        let reason = match result {
                            Probe::Failed(r) => r,
                            _ => "its socket is gone".to_string(),
                        };
                        if !starting {
                            failures += 1;
                            inst.set_state(InstanceState::Unhealthy);
                            tracing::warn!(kind = inst.kind.name(), instance = inst.index, failures, reason = %reason, "health check failed");
                            if failures >= sup.unhealthy_threshold {
                                return End::Unhealthy(reason);
                            }
                        }
                    }
                }
                if starting && !ever_ready && started.elapsed() > sup.start_timeout.get() {
                    return End::Unhealthy(format!(
                        "not ready within supervisor.start_timeout ({})",
                        sup.start_timeout
                    ));
                }
                next_check = Instant::now()
                    + if ever_ready { sup.health_interval.get() } else { STARTUP_PROBE_INTERVAL };
            }
        }
    }
}

/// SIGTERM, then wait for the worker to finish its in-flight requests; SIGKILL at `deadline`.
async fn drain(inst: &Instance, child: &mut Child, deadline: Instant) {
    inst.set_state(InstanceState::Draining);
    let kind = inst.kind.name();
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    tokio::select! {
        status = child.wait() => {
            let how = status.map(describe_exit).unwrap_or_else(|e| e.to_string());
            tracing::info!(kind, instance = inst.index, exit = %how, "instance drained");
            inst.on_exited(how);
        }
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(kind, instance = inst.index, "drain timeout; killing instance");
            let _ = child.start_kill();
            let _ = child.wait().await;
            inst.on_exited("killed: drain timeout".into());
        }
    }
}
