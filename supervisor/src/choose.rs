//! Which instance takes a request: the ready one with the fewest requests outstanding,
//! ties broken round-robin from a rotating start. Pure policy, no I/O (after pingora's
//! `selection`); the front supplies the instances' state.

/// What the policy sees of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub ready: bool,
    pub outstanding: usize,
}

/// The index of the chosen candidate, or `None` when none is ready. `start` rotates the
/// scan so equal loads share the work; `exclude` skips one instance (the one a retry left).
pub fn least_outstanding(
    candidates: impl ExactSizeIterator<Item = Candidate>,
    start: usize,
    exclude: Option<usize>,
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = start % n;
    // (outstanding, position in the rotated scan, index): the smallest wins.
    let mut best: Option<(usize, usize, usize)> = None;
    for (i, c) in candidates.enumerate() {
        if !c.ready || Some(i) == exclude {
            continue;
        }
        let key = (c.outstanding, (i + n - start) % n, i);
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    best.map(|(_, _, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ready: bool, outstanding: usize) -> Candidate {
        Candidate { ready, outstanding }
    }

    #[test]
    fn picks_the_least_loaded_ready_instance() {
        let cs = [c(true, 5), c(true, 2), c(false, 0), c(true, 3)];
        assert_eq!(least_outstanding(cs.into_iter(), 0, None), Some(1));
    }

    #[test]
    fn rotates_among_equals() {
        let cs = [c(true, 0), c(true, 0), c(true, 0)];
        let picks: Vec<_> = (0..6)
            .map(|s| least_outstanding(cs.into_iter(), s, None).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn none_ready_means_none() {
        let cs = [c(false, 0), c(false, 0)];
        assert_eq!(least_outstanding(cs.into_iter(), 0, None), None);
        assert_eq!(
            least_outstanding(
                std::iter::empty::<Candidate>()
                    .collect::<Vec<_>>()
                    .into_iter(),
                0,
                None
            ),
            None
        );
    }

    #[test]
    fn a_retry_avoids_the_instance_that_failed() {
        let cs = [c(true, 0), c(true, 9)];
        assert_eq!(least_outstanding(cs.into_iter(), 0, Some(0)), Some(1));
        // Only the failed one is ready: no other choice.
        let cs = [c(true, 0), c(false, 0)];
        assert_eq!(least_outstanding(cs.into_iter(), 0, Some(0)), None);
    }
}
