//! The black-box test harness: starts a real `firemode` (which starts real worker
//! processes) in a temporary directory, talks HTTP to it over TCP, and creates a throwaway
//! PostgreSQL database per test when one is reachable.
//!
//! Binaries: `cargo test` does not build other packages' binaries, so the harness runs
//! `cargo build --bins` once per test process (a no-op when they are fresh) and uses
//! `target/debug`. Set `FM_TEST_BIN_DIR` to test other binaries (no build then).
//!
//! PostgreSQL: `TEST_DATABASE_URL` (default `host=127.0.0.1 user=postgres dbname=postgres`)
//! is the server to create per-test databases on. Unreachable: the PostgreSQL tests fail
//! when `CI` is set, and skip with a loud message otherwise.

#![forbid(unsafe_code)]

mod cluster;
mod http;
mod otlp;
mod pg;
mod system;

pub use cluster::ThrowawayCluster;
pub use http::{request, Reply};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pg::{pg_database, PgDatabase};
pub use system::{bin_dir, SystemOptions, TestSystem};

/// The HS256 secret test configs use (`auth.jwt_secret`).
pub const TEST_SECRET: &str = "firemode-test-secret-0123456789abcdef";

/// A token signed with [`TEST_SECRET`].
pub fn token(sub: &str, org: Option<&str>) -> String {
    token_with(sub, org, 3600, TEST_SECRET.as_bytes())
}

/// A token with a chosen lifetime (negative: already expired) and key.
pub fn token_with(sub: &str, org: Option<&str>, ttl_secs: i64, secret: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut claims = serde_json::json!({"sub": sub, "exp": now + ttl_secs});
    if let Some(org) = org {
        claims["org"] = org.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("signing a test token")
}

/// A token with exactly these claims, signed with [`TEST_SECRET`].
pub fn token_claims(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .expect("signing a test token")
}

/// Seconds since the epoch, for claims.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The settings that make `kind`'s workers the test fixture worker
/// (`tests/fixtures/fixture_worker.py`, run by `python3`) with `extra` flags: its
/// `workers.<kind>.command` and `workers.<kind>.args`.
pub fn fixture_worker(kind: &str, extra: &[&str]) -> Vec<(&'static str, toml::Value)> {
    let (command, args) = match kind {
        "classify" => ("workers.classify.command", "workers.classify.args"),
        "sync" => ("workers.sync.command", "workers.sync.args"),
        other => panic!("no worker kind {other:?}"),
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fixture_worker.py");
    let mut argv = vec![toml::Value::from(script.display().to_string())];
    argv.extend(extra.iter().map(|s| toml::Value::from(*s)));
    vec![
        (command, "python3".into()),
        (args, toml::Value::Array(argv)),
    ]
}

/// Whether a process is gone (no such pid, or a zombie waiting for its reaper).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            .unwrap_or(false),
    }
}
