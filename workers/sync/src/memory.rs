//! Giving back to the system the memory a large read or merge freed.
//!
//! The sync worker runs on glibc's allocator, which keeps what the program frees in its
//! arenas and returns only the free top of each: after a whole read of 100,000 paths the
//! worker stayed at ~105 MiB of RSS with a live heap of a few MiB (design §6: each worker
//! < 40 MiB). Work that held many registers says so ([`freed_much`]); a task started with the
//! worker ([`release_after_large_work`]) then asks glibc, once such work has stopped for
//! [`QUIET_SECONDS`], to hand the free pages back (`malloc_trim(0)`: 105 → 41 MiB).
//!
//! Not after every large read: a trim walks every arena under its lock and the next read
//! faults the pages in again (whole reads of 20,000 paths every 0.3 s: +14 % worker CPU a read
//! when trimming after each). While large work goes on, its memory is in use anyway; what
//! matters is what the worker keeps once the burst is over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Work that held at least this many registers counts as large (a few MiB of heap).
pub const LARGE_WORK_REGISTERS: usize = 4096;

/// How often the release task looks for large work that ended.
const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// Looks of the release task without new large work before it trims.
pub const QUIET_SECONDS: u32 = 2;

/// Set when large work freed its memory; cleared by the release task.
static FREED_MUCH: AtomicBool = AtomicBool::new(false);

/// Says that work holding `registers` registers has ended (or is about to): if that is
/// [`LARGE_WORK_REGISTERS`] or more, the release task trims once such work has stopped.
pub fn freed_much(registers: usize) {
    if registers >= LARGE_WORK_REGISTERS {
        FREED_MUCH.store(true, Ordering::Relaxed);
    }
}

/// Runs for the life of the worker: after large work, returns the allocator's free pages.
pub async fn release_after_large_work() {
    let mut every = tokio::time::interval(RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Looks since the last large work ended, while a trim is owed.
    let mut quiet: Option<u32> = None;
    loop {
        every.tick().await;
        quiet = match (FREED_MUCH.swap(false, Ordering::Relaxed), quiet) {
            (true, _) => Some(0),
            (false, Some(looks)) if looks + 1 >= QUIET_SECONDS => {
                // A trim of a large heap takes milliseconds: off the request threads.
                let _ = tokio::task::spawn_blocking(release_free_pages).await;
                None
            }
            (false, owed) => owed.map(|looks| looks + 1),
        };
    }
}

/// Asks the allocator to return every arena's free pages to the system; whether it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and touches only glibc's own free lists, which
    // it locks arena by arena as every allocator call does.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl, other systems) return large blocks themselves, or offer no call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() -> bool {
    false
}
