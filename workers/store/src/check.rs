//! `firemode check-config --connect`: can the store be reached, may we log in, does the
//! database exist, and is its schema one this binary knows? Each failure is its own
//! [`ConnectProblem`] with a message saying what to do; nothing is created or migrated.

use crate::migrations::MIGRATIONS;
use std::path::Path;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectProblem {
    #[error("database.url is not a valid PostgreSQL connection string: {0}")]
    BadUrl(String),
    #[error("connection refused by {0}: is PostgreSQL running and listening there (host, port)?")]
    Refused(String),
    #[error(
        "cannot reach {0} within {1:?} (timed out): check the host, the port and any firewall"
    )]
    TimedOut(String, Duration),
    #[error(
        "authentication failed: {0}; check the user and password in database.url and pg_hba.conf"
    )]
    AuthFailed(String),
    #[error(
        "database missing: {0}; create it (createdb) or fix the database name in database.url"
    )]
    DatabaseMissing(String),
    #[error("the schema is newer than this binary: the database is at migration {found}, this firemode knows up to {known}; upgrade firemode (never run an older binary on a newer schema)")]
    SchemaNewer { found: i64, known: i64 },
    #[error("cannot use the store: {0}")]
    Other(String),
}

/// The newest migration this binary knows.
pub fn known_schema_version() -> i64 {
    MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0)
}

/// Connects once (PostgreSQL when `url` is set, else the SQLite file in `data_dir` if it
/// exists) and reads the schema version. `Ok` carries a one-line summary.
pub async fn check_connection(
    url: &str,
    data_dir: &Path,
    timeout: Duration,
) -> Result<String, ConnectProblem> {
    let found = if url.trim().is_empty() {
        sqlite_schema_version(data_dir)?
    } else {
        postgres_schema_version(url.trim(), timeout).await?
    };
    let known = known_schema_version();
    match found {
        Some(found) if found > known => Err(ConnectProblem::SchemaNewer { found, known }),
        Some(found) => Ok(format!("store ok: schema at migration {found} of {known}")),
        None => Ok(format!(
            "store ok: no schema yet (migrations 1-{known} are applied at start)"
        )),
    }
}

async fn postgres_schema_version(
    url: &str,
    timeout: Duration,
) -> Result<Option<i64>, ConnectProblem> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectProblem::BadUrl(e.to_string()))?;
    config.application_name("firemode check-config");
    config.connect_timeout(timeout);
    let target = describe(&config);
    let connecting = config.connect(NoTls);
    let (client, connection) = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(ConnectProblem::TimedOut(target, timeout)),
        Ok(Err(e)) => return Err(classify(&e, target, timeout)),
        Ok(Ok(pair)) => pair,
    };
    let driver = tokio::spawn(connection);
    let rows = client
        .query_opt("SELECT max(version) FROM firemode_schema", &[])
        .await;
    driver.abort();
    match rows {
        Ok(row) => Ok(row.and_then(|r| r.get::<_, Option<i64>>(0))),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(ConnectProblem::Other(e.to_string())),
    }
}

/// `host:port/dbname as user`, for messages (never the password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{} as {}",
        config.get_dbname().unwrap_or("(default database)"),
        config.get_user().unwrap_or("(default user)")
    )
}

fn classify(e: &tokio_postgres::Error, target: String, timeout: Duration) -> ConnectProblem {
    if let Some(code) = e.code() {
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        return match code {
            c if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                ConnectProblem::AuthFailed(format!("{target}: {detail}"))
            }
            c if *c == SqlState::INVALID_CATALOG_NAME => {
                ConnectProblem::DatabaseMissing(format!("{target}: {detail}"))
            }
            _ => ConnectProblem::Other(format!("{target}: {detail}")),
        };
    }
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    match io.map(std::io::Error::kind) {
        Some(std::io::ErrorKind::ConnectionRefused) => ConnectProblem::Refused(target),
        Some(std::io::ErrorKind::TimedOut) => ConnectProblem::TimedOut(target, timeout),
        _ if e.to_string().contains("timed out") => ConnectProblem::TimedOut(target, timeout),
        _ => ConnectProblem::Other(format!("{target}: {e}")),
    }
}

/// The SQLite file's schema version, read-only; `None` when there is no file yet.
fn sqlite_schema_version(data_dir: &Path) -> Result<Option<i64>, ConnectProblem> {
    use rusqlite::OpenFlags;
    let path = data_dir.join("firemode.sqlite3");
    if !path.exists() {
        return Ok(None);
    }
    let other = |e: rusqlite::Error| ConnectProblem::Other(format!("{}: {e}", path.display()));
    let conn = rusqlite::Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(other)?;
    let has_table: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'firemode_schema'",
            [],
            |r| r.get(0),
        )
        .map_err(other)?;
    if !has_table {
        return Ok(None);
    }
    conn.query_row("SELECT max(version) FROM firemode_schema", [], |r| r.get(0))
        .map_err(other)
}
