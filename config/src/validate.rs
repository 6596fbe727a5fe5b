//! Validation after parsing: what serde cannot check (ranges, addresses, combinations of
//! keys), one step per table, every refusal naming its key.

use crate::{Auth, Config, ConfigError, ConfigErrors, Database, HumanDuration, Supervisor};
use crate::{SyncConfig, Workers};
use std::net::SocketAddr;
use std::time::Duration;

/// After the drain deadline: time to SIGKILL and reap workers and exit.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// The most conflicts `sync.max_conflicts_reported` may list in one merge answer.
pub const MAX_CONFLICTS_REPORTED: u32 = 10_000;

/// The refusals found so far, in the order the steps find them.
#[derive(Default)]
struct Refusals(Vec<ConfigError>);

impl Refusals {
    fn refuse(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigError::new(key, message));
    }
}

impl Config {
    /// Checks what serde cannot: ranges, addresses, combinations of keys. Every refusal is
    /// reported, not only the first.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut out = Refusals::default();
        check_server(self, &mut out);
        check_durations(self, &mut out);
        check_supervisor(&self.supervisor, &mut out);
        check_directories(self, &mut out);
        check_workers(&self.workers, &mut out);
        check_database(&self.database, &mut out);
        check_auth(&self.auth, &mut out);
        check_sync(&self.sync, &mut out);
        if out.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(out.0))
        }
    }
}

/// The listeners are `address:port`; a body may be at least one byte.
fn check_server(c: &Config, out: &mut Refusals) {
    for (key, addr) in [
        ("server.listen", &c.server.listen),
        ("server.admin_listen", &c.server.admin_listen),
    ] {
        if addr.parse::<SocketAddr>().is_err() {
            out.refuse(
                key,
                format!("{addr:?} is not an address:port such as \"127.0.0.1:8080\""),
            );
        }
    }
    if c.server.max_body_bytes == 0 {
        out.refuse("server.max_body_bytes", "must be at least 1");
    }
}

/// Timeouts and intervals that would mean "never" or "spin" at zero.
fn check_durations(c: &Config, out: &mut Refusals) {
    for (key, d) in [
        ("server.queue_timeout", c.server.queue_timeout),
        ("server.request_timeout", c.server.request_timeout),
        ("server.header_read_timeout", c.server.header_read_timeout),
        ("supervisor.health_interval", c.supervisor.health_interval),
        ("supervisor.health_timeout", c.supervisor.health_timeout),
        ("supervisor.start_timeout", c.supervisor.start_timeout),
        ("supervisor.backoff.initial", c.supervisor.backoff.initial),
        ("supervisor.backoff.max", c.supervisor.backoff.max),
        ("catalog.refresh_interval", c.catalog.refresh_interval),
    ] {
        if d.get().is_zero() {
            out.refuse(key, "must be longer than zero");
        }
    }
}

/// The backoff is ordered, the drain and the kill grace fit the stop budget, and an
/// instance may fail at least one health check.
fn check_supervisor(sup: &Supervisor, out: &mut Refusals) {
    let b = &sup.backoff;
    if b.initial > b.max {
        out.refuse(
            "supervisor.backoff.initial",
            format!("{} is above supervisor.backoff.max ({})", b.initial, b.max),
        );
    }
    let needed = sup.drain_timeout.get() + KILL_GRACE;
    if needed > sup.stop_timeout.get() {
        out.refuse(
            "supervisor.drain_timeout",
            format!(
                "{} plus the {} kill grace is {}, over supervisor.stop_timeout ({}); lower the drain timeout or raise stop_timeout (and TimeoutStopSec= in the systemd unit with it)",
                sup.drain_timeout,
                HumanDuration(KILL_GRACE),
                HumanDuration(needed),
                sup.stop_timeout
            ),
        );
    }
    if sup.unhealthy_threshold == 0 {
        out.refuse("supervisor.unhealthy_threshold", "must be at least 1");
    }
}

/// The runtime and data directories are named.
fn check_directories(c: &Config, out: &mut Refusals) {
    if c.supervisor.runtime_dir.as_os_str().is_empty() {
        out.refuse("supervisor.runtime_dir", "must not be empty");
    }
    if c.data_dir.as_os_str().is_empty() {
        out.refuse("data_dir", "must not be empty");
    }
}

