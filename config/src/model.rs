//! The configuration tree: one struct per TOML table, every key with its default.
//!
//! Keys listed in the product brief (design §4) are a contract: add keys freely, rename none.
//! Every struct denies unknown fields, so a misspelt key is an error that names it.

use crate::{ByteSize, HumanDuration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The whole effective configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Embedded store and generated secret live here.
    pub data_dir: PathBuf,
    pub server: Server,
    pub supervisor: Supervisor,
    pub workers: Workers,
    pub database: Database,
    pub auth: Auth,
    pub sync: SyncConfig,
    pub catalog: Catalog,
    pub telemetry: Telemetry,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            server: Server::default(),
            supervisor: Supervisor::default(),
            workers: Workers::default(),
            database: Database::default(),
            auth: Auth::default(),
            sync: SyncConfig::default(),
            catalog: Catalog::default(),
            telemetry: Telemetry::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Front listener; the `PORT` environment variable overrides it (binding 0.0.0.0).
    pub listen: String,
    /// Admin listener: /healthz /readyz /metrics /status.
    pub admin_listen: String,
    pub max_body_bytes: u64,
    /// How long a request waits for a ready instance before 503.
    pub queue_timeout: HumanDuration,
    /// Budget for one request through the front, until the response head.
    pub request_timeout: HumanDuration,
    /// How long a client may take to send a request's headers (slowloris guard).
    pub header_read_timeout: HumanDuration,
    /// Workers dying with the same request in flight this many times (within 10 minutes)
    /// make the front refuse that request; 0: off.
    pub poison_threshold: u32,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 1_048_576,
            queue_timeout: HumanDuration::from_secs(5),
            request_timeout: HumanDuration::from_secs(30),
            header_read_timeout: HumanDuration::from_secs(10),
            poison_threshold: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Supervisor {
    /// Worker sockets (directory mode 0700).
    pub runtime_dir: PathBuf,
    pub drain_timeout: HumanDuration,
    pub health_interval: HumanDuration,
    pub health_timeout: HumanDuration,
    pub unhealthy_threshold: u32,
    /// Real requests failing in a row at one instance (connection errors, timeouts, 500/502/504)
    /// before it is taken out of rotation and replaced, even if it passes `/healthz`; 0: off.
    pub traffic_failure_threshold: u32,
    /// How long a new instance may take to pass its first health check.
    pub start_timeout: HumanDuration,
    /// The outer budget for a stop (systemd's `TimeoutStopSec`): the drain and the kill grace
    /// must fit inside it.
    pub stop_timeout: HumanDuration,
    pub backoff: Backoff,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self {
            runtime_dir: PathBuf::from("./run"),
            drain_timeout: HumanDuration::from_secs(30),
            health_interval: HumanDuration::from_secs(1),
            health_timeout: HumanDuration::from_millis(500),
            unhealthy_threshold: 3,
            traffic_failure_threshold: 5,
            start_timeout: HumanDuration::from_secs(30),
            stop_timeout: HumanDuration::from_secs(90),
            backoff: Backoff::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    pub initial: HumanDuration,
    pub max: HumanDuration,
    /// Healthy uptime after which the restart counter goes back to zero.
    pub reset_after: HumanDuration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: HumanDuration::from_millis(100),
            max: HumanDuration::from_secs(60),
            reset_after: HumanDuration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workers {
    pub classify: WorkerKind,
    pub sync: WorkerKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerKind {
    pub instances: u32,
    /// Program to run instead of the worker binary found beside `firemode`.
    pub command: String,
    /// Extra arguments given to `command` before FireMode's own.
    pub args: Vec<String>,
    /// Extra environment for the worker processes.
    pub env: BTreeMap<String, String>,
    /// Replace an instance (rolling, never mid-request) after it served this many requests;
    /// 0: never.
    pub max_requests: u64,
    /// Replace an instance whose resident memory reaches this size; 0: never.
    pub max_rss: ByteSize,
}

impl Default for WorkerKind {
    fn default() -> Self {
        Self {
            instances: 2,
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            max_requests: 0,
            max_rss: ByteSize(0),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    /// Empty: embedded SQLite in `data_dir`. Otherwise a PostgreSQL URL.
    pub url: String,
    pub pool_size: u32,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 16,
        }
    }
}

/// JWT algorithms the front accepts; the token header never chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    ES256,
    EdDSA,
}

impl Algorithm {
    pub fn is_symmetric(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub algorithm: Algorithm,
    /// Empty and no key file: a secret is generated into `data_dir`.
    pub jwt_secret: String,
    /// PEM public key for RS256 / ES256 / EdDSA.
    pub public_key_file: String,
    /// Checked when set.
    pub issuer: String,
    /// Checked when set.
    pub audience: String,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::HS256,
            jwt_secret: String::new(),
            public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
        }
    }
}

/// The `[sync]` table. Not named `Sync`: through `firemode_config::*` that would shadow the
/// marker trait.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    pub idempotency_ttl: HumanDuration,
    pub max_clock_skew: HumanDuration,
    pub max_bundle_bytes: u64,
    pub max_changes_per_batch: u32,
    /// At most this many conflicts are listed in a merge answer (`conflicts_total` counts
    /// them all), so one batch cannot make an answer of millions of pairs.
    pub max_conflicts_reported: u32,
    /// Tombstones older than this may be compacted (design §3). Accepted and checked now so
    /// a config written from the brief loads; compaction itself is not built yet.
    pub tombstone_retention: HumanDuration,
    /// How long the conflict journal keeps a conflict (design §3). Accepted and checked now;
    /// the journal itself is not built yet.
    pub conflict_retention: HumanDuration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            idempotency_ttl: HumanDuration::from_secs(24 * 3600),
            max_clock_skew: HumanDuration::from_secs(300),
            max_bundle_bytes: 52_428_800,
            max_changes_per_batch: 1000,
            max_conflicts_reported: 100,
            tombstone_retention: HumanDuration::from_secs(30 * 24 * 3600),
            conflict_retention: HumanDuration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Catalog {
    /// Empty: the sample catalog shipped with FireMode (`config/catalog.json`).
    pub file: String,
    /// How often a classify worker checks the store for a newer catalog version.
    pub refresh_interval: HumanDuration,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            file: String::new(),
            refresh_interval: HumanDuration::from_secs(5),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    pub log_format: LogFormat,
    pub slow_request_threshold: HumanDuration,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` wins when set.
    pub otlp_endpoint: String,
    /// One info line per front request (target `firemode::access`): method, route
    /// template, status, duration, request id, bytes out. Applied on reload.
    pub access_log: bool,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Auto,
            slow_request_threshold: HumanDuration::from_millis(300),
            otlp_endpoint: String::new(),
            access_log: false,
        }
    }
}
