//! Validation after parsing, and the error type that names the offending key.

use crate::Config;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// After the drain deadline: time to SIGKILL and reap workers and exit.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// The most conflicts `sync.max_conflicts_reported` may list in one merge answer.
pub const MAX_CONFLICTS_REPORTED: u32 = 10_000;

/// One or more configuration errors, each naming the key it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted key path (`server.listen`), or the variable / flag that carried the value.
    pub key: String,
    pub message: String,
}

impl ConfigErrors {
    pub fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![ConfigError {
            key: key.into(),
            message: message.into(),
        }])
    }

    pub(crate) fn from_figment(err: figment::Error) -> Self {
        Self(err.into_iter().map(figment_error).collect())
    }

    /// Whether every error is about the config file itself (missing, unreadable), not a key.
    pub fn is_about_the_file(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|e| e.key == FILE_KEY)
    }
}

/// The key of errors about the config file itself (missing, unreadable, empty).
pub const FILE_KEY: &str = "--config";

/// One figment error, under its dotted key; a value from the environment names its variable.
fn figment_error(e: figment::Error) -> ConfigError {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind {
        // figment puts the unknown field in the path itself for some providers.
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = if path.is_empty() {
        "(top level)".to_string()
    } else {
        path.join(".")
    };
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.source.is_none() && m.name.contains("environment"));
    let var = from_env
        .then(|| crate::sources::env_var_for(&key))
        .flatten();
    let source = match (&var, e.metadata.as_ref()) {
        (Some(_), _) | (None, None) => String::new(),
        (None, Some(m)) => match &m.source {
            Some(src) => format!(" (in {src})"),
            None => format!(" (from {})", m.name),
        },
    };
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => format!(
            "unknown key `{field}`; expected one of: {}",
            expected.join(", ")
        ),
        kind => kind.to_string(),
    };
    ConfigError {
        key: match var {
            Some(var) => format!("{var}: {key}"),
            None => key,
        },
        message: format!("{message}{source}"),
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config error: {}: {}", e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Checks what serde cannot: ranges, addresses, combinations of keys.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            errors.push(ConfigError {
                key: key.into(),
                message,
            })
        };
        for (key, addr) in [
            ("server.listen", &self.server.listen),
            ("server.admin_listen", &self.server.admin_listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                err(
                    key,
                    format!("{addr:?} is not an address:port such as \"127.0.0.1:8080\""),
                );
            }
        }
        if self.server.max_body_bytes == 0 {
            err("server.max_body_bytes", "must be at least 1".into());
        }
        for (key, d) in [
            ("server.queue_timeout", self.server.queue_timeout),
            ("server.request_timeout", self.server.request_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            (
                "supervisor.health_interval",
                self.supervisor.health_interval,
            ),
            ("supervisor.health_timeout", self.supervisor.health_timeout),
            ("supervisor.start_timeout", self.supervisor.start_timeout),
            (
                "supervisor.backoff.initial",
                self.supervisor.backoff.initial,
            ),
            ("supervisor.backoff.max", self.supervisor.backoff.max),
            ("catalog.refresh_interval", self.catalog.refresh_interval),
        ] {
            if d.get().is_zero() {
                err(key, "must be longer than zero".into());
            }
        }
        let b = &self.supervisor.backoff;
        if b.initial > b.max {
            err(
                "supervisor.backoff.initial",
                format!("{} is above supervisor.backoff.max ({})", b.initial, b.max),
            );
        }
        let sup = &self.supervisor;
        let needed = sup.drain_timeout.get() + KILL_GRACE;
        if needed > sup.stop_timeout.get() {
            err(
                "supervisor.drain_timeout",
                format!(
                    "{} plus the {} kill grace is {}, over supervisor.stop_timeout ({}); lower the drain timeout or raise stop_timeout (and TimeoutStopSec= in the systemd unit with it)",
                    sup.drain_timeout,
                    crate::HumanDuration(KILL_GRACE),
                    crate::HumanDuration(needed),
                    sup.stop_timeout
                ),
            );
        }
        if self.supervisor.unhealthy_threshold == 0 {
            err(
                "supervisor.unhealthy_threshold",
                "must be at least 1".into(),
            );
        }
        if self.supervisor.runtime_dir.as_os_str().is_empty() {
            err("supervisor.runtime_dir", "must not be empty".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            err("data_dir", "must not be empty".into());
        }
        for (kind, w) in [
            ("classify", &self.workers.classify),
            ("sync", &self.workers.sync),
        ] {
            if !(1..=64).contains(&w.instances) {
                err(
                    &format!("workers.{kind}.instances"),
                    format!("{} is out of range 1-64", w.instances),
                );
            }
        }
        if !(1..=1024).contains(&self.database.pool_size) {
            err(
                "database.pool_size",
                format!("{} is out of range 1-1024", self.database.pool_size),
            );
        }
        let url = self.database.url.trim();
        let looks_like_postgres =
            url.starts_with("postgres://") || url.starts_with("postgresql://") || url.contains('=');
        if !url.is_empty() && !looks_like_postgres {
            err(
                "database.url",
                "must be a PostgreSQL URL (postgres://user@host/db or host=... dbname=...), or empty for the embedded store".into(),
            );
        }
        let a = &self.auth;
        if a.algorithm.is_symmetric() {
            if !a.public_key_file.is_empty() {
                err(
                    "auth.public_key_file",
                    format!(
                        "is set but auth.algorithm is {:?}, which uses auth.jwt_secret; set the algorithm to RS256, ES256 or EdDSA to use a public key",
                        a.algorithm
                    ),
                );
            }
            if !a.jwt_secret.is_empty() && a.jwt_secret.len() < 32 {
                err(
                    "auth.jwt_secret",
                    "is shorter than 32 bytes; use a long random secret, or leave it empty to have one generated in data_dir".into(),
                );
            }
        } else if a.public_key_file.is_empty() {
            err(
                "auth.public_key_file",
                format!(
                    "is required when auth.algorithm is {:?} (a PEM public key)",
                    a.algorithm
                ),
            );
        }
        if self.sync.max_bundle_bytes == 0 {
            err("sync.max_bundle_bytes", "must be at least 1".into());
        }
        if self.sync.max_changes_per_batch == 0 {
            err("sync.max_changes_per_batch", "must be at least 1".into());
        }
        if self.sync.max_conflicts_reported > MAX_CONFLICTS_REPORTED {
            err(
                "sync.max_conflicts_reported",
                format!("must be at most {MAX_CONFLICTS_REPORTED} (every listed conflict carries two values; 0 lists none and still counts them)"),
            );
        }
        for (key, retention) in [
            (
                "sync.tombstone_retention",
                self.sync.tombstone_retention.get(),
            ),
            (
                "sync.conflict_retention",
                self.sync.conflict_retention.get(),
            ),
        ] {
            if retention.is_zero() {
                err(key, "must be more than 0 (e.g. \"30d\")".into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
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