/// Each kind runs 1 to 64 instances.
fn check_workers(workers: &Workers, out: &mut Refusals) {
    for (kind, w) in [("classify", &workers.classify), ("sync", &workers.sync)] {
        if !(1..=64).contains(&w.instances) {
            out.refuse(
                &format!("workers.{kind}.instances"),
                format!("{} is out of range 1-64", w.instances),
            );
        }
    }
}

/// A pool of 1 to 1024 connections, and a URL that is PostgreSQL's or empty.
fn check_database(db: &Database, out: &mut Refusals) {
    if !(1..=1024).contains(&db.pool_size) {
        out.refuse(
            "database.pool_size",
            format!("{} is out of range 1-1024", db.pool_size),
        );
    }
    let url = db.url.trim();
    let looks_like_postgres =
        url.starts_with("postgres://") || url.starts_with("postgresql://") || url.contains('=');
    if !url.is_empty() && !looks_like_postgres {
        out.refuse(
            "database.url",
            "must be a PostgreSQL URL (postgres://user@host/db or host=... dbname=...), or empty for the embedded store",
        );
    }
}

/// A symmetric algorithm takes a long enough secret and no key file; the others need one.
fn check_auth(a: &Auth, out: &mut Refusals) {
    if a.algorithm.is_symmetric() {
        if !a.public_key_file.is_empty() {
            out.refuse(
                "auth.public_key_file",
                format!(
                    "is set but auth.algorithm is {:?}, which uses auth.jwt_secret; set the algorithm to RS256, ES256 or EdDSA to use a public key",
                    a.algorithm
                ),
            );
        }
        if !a.jwt_secret.is_empty() && a.jwt_secret.len() < 32 {
            out.refuse(
                "auth.jwt_secret",
                "is shorter than 32 bytes; use a long random secret, or leave it empty to have one generated in data_dir",
            );
        }
    } else if a.public_key_file.is_empty() {
        out.refuse(
            "auth.public_key_file",
            format!(
                "is required when auth.algorithm is {:?} (a PEM public key)",
                a.algorithm
            ),
        );
    }
}

