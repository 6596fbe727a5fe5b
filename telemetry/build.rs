//! Computes the git commit the binaries report (`--version`, `firemode_build_info`, the
//! startup line) once, for every FireMode binary: `FIREMODE_COMMIT` when set (builds outside
//! git, packagers), else `git rev-parse --short=12 HEAD`, else "unknown".
//!
//! Cargo reruns this only when `FIREMODE_COMMIT` changes or when HEAD moves (the HEAD file
//! and the branch's ref, found through `git rev-parse --git-path`, which also works in a
//! git worktree where `.git` is a file). No "-dirty" suffix: knowing whether the tree has
//! changes would mean rerunning on every source edit, rebuilding every crate above this one.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Asks cargo to rerun when this git file changes. A path that does not exist would make
/// cargo rerun on every build, so a missing file (a branch ref still packed) is watched
/// through its folder, where it will appear; with `only_if_present`, a missing file is not
/// watched at all (`packed-refs`, whose folder is `.git` itself: watching that would rerun
/// on every git command, and rebuild every crate above this one).
fn watch(git_path: &str, only_if_present: bool) {
    let Some(path) = git(&[
        "rev-parse",
        "--path-format=absolute",
        "--git-path",
        git_path,
    ]) else {
        return;
    };
    let path = Path::new(&path);
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    } else if let Some(dir) = path.parent().filter(|d| d.exists() && !only_if_present) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=FIREMODE_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let from_env = std::env::var("FIREMODE_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    let commit = match from_env {
        Some(c) => c,
        None => {
            watch("HEAD", false);
            if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&reference, false);
                watch("packed-refs", true);
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=FIREMODE_COMMIT={commit}");
}
