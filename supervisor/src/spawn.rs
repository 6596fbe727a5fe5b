//! Starting one worker process: which program, its arguments and environment, its output
//! piped into our log, and a death signal so it dies with the supervisor even when the
//! supervisor is SIGKILLed. Before each start the runtime dir and the worker config file are
//! checked (and written again when something deleted them).

use crate::child_log;
use crate::instance::{Instance, Kind};
use crate::runtime_dir::WorkerConfigFile;
use firemode_config::WorkerKind;
use firemode_telemetry::traces::LogStyle;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use tokio::process::{Child, Command};

/// Everything needed to start instances of one kind.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    pub kind: Kind,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The generation's config; every instance started from this spec holds it, so the file
    /// lives as long as one of them runs.
    pub config_file: Arc<WorkerConfigFile>,
    pub log_style: LogStyle,
}

impl SpawnSpec {
    pub fn new(
        kind: Kind,
        worker: &WorkerKind,
        config_file: Arc<WorkerConfigFile>,
        log_style: LogStyle,
    ) -> anyhow::Result<Self> {
        let program = if worker.command.is_empty() {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            dir.join(kind.binary())
        } else {
            PathBuf::from(&worker.command)
        };
        Ok(Self {
            kind,
            program,
            args: worker.args.clone(),
            env: worker
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            config_file,
            log_style,
        })
    }
}

/// Variables meant for the supervisor alone (systemd's notify and socket activation).
const SUPERVISOR_ONLY_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

pub fn spawn(spec: &SpawnSpec, instance: &Instance) -> std::io::Result<Child> {
    spec.config_file
        .ensure()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .arg("--socket")
        .arg(&instance.socket)
        .arg("--config-json")
        .arg(spec.config_file.path())
        .arg("--instance")
        .arg(instance.index.to_string())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own: Ctrl-C or a hangup on the supervisor's terminal must
        // not reach the workers directly; the supervisor drains them in order.
        .process_group(0)
        .kill_on_drop(true);
    for var in SUPERVISOR_ONLY_ENV {
        cmd.env_remove(var);
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The supervisor may have died between fork and prctl.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    if let Some(out) = child.stdout.take() {
        child_log::forward(out, spec.log_style, spec.kind, instance.index, pid);
    }
    if let Some(err) = child.stderr.take() {
        child_log::forward(err, spec.log_style, spec.kind, instance.index, pid);
    }
    Ok(child)
}

/// How a child ended, for `/status` and logs.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| sig.to_string());
        format!("killed by {name}")
    } else {
        "ended".into()
    }
}
