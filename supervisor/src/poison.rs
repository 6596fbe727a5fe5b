//! Poison requests: one exact request that workers keep dying on. A fingerprint names one
//! request — method, path (route and session id), the verified identity (tenant and user)
//! and body — never a whole route. When worker connections die under the same fingerprint
//! `server.poison_threshold` times within [`WINDOW`], the front refuses that request (503
//! with `Retry-After`) until the window since its last strike has passed. Reads (GET,
//! HEAD) are never fingerprinted, and deaths the supervisor caused itself (health kills,
//! recycling, drains) are not strikes: the front decides both before calling in here.
//! Bounded in size and time; no cost while nothing has struck.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a strike is remembered, and so how long a refusal lasts after the last one.
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

/// What identifies one request for poison accounting.
pub struct RequestKey<'a> {
    pub method: &'a str,
    /// The path as sent (route template plus session id); the query is not part of it.
    pub path: &'a str,
    /// The verified identity as it travels to the worker (tenant and user), in any order.
    pub identity: &'a [&'a [u8]],
    pub body: &'a [u8],
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

    pub fn fingerprint(&self, key: &RequestKey<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        for part in [key.method.as_bytes(), key.path.as_bytes()] {
            h.write_usize(part.len());
            h.write(part);
        }
        let mut identity = key.identity.to_vec();
        identity.sort_unstable();
        h.write_usize(identity.len());
        for part in identity {
            h.write_usize(part.len());
            h.write(part);
        }
        h.write_usize(key.body.len());
        h.write(key.body);
        h.finish()
    }

    /// `Some(time left)` while `fp` is refused: it struck `threshold` times and the last
    /// strike is younger than [`WINDOW`].
    pub fn refused_for(&self, fp: u64, now: Instant) -> Option<Duration> {
        if self.threshold == 0 {
            return None;
        }
        let map = self.map();
        let (n, last) = map.get(&fp)?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(*last))?;
        (*n >= self.threshold && !left.is_zero()).then_some(left)
    }

    /// Records that a worker died with `fp` in flight; returns the strike count.
    pub fn strike(&self, fp: u64, now: Instant) -> u32 {
        if self.threshold == 0 {
            return 0;
        }
        let mut map = self.map();
        map.retain(|_, (_, last)| now.saturating_duration_since(*last) < WINDOW);
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

    fn key<'a>(path: &'a str, identity: &'a [&'a [u8]], body: &'a [u8]) -> RequestKey<'a> {
        RequestKey {
            method: "POST",
            path,
            identity,
            body,
        }
    }

    #[test]
    fn poison_after_threshold_strikes_within_the_window() {
        let p = PoisonList::new(3);
        let now = Instant::now();
        assert!(!p.active());
        let a: &[&[u8]] = &[b"sub-a", b"org-a"];
        let fp = p.fingerprint(&key("/v1/classify", a, b"{\"x\":1}"));
        assert_eq!(fp, p.fingerprint(&key("/v1/classify", a, b"{\"x\":1}")));
        assert_ne!(fp, p.fingerprint(&key("/v1/classify", a, b"{\"x\":2}")));
        assert_eq!(p.strike(fp, now), 1);
        assert!(p.active());
        assert_eq!(p.strike(fp, now), 2);
        assert_eq!(p.refused_for(fp, now), None);
        assert_eq!(p.strike(fp, now), 3);
        assert_eq!(p.refused_for(fp, now), Some(WINDOW));
        assert_eq!(
            p.refused_for(fp, now + Duration::from_secs(60)),
            Some(WINDOW - Duration::from_secs(60))
        );
        assert_eq!(p.refused_for(fp, now + WINDOW), None, "it expires");
        let other = p.fingerprint(&key("/v1/classify", a, b"other"));
        assert_eq!(p.refused_for(other, now), None);
    }

    #[test]
    fn a_fingerprint_is_one_request_not_a_route() {
        let p = PoisonList::new(1);
        let a: &[&[u8]] = &[b"sub-a", b"org-a"];
        let b: &[&[u8]] = &[b"sub-b", b"org-a"];
        let base = p.fingerprint(&key("/v1/tests/sessions/S1/results", a, b"{}"));
        assert_ne!(
            base,
            p.fingerprint(&key("/v1/tests/sessions/S2/results", a, b"{}")),
            "another session"
        );
        assert_ne!(
            base,
            p.fingerprint(&key("/v1/tests/sessions/S1/results", b, b"{}")),
            "another user"
        );
        let swapped: &[&[u8]] = &[b"org-a", b"sub-a"];
        assert_eq!(
            base,
            p.fingerprint(&key("/v1/tests/sessions/S1/results", swapped, b"{}")),
            "identity order does not matter"
        );
        // Length prefixes: moving bytes between fields changes the fingerprint.
        let ab: &[&[u8]] = &[b"ab"];
        let a_b: &[&[u8]] = &[b"a", b"b"];
        assert_ne!(
            p.fingerprint(&key("/p", ab, b"")),
            p.fingerprint(&key("/p", a_b, b""))
        );
    }

    #[test]
    fn a_success_clears_the_strikes() {
        let p = PoisonList::new(2);
        let now = Instant::now();
        p.strike(7, now);
        p.forgive(7);
        assert!(!p.active());
        p.strike(7, now);
        assert_eq!(p.refused_for(7, now), None, "one strike after forgiveness");
    }

    #[test]
    fn disabled_and_bounded() {
        let off = PoisonList::new(0);
        assert_eq!(off.strike(1, Instant::now()), 0);
        assert_eq!(off.refused_for(1, Instant::now()), None);
        let p = PoisonList::new(2);
        let now = Instant::now();
        for fp in 0..(MAX_TRACKED as u64 + 10) {
            p.strike(fp, now);
        }
        assert!(p.map().len() <= MAX_TRACKED);
    }
}
