//! What a reload (SIGHUP) may read and change. A reload re-reads the file the system started
//! with; an empty, whitespace-only, unreadable or vanished file is an error, never "all
//! defaults" (which would swap the signing key and the store under running clients). Keys a
//! running process cannot switch — the store, the signing key, the listeners, the runtime
//! dir — refuse the whole reload: they need a restart (design §4).

use crate::{load_text, Config, ConfigErrors, FileText, Overrides};
use std::path::Path;

/// Keys whose change needs a restart, in the order [`Config::restart_only_changes`] reports
/// them. `data_dir` counts only while it holds the embedded store or the generated secret.
pub const RESTART_ONLY_KEYS: &[&str] = &[
    "database.url",
    "data_dir",
    "auth.algorithm",
    "auth.jwt_secret",
    "auth.public_key_file",
    "server.listen",
    "server.admin_listen",
    "supervisor.runtime_dir",
];

/// Like [`crate::load`], for a reload: the file (when the system runs with one) must be
/// readable and hold something besides whitespace.
pub fn load_for_reload(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let file = file.map(FileText::read).transpose()?;
    if let Some(f) = &file {
        if f.text.trim().is_empty() {
            return Err(ConfigErrors::one(
                "--config",
                format!(
                    "config file {} is empty; a reload never falls back to the built-in defaults (restore the file, then reload again)",
                    f.path.display()
                ),
            ));
        }
    }
    load_text(file, overrides)
}

impl Config {
    /// The keys of [`RESTART_ONLY_KEYS`] that differ between the running config (`self`) and
    /// `next`. Empty: `next` may be applied by a rolling restart.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let data_dir_matters = |c: &Config| {
            c.database.url.trim().is_empty()
                || (c.auth.algorithm.is_symmetric() && c.auth.jwt_secret.is_empty())
        };
        let (a, b) = (self, next);
        let changed = [
            a.database.url != b.database.url,
            a.data_dir != b.data_dir && (data_dir_matters(a) || data_dir_matters(b)),
            a.auth.algorithm != b.auth.algorithm,
            a.auth.jwt_secret != b.auth.jwt_secret,
            a.auth.public_key_file != b.auth.public_key_file,
            a.server.listen != b.server.listen,
            a.server.admin_listen != b.server.admin_listen,
            a.supervisor.runtime_dir != b.supervisor.runtime_dir,
        ];
        RESTART_ONLY_KEYS
            .iter()
            .zip(changed)
            .filter_map(|(key, changed)| changed.then_some(*key))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Algorithm;

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fm-reload-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("firemode.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn an_empty_or_blank_file_is_an_error_naming_the_file() {
        for (name, text) in [("empty", ""), ("blank", " \n\t\r\n")] {
            let path = temp_file(name, text);
            let err = load_for_reload(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("is empty"), "{err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }

    #[test]
    fn a_vanished_file_is_an_error() {
        let path = temp_file("vanished", "data_dir = \"/tmp/x\"\n");
        std::fs::remove_file(&path).unwrap();
        let err = load_for_reload(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_file_with_keys_loads_and_errors_still_name_the_file() {
        let path = temp_file("ok", "[workers.classify]\ninstances = 3\n");
        let c = load_for_reload(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(c.workers.classify.instances, 3);
        std::fs::write(&path, "[server]\nlisen = 1\n").unwrap();
        let err = load_for_reload(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.lisen") && err.contains("firemode.toml"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn store_key_and_listener_changes_are_named() {
        let running = Config {
            database: crate::Database {
                url: "host=db dbname=fm".into(),
                ..Default::default()
            },
            auth: crate::Auth {
                jwt_secret: "s".repeat(40),
                ..Default::default()
            },
            ..Config::default()
        };
        assert!(running.restart_only_changes(&running.clone()).is_empty());
        let mut next = running.clone();
        next.workers.classify.instances = 5;
        next.server.queue_timeout = crate::HumanDuration::from_secs(1);
        next.auth.issuer = "https://issuer".into();
        assert!(running.restart_only_changes(&next).is_empty(), "reloadable");
        // With PostgreSQL and a configured secret, data_dir holds nothing that matters.
        next.data_dir = "/elsewhere".into();
        assert!(running.restart_only_changes(&next).is_empty());

        let mut next = running.clone();
        next.database.url = String::new();
        next.auth.algorithm = Algorithm::HS512;
        next.server.admin_listen = "127.0.0.1:1".into();
        assert_eq!(
            running.restart_only_changes(&next),
            ["database.url", "auth.algorithm", "server.admin_listen"]
        );
    }

    #[test]
    fn data_dir_matters_for_the_embedded_store_and_the_generated_secret() {
        let sqlite = Config::default();
        let mut next = sqlite.clone();
        next.data_dir = "/elsewhere".into();
        assert_eq!(sqlite.restart_only_changes(&next), ["data_dir"]);

        let mut generated = Config::default();
        generated.database.url = "host=db".into();
        let mut next = generated.clone();
        next.data_dir = "/elsewhere".into();
        assert_eq!(generated.restart_only_changes(&next), ["data_dir"]);
    }
}
