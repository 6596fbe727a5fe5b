//! `firemode` running the whole system: prepare the runtime dir, bind the listeners (or take
//! systemd's), start the fleet, serve; on SIGHUP reload with a rolling restart; on
//! SIGTERM/SIGINT drain in order — the front first (finish accepted requests), then the
//! workers (SIGTERM, SIGKILL at the deadline) — and exit 0 when everything stopped cleanly.
//! A second stop signal ends the drain early; `run` still returns (exit 1), so the
//! telemetry is flushed on the way out.

use crate::admin::Admin;
use crate::auth::Verifier;
use crate::control::{ReloadOutcome, ReloadRequest};
use crate::fleet::Fleet;
use crate::front::{Front, FrontSettings};
use crate::instance::{Instance, Kind};
use crate::listener::{self, Listening};
use crate::registry::Registry;
use crate::signals::{Signals, SupervisorSignal};
use crate::systemd;
use anyhow::Context as _;
use firemode_config::{load_for_reload, Config, Overrides, KILL_GRACE};
use firemode_telemetry::traces::LogStyle;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where the config came from, so a reload reads it the same way.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

pub async fn run(
    config: Config,
    source: ConfigSource,
    log_style: LogStyle,
) -> anyhow::Result<bool> {
    let config = Arc::new(config);
    log_startup(&source);
    let signals = Signals::install()?;
    firemode_telemetry::install_metrics();
    describe_metrics();
    publish_limits(&config);
    let runtime_dir = config.supervisor.runtime_dir.clone();
    crate::runtime_dir::prepare(&runtime_dir)?;
    let verifier = Verifier::new(&config)?;
    // The key the front verifies with; a reload never swaps it (design §4).
    let signing_key = key_material(&config);
    let listeners = Listeners::bind(&config).await?;
    crate::runtime_dir::write_admin_addr(&runtime_dir, listeners.admin.socket.local_addr()?);

    let registry = Arc::new(Registry::new(Kind::ALL));
    let (recycle_tx, recycles) = mpsc::unbounded_channel();
    let mut fleet = Fleet::new(registry.clone(), runtime_dir, log_style, recycle_tx);
    fleet.start(&config)?;
    let front = Arc::new(Front::new(
        registry.clone(),
        FrontSettings::new(&config, verifier),
        config.server.poison_threshold,
    ));
    let (reload_tx, reloads) = mpsc::channel(16);
    let serving = Serving::start(listeners, &config, front.clone(), &registry, reload_tx);
    let mut system = System {
        config,
        signing_key,
        source,
        fleet,
        front,
        registry,
        signals,
        reloads,
        recycles,
    };
    let signal = system.serve().await;
    Ok(system.shut_down(signal, serving).await)
}

/// The two listeners, bound (or the front's taken from systemd) before anything starts.
struct Listeners {
    front: Listening,
    admin: Listening,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Self> {
        let activated = systemd::activated_listener()?;
        let from_systemd = activated.is_some();
        let front = match activated {
            Some(std) => {
                tracing::info!(
                    "using the socket passed by systemd for the front (server.listen ignored)"
                );
                TcpListener::from_std(std)?
            }
            None => TcpListener::bind(&config.server.listen)
                .await
                .with_context(|| {
                    format!("server.listen: cannot listen on {}", config.server.listen)
                })?,
        };
        let admin_listen = &config.server.admin_listen;
        let admin = TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("server.admin_listen: cannot listen on {admin_listen}"))?;
        tracing::info!(listener = "front", addr = %front.local_addr()?, "listening");
        tracing::info!(listener = "admin", addr = %admin.local_addr()?, "listening");
        Ok(Self {
            front: Listening {
                name: "front",
                socket: front,
                from_systemd,
            },
            admin: Listening {
                name: "admin",
                socket: admin,
                from_systemd: false,
            },
        })
    }
}

/// The tasks that serve while the system runs, and the handles that stop them.
struct Serving {
    front: JoinHandle<bool>,
    stop_front: watch::Sender<bool>,
    admin: JoinHandle<bool>,
    stop_admin: watch::Sender<bool>,
    /// `/readyz` says 503 from the moment this is set.
    draining: Arc<AtomicBool>,
    /// When the drain began and its budget: what the front's grace period is.
    drain_started: Arc<OnceLock<(Instant, Duration)>>,
    notifier: JoinHandle<()>,
}

