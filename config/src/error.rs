//! The error every config operation returns: one or more [`ConfigError`]s, each naming the
//! key it is about (and the `FIREMODE_*` variable when the value came from the environment).

use std::fmt;

/// The key of errors about the config file itself (missing, unreadable, empty).
pub const FILE_KEY: &str = "--config";

/// One or more configuration errors, each naming the key it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One refused key: `config error: <key>: <message>`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config error: {key}: {message}")]
pub struct ConfigError {
    /// Dotted key path (`server.listen`), or the variable / flag that carried the value.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl ConfigErrors {
    pub fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![ConfigError::new(key, message)])
    }

    pub(crate) fn from_figment(err: figment::Error) -> Self {
        Self(err.into_iter().map(figment_error).collect())
    }

    /// Whether every error is about the config file itself (missing, unreadable), not a key.
    pub fn is_about_the_file(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|e| e.key == FILE_KEY)
    }
}

/// One error a line.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

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
