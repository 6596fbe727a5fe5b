//! What this build is: the version and the git commit every FireMode binary reports in
//! `--version`, its startup log line and `firemode_build_info`. The commit is computed once,
//! at build time, by this crate's `build.rs` (`FIREMODE_COMMIT` overrides it; "unknown"
//! outside git).

/// The FireMode version (all crates of the workspace are versioned together).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binaries were built from (12 hex digits), or "unknown".
pub const COMMIT: &str = env!("FIREMODE_COMMIT");

/// What `--version` prints after the program name: `0.1.0 (commit 0123456789ab)`.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FIREMODE_COMMIT"),
    ")"
);

/// Publishes `firemode_build_info{version,commit} 1`.
pub fn record() {
    metrics::describe_gauge!(
        "firemode_build_info",
        "Always 1; the labels say which version and commit this process runs"
    );
    metrics::gauge!("firemode_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
}