impl Serving {
    fn start(
        listeners: Listeners,
        config: &Config,
        front: Arc<Front>,
        registry: &Arc<Registry>,
        reload: mpsc::Sender<ReloadRequest>,
    ) -> Self {
        let drain_started: Arc<OnceLock<(Instant, Duration)>> = Arc::default();
        let remaining = {
            let drain_started = drain_started.clone();
            move || match drain_started.get() {
                Some((start, budget)) => {
                    (*start + *budget).saturating_duration_since(Instant::now())
                }
                None => Duration::ZERO,
            }
        };
        let (stop_front, stop_front_rx) = watch::channel(false);
        let send_timeout = {
            let front = front.clone();
            move || front.send_timeout()
        };
        let front_task = tokio::spawn(listener::serve(
            listeners.front,
            front,
            |f: Arc<Front>, req| Box::pin(async move { f.handle(req).await }),
            stop_front_rx,
            remaining,
            config.server.header_read_timeout.get(),
            send_timeout,
        ));
        let (stop_admin, stop_admin_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(Admin {
            registry: registry.clone(),
            reload,
            draining: draining.clone(),
            published_slots: Default::default(),
        });
        let admin_task = tokio::spawn(listener::serve(
            listeners.admin,
            admin,
            |a: Arc<Admin>, req| Box::pin(async move { a.handle(req).await }),
            stop_admin_rx,
            || Duration::from_secs(1),
            Duration::from_secs(10),
            || Duration::from_secs(10),
        ));
        Self {
            front: front_task,
            stop_front,
            admin: admin_task,
            stop_admin,
            draining,
            drain_started,
            notifier: tokio::spawn(notify_systemd(registry.clone())),
        }
    }
}

/// What the run loop works on: the running configuration, the fleet, the front, and where
/// events come from.
struct System {
    config: Arc<Config>,
    signing_key: Option<Vec<u8>>,
    source: ConfigSource,
    fleet: Fleet,
    front: Arc<Front>,
    registry: Arc<Registry>,
    signals: Signals,
    reloads: mpsc::Receiver<ReloadRequest>,
    /// Instances asking for their rolling replacement.
    recycles: mpsc::UnboundedReceiver<Arc<Instance>>,
}

/// What the run loop reacts to.
enum Event {
    Signal(SupervisorSignal),
    Recycle(Arc<Instance>),
    Reload(ReloadRequest),
}

impl System {
    /// Serves until a stop signal (which it returns): reloads and recycling meanwhile.
    async fn serve(&mut self) -> SupervisorSignal {
        loop {
            let event = tokio::select! {
                s = self.signals.next() => Event::Signal(s),
                Some(inst) = self.recycles.recv() => Event::Recycle(inst),
                Some(req) = self.reloads.recv() => Event::Reload(req),
            };
            let waiters = match event {
                Event::Signal(SupervisorSignal::Reload) => Vec::new(),
                Event::Reload(req) => vec![req.reply],
                Event::Signal(stop) => return stop,
                Event::Recycle(inst) => match self.recycle(&inst).await {
                    Ok(()) => continue,
                    Err(stop) => return stop,
                },
            };
            if let Err(stop) = self.settle(waiters).await {
                return stop;
            }
            let (ready, total) = self.registry.ready_counts();
            systemd::ready(&format!("{ready}/{total} instances ready"));
        }
    }

    /// Replaces `inst` the rolling way. `Err` is a stop signal that ended it.
    async fn recycle(&mut self, inst: &Arc<Instance>) -> Result<(), SupervisorSignal> {
        let outcome = tokio::select! {
            r = self.fleet.replace(inst) => r,
            s = self.signals.next() => {
                if s != SupervisorSignal::Reload {
                    return Err(s);
                }
                tracing::warn!("SIGHUP during a recycle is ignored; send it again");
                Ok(())
            }
        };
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "recycling failed");
        }
        Ok(())
    }

    /// The ordered drain: the front first (it stops accepting and finishes what it
    /// accepted), then the workers (SIGKILL at the deadline), then the admin listener.
    /// A second stop signal ends it early (the workers are killed as the fleet drops).
    /// Returns whether everything stopped cleanly.
    async fn shut_down(&mut self, signal: SupervisorSignal, serving: Serving) -> bool {
        serving.notifier.abort();
        let drain_timeout = self.config.supervisor.drain_timeout.get();
        let started = Instant::now();
        let _ = serving.drain_started.set((started, drain_timeout));
        tracing::info!(?signal, drain_timeout = %self.config.supervisor.drain_timeout, "draining");
        systemd::stopping("draining");
        // Let systemd wait for our own deadline plus the kill grace.
        systemd::extend_timeout(drain_timeout + KILL_GRACE, "draining");
        let progress = tokio::spawn(report_drain(self.front.clone()));
        let deadline = started + drain_timeout;
        let clean = tokio::select! {
            clean = drain(serving, &mut self.fleet, deadline) => clean,
            () = second_stop(&mut self.signals) => {
                tracing::warn!("second stop signal: exiting without finishing the drain");
                false
            }
        };
        progress.abort();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if clean {
            tracing::info!(elapsed_ms, "drained; exiting");
        } else {
            tracing::warn!(elapsed_ms, "stopped, but not everything drained cleanly");
        }
        clean
    }
}

