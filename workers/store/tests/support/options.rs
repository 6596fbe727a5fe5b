//! The store options every store test opens with: a small pool, 5 s timeouts.

use firemode_store::StoreOptions;
use std::path::Path;
use std::time::Duration;

/// `url` empty: SQLite in `dir`.
pub fn options(url: &str, dir: &Path) -> StoreOptions {
    StoreOptions {
        url: url.to_string(),
        pool_size: 4,
        data_dir: dir.to_path_buf(),
        connect_timeout: Duration::from_secs(5),
        lock_timeout: Duration::from_secs(5),
    }
}
