//! Where each value came from, and what that means for it: relative paths written in a
//! config file resolve against that file's directory (paths from `FIREMODE_*`, flags and the
//! built-in defaults resolve against the current directory, as any command-line path does);
//! `DATABASE_URL` fills `database.url` when nothing else set it; an error about a value that
//! came from the environment names the variable that carried it.

use crate::{Config, ConfigError, ConfigErrors};
use figment::{Figment, Source};
use std::path::{Component, Path, PathBuf};

/// The prefix of FireMode's environment variables.
pub(crate) const ENV_PREFIX: &str = "FIREMODE_";

/// Keys whose value is a secret: an error naming their variable never prints the value.
const SECRET_KEYS: &[&str] = &["auth.jwt_secret", "database.url"];

/// Makes every relative path that the config file set relative to the file's directory.
pub(crate) fn resolve_file_paths(config: &mut Config, figment: &Figment, file: &Path) {
    let base = file.parent().unwrap_or(Path::new(""));
    let from_file = |key: &str| {
        figment
            .find_metadata(key)
            .and_then(|m| m.source.as_ref())
            .is_some_and(|s| matches!(s, Source::File(f) if f == file))
    };
    if from_file("data_dir") {
        config.data_dir = against(base, &config.data_dir);
    }
    if from_file("supervisor.runtime_dir") {
        config.supervisor.runtime_dir = against(base, &config.supervisor.runtime_dir);
    }
    for (key, value) in [
        ("catalog.file", &mut config.catalog.file),
        ("auth.public_key_file", &mut config.auth.public_key_file),
    ] {
        if !value.is_empty() && from_file(key) {
            *value = against(base, Path::new(value.as_str()))
                .display()
                .to_string();
        }
    }
    for (key, w) in [
        ("workers.classify.command", &mut config.workers.classify),
        ("workers.sync.command", &mut config.workers.sync),
    ] {
        // A bare program name is looked up in PATH; only a name with a `/` is a path.
        if w.command.contains('/') && from_file(key) {
            w.command = against(base, Path::new(&w.command)).display().to_string();
        }
    }
}

/// `path` resolved against `base` when relative, without `.` components
/// (`config` + `./data` → `config/data`).
fn against(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || base.as_os_str().is_empty() {
        return path.to_path_buf();
    }
    let joined: PathBuf = base
        .join(path)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if joined.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        joined
    }
}

/// Fills an unset (empty) `database.url` from `DATABASE_URL` (the convention of Replit, Heroku
/// and most hosts). Returns whether it did, so errors can name the variable.
pub(crate) fn apply_database_url(config: &mut Config) -> bool {
    if !config.database.url.trim().is_empty() {
        return false;
    }
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            config.database.url = url;
            true
        }
        _ => false,
    }
}

/// The `FIREMODE_*` variable that carries `key` (dotted), with its value for messages
/// (secrets redacted).
pub(crate) fn env_var_for(key: &str) -> Option<String> {
    let (name, value) = std::env::vars().find(|(name, _)| {
        name.len() > ENV_PREFIX.len()
            && name.is_char_boundary(ENV_PREFIX.len())
            && name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
            && name[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .split("__")
                .eq(key.split('.'))
    })?;
    let shown = if SECRET_KEYS.contains(&key) {
        "<redacted>".to_string()
    } else {
        format!("{value:?}")
    };
    Some(format!("{name}={shown}"))
}

/// Validation errors about values that came from the environment name the variable:
/// `FIREMODE_SERVER__LISTEN="x": server.listen: …`, `DATABASE_URL: database.url: …`.
pub(crate) fn name_env_sources(
    errors: ConfigErrors,
    figment: &Figment,
    database_url_from_env: bool,
) -> ConfigErrors {
    let from_env = |key: &str| {
        figment
            .find_metadata(key)
            .is_some_and(|m| m.source.is_none() && m.name.contains("environment"))
    };
    ConfigErrors(
        errors
            .0
            .into_iter()
            .map(|e| {
                let var = if e.key == "database.url" && database_url_from_env {
                    Some("DATABASE_URL".to_string())
                } else if from_env(&e.key) {
                    env_var_for(&e.key)
                } else {
                    None
                };
                match var {
                    Some(var) => ConfigError {
                        key: format!("{var}: {}", e.key),
                        message: e.message,
                    },
                    None => e,
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::against;
    use std::path::Path;

    #[test]
    fn relative_paths_join_the_file_directory() {
        let p = |b: &str, x: &str| against(Path::new(b), Path::new(x)).display().to_string();
        assert_eq!(p("config", "./data"), "config/data");
        assert_eq!(p("/srv/fm", "run"), "/srv/fm/run");
        assert_eq!(p("/srv/fm", "../x"), "/srv/fm/../x");
        assert_eq!(p("/srv/fm", "/abs"), "/abs");
        assert_eq!(p("", "./data"), "./data");
        assert_eq!(p(".", "."), ".");
    }
}