/// The drain's steps, in order (see [`System::shut_down`]).
async fn drain(serving: Serving, fleet: &mut Fleet, deadline: Instant) -> bool {
    // 1. `/readyz` says 503 from now on (a load balancer stops sending work); the front
    //    stops accepting and finishes what it accepted.
    serving.draining.store(true, Ordering::Release);
    let _ = serving.stop_front.send(true);
    // Held long-polls answer now, or the front would wait for them until the deadline.
    fleet.release_waiters();
    let front_clean = serving.front.await.unwrap_or(false);
    if !front_clean {
        tracing::warn!("drain timeout reached with client requests still open");
    }
    // 2. The workers finish their in-flight requests and exit; SIGKILL at the deadline.
    let deadline = deadline.max(Instant::now() + Duration::from_millis(100));
    let workers_clean = fleet.drain_all(deadline).await;
    let _ = serving.stop_admin.send(true);
    let _ = serving.admin.await;
    front_clean && workers_clean
}

/// Resolves on a stop signal (a SIGHUP during the drain means nothing).
async fn second_stop(signals: &mut Signals) {
    while signals.next().await == SupervisorSignal::Reload {}
}

/// The first line: which build runs, and with which config (what an operator checks first
/// after an upgrade or a config change).
fn log_startup(source: &ConfigSource) {
    let config = match &source.file {
        Some(path) => path.display().to_string(),
        None => "built-in defaults".to_string(),
    };
    tracing::info!(
        version = firemode_telemetry::build_info::VERSION,
        commit = firemode_telemetry::build_info::COMMIT,
        config = %config,
        pid = std::process::id(),
        "firemode starting"
    );
}

/// Publishes each kind's `max_rss` (0: none) as `firemode_worker_max_rss_bytes{kind}`, so
/// dashboards and alerts can put worker RSS beside its limit; again after each reload.
fn publish_limits(config: &Config) {
    for kind in Kind::ALL {
        let limit = config.worker(kind.name()).map_or(0, |w| w.max_rss.0);
        metrics::gauge!("firemode_worker_max_rss_bytes", "kind" => kind.name()).set(limit as f64);
    }
}

/// Names and explains the supervisor's series, and makes the counters visible at zero.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Front requests by method, route template and status"
    );
    describe_gauge!("active_connections", "Open client connections per listener");
    describe_gauge!(
        "firemode_worker_up",
        "1 when the instance is ready and routable"
    );
    describe_gauge!(
        "firemode_worker_backoff",
        "1 while the instance waits out its restart delay"
    );
    describe_counter!(
        "firemode_worker_restarts_total",
        "Instance restarts (exits, failed health, traffic verdicts)"
    );
    describe_counter!(
        "firemode_health_check_failures_total",
        "Failed health checks"
    );
    describe_counter!(
        "firemode_traffic_replacements_total",
        "Instances replaced because real requests failed"
    );
    describe_counter!(
        "firemode_upstream_retries_total",
        "Requests retried on another instance"
    );
    describe_counter!(
        "firemode_poison_requests_total",
        "Requests that reached the poison threshold (workers died under them) and are refused from then on"
    );
    describe_gauge!(
        "firemode_worker_max_rss_bytes",
        "workers.<kind>.max_rss: an instance is recycled at this resident memory (0: never)"
    );
    describe_histogram!(
        "firemode_queue_wait_seconds",
        Unit::Seconds,
        "Time requests waited for a ready instance"
    );
    for kind in Kind::ALL {
        let k = kind.name();
        metrics::counter!("firemode_worker_restarts_total", "kind" => k).absolute(0);
        metrics::counter!("firemode_health_check_failures_total", "kind" => k).absolute(0);
        metrics::counter!("firemode_traffic_replacements_total", "kind" => k).absolute(0);
        metrics::counter!("firemode_upstream_retries_total", "kind" => k).absolute(0);
        metrics::counter!("firemode_poison_requests_total", "kind" => k).absolute(0);
    }
    metrics::gauge!("active_connections", "listener" => "front").set(0.0);
}

