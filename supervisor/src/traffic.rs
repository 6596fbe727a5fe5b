//! What real traffic says about an instance's health (pure policy). A worker can answer
//! `/healthz` and still fail every real request; the front reports each request's outcome
//! here and, after `supervisor.traffic_failure_threshold` failures in a row, the instance is
//! taken out of rotation and replaced.

/// Whether an upstream outcome counts against the instance: a connection failure or
/// timeout (`None`), or a 500/502/504 from the worker. A 503 does not count: it is how a
/// worker says its store is down, which a restart cannot fix.
pub fn is_failure(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => matches!(s, 500 | 502 | 504),
    }
}

/// Consecutive-failure accounting: `record` returns true for every failure once the count
/// of failures in a row has reached `threshold` (0 disables it); whoever acts on it resets
/// the count. A verdict that may not be executed yet (the last ready instance) is thus
/// asked again on the next failure.
pub fn record(consecutive: &std::sync::atomic::AtomicU32, failed: bool, threshold: u32) -> bool {
    use std::sync::atomic::Ordering;
    if !failed {
        // Avoid a write on the hot path when nothing failed.
        if consecutive.load(Ordering::Relaxed) != 0 {
            consecutive.store(0, Ordering::Relaxed);
        }
        return false;
    }
    let n = consecutive.fetch_add(1, Ordering::Relaxed) + 1;
    threshold != 0 && n >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn classifies_outcomes() {
        assert!(is_failure(None));
        assert!(is_failure(Some(500)));
        assert!(is_failure(Some(502)));
        assert!(is_failure(Some(504)));
        assert!(!is_failure(Some(503)));
        assert!(!is_failure(Some(200)));
        assert!(!is_failure(Some(404)));
        assert!(!is_failure(Some(422)));
    }

    #[test]
    fn trips_once_at_the_threshold_and_resets_on_success() {
        let c = AtomicU32::new(0);
        assert!(!record(&c, true, 3));
        assert!(!record(&c, true, 3));
        assert!(!record(&c, false, 3), "a success resets");
        assert!(!record(&c, true, 3));
        assert!(!record(&c, true, 3));
        assert!(record(&c, true, 3), "third in a row trips");
        assert!(record(&c, true, 3), "until someone acts on it");
        c.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(!record(&c, true, 3));
        let off = AtomicU32::new(0);
        assert!((0..10).all(|_| !record(&off, true, 0)));
    }
}
