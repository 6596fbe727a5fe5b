//! `firemode check-config`: what a valid config can still get wrong about the machine it runs
//! on — files that are missing or unreadable (`catalog.file`, `auth.public_key_file`), worker
//! commands that do not exist or are not executable, directories FireMode cannot create or
//! write (`data_dir`, `supervisor.runtime_dir`) — and, with `--connect`, the store, checked by
//! the sync worker binary (`firemode-sync --check-store`) because the supervisor does not
//! link the store. Each finding names its key; the checks create and change nothing.

use crate::instance::Kind;
use firemode_config::Config;
use nix::unistd::{access, AccessFlags};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One problem, under the key it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "check error: {}: {}", self.key, self.message)
    }
}

fn finding(key: impl Into<String>, message: impl Into<String>) -> Finding {
    Finding {
        key: key.into(),
        message: message.into(),
    }
}

/// Every machine-level check; empty when the config can start here.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if !config.catalog.file.is_empty() {
        out.extend(catalog_file(Path::new(&config.catalog.file)).err());
    }
    if !config.auth.public_key_file.is_empty() {
        let path = Path::new(&config.auth.public_key_file);
        if let Err(e) = std::fs::read(path) {
            out.push(finding(
                "auth.public_key_file",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    for kind in Kind::ALL {
        if let Some(worker) = config.worker(kind.name()) {
            let key = format!("workers.{}.command", kind.name());
            if let Err(message) = resolve_program(kind, &worker.command) {
                out.push(finding(key, message));
            }
        }
    }
    let data_dir_used = config.database.url.trim().is_empty()
        || (config.auth.algorithm.is_symmetric() && config.auth.jwt_secret.is_empty());
    if data_dir_used {
        out.extend(writable_dir("data_dir", &config.data_dir).err());
    }
    out.extend(writable_dir("supervisor.runtime_dir", &config.supervisor.runtime_dir).err());
    out
}

fn catalog_file(path: &Path) -> Result<(), Finding> {
    let key = "catalog.file";
    let text = std::fs::read_to_string(path).map_err(|e| {
        finding(
            key,
            format!(
                "cannot read {}: {e} (the classify workers would fail at start, over and over)",
                path.display()
            ),
        )
    })?;
    firemode_catalog::Catalog::from_json(&text)
        .map(drop)
        .map_err(|e| {
            finding(
                key,
                format!("{} is not a valid catalog: {e}", path.display()),
            )
        })
}

/// The program a worker kind runs, as [`crate::spawn`] finds it: `command` (a path, or a
/// name looked up in `PATH`), else the binary beside this executable.
pub fn resolve_program(kind: Kind, command: &str) -> Result<PathBuf, String> {
    let path = if command.is_empty() {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find firemode: {e}"))?;
        exe.with_file_name(kind.binary())
    } else if command.contains('/') {
        PathBuf::from(command)
    } else {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|dir| dir.join(command))
            .find(|p| p.is_file());
        found.ok_or_else(|| format!("{command:?} is not found in PATH"))?
    };
    let shown = path.display();
    if !path.exists() {
        return Err(if command.is_empty() {
            format!(
                "the worker binary {shown} does not exist (it belongs beside firemode; build with `cargo build --release`, or set this key)"
            )
        } else {
            format!("{shown} does not exist")
        });
    }
    if !path.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    access(&path, AccessFlags::X_OK)
        .map_err(|e| format!("{shown} is not executable by this user: {e}"))?;
    Ok(path)
}

/// `dir` can be written, or created (its nearest existing ancestor can be written).
fn writable_dir(key: &str, dir: &Path) -> Result<(), Finding> {
    let shown = dir.display();
    if dir.exists() {
        if !dir.is_dir() {
            return Err(finding(
                key,
                format!("{shown} exists and is not a directory"),
            ));
        }
        return access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
            finding(
                key,
                format!("{shown} is not writable by this user (uid {}): {e}", uid()),
            )
        });
    }
    let ancestor = dir
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    access(ancestor, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        finding(
            key,
            format!(
                "{shown} does not exist and cannot be created: {} is not writable by this user (uid {}): {e}",
                ancestor.display(),
                uid()
            ),
        )
    })
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `--connect`: runs `firemode-sync --check-store` with the effective config on stdin.
/// `Ok` is its one-line summary; `Err` its message (refused, authentication failed, database
/// missing, schema newer than this binary, …).
pub fn connect(config: &Config) -> Result<String, Finding> {
    let key = "database.url";
    let program = resolve_program(Kind::Sync, "")
        .or_else(|_| resolve_program(Kind::Sync, &config.workers.sync.command))
        .map_err(|e| finding(key, format!("cannot run the store check: {e}")))?;
    let mut child = Command::new(&program)
        .arg("--check-store")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| finding(key, format!("cannot run {}: {e}", program.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The config goes through a pipe: no file holds the secrets.
        let _ = stdin.write_all(config.to_json().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| finding(key, format!("{}: {e}", program.display())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(finding(
            key,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
