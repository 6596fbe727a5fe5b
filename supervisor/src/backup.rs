//! `firemode backup FILE`: an online copy of the embedded SQLite store while the system runs.
//! The copy is made by the sync worker binary (`firemode-sync --backup FILE`, the effective
//! config on stdin) because the supervisor does not link the store.

use crate::instance::Kind;
use crate::preflight::resolve_program;
use firemode_config::Config;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why the backup failed, and the exit status to report it with (2: nothing to do or a
/// refusal the operator can fix, 1: the copy itself failed).
pub struct BackupFailed {
    pub message: String,
    pub exit: u8,
}

/// Runs the backup to `dest` (relative to the current directory); `Ok` is its summary line.
pub fn run(config: &Config, dest: &Path) -> Result<String, BackupFailed> {
    let fail = |message: String, exit| BackupFailed { message, exit };
    let dest =
        std::path::absolute(dest).map_err(|e| fail(format!("{}: {e}", dest.display()), 2))?;
    let program = resolve_program(Kind::Sync, "")
        .or_else(|_| resolve_program(Kind::Sync, &config.workers.sync.command))
        .map_err(|e| fail(format!("cannot run the backup: {e}"), 1))?;
    let mut child = Command::new(&program)
        .arg("--backup")
        .arg(&dest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", program.display()), 1))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The config goes through a pipe: no file holds the secrets.
        let _ = stdin.write_all(config.to_json().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("{}: {e}", program.display()), 1))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            out.status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ))
    }
}
