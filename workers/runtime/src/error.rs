//! Why a worker process stops with an error. Each message is the step that failed, and the
//! cause follows as the error's source, so the line the supervisor logs reads
//! `binding /run/firemode/classify-0.sock: Permission denied (os error 13)`.

use firemode_catalog::CatalogError;
use firemode_config::ConfigErrors;
use firemode_store::StoreError;
use std::path::PathBuf;

/// A worker that could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("reading {}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config the supervisor wrote does not parse or validate.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kind's own start (`make_app`) failed.
    #[error(transparent)]
    App(anyhow::Error),
    #[error("removing stale {}", path.display())]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error(transparent)]
    Signals(std::io::Error),
    /// The control thread or its runtime could not be started.
    #[error(transparent)]
    ControlThread(std::io::Error),
    #[error("the control thread ended without a result")]
    ControlThreadLost,
}

/// The configured catalog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogFileError {
    #[error("the built-in catalog")]
    BuiltIn(#[source] CatalogError),
    #[error("catalog.file {file}")]
    Unreadable {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog.file {file}")]
    Invalid {
        file: String,
        #[source]
        source: CatalogError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;
    use std::io;

    /// How `run` prints an error: the message, then each cause.
    fn printed(e: impl Into<anyhow::Error>) -> String {
        format!("{:#}", e.into())
    }

    /// The same text anyhow's `context` gave before these types existed.
    fn with_context(context: &str, cause: io::Error) -> String {
        printed(Err::<(), _>(cause).context(context.to_owned()).unwrap_err())
    }

    fn denied() -> io::Error {
        io::Error::from(io::ErrorKind::PermissionDenied)
    }

    #[test]
    fn each_step_names_itself_then_its_cause() {
        let path = PathBuf::from("/run/fm/classify-0.sock");
        let cases = [
            (
                printed(WorkerError::Bind {
                    path: path.clone(),
                    source: denied(),
                }),
                with_context("binding /run/fm/classify-0.sock", denied()),
            ),
            (
                printed(WorkerError::RemoveStaleSocket {
                    path: path.clone(),
                    source: denied(),
                }),
                with_context("removing stale /run/fm/classify-0.sock", denied()),
            ),
            (
                printed(WorkerError::ReadConfig {
                    path: "/run/fm/worker-config.g1.json".into(),
                    source: denied(),
                }),
                with_context("reading /run/fm/worker-config.g1.json", denied()),
            ),
            (printed(WorkerError::Signals(denied())), printed(denied())),
            (
                printed(CatalogFileError::Unreadable {
                    file: "/etc/fm/catalog.json".into(),
                    source: denied(),
                }),
                with_context("catalog.file /etc/fm/catalog.json", denied()),
            ),
        ];
        for (now, before) in cases {
            assert_eq!(now, before);
        }
        assert_eq!(
            printed(WorkerError::Bind {
                path,
                source: denied()
            }),
            "binding /run/fm/classify-0.sock: permission denied"
        );
    }

    #[test]
    fn wrapped_errors_print_as_themselves() {
        let app = anyhow::anyhow!("no catalog").context("starting classify");
        assert_eq!(
            printed(WorkerError::App(app)),
            "starting classify: no catalog"
        );
        let config = ConfigErrors::one("worker config", "expected value at line 1 column 1");
        assert_eq!(
            printed(WorkerError::from(config.clone())),
            config.to_string()
        );
        let invalid = || CatalogError::Invalid(firemode_catalog::InvalidCatalog::NoItems);
        assert_eq!(
            printed(CatalogFileError::Invalid {
                file: "c.json".into(),
                source: invalid(),
            }),
            "catalog.file c.json: catalog is invalid: `items` is empty"
        );
        assert_eq!(
            printed(CatalogFileError::BuiltIn(invalid())),
            "the built-in catalog: catalog is invalid: `items` is empty"
        );
    }
}
