//! The fleet: every instance task the supervisor runs, routable or draining. It starts the
//! configured instances, replaces them one at a time on reload (the new one ready before the
//! old one drains, so no request fails), scales kinds up and down, and drains everything on
//! shutdown.

use crate::child_log::Style;
use crate::instance::{Instance, InstanceState, Kind};
use crate::registry::Registry;
use crate::runtime_dir::{remove_worker_configs, WorkerConfigFile};
use crate::spawn::SpawnSpec;
use crate::supervise::{supervise, Phase, SuperviseCtx};
use anyhow::{bail, Context as _};
use firemode_config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connections the front keeps to one instance at most (requests beyond wait for one). A
/// worker serves them on two cores; more would only queue inside it, costing memory.
const UPSTREAM_CONNECTIONS_PER_INSTANCE: usize = 64;
/// The longest Unix socket path the kernel accepts (sun_path, less the NUL).
const MAX_SOCKET_PATH: usize = 107;

struct Member {
    inst: Arc<Instance>,
    phase: watch::Sender<Phase>,
}

pub struct Fleet {
    registry: Arc<Registry>,
    runtime_dir: PathBuf,
    log_style: Style,
    /// Bumped by every reload; names the worker config file.
    generation: u64,
    /// Bumped by every launch; makes every socket name unique.
    launches: u64,
    members: Vec<Member>,
    tasks: JoinSet<bool>,
    /// How instances are started now (one per kind), for replacements.
    contexts: Vec<Arc<SuperviseCtx>>,
    recycle: tokio::sync::mpsc::UnboundedSender<Arc<Instance>>,
}

impl Fleet {
    pub fn new(
        registry: Arc<Registry>,
        runtime_dir: PathBuf,
        log_style: Style,
        recycle: tokio::sync::mpsc::UnboundedSender<Arc<Instance>>,
    ) -> Self {
        Self {
            registry,
            runtime_dir,
            log_style,
            generation: 0,
            launches: 0,
            members: Vec::new(),
            tasks: JoinSet::new(),
            contexts: Vec::new(),
            recycle,
        }
    }

