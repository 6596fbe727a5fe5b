//! Following the store's current catalog: a worker builds what it serves from a catalog
//! version (an index, a rendered JSON) and rebuilds it when another version becomes
//! current. Versions are immutable in the store, so a check of the current version's name
//! every `catalog.refresh_interval` is all it takes to stay correct.

use crate::CatalogFileError;
use firemode_catalog::Catalog;
use firemode_store::{Store, StoreError, StoredCatalog};
use std::time::Duration;

/// The configured catalog: `catalog.file`, or the shipped sample when it is empty.
pub fn configured_catalog(file: &str) -> Result<Catalog, CatalogFileError> {
    if file.is_empty() {
        return Catalog::from_json(firemode_catalog::SAMPLE).map_err(CatalogFileError::BuiltIn);
    }
    let text = std::fs::read_to_string(file).map_err(|source| CatalogFileError::Unreadable {
        file: file.to_owned(),
        source,
    })?;
    Catalog::from_json(&text).map_err(|source| CatalogFileError::Invalid {
        file: file.to_owned(),
        source,
    })
}

/// Installs `configured` into the store (waiting while the store is down), then follows the
/// store's current catalog like [`follow_current_catalog`]. Every worker that serves the
/// catalog does this, so none depends on another kind having started first.
pub async fn install_and_follow(
    store: Store,
    configured: Catalog,
    refresh: Duration,
    on_change: impl FnMut(StoredCatalog) + Send + 'static,
) {
    loop {
        match store.install_catalog(&configured).await {
            Ok(()) => break,
            Err(StoreError::Conflict(msg)) => {
                // An operator error that a restart will not fix: say so and exit; the
                // supervisor's backoff keeps the retry rate low.
                tracing::error!(error = %msg, "cannot install the catalog");
                std::process::exit(2);
            }
            Err(e) => {
                tracing::debug!(error = %e, "catalog install waits for the store");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    tracing::info!(version = %configured.version, "catalog installed");
    follow_current_catalog(store, refresh, on_change).await;
}

/// Calls `on_change` with the current catalog now (once the store answers) and whenever the
/// current version changes. Runs until the process ends.
pub async fn follow_current_catalog(
    store: Store,
    refresh: Duration,
    mut on_change: impl FnMut(StoredCatalog) + Send + 'static,
) {
    let mut serving: Option<String> = None;
    loop {
        match store.current_catalog_version().await {
            Ok(Some(v)) if Some(&v) != serving.as_ref() => match store.current_catalog().await {
                Ok(Some(stored)) => {
                    tracing::info!(version = %stored.version, "serving catalog");
                    serving = Some(stored.version.clone());
                    on_change(stored);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot load the current catalog"),
            },
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "catalog version check failed"),
        }
        // Poll quickly until there is a catalog at all, then at the configured pace.
        let pause = if serving.is_some() {
            refresh
        } else {
            Duration::from_millis(250).min(refresh)
        };
        tokio::time::sleep(pause).await;
    }
}
