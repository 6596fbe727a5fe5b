//! `firemode` running the whole system: prepare the runtime dir, bind the listeners, start
//! one supervision task per instance, serve, and on SIGTERM/SIGINT drain in order — the
//! front first (finish accepted requests), then the workers (SIGTERM, SIGKILL at the
//! deadline) — and exit 0 when everything stopped cleanly.

use crate::admin::Admin;
use crate::auth::Verifier;
use crate::child_log::Style;
use crate::front::Front;
use crate::instance::{Instance, Kind};
use crate::listener;
use crate::registry::Registry;
use crate::signals::{next_signal, StopSignal};
use crate::spawn::SpawnSpec;
use crate::supervise::{supervise, Phase, SuperviseCtx};
use anyhow::{bail, Context as _};
use firemode_config::Config;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Idle upstream connections kept per instance; more are opened under load and closed after.
const MAX_IDLE_PER_INSTANCE: usize = 64;
/// The longest Unix socket path the kernel accepts (sun_path, less the NUL).
const MAX_SOCKET_PATH: usize = 107;

pub async fn run(config: Config, log_style: Style) -> anyhow::Result<bool> {
    let config = Arc::new(config);
    let runtime_dir = &config.supervisor.runtime_dir;
    prepare_runtime_dir(runtime_dir)?;
    let config_json = write_worker_config(&config, runtime_dir)?;
    let verifier = Verifier::new(&config)?;

    let front_listener = TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {}", config.server.listen))?;
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

    let mut kinds = Vec::new();
    let mut specs = Vec::new();
    for kind in Kind::ALL {
        let worker = config.worker(kind.name()).context("worker kind")?;
        let mut instances = Vec::new();
        for i in 0..worker.instances {
            let socket = runtime_dir.join(format!("{}-{i}.sock", kind.name()));
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                bail!(
                    "supervisor.runtime_dir: the socket path {} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter directory",
                    socket.display()
                );
            }
            instances.push(Arc::new(Instance::new(
                kind,
                i,
                socket,
                MAX_IDLE_PER_INSTANCE,
            )));
        }
        kinds.push((kind, instances));
        specs.push(SpawnSpec::new(kind, worker, &config_json, log_style)?);
    }
    let registry = Arc::new(Registry::new(kinds));

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let mut tasks = JoinSet::new();
    for spec in specs {
        let ctx = Arc::new(SuperviseCtx {
            spec: spec.clone(),
            config: config.clone(),
            registry: registry.clone(),
        });
        if let Some(set) = registry.set(spec.kind) {
            for inst in &set.instances {
                tasks.spawn(supervise(inst.clone(), ctx.clone(), phase_rx.clone()));
            }
        }
    }

    let drain_timeout = config.supervisor.drain_timeout.get();
    let drain_started: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let remaining = {
        let drain_started = drain_started.clone();
        move || {
            let start = drain_started.get().copied().unwrap_or_else(Instant::now);
            (start + drain_timeout).saturating_duration_since(Instant::now())
        }
    };

    let (stop_front, stop_front_rx) = watch::channel(false);
    let front = Arc::new(Front::new(&config, registry.clone(), verifier));
    let front_task = tokio::spawn(listener::serve(
        "front",
        front_listener,
        front,
        |f: Arc<Front>, req| Box::pin(async move { f.handle(req).await }),
        stop_front_rx,
        remaining.clone(),
    ));
    let (stop_admin, stop_admin_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        registry: registry.clone(),
    });
    let admin_task = tokio::spawn(listener::serve(
        "admin",
        admin_listener,
        admin,
        |a: Arc<Admin>, req| Box::pin(async move { a.handle(req).await }),
        stop_admin_rx,
        || Duration::from_secs(1),
    ));

    let signal = loop {
        match next_signal().await? {
            StopSignal::Reload => {
                tracing::warn!("SIGHUP received; configuration reload is not supported yet, keeping the running config");
            }
            s => break s,
        }
    };
    let started = Instant::now();
    let _ = drain_started.set(started);
    tracing::info!(?signal, drain_timeout = %config.supervisor.drain_timeout, "draining");

    // 1. The front stops accepting and finishes what it accepted.
    let _ = stop_front.send(true);
    let front_clean = front_task.await.unwrap_or(false);
    if !front_clean {
        tracing::warn!("drain timeout reached with client requests still open");
    }
    // 2. The workers finish their in-flight requests and exit; SIGKILL at the deadline.
    let deadline = (started + drain_timeout).max(Instant::now() + Duration::from_millis(100));
    let _ = phase_tx.send(Phase::Drain { deadline });
    while tasks.join_next().await.is_some() {}
    let workers_clean = registry.all().all(|i| {
        i.status()
            .last_exit
            .as_deref()
            .is_some_and(|e| !e.starts_with("killed"))
    });
    let _ = stop_admin.send(true);
    let _ = admin_task.await;
    let _ = std::fs::remove_file(&config_json);
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

/// Creates the runtime dir with mode 0700 and removes stale sockets from an earlier run.
fn prepare_runtime_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("supervisor.runtime_dir: cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "supervisor.runtime_dir: cannot set mode 0700 on {}",
            dir.display()
        )
    })?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sock") {
            tracing::info!(path = %path.display(), "removing stale socket");
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// The effective config for the workers, mode 0600 (it may hold the database password).
fn write_worker_config(config: &Config, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("worker-config.json");
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(config.to_json().as_bytes())?;
    Ok(path)
}
