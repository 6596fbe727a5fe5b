//! `firemode-sync`: the sync worker binary. A one-shot command (`--check-store`,
//! `--backup FILE`) when the first argument names one, else a worker serving
//! [`firemode_sync::SyncApp`] under the worker runtime. Everything else is in the library.

#![forbid(unsafe_code)]

use firemode_sync::{Command, SyncApp};
use std::process::ExitCode;

/// mimalloc rather than glibc malloc: the request path allocates per request (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Command::from_args(std::env::args().skip(1)) {
        Some(command) => command.run(),
        None => firemode_worker::run("sync", SyncApp::start),
    }
}
