//! What real traffic says about an instance's health (pure policy). A worker can answer
//! `/healthz` and still fail every real request; the front reports each request's outcome
//! here and, after `supervisor.traffic_failure_threshold` failures in a row, the instance is
//! taken out of rotation and replaced.

/// What one attempt on an instance came to, as the front reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this status. `data_fault`: the worker marked it
    /// (`firemode_wire::DATA_FAULT`) as caused by stored data, such as an unreadable session.
    Answered { status: u16, data_fault: bool },
    /// No answer: the connection failed or the request timed out.
    Lost,
}

impl Outcome {
    /// An answer the worker did not blame on stored data.
    pub fn status(status: u16) -> Outcome {
        Outcome::Answered {
            status,
            data_fault: false,
        }
    }

    /// Whether it counts against the instance: no answer, or a 500/502/504 from the worker.
    /// A 503 does not count (it is how a worker says its store is down), nor a 500 blamed on
    /// stored data: a restart fixes neither.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Lost => true,
            Outcome::Answered {
                data_fault: true, ..
            } => false,
            Outcome::Answered { status, .. } => matches!(status, 500 | 502 | 504),
        }
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
        assert!(Outcome::Lost.is_failure());
        for failed in [500, 502, 504] {
            assert!(Outcome::status(failed).is_failure());
        }
        for fine in [503, 200, 404, 422] {
            assert!(!Outcome::status(fine).is_failure());
        }
        let blamed_on_data = Outcome::Answered {
            status: 500,
            data_fault: true,
        };
        assert!(!blamed_on_data.is_failure());
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
