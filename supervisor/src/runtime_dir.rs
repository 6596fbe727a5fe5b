//! The runtime dir (`supervisor.runtime_dir`) and what the supervisor keeps in it: the
//! directory itself (mode 0700), the workers' sockets (named by [`crate::fleet`]) and one
//! worker config file per config generation (mode 0600: it holds the JWT secret and the
//! database URL).
//!
//! Everything here is recreated on demand: before every spawn the directory and the
//! instance's config file are checked and written again when missing, so a deleted runtime
//! dir (a tmp cleaner, an operator) costs a restart of the instances, never an outage. A
//! generation's file is deleted when the last instance started from it stops
//! ([`WorkerConfigFile`]'s `Drop`), so a secret is on disk only while a process needs it.
//!
//! `admin.addr` holds the address the admin listener is bound to, so `firemode status` and
//! `firemode reload` find the running supervisor even after `server.admin_listen` was
//! changed in the file (or when it is port 0).
//!
//! One supervisor owns a runtime dir: [`lock`] takes an exclusive `flock` on
//! `supervisor.lock` in it for the process's life (the kernel releases it when the process
//! dies, however it dies), so a second supervisor started on the same dir exits before it
//! touches the first one's sockets.

use anyhow::Context as _;
use firemode_config::Config;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The lock file's name inside the runtime dir; it holds the owner's pid.
pub const LOCK_FILE: &str = "supervisor.lock";

/// The lock file this process holds (see [`lock`]); kept here so that [`ensure`] can take
/// the lock again in a runtime dir it had to recreate.
static HELD: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// The runtime dir's lock, held until this is dropped (at exit).
#[derive(Debug)]
pub struct RuntimeDirLock(());

impl Drop for RuntimeDirLock {
    fn drop(&mut self) {
        held().take();
    }
}

fn held() -> std::sync::MutexGuard<'static, Option<std::fs::File>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the runtime dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("supervisor.runtime_dir {dir} is in use by another firemode supervisor{}; one supervisor per runtime dir: stop that one, or give this one its own supervisor.runtime_dir (and listeners)", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { dir: String, holder: Option<u32> },
    #[error("supervisor.runtime_dir: cannot lock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Creates the dir (mode 0700) and takes its lock, writing our pid into the lock file; a
/// second supervisor gets [`LockError::Held`] with the holder's pid when it is known.
pub fn lock(dir: &Path) -> Result<RuntimeDirLock, LockError> {
    std::fs::create_dir_all(dir).map_err(|source| LockError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let file = lock_file(dir)?;
    *held() = Some(file);
    Ok(RuntimeDirLock(()))
}

fn lock_file(dir: &Path) -> Result<std::fs::File, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            return Err(LockError::Held {
                dir: dir.display().to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// After the dir was recreated: the lock went with the old one, so take it again (when this
/// process holds one at all).
fn relock(dir: &Path) {
    let mut held = held();
    if held.is_none() {
        return;
    }
    match lock_file(dir) {
        Ok(file) => *held = Some(file),
        Err(e) => tracing::error!(error = %e, "cannot take the runtime dir's lock again"),
    }
}

/// At start: creates the dir with mode 0700, removes stale sockets and worker config files
/// left by an earlier run.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("supervisor.runtime_dir: cannot create {}", dir.display()))?;
    make_private(dir)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sock") {
            tracing::info!(path = %path.display(), "removing stale socket");
            let _ = std::fs::remove_file(&path);
        }
    }
    remove_worker_configs(dir);
    Ok(())
}

fn make_private(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "supervisor.runtime_dir: cannot set mode 0700 on {}",
            dir.display()
        )
    })
}

/// Creates the dir again (mode 0700) when it has gone missing.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("supervisor.runtime_dir: cannot create {}", dir.display()))?;
    make_private(dir)?;
    relock(dir);
    tracing::warn!(path = %dir.display(), "supervisor.runtime_dir was missing; created it again");
    Ok(())
}

/// The effective config handed to the workers of one generation. Shared (`Arc`) by every
/// instance started from it; the file is deleted when the last holder lets go.
#[derive(Debug)]
pub struct WorkerConfigFile {
    path: PathBuf,
    json: String,
}

impl WorkerConfigFile {
    /// Writes `worker-config.g<generation>.json` into `dir`.
    pub fn write(config: &Config, dir: &Path, generation: u64) -> anyhow::Result<Arc<Self>> {
        let file = Self {
            path: dir.join(format!("worker-config.g{generation}.json")),
            json: config.to_json(),
        };
        ensure(dir)?;
        let _ = std::fs::remove_file(&file.path);
        file.create()?;
        Ok(Arc::new(file))
    }

    /// Where the file is (what the workers get as `--config-json`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Before a spawn: the dir and this file exist (written again if something deleted them).
    pub fn ensure(&self) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent() {
            ensure(dir)?;
        }
        if !self.path.exists() {
            self.create()?;
            tracing::warn!(path = %self.path.display(), "a worker config file was missing; wrote it again");
        }
        Ok(())
    }

    fn create(&self) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        f.write_all(self.json.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for WorkerConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The file in `dir` that names the running admin listener.
pub fn admin_addr_file(dir: &Path) -> std::path::PathBuf {
    dir.join("admin.addr")
}

/// Records the admin listener's bound address for the operator commands.
pub fn write_admin_addr(dir: &Path, addr: std::net::SocketAddr) {
    let path = admin_addr_file(dir);
    if let Err(e) = std::fs::write(&path, addr.to_string()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the admin address; `firemode status` will use server.admin_listen");
    }
}

/// The admin address a running supervisor recorded in `dir`, if any.
pub fn read_admin_addr(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(admin_addr_file(dir)).ok()?;
    let addr: std::net::SocketAddr = text.trim().parse().ok()?;
    Some(addr.to_string())
}

/// Removes every worker config file in `dir` (at start: an earlier run's; at exit: ours).
pub fn remove_worker_configs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("worker-config") && name.ends_with(".json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_comes_back_after_its_dir_is_deleted_and_goes_with_its_last_holder() {
        let dir = std::env::temp_dir().join(format!("fm-rundir-{}", std::process::id()));
        let run = dir.join("run");
        prepare(&run).unwrap();
        let file = WorkerConfigFile::write(&Config::default(), &run, 3).unwrap();
        let path = file.path().to_path_buf();
        assert!(path.ends_with("worker-config.g3.json"));
        std::fs::remove_dir_all(&run).unwrap();
        file.ensure().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&run), 0o700);
        assert_eq!(mode(&path), 0o600);
        let back = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Config::from_json(&back).unwrap(), Config::default());
        let second = file.clone();
        drop(file);
        assert!(path.exists(), "a holder is left");
        drop(second);
        assert!(!path.exists(), "deleted with its last holder");
        let _ = std::fs::remove_dir_all(dir);
    }
}
