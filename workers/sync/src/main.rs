//! `firemode-sync`: the sync worker binary. A one-shot command (`--check-store`,
//! `--backup FILE`) when the first argument names one, else a worker serving
//! [`firemode_sync::SyncApp`] under the worker runtime. Everything else is in the library.

#![forbid(unsafe_code)]

use firemode_sync::{Command, SyncApp};
use std::process::ExitCode;

// The system allocator (glibc malloc), not mimalloc as the supervisor and classify use: the
// sync worker's requests are store-bound, and on them mimalloc bought no speed but kept what
// large merges and catch-ups had freed (a 20,000-path session: RSS 72 MiB against 31 after
// the merges, +60 MiB against +14 for eight concurrent 4,000-path catch-ups; BENCHMARKS.md).

fn main() -> ExitCode {
    match Command::from_args(std::env::args().skip(1)) {
        Some(command) => command.run(),
        None => firemode_worker::run("sync", SyncApp::start),
    }
}
