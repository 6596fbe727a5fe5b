//! `firemode` running the whole system: prepare the runtime dir, bind the listeners (or take
//! systemd's), start the fleet, serve; on SIGHUP reload with a rolling restart; on
//! SIGTERM/SIGINT drain in order — the front first (finish accepted requests), then the
//! workers (SIGTERM, SIGKILL at the deadline) — and exit 0 when everything stopped cleanly.

use crate::admin::Admin;
use crate::auth::Verifier;
use crate::child_log::Style;
use crate::control::{ReloadOutcome, ReloadRequest};
use crate::fleet::Fleet;
use crate::front::{Front, FrontSettings};
use crate::instance::Kind;
use crate::listener::{self, Listening};
use crate::registry::Registry;
use crate::signals::{Signals, SupervisorSignal};
use crate::systemd;
use anyhow::Context as _;
use firemode_config::{load_for_reload, Config, Overrides, KILL_GRACE};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the config came from, so a reload reads it the same way.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

pub async fn run(config: Config, source: ConfigSource, log_style: Style) -> anyhow::Result<bool> {
    let mut config = Arc::new(config);
    log_startup(&source);
    let mut signals = Signals::install()?;
    firemode_telemetry::install_metrics();
    describe_metrics();
    publish_limits(&config);
    let runtime_dir = config.supervisor.runtime_dir.clone();
    crate::runtime_dir::prepare(&runtime_dir)?;
    let verifier = Verifier::new(&config)?;
    // The key the front verifies with; a reload never swaps it (design §4).
    let signing_key = key_material(&config);

    let activated = systemd::activated_listener()?;
    let front_from_systemd = activated.is_some();
    let front_listener = match activated {
        Some(std) => {
            tracing::info!(
                "using the socket passed by systemd for the front (server.listen ignored)"
            );
            TcpListener::from_std(std)?
        }
        None => TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| format!("server.listen: cannot listen on {}", config.server.listen))?,
    };
    let admin_listener = TcpListener::bind(&config.server.admin_listen)
        .await
        .with_context(|| {
            format!(
                "server.admin_listen: cannot listen on {}",
                config.server.admin_listen
            )
        })?;
    tracing::info!(listener = "front", addr = %front_listener.local_addr()?, "listening");
    tracing::info!(listener = "admin", addr = %admin_listener.local_addr()?, "listening");
    crate::runtime_dir::write_admin_addr(&runtime_dir, admin_listener.local_addr()?);

    let registry = Arc::new(Registry::new(Kind::ALL));
    let (recycle_tx, mut recycle_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut fleet = Fleet::new(registry.clone(), runtime_dir.clone(), log_style, recycle_tx);
    fleet.start(&config)?;

    let drain_started: Arc<std::sync::OnceLock<(Instant, Duration)>> = Arc::default();
    let remaining = {
        let drain_started = drain_started.clone();
        move || match drain_started.get() {
            Some((start, budget)) => (*start + *budget).saturating_duration_since(Instant::now()),
            None => Duration::ZERO,
        }
    };

    let (stop_front, stop_front_rx) = watch::channel(false);
    let front = Arc::new(Front::new(
        registry.clone(),
        FrontSettings::new(&config, verifier),
        config.server.poison_threshold,
    ));
    let front_task = tokio::spawn(listener::serve(
        Listening {
            name: "front",
            socket: front_listener,
            from_systemd: front_from_systemd,
        },
        front.clone(),
        |f: Arc<Front>, req| Box::pin(async move { f.handle(req).await }),
        stop_front_rx,
        remaining.clone(),
        config.server.header_read_timeout.get(),
        {
            let front = front.clone();
            move || front.send_timeout()
        },
    ));
    let (stop_admin, stop_admin_rx) = watch::channel(false);
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(16);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = Arc::new(Admin {
        registry: registry.clone(),
        reload: reload_tx,
        draining: draining.clone(),
        published_slots: Default::default(),
    });
    let admin_task = tokio::spawn(listener::serve(
        Listening {
            name: "admin",
            socket: admin_listener,
            from_systemd: false,
        },
        admin,
        |a: Arc<Admin>, req| Box::pin(async move { a.handle(req).await }),
        stop_admin_rx,
        || Duration::from_secs(1),
        Duration::from_secs(10),
        || Duration::from_secs(10),
    ));
    let notifier = tokio::spawn(notify_systemd(registry.clone()));

    let signal = 'serve: loop {
        let event = tokio::select! {
            s = signals.next() => Event::Signal(s),
            Some(inst) = recycle_rx.recv() => Event::Recycle(inst),
            Some(req) = reload_rx.recv() => Event::Reload(req),
        };
        let waiters = match event {
            Event::Signal(SupervisorSignal::Reload) => Vec::new(),
            Event::Reload(req) => vec![req.reply],
            Event::Signal(s) => break s,
            Event::Recycle(inst) => {
                let outcome = tokio::select! {
                    r = fleet.replace(&inst) => r,
                    s = signals.next() => {
                        if s == SupervisorSignal::Reload {
                            tracing::warn!("SIGHUP during a recycle is ignored; send it again");
                            Ok(())
                        } else {
                            break 'serve s
                        }
                    }
                };
                if let Err(e) = outcome {
                    tracing::error!(error = %format!("{e:#}"), "recycling failed");
                }
                continue;
            }
        };
        let mut reloading = Reloading {
            config: &mut config,
            signing_key: &signing_key,
            source: &source,
            fleet: &mut fleet,
            front: &front,
            signals: &mut signals,
            requests: &mut reload_rx,
        };
        if let Err(stop) = reloading.settle(waiters).await {
            break stop;
        }
        let (ready, total) = registry.ready_counts();
        systemd::ready(&format!("{ready}/{total} instances ready"));
    };
    notifier.abort();
    let drain_timeout = config.supervisor.drain_timeout.get();
    let started = Instant::now();
    let _ = drain_started.set((started, drain_timeout));
    tracing::info!(?signal, drain_timeout = %config.supervisor.drain_timeout, "draining");
    systemd::stopping("draining");
    // Let systemd wait for our own deadline plus the kill grace.
    systemd::extend_timeout(drain_timeout + KILL_GRACE, "draining");
    let progress = tokio::spawn(report_drain(front.clone()));
    // A second stop signal means "now": exit at once; the workers die with us
    // (PR_SET_PDEATHSIG).
    let impatient = tokio::spawn(async move {
        loop {
            if signals.next().await != SupervisorSignal::Reload {
                tracing::warn!("second stop signal: exiting without finishing the drain");
                std::process::exit(1);
            }
        }
    });

    // 1. `/readyz` says 503 from now on (a load balancer stops sending work); the front
    //    stops accepting and finishes what it accepted.
    draining.store(true, std::sync::atomic::Ordering::Release);
    let _ = stop_front.send(true);
    let front_clean = front_task.await.unwrap_or(false);
    if !front_clean {
        tracing::warn!("drain timeout reached with client requests still open");
    }
    // 2. The workers finish their in-flight requests and exit; SIGKILL at the deadline.
    let deadline = (started + drain_timeout).max(Instant::now() + Duration::from_millis(100));
    let workers_clean = fleet.drain_all(deadline).await;
    progress.abort();
    impatient.abort();
    let _ = stop_admin.send(true);
    let _ = admin_task.await;
    let clean = front_clean && workers_clean;
    if clean {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drained; exiting"
        );
    } else {
        tracing::warn!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stopped, but not everything drained cleanly"
        );
    }
    Ok(clean)
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

enum Event {
    Signal(SupervisorSignal),
    Recycle(Arc<crate::instance::Instance>),
    Reload(ReloadRequest),
}

/// What a reload works on, borrowed from the run loop for as long as reloads keep coming.
struct Reloading<'a> {
    config: &'a mut Arc<Config>,
    signing_key: &'a Option<Vec<u8>>,
    source: &'a ConfigSource,
    fleet: &'a mut Fleet,
    front: &'a Front,
    signals: &'a mut Signals,
    requests: &'a mut tokio::sync::mpsc::Receiver<ReloadRequest>,
}

impl Reloading<'_> {
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
                    self.config,
                    self.signing_key,
                    self.source,
                    self.fleet,
                    self.front,
                );
                tokio::pin!(reloading);
                loop {
                    tokio::select! {
                        r = &mut reloading => break Ok(r),
                        s = self.signals.next() => match s {
                            SupervisorSignal::Reload => again = true,
                            stop => break Err(stop),
                        },
                        Some(req) = self.requests.recv() => {
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
                    *self.config = new.clone();
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
