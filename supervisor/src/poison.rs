//! Poison requests: one exact request that workers keep dying on. A fingerprint names one
//! request — method, path (route and session id), the verified identity (tenant and user)
//! and body — never a whole route. When `server.poison_threshold` distinct worker processes
//! die under the same fingerprint within [`WINDOW`], the front refuses that request (503
//! with `Retry-After`) until the window since its last strike has passed. Reads (GET,
//! HEAD) are never fingerprinted, and deaths the supervisor caused itself (health kills,
//! recycling, drains) are not strikes: the front decides both before calling in here. One
//! death is one strike however many copies of the request were in flight at that process
//! (identical batches from a load test, say): strikes count processes, not attempts.
//! Bounded in size and time; no cost while nothing has struck.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a strike is remembered, and so how long a refusal lasts after the last one.
pub const WINDOW: Duration = Duration::from_secs(600);
/// At most this many fingerprints are kept; the oldest go first.
const MAX_ENTRIES: usize = 1024;

pub struct PoisonList {
    threshold: u32,
    strikes: Mutex<HashMap<u64, Strikes>>,
    /// Entries in `strikes`, readable without the lock (the request path checks it first).
    entries: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

/// The worker processes that died under one fingerprint, and when the last one did.
struct Strikes {
    /// Distinct pids (at most `threshold` kept: enough to decide).
    deaths: Vec<u32>,
    last: Instant,
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
            entries: AtomicUsize::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Strikes>> {
        self.strikes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any fingerprint is kept (if not, nothing needs hashing).
    pub fn active(&self) -> bool {
        self.threshold > 0 && self.entries.load(Ordering::Relaxed) > 0
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
        let strikes = map.get(&fp)?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(strikes.last))?;
        (strikes.count() >= self.threshold && !left.is_zero()).then_some(left)
    }

    /// Records that worker process `pid` died with `fp` in flight; returns the number of
    /// distinct processes that did. The same process seen again (other copies of the request
    /// in flight at it, a retry's report of the same death) adds nothing.
    pub fn strike(&self, fp: u64, pid: u32, now: Instant) -> u32 {
        if self.threshold == 0 {
            return 0;
        }
        let mut map = self.map();
        map.retain(|_, s| now.saturating_duration_since(s.last) < WINDOW);
        if map.len() >= MAX_ENTRIES && !map.contains_key(&fp) {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(fp).or_insert(Strikes {
            deaths: Vec::new(),
            last: now,
        });
        if !entry.deaths.contains(&pid) && entry.count() < self.threshold {
            entry.deaths.push(pid);
            entry.last = now;
        }
        let n = entry.count();
        self.entries.store(map.len(), Ordering::Relaxed);
        n
    }

    /// The request succeeded: it is not poison (a busy request caught in unrelated crashes,
    /// say a SIGKILL storm, must not be refused). Only called while the list is active.
    pub fn forgive(&self, fp: u64) {
        let mut map = self.map();
        if map.remove(&fp).is_some() {
            self.entries.store(map.len(), Ordering::Relaxed);
        }
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }
}

impl Strikes {
    fn count(&self) -> u32 {
        u32::try_from(self.deaths.len()).unwrap_or(u32::MAX)
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
        assert_eq!(p.strike(fp, 101, now), 1);
        assert!(p.active());
        assert_eq!(p.strike(fp, 102, now), 2);
        assert_eq!(p.refused_for(fp, now), None);
        assert_eq!(p.strike(fp, 103, now), 3);
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
        p.strike(7, 101, now);
        p.forgive(7);
        assert!(!p.active());
        p.strike(7, 102, now);
        assert_eq!(p.refused_for(7, now), None, "one strike after forgiveness");
    }

    #[test]
    fn one_death_is_one_strike_however_many_copies_were_in_flight() {
        let p = PoisonList::new(3);
        let now = Instant::now();
        for _ in 0..6 {
            assert_eq!(p.strike(9, 4242, now), 1, "six copies at one dying process");
        }
        assert_eq!(p.refused_for(9, now), None);
        assert_eq!(p.strike(9, 4243, now), 2);
        assert_eq!(p.strike(9, 4243, now), 2);
        assert_eq!(p.strike(9, 4244, now), 3);
        assert!(p.refused_for(9, now).is_some());
    }

    #[test]
    fn disabled_and_bounded() {
        let off = PoisonList::new(0);
        assert_eq!(off.strike(1, 101, Instant::now()), 0);
        assert_eq!(off.refused_for(1, Instant::now()), None);
        let p = PoisonList::new(2);
        let now = Instant::now();
        for fp in 0..(MAX_ENTRIES as u64 + 10) {
            p.strike(fp, 101, now);
        }
        assert!(p.map().len() <= MAX_ENTRIES);
    }
}
