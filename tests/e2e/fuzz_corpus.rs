//! The fuzz smoke run: every file of each fuzz target's committed corpus
//! (`fuzz/corpus/<target>/`) goes through the same check the fuzz target runs
//! (`fuzz/checks/<target>.rs`, included here), so plain `cargo test` on stable exercises every
//! target and its invariants. Long runs use `cargo fuzz` (README.md, "Fuzzing").

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

mod merge {
    include!("../../fuzz/checks/merge.rs");
}

mod pointer {
    include!("../../fuzz/checks/pointer.rs");
}

mod sync_request {
    include!("../../fuzz/checks/sync_request.rs");
}

mod config {
    include!("../../fuzz/checks/config.rs");
}

mod jwt_header {
    include!("../../fuzz/checks/jwt_header.rs");
}

/// The committed corpus of one target, sorted by file name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    files
        .into_iter()
        .map(|path| {
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (path, data)
        })
        .collect()
}

/// Runs `check` on every corpus file of `target`; a broken invariant names the file and its
/// bytes (hex), ready to reproduce with `cargo fuzz run <target> <file>`.
fn replay(target: &str, check: fn(&[u8])) {
    for (path, data) in corpus(target) {
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            let hex: String = data.iter().map(|byte| format!("{byte:02x}")).collect();
            panic!(
                "fuzz target {target}: {} breaks an invariant (see the panic above); input hex: {hex}",
                path.display()
            );
        }
    }
}

#[test]
fn merge_corpus_converges() {
    replay("merge", merge::check);
}

#[test]
fn pointer_corpus_round_trips() {
    replay("pointer", pointer::check);
}

#[test]
fn sync_request_corpus_parses_within_limits() {
    replay("sync_request", sync_request::check);
}

#[test]
fn config_corpus_validates_and_round_trips() {
    replay("config", config::check);
}

#[test]
fn jwt_header_corpus_accepts_only_signed_tokens() {
    replay("jwt_header", jwt_header::check);
    // The corpus must keep exercising the accepting path: its signed tokens still verify.
    let verifier = jwt_header::verifier(jwt_header::SECRET);
    let accepted = corpus("jwt_header")
        .iter()
        .filter(|(_, data)| {
            http::HeaderValue::from_bytes(data)
                .is_ok_and(|header| verifier.verify(Some(&header)).is_ok())
        })
        .count();
    assert!(
        accepted >= 1,
        "no corpus token is accepted any more; mint a new one (see README.md, Fuzzing)"
    );
}
