//! Poison requests: a request that workers keep dying on. When the worker connection dies
//! under the same request (route, method and body fingerprint) `server.poison_threshold`
//! times within ten minutes, the front refuses that request instead of letting it crash the
//! pool again and again. Bounded in size and time; no cost while nothing has struck.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a strike is remembered.
pub const WINDOW: Duration = Duration::from_secs(600);
/// At most this many fingerprints are tracked; the oldest go first.
const MAX_TRACKED: usize = 1024;

pub struct PoisonList {
    threshold: u32,
    strikes: Mutex<HashMap<u64, (u32, Instant)>>,
    /// Entries in `strikes`, readable without the lock (the request path checks it first).
    tracked: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

impl PoisonList {
    /// `threshold` 0 disables the list.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold,
            strikes: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u32, Instant)>> {
        self.strikes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any fingerprint is tracked (if not, nothing needs hashing).
    pub fn active(&self) -> bool {
        self.threshold > 0 && self.tracked.load(Ordering::Relaxed) > 0
    }

    pub fn fingerprint(&self, route: &str, method: &str, body: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(route.as_bytes());
        h.write_u8(0);
        h.write(method.as_bytes());
        h.write_u8(0);
        h.write(body);
        h.finish()
    }

    /// Whether `fp` has struck `threshold` times within the window.
    pub fn is_poison(&self, fp: u64, now: Instant) -> bool {
        self.threshold > 0
            && self
                .map()
                .get(&fp)
                .is_some_and(|(n, last)| *n >= self.threshold && now.duration_since(*last) < WINDOW)
    }

    /// Records that a worker died with `fp` in flight; returns the strike count.
    pub fn strike(&self, fp: u64, now: Instant) -> u32 {
        if self.threshold == 0 {
            return 0;
        }
        let mut map = self.map();
        map.retain(|_, (_, last)| now.duration_since(*last) < WINDOW);
        if map.len() >= MAX_TRACKED && !map.contains_key(&fp) {
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(fp).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now;
        let n = entry.0;
        self.tracked.store(map.len(), Ordering::Relaxed);
        n
    }

    /// The request succeeded: it is not poison (a busy request caught in unrelated crashes,
    /// say a SIGKILL storm, must not be refused). Only called while the list is active.
    pub fn forgive(&self, fp: u64) {
        let mut map = self.map();
        if map.remove(&fp).is_some() {
            self.tracked.store(map.len(), Ordering::Relaxed);
        }
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_after_threshold_strikes_within_the_window() {
        let p = PoisonList::new(3);
        let now = Instant::now();
        assert!(!p.active());
        let fp = p.fingerprint("/v1/classify", "POST", b"{\"x\":1}");
        assert_eq!(fp, p.fingerprint("/v1/classify", "POST", b"{\"x\":1}"));
        assert_ne!(fp, p.fingerprint("/v1/classify", "POST", b"{\"x\":2}"));
        assert_eq!(p.strike(fp, now), 1);
        assert!(p.active());
        assert_eq!(p.strike(fp, now), 2);
        assert!(!p.is_poison(fp, now));
        assert_eq!(p.strike(fp, now), 3);
        assert!(p.is_poison(fp, now));
        assert!(!p.is_poison(fp, now + WINDOW), "forgiven after the window");
        let other = p.fingerprint("/v1/classify", "POST", b"other");
        assert!(!p.is_poison(other, now));
    }

    #[test]
    fn a_success_clears_the_strikes() {
        let p = PoisonList::new(2);
        let now = Instant::now();
        p.strike(7, now);
        p.forgive(7);
        assert!(!p.active());
        p.strike(7, now);
        assert!(!p.is_poison(7, now), "one strike after forgiveness");
    }

    #[test]
    fn disabled_and_bounded() {
        let off = PoisonList::new(0);
        assert_eq!(off.strike(1, Instant::now()), 0);
        assert!(!off.is_poison(1, Instant::now()));
        let p = PoisonList::new(2);
        let now = Instant::now();
        for fp in 0..(MAX_TRACKED as u64 + 10) {
            p.strike(fp, now);
        }
        assert!(p.map().len() <= MAX_TRACKED);
    }
}
