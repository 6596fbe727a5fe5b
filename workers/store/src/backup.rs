//! An online backup of the embedded SQLite store (`firemode backup FILE`): SQLite's backup
//! API copies a consistent snapshot page by page while workers keep reading and writing, the
//! copy is checked (`PRAGMA quick_check`) and only then moved to its name. PostgreSQL is
//! backed up with its own tools (`pg_dump`), never here.

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a finished backup holds.
#[derive(Debug)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub schema_version: Option<i64>,
    pub sessions: i64,
}

impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backed up {} sessions ({} bytes, schema version {}) to {}",
            self.sessions,
            self.bytes,
            self.schema_version
                .map_or_else(|| "none".to_owned(), |v| v.to_string()),
            self.path.display()
        )
    }
}

/// Why a backup was not made; the text says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the store is PostgreSQL (database.url is set): back it up with pg_dump, e.g. `pg_dump --format=custom --file=firemode.dump \"$DATABASE_URL\"`")]
    NotSqlite,
    #[error("there is no embedded store at {0} yet (data_dir): nothing to back up")]
    NoStore(PathBuf),
    #[error("{0} already exists: choose a new file name (a backup never overwrites)")]
    Exists(PathBuf),
    #[error("backing up to {path}: {detail}")]
    Failed { path: PathBuf, detail: String },
}

/// Copies `data_dir`'s SQLite store to `dest` while it is in use.
pub fn backup_sqlite(
    database_url: &str,
    data_dir: &Path,
    dest: &Path,
) -> Result<BackupSummary, BackupError> {
    if !database_url.trim().is_empty() {
        return Err(BackupError::NotSqlite);
    }
    let source = data_dir.join("firemode.sqlite3");
    if !source.exists() {
        return Err(BackupError::NoStore(source));
    }
    if dest.exists() {
        return Err(BackupError::Exists(dest.to_path_buf()));
    }
    let failed = |detail: String| BackupError::Failed {
        path: dest.to_path_buf(),
        detail,
    };
    let file_name = dest
        .file_name()
        .ok_or_else(|| failed("not a file name".into()))?
        .to_string_lossy();
    let partial = dest.with_file_name(format!(".{file_name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let copied = copy(&source, &partial).and_then(|()| check(&partial));
    let summary = match copied {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(failed(e.to_string()));
        }
    };
    std::fs::rename(&partial, dest).map_err(|e| failed(e.to_string()))?;
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    Ok(BackupSummary {
        path: dest.to_path_buf(),
        bytes,
        schema_version: summary.0,
        sessions: summary.1,
    })
}

/// The backup API, a few hundred pages at a time so writers are held up only briefly.
fn copy(source: &Path, to: &Path) -> rusqlite::Result<()> {
    let src = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(Duration::from_secs(10))?;
    // The copy holds every tenant's sessions: created private (mode 0600) before SQLite
    // writes to it.
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("{}: {e}", to.display())),
                )
            })?;
    }
    let mut dst = Connection::open(to)?;
    let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
    backup.run_to_completion(256, Duration::from_millis(5), None)?;
    drop(backup);
    // One self-contained file: no WAL beside the backup.
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    Ok(())
}

/// The copy is sound and readable: (schema version, session count).
fn check(path: &Path) -> rusqlite::Result<(Option<i64>, i64)> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let verdict: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("the copy fails its integrity check: {verdict}")),
        ));
    }
    let version = conn
        .query_row("SELECT max(version) FROM firemode_schema", [], |r| r.get(0))
        .ok()
        .flatten();
    let sessions = conn
        .query_row("SELECT count(*) FROM sync_sessions", [], |r| r.get(0))
        .unwrap_or(0);
    Ok((version, sessions))
}
