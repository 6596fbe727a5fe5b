//! `firemode-classify`: the classify worker process. The routes are the library's
//! [`ClassifyApp`]; the worker runtime runs everything else.

#![forbid(unsafe_code)]

use firemode_classify::ClassifyApp;
use std::process::ExitCode;

/// mimalloc rather than glibc malloc: the request path allocates per request (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    firemode_worker::run("classify", ClassifyApp::start)
}
