//! FireMode's configuration: one TOML file, overridden by `FIREMODE_*` environment variables
//! (nested with `__`), then by `PORT`, then by command-line flags.
//!
//! # Layout
//! * [`model`]: the tree of tables and keys, with defaults.
//! * [`HumanDuration`]: durations written as `"250ms"`, `"30s"`.
//! * [`load`]: reading, merging and validating; every error names the key it is about.
//! * [`Config::redacted`]: the effective config with secrets hidden, for `check-config` and logs.

mod bytesize;
mod duration;
pub mod model;
mod redact;
mod reload;
mod validate;

pub use bytesize::ByteSize;
pub use duration::HumanDuration;
pub use model::*;
pub use reload::{load_for_reload, RESTART_ONLY_KEYS};
pub use validate::{ConfigErrors, KILL_GRACE};

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
        if !path.is_file() {
            return Err(ConfigErrors::one(
                "--config",
                format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(
                "--config",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
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
    let mut figment = Figment::new();
    if let Some(file) = file {
        figment = figment.merge(file);
    }
    figment = figment.merge(Env::prefixed("FIREMODE_").split("__"));
    let mut config: Config = figment.extract().map_err(ConfigErrors::from_figment)?;

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
    config.validate()?;
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
