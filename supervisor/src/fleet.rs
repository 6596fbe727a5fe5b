//! The fleet: every instance task the supervisor runs, routable or draining. It starts the
//! configured instances, replaces them one at a time on reload (the new one ready before the
//! old one drains, so no request fails), scales kinds up and down, and drains everything on
//! shutdown. Reload, recycling and scaling share one path, [`Fleet::replace_slot`]. The
//! fleet acts on an instance only by sending it a `Command::Drain`.

use crate::instance::{Command, Instance, InstanceState, Kind};
use crate::registry::Registry;
use crate::runtime_dir::{remove_worker_configs, WorkerConfigFile};
use crate::spawn::SpawnSpec;
use crate::supervise::{supervise, SuperviseCtx};
use anyhow::{bail, Context as _};
use firemode_config::Config;
use firemode_telemetry::traces::LogStyle;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connections the front keeps to one instance at most (requests beyond wait for one). A
/// worker serves them on two cores; more would only queue inside it, costing memory.
const UPSTREAM_CONNECTIONS_PER_INSTANCE: usize = 64;
/// Long-polls (`GET …/changes?wait=`) held at one instance at most; each is an idle Unix
/// socket connection at the worker until a merge or its wait ends. Beyond, a long-poll
/// waits for a connection within its deadline like any request.
const LONG_POLL_CONNECTIONS_PER_INSTANCE: usize = 4096;
/// How long a retired instance's task may take to act on its `Drain` before the fleet
/// goes on anyway (it acts within microseconds unless something is badly wrong).
const ACKNOWLEDGE_WITHIN: Duration = Duration::from_secs(5);
/// The longest Unix socket path the kernel accepts (sun_path, less the NUL).
const MAX_SOCKET_PATH: usize = 107;

struct Member {
    inst: Arc<Instance>,
    /// Sent its `Drain` (replaced, scaled down, stopping): never replaced again.
    retired: bool,
}

pub struct Fleet {
    registry: Arc<Registry>,
    runtime_dir: PathBuf,
    log_style: LogStyle,
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
        log_style: LogStyle,
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
        let (inst, owner) = Instance::new(
            kind,
            index,
            socket,
            UPSTREAM_CONNECTIONS_PER_INSTANCE,
            LONG_POLL_CONNECTIONS_PER_INSTANCE,
        );
        self.tasks.spawn(supervise(owner, ctx.clone()));
        self.members.push(Member {
            inst: inst.clone(),
            retired: false,
        });
        self.registry.set_members(self.instances());
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
                if let Some(set) = self.registry.kind(kind) {
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
        self.contexts = self.contexts(config)?;
        for ctx in self.contexts.clone() {
            let kind = ctx.spec.kind;
            let registry = self.registry.clone();
            let Some(set) = registry.kind(kind) else {
                continue;
            };
            let target = config.worker(kind.name()).map(|w| w.instances).unwrap_or(0);
            let current: Vec<Arc<Instance>> = set.instances().iter().cloned().collect();
            for i in 0..target {
                let old = current.iter().find(|o| o.index == i);
                if !self.replace_slot(&ctx, i, old).await? {
                    bail!(
                        "the new {} instance {i} did not become ready within supervisor.start_timeout ({}); reload stopped, the remaining old instances keep serving",
                        kind.name(),
                        config.supervisor.start_timeout
                    );
                }
                tracing::info!(kind = kind.name(), instance = i, "instance replaced");
            }
            for old in current.iter().filter(|o| o.index >= target) {
                set.update(|list| list.retain(|x| !Arc::ptr_eq(x, old)));
                self.retire(old, config.supervisor.drain_timeout.get())
                    .await;
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
        let current = self
            .members
            .iter()
            .any(|m| Arc::ptr_eq(&m.inst, old) && !m.retired);
        let ctx = self
            .contexts
            .iter()
            .find(|c| c.spec.kind == old.kind)
            .cloned();
        let (true, Some(ctx)) = (current, ctx) else {
            return Ok(());
        };
        if !self.replace_slot(&ctx, old.index, Some(old)).await? {
            bail!(
                "the replacement for {} instance {} did not become ready within supervisor.start_timeout; the old one keeps serving",
                old.kind.name(),
                old.index
            );
        }
        self.forget_stopped();
        tracing::info!(
            kind = old.kind.name(),
            instance = old.index,
            "instance recycled"
        );
        Ok(())
    }

    /// The one way an instance is replaced: launch a new process for slot `index`, wait
    /// (for the event, within `supervisor.start_timeout`) until it is ready, swap it into
    /// the kind's routing list in place of `old`, then retire `old`. Returns false when the
    /// new one did not become ready (it is retired; `old` keeps serving).
    async fn replace_slot(
        &mut self,
        ctx: &Arc<SuperviseCtx>,
        index: u32,
        old: Option<&Arc<Instance>>,
    ) -> anyhow::Result<bool> {
        let sup = &ctx.config.supervisor;
        let new = self.launch(index, ctx)?;
        if !new.wait_ready(sup.start_timeout.get()).await {
            self.retire(&new, sup.drain_timeout.get()).await;
            return Ok(false);
        }
        if let Some(set) = self.registry.kind(ctx.spec.kind) {
            set.update(|list| {
                list.retain(|x| !old.is_some_and(|o| Arc::ptr_eq(x, o)));
                list.push(new.clone());
                list.sort_by_key(|x| x.index);
            });
        }
        if let Some(old) = old {
            self.retire(old, sup.drain_timeout.get()).await;
        }
        Ok(true)
    }

    /// Drains one instance in the background: SIGTERM once idle, SIGKILL after `drain`.
    /// Returns once its task has acted on it (it reports `draining`, or `stopped`).
    async fn retire(&mut self, inst: &Arc<Instance>, drain: Duration) {
        if let Some(m) = self.members.iter_mut().find(|m| Arc::ptr_eq(&m.inst, inst)) {
            m.retired = true;
        }
        inst.send(Command::Drain {
            deadline: Instant::now() + drain,
        });
        inst.wait_leaving(ACKNOWLEDGE_WITHIN).await;
    }

    fn forget_stopped(&mut self) {
        self.members
            .retain(|m| m.inst.state() != InstanceState::Stopped);
        self.registry.set_members(self.instances());
    }

    /// Asks every sync process to answer its held long-polls now (the start of a shutdown:
    /// the front finishes its requests first, and a long-poll would hold that up).
    pub fn release_waiters(&self) {
        for m in &self.members {
            m.inst.send(Command::ReleaseWaiters);
        }
    }

    /// Drains every instance (shutdown) and waits for all of their tasks. Returns whether
    /// every instance stopped without SIGKILL.
    pub async fn drain_all(&mut self, deadline: Instant) -> bool {
        for set in self.registry.kinds() {
            set.update(|list| list.clear());
        }
        for m in &mut self.members {
            m.retired = true;
            m.inst.send(Command::Drain { deadline });
        }
        let mut clean = true;
        while let Some(done) = self.tasks.join_next().await {
            clean &= done.unwrap_or(false);
        }
        remove_worker_configs(&self.runtime_dir);
        clean
    }
}