impl System {
    /// Reloads until no more are asked for: a SIGHUP or `POST /reload` that arrives during a
    /// reload asks for one more afterwards, and each `POST /reload` is answered with the
    /// outcome of the first reload that started after it. `Err` is a stop signal that ended
    /// the reload (new instances already started are drained with the rest).
    async fn settle(
        &mut self,
        mut waiters: Vec<tokio::sync::oneshot::Sender<ReloadOutcome>>,
    ) -> Result<(), SupervisorSignal> {
        loop {
            systemd::reloading();
            tracing::info!("reloading the configuration");
            let mut next_waiters = Vec::new();
            let mut again = false;
            let outcome = {
                let reloading = reload(
                    &self.config,
                    &self.signing_key,
                    &self.source,
                    &mut self.fleet,
                    &self.front,
                );
                tokio::pin!(reloading);
                loop {
                    tokio::select! {
                        r = &mut reloading => break Ok(r),
                        s = self.signals.next() => match s {
                            SupervisorSignal::Reload => again = true,
                            stop => break Err(stop),
                        },
                        Some(req) = self.reloads.recv() => {
                            again = true;
                            next_waiters.push(req.reply);
                        }
                    }
                }
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(stop) => {
                    tracing::warn!(signal = ?stop, "stop signal during reload");
                    let stopped = ReloadOutcome::Failed("the supervisor is stopping".into());
                    for w in waiters.into_iter().chain(next_waiters) {
                        let _ = w.send(stopped.clone());
                    }
                    return Err(stop);
                }
            };
            match &outcome {
                (ReloadOutcome::Applied, Some(new)) => {
                    self.config = new.clone();
                    publish_limits(new);
                    tracing::info!("reload complete");
                }
                (ReloadOutcome::Failed(e), _) => tracing::error!(
                    error = %e,
                    "reload failed; instances not yet replaced keep the old configuration"
                ),
                _ => {}
            }
            for w in waiters {
                let _ = w.send(outcome.0.clone());
            }
            if !again {
                return Ok(());
            }
            waiters = next_waiters;
        }
    }
}

/// Re-reads the config and rolls every instance onto it. Refused (logged, nothing changes)
/// when it is invalid, empty or unreadable, or changes what needs a restart (the store, the
/// signing key, the listeners, the runtime dir); the new config comes back when applied.
async fn reload(
    current: &Arc<Config>,
    signing_key: &Option<Vec<u8>>,
    source: &ConfigSource,
    fleet: &mut Fleet,
    front: &Front,
) -> (ReloadOutcome, Option<Arc<Config>>) {
    let refused = |reason: String| {
        tracing::error!(error = %reason, "reload refused; the running configuration stays in force");
        (ReloadOutcome::Refused(reason), None)
    };
    let next = match load_for_reload(source.file.as_deref(), &source.overrides) {
        Ok(c) => c,
        Err(e) => return refused(format!("the new configuration is invalid: {e}")),
    };
    let changed = current.restart_only_changes(&next);
    if !changed.is_empty() {
        return refused(format!(
            "the new configuration changes {}, which needs a restart",
            changed.join(", ")
        ));
    }
    if key_material(&next) != *signing_key {
        return refused(
            "the signing key's file (auth.public_key_file or data_dir/jwt_secret) changed or vanished since start, which needs a restart".into(),
        );
    }
    let next = Arc::new(next);
    let verifier = match Verifier::new(&next) {
        Ok(v) => v,
        Err(e) => return refused(format!("{e:#}")),
    };
    if let Err(e) = fleet.roll(&next).await {
        return (ReloadOutcome::Failed(format!("{e:#}")), None);
    }
    // The front switches (limits, timeouts, issuer, audience) once every instance runs the
    // new config.
    front.reconfigure(FrontSettings::new(&next, verifier));
    (ReloadOutcome::Applied, Some(next))
}

/// The bytes the front's key is made from: `auth.jwt_secret`, the generated secret's file, or
/// the public key file. Read without creating anything; `None` when the file is unreadable.
fn key_material(config: &Config) -> Option<Vec<u8>> {
    let auth = &config.auth;
    if !auth.algorithm.is_symmetric() {
        return std::fs::read(&auth.public_key_file).ok();
    }
    if !auth.jwt_secret.is_empty() {
        return Some(auth.jwt_secret.as_bytes().to_vec());
    }
    std::fs::read(crate::auth::secret_path(config)).ok()
}

/// READY=1 once every kind has a ready instance; STATUS= whenever the counts change;
/// WATCHDOG=1 at half of `WATCHDOG_USEC` (this task runs on the supervisor's runtime, so a
/// wedged runtime stops the pings).
async fn notify_systemd(registry: Arc<Registry>) {
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_millis(500));
    let mut announced_ready = false;
    let mut last_status = String::new();
    let mut last_ping = Instant::now();
    loop {
        let (ready, total) = registry.ready_counts();
        let status = format!("{ready}/{total} instances ready");
        if !announced_ready && registry.all_kinds_ready() {
            systemd::ready(&status);
            tracing::info!(%status, "all worker kinds ready");
            announced_ready = true;
        } else if status != last_status {
            systemd::status(&status);
        }
        last_status = status;
        if let Some(every) = watchdog {
            if last_ping.elapsed() >= every {
                systemd::watchdog();
                last_ping = Instant::now();
            }
        }
        tokio::time::sleep(tick).await;
    }
}

async fn report_drain(front: Arc<Front>) {
    loop {
        systemd::status(&format!("draining, {} in flight", front.in_flight()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