    /// Every instance with a live task (routable, starting or draining), for `/status`.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.members.iter().map(|m| m.inst.clone()).collect()
    }

    fn contexts(&self, config: &Arc<Config>) -> anyhow::Result<Vec<Arc<SuperviseCtx>>> {
        let config_file = WorkerConfigFile::write(config, &self.runtime_dir, self.generation)?;
        Kind::ALL
            .iter()
            .map(|&kind| {
                let worker = config.worker(kind.name()).context("worker kind")?;
                Ok(Arc::new(SuperviseCtx {
                    spec: SpawnSpec::new(kind, worker, config_file.clone(), self.log_style)?,
                    config: config.clone(),
                    registry: self.registry.clone(),
                    recycle: self.recycle.clone(),
                }))
            })
            .collect()
    }

    fn launch(&mut self, index: u32, ctx: &Arc<SuperviseCtx>) -> anyhow::Result<Arc<Instance>> {
        let kind = ctx.spec.kind;
        self.launches += 1;
        let socket =
            self.runtime_dir
                .join(format!("{}-{index}.{}.sock", kind.name(), self.launches));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "supervisor.runtime_dir: the socket path {} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter directory",
                socket.display()
            );
        }
        let inst = Arc::new(Instance::new(
            kind,
            index,
            socket,
            UPSTREAM_CONNECTIONS_PER_INSTANCE,
        ));
        let (phase, phase_rx) = watch::channel(Phase::Running);
        self.tasks
            .spawn(supervise(inst.clone(), ctx.clone(), phase_rx));
        self.members.push(Member {
            inst: inst.clone(),
            phase,
        });
        self.registry.track(self.instances());
        Ok(inst)
    }

    /// Starts every configured instance (the first start).
    pub fn start(&mut self, config: &Arc<Config>) -> anyhow::Result<()> {
        self.contexts = self.contexts(config)?;
        for ctx in self.contexts.clone() {
            let kind = ctx.spec.kind;
            let n = config.worker(kind.name()).map(|w| w.instances).unwrap_or(0);
            for i in 0..n {
                let inst = self.launch(i, &ctx)?;
                let registry = self.registry.clone();
                if let Some(set) = registry.set(kind) {
                    set.update(|list| list.push(inst.clone()));
                }
            }
        }
        Ok(())
    }

    /// Replaces every instance with one running `config`, one at a time, and scales each
    /// kind to its configured count. Stops at the first new instance that does not become
    /// ready within `supervisor.start_timeout`; the instances not yet replaced keep serving.
    pub async fn roll(&mut self, config: &Arc<Config>) -> anyhow::Result<()> {
        self.forget_stopped();
        self.generation += 1;
        let drain = config.supervisor.drain_timeout.get();
        self.contexts = self.contexts(config)?;
        for ctx in self.contexts.clone() {
            let kind = ctx.spec.kind;
            let registry = self.registry.clone();
            let Some(set) = registry.set(kind) else {
                continue;
            };
            let target = config.worker(kind.name()).map(|w| w.instances).unwrap_or(0);
            let current: Vec<Arc<Instance>> = set.instances().iter().cloned().collect();
            for i in 0..target {
                let new = self.launch(i, &ctx)?;
                if !wait_ready(&new, config.supervisor.start_timeout.get()).await {
                    self.retire(&new, drain);
                    bail!(
                        "the new {} instance {i} did not become ready within supervisor.start_timeout ({}); reload stopped, the remaining old instances keep serving",
                        kind.name(),
                        config.supervisor.start_timeout
                    );
                }
                let old = current.iter().find(|o| o.index == i).cloned();
                set.update(|list| {
                    list.retain(|x| !old.as_ref().is_some_and(|o| Arc::ptr_eq(x, o)));
                    list.push(new.clone());
                    list.sort_by_key(|x| x.index);
                });
                if let Some(old) = old {
                    self.retire(&old, drain);
                }
                tracing::info!(kind = kind.name(), instance = i, "instance replaced");
            }
            for old in current.iter().filter(|o| o.index >= target) {
                set.update(|list| list.retain(|x| !Arc::ptr_eq(x, old)));
                self.retire(old, drain);
                tracing::info!(
                    kind = kind.name(),
                    instance = old.index,
                    "instance retired (scaled down)"
                );
            }
        }
        Ok(())
    }

    /// Replaces one instance the rolling way (recycling): a new process for its slot, ready
    /// before the old one drains.
    pub async fn replace(&mut self, old: &Arc<Instance>) -> anyhow::Result<()> {
        // Already replaced (a reload rolled it, or a second request for the same instance):
        // nothing to do.
        if old.is_retired() || !self.members.iter().any(|m| Arc::ptr_eq(&m.inst, old)) {
            return Ok(());
        }
        let Some(ctx) = self
            .contexts
            .iter()
            .find(|c| c.spec.kind == old.kind)
            .cloned()
        else {
            return Ok(());
        };
        let config = ctx.config.clone();
        let new = self.launch(old.index, &ctx)?;
        if !wait_ready(&new, config.supervisor.start_timeout.get()).await {
            self.retire(&new, config.supervisor.drain_timeout.get());
            bail!(
                "the replacement for {} instance {} did not become ready within supervisor.start_timeout; the old one keeps serving",
                old.kind.name(),
                old.index
            );
        }
        let registry = self.registry.clone();
        if let Some(set) = registry.set(old.kind) {
            set.update(|list| {
                list.retain(|x| !Arc::ptr_eq(x, old));
                list.push(new.clone());
                list.sort_by_key(|x| x.index);
            });
        }
        self.retire(old, config.supervisor.drain_timeout.get());
        self.forget_stopped();
        tracing::info!(
            kind = old.kind.name(),
            instance = old.index,
            "instance recycled"
        );
        Ok(())
    }

    /// Drains one instance in the background: SIGTERM now, SIGKILL after `drain`.
    fn retire(&self, inst: &Arc<Instance>, drain: Duration) {
        inst.retire();
        if let Some(m) = self.members.iter().find(|m| Arc::ptr_eq(&m.inst, inst)) {
            let _ = m.phase.send(Phase::Drain {
                deadline: Instant::now() + drain,
            });
        }
    }

    fn forget_stopped(&mut self) {
        self.members
            .retain(|m| m.inst.state() != InstanceState::Stopped);
        self.registry.track(self.instances());
    }

    /// Drains every instance (shutdown) and waits for all of their tasks. Returns whether
    /// every instance stopped without SIGKILL.
    pub async fn drain_all(&mut self, deadline: Instant) -> bool {
        for set in self.registry.kinds() {
            set.update(|list| list.clear());
        }
        for m in &self.members {
            let _ = m.phase.send(Phase::Drain { deadline });
        }
        let mut clean = true;
        while let Some(done) = self.tasks.join_next().await {
            clean &= done.unwrap_or(false);
        }
        remove_worker_configs(&self.runtime_dir);
        clean
    }
}

async fn wait_ready(inst: &Instance, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if inst.is_ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    inst.is_ready()
}