/// Limits that would refuse every request at zero, the bound on listed conflicts, and
/// retentions that keep something.
fn check_sync(sync: &SyncConfig, out: &mut Refusals) {
    if sync.max_bundle_bytes == 0 {
        out.refuse("sync.max_bundle_bytes", "must be at least 1");
    }
    if sync.max_changes_per_batch == 0 {
        out.refuse("sync.max_changes_per_batch", "must be at least 1");
    }
    if sync.max_conflicts_reported > MAX_CONFLICTS_REPORTED {
        out.refuse(
            "sync.max_conflicts_reported",
            format!("must be at most {MAX_CONFLICTS_REPORTED} (every listed conflict carries two values; 0 lists none and still counts them)"),
        );
    }
    for (key, retention) in [
        ("sync.tombstone_retention", sync.tombstone_retention),
        ("sync.conflict_retention", sync.conflict_retention),
    ] {
        if retention.get().is_zero() {
            out.refuse(key, "must be more than 0 (e.g. \"30d\")");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Algorithm;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = Config::default();
        c.server.listen = "nowhere".into();
        c.workers.sync.instances = 0;
        c.supervisor.backoff.initial = crate::HumanDuration::from_secs(120);
        let text = c.validate().unwrap_err().to_string();
        assert!(text.contains("server.listen"), "{text}");
        assert!(text.contains("workers.sync.instances"), "{text}");
        assert!(text.contains("supervisor.backoff.initial"), "{text}");
    }

    #[test]
    fn the_drain_must_fit_the_stop_budget() {
        let mut c = Config::default();
        c.supervisor.drain_timeout = crate::HumanDuration::from_secs(88);
        let text = c.validate().unwrap_err().to_string();
        assert!(text.contains("supervisor.drain_timeout"), "{text}");
        assert!(text.contains("1m 33s") && text.contains("1m 30s"), "{text}");
        c.supervisor.stop_timeout = crate::HumanDuration::from_secs(120);
        c.validate().unwrap();
    }

    #[test]
    fn the_conflicts_listed_per_answer_are_bounded() {
        let mut c = Config::default();
        assert_eq!(c.sync.max_conflicts_reported, 100);
        c.sync.max_conflicts_reported = MAX_CONFLICTS_REPORTED + 1;
        let text = c.validate().unwrap_err().to_string();
        assert!(text.contains("sync.max_conflicts_reported"), "{text}");
        c.sync.max_conflicts_reported = 0;
        c.validate().unwrap();
    }

    #[test]
    fn every_refusal_is_reported_in_order_with_its_message() {
        let mut c = Config::default();
        c.server.listen = "nowhere".into();
        c.server.admin_listen = "x:y".into();
        c.server.max_body_bytes = 0;
        c.server.queue_timeout = crate::HumanDuration::from_secs(0);
        c.server.header_read_timeout = crate::HumanDuration::from_secs(0);
        c.supervisor.health_timeout = crate::HumanDuration::from_secs(0);
        c.supervisor.backoff.initial = crate::HumanDuration::from_secs(120);
        c.catalog.refresh_interval = crate::HumanDuration::from_secs(0);
        c.supervisor.drain_timeout = crate::HumanDuration::from_secs(100);
        c.supervisor.unhealthy_threshold = 0;
        c.supervisor.runtime_dir = "".into();
        c.data_dir = "".into();
        c.workers.classify.instances = 0;
        c.workers.sync.instances = 65;
        c.database.pool_size = 0;
        c.database.url = "mysql://x".into();
        c.auth.public_key_file = "k.pem".into();
        c.auth.jwt_secret = "short".into();
        c.sync.max_bundle_bytes = 0;
        c.sync.max_changes_per_batch = 0;
        c.sync.max_conflicts_reported = MAX_CONFLICTS_REPORTED + 1;
        c.sync.tombstone_retention = crate::HumanDuration::from_secs(0);
        c.sync.conflict_retention = crate::HumanDuration::from_secs(0);
        let text = c.validate().unwrap_err().to_string();
        let expected = [
        "config error: server.listen: \"nowhere\" is not an address:port such as \"127.0.0.1:8080\"",
        "config error: server.admin_listen: \"x:y\" is not an address:port such as \"127.0.0.1:8080\"",
        "config error: server.max_body_bytes: must be at least 1",
        "config error: server.queue_timeout: must be longer than zero",
        "config error: server.header_read_timeout: must be longer than zero",
        "config error: supervisor.health_timeout: must be longer than zero",
        "config error: catalog.refresh_interval: must be longer than zero",
        "config error: supervisor.backoff.initial: 2m is above supervisor.backoff.max (1m)",
        "config error: supervisor.drain_timeout: 1m 40s plus the 5s kill grace is 1m 45s, over supervisor.stop_timeout (1m 30s); lower the drain timeout or raise stop_timeout (and TimeoutStopSec= in the systemd unit with it)",
        "config error: supervisor.unhealthy_threshold: must be at least 1",
        "config error: supervisor.runtime_dir: must not be empty",
        "config error: data_dir: must not be empty",
        "config error: workers.classify.instances: 0 is out of range 1-64",
        "config error: workers.sync.instances: 65 is out of range 1-64",
        "config error: database.pool_size: 0 is out of range 1-1024",
        "config error: database.url: must be a PostgreSQL URL (postgres://user@host/db or host=... dbname=...), or empty for the embedded store",
        "config error: auth.public_key_file: is set but auth.algorithm is HS256, which uses auth.jwt_secret; set the algorithm to RS256, ES256 or EdDSA to use a public key",
        "config error: auth.jwt_secret: is shorter than 32 bytes; use a long random secret, or leave it empty to have one generated in data_dir",
        "config error: sync.max_bundle_bytes: must be at least 1",
        "config error: sync.max_changes_per_batch: must be at least 1",
        "config error: sync.max_conflicts_reported: must be at most 10000 (every listed conflict carries two values; 0 lists none and still counts them)",
        "config error: sync.tombstone_retention: must be more than 0 (e.g. \"30d\")",
        "config error: sync.conflict_retention: must be more than 0 (e.g. \"30d\")",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn asymmetric_algorithms_need_a_key_file() {
        let mut c = Config::default();
        c.auth.algorithm = Algorithm::RS256;
        let text = c.validate().unwrap_err().to_string();
        assert!(text.contains("auth.public_key_file"), "{text}");
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        let mut c = Config::default();
        c.server.queue_timeout = crate::HumanDuration::from_millis(250);
        c.workers.classify.env.insert("A".into(), "b".into());
        let back = Config::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }
}
