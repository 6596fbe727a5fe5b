//! FireMode's configuration: one TOML file, overridden by `FIREMODE_*` environment variables
//! (nested with `__`), then by `PORT`, then by command-line flags.
//!
//! # Layout
//! * [`model`]: the tree of tables and keys, with defaults.
//! * [`HumanDuration`]: durations written as `"250ms"`, `"30s"`.
//! * [`load`]: reading, merging and validating; every error names the key it is about (and
//!   the `FIREMODE_*` variable when the value came from the environment). Relative paths
//!   in a file resolve against the file's directory; `DATABASE_URL` fills an empty
//!   `database.url`.
//! * [`Config::validate`]: what serde cannot check, one step per table.
//! * [`ConfigErrors`]: every refusal, each naming its key.
//! * [`Config::redacted`]: the effective config with secrets hidden, for `check-config` and logs.

#![forbid(unsafe_code)]

mod bytesize;
mod duration;
mod error;
pub mod model;
mod redact;
mod reload;
mod sources;
mod validate;

pub use bytesize::{ByteSize, ByteSizeError};
pub use duration::HumanDuration;
pub use error::{ConfigError, ConfigErrors, FILE_KEY};
pub use model::*;
pub use reload::{load_for_reload, RESTART_ONLY_KEYS};
pub use validate::KILL_GRACE;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use std::path::{Path, PathBuf};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/firemode/firemode.toml";

/// What the command line adds on top of the file and the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// Which file `load` reads: the named one (it must exist), else the default path when it
/// exists, else none (built-in defaults).
pub fn config_file(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            default.exists().then(|| default.to_path_buf())
        }
    }
}

/// Reads the file (if any), the `FIREMODE_*` environment and `PORT`, applies `overrides`, and
/// validates the result.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let file = file.map(FileText::read).transpose()?;
    load_text(file, overrides)
}

/// A config file's text, read once and parsed from that text (a file truncated or replaced
/// between two reads can never turn into "no file"), under the file's name for errors.
pub(crate) struct FileText {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl FileText {
    pub(crate) fn read(path: &Path) -> Result<Self, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self {
                path: path.to_path_buf(),
                text,
            }),
            Err(e) => Err(ConfigErrors::one(FILE_KEY, unreadable(path, &e))),
        }
    }
}

/// Why a config file cannot be read, and what to do about it.
fn unreadable(path: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let shown = path.display();
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("config file {shown} does not exist")
        }
        std::io::ErrorKind::PermissionDenied => {
            // Our effective uid owns /proc/self; no libc needed.
            let uid = std::fs::metadata("/proc/self")
                .map(|m| m.uid().to_string())
                .unwrap_or_else(|_| "unknown".into());
            let file = std::fs::metadata(path)
                .map(|m| {
                    format!(
                        " (the file is mode {:04o}, owner uid {} gid {})",
                        m.mode() & 0o7777,
                        m.uid(),
                        m.gid()
                    )
                })
                .unwrap_or_default();
            format!(
                "config file {shown} cannot be read by uid {uid}: {e}{file}. Make the file (and its directories) readable by the user FireMode runs as, e.g. `chmod 0644 {shown}`, and keep secrets out of it: put them in the environment (FIREMODE_AUTH__JWT_SECRET, DATABASE_URL; with systemd an EnvironmentFile= that only root reads)"
            )
        }
        _ if path.is_dir() => format!("config file {shown} is a directory, not a file"),
        _ => format!("cannot read config file {shown}: {e}"),
    }
}

impl Provider for FileText {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

pub(crate) fn load_text(
    file: Option<FileText>,
    overrides: &Overrides,
) -> Result<Config, ConfigErrors> {
    let path = file.as_ref().map(|f| f.path.clone());
    let mut figment = Figment::new();
    if let Some(file) = file {
        figment = figment.merge(file);
    }
    figment = figment.merge(Env::prefixed(sources::ENV_PREFIX).split("__"));
    let mut config: Config = figment.extract().map_err(ConfigErrors::from_figment)?;
    if let Some(path) = &path {
        sources::resolve_file_paths(&mut config, &figment, path);
    }
    let database_url_from_env = sources::apply_database_url(&mut config);

    if let Ok(port) = std::env::var("PORT") {
        let port: u16 = port.trim().parse().map_err(|_| {
            ConfigErrors::one(
                "PORT",
                format!("environment variable PORT={port:?} is not a port number (1-65535)"),
            )
        })?;
        config.server.listen = format!("0.0.0.0:{port}");
    }
    if let Some(listen) = &overrides.listen {
        config.server.listen.clone_from(listen);
    }
    if let Some(admin) = &overrides.admin_listen {
        config.server.admin_listen.clone_from(admin);
    }
    if let Some(dir) = &overrides.data_dir {
        config.data_dir.clone_from(dir);
    }
    config
        .validate()
        .map_err(|e| sources::name_env_sources(e, &figment, database_url_from_env))?;
    Ok(config)
}

impl Config {
    /// Parses a config written by [`Config::to_json`] (how the supervisor hands the effective
    /// config to its workers).
    pub fn from_json(text: &str) -> Result<Config, ConfigErrors> {
        let config: Config = serde_json::from_str(text)
            .map_err(|e| ConfigErrors::one("worker config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        // A tree of plain structs, strings and numbers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The effective config as TOML, for `check-config`. Call it on [`Config::redacted`].
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn worker(&self, kind: &str) -> Option<&WorkerKind> {
        match kind {
            "classify" => Some(&self.workers.classify),
            "sync" => Some(&self.workers.sync),
            _ => None,
        }
    }
}
