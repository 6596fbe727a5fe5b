//! Giving back to the system the memory a large read or merge freed.
//!
//! The sync worker runs on glibc's allocator, which keeps what the program frees in its
//! arenas and returns only the free top of each: after a whole read of 100,000 paths the
//! worker stayed at ~105 MiB of RSS with a live heap of a few MiB (design §6: each worker
//! < 40 MiB). Work that held many registers says so ([`freed_much`]); a task started with the
//! worker ([`release_after_large_work`]) then asks glibc once, within a second, to hand the
//! free pages back (`malloc_trim(0)`: 105 → 40 MiB). Bursts are coalesced: one trim a second
//! at most, and none while nothing large happened (a trim walks every arena under its lock).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Work that held at least this many registers counts as large (a few MiB of heap).
pub const LARGE_WORK_REGISTERS: usize = 4096;

/// How often the release task looks for large work that ended.
const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// Set when large work freed its memory; cleared by the release task.
static FREED_MUCH: AtomicBool = AtomicBool::new(false);

/// Says that work holding `registers` registers has ended (or is about to): if that is
/// [`LARGE_WORK_REGISTERS`] or more, the release task trims within a second.
pub fn freed_much(registers: usize) {
    if registers >= LARGE_WORK_REGISTERS {
        FREED_MUCH.store(true, Ordering::Relaxed);
    }
}

/// Runs for the life of the worker: after large work, returns the allocator's free pages.
pub async fn release_after_large_work() {
    let mut every = tokio::time::interval(RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if FREED_MUCH.swap(false, Ordering::Relaxed) {
            // A trim of a large heap takes milliseconds: off the request threads.
            let _ = tokio::task::spawn_blocking(release_free_pages).await;
        }
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
