//! The front's per-request duration histogram, `http_request_duration_seconds{method,
//! endpoint,status}`, with its handles resolved once per label set: building a metric key
//! (labels, hashing, the registry lookup) on every request was a measurable part of the
//! front's own time (BENCHMARKS.md, "Where the front's time goes").

use crate::front::Route;
use http::{Method, StatusCode};
use metrics::Histogram;
use std::sync::OnceLock;

/// The method labels: the methods HTTP defines, else "other".
const METHODS: [&str; 8] = [
    "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];

/// The status codes FireMode answers, each a label without allocating; others are rare and
/// take the slow path.
const STATUSES: [u16; 14] = [
    200, 304, 400, 401, 404, 405, 408, 409, 413, 422, 500, 502, 503, 504,
];

const SLOTS: usize = METHODS.len() * Route::ALL.len() * STATUSES.len();

/// Lazily resolved histogram handles, one per (method, route, status) label set.
pub struct RequestDurations {
    slots: Box<[OnceLock<Histogram>]>,
}

impl Default for RequestDurations {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl RequestDurations {
    /// Records one request's duration under its labels.
    pub fn record(&self, method: &Method, route: Route, status: StatusCode, seconds: f64) {
        let method_index = method_index(method);
        let route_index = route.index();
        match STATUSES.iter().position(|&s| s == status.as_u16()) {
            Some(status_index) => {
                let slot =
                    (method_index * Route::ALL.len() + route_index) * STATUSES.len() + status_index;
                let histogram = self.slots[slot].get_or_init(|| {
                    metrics::histogram!(
                        "http_request_duration_seconds",
                        "method" => METHODS[method_index],
                        "endpoint" => route.template(),
                        "status" => status_label(status_index),
                    )
                });
                histogram.record(seconds);
            }
            None => metrics::histogram!(
                "http_request_duration_seconds",
                "method" => METHODS[method_index],
                "endpoint" => route.template(),
                "status" => status.as_u16().to_string(),
            )
            .record(seconds),
        }
    }
}

/// A bounded label value for `m`: the method names HTTP defines, else "other".
pub fn method_label(m: &Method) -> &'static str {
    METHODS[method_index(m)]
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::HEAD => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The label of `STATUSES[index]`.
fn status_label(index: usize) -> &'static str {
    const LABELS: [&str; STATUSES.len()] = [
        "200", "304", "400", "401", "404", "405", "408", "409", "413", "422", "500", "502", "503",
        "504",
    ];
    LABELS[index]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_spell_their_codes() {
        for (index, code) in STATUSES.iter().enumerate() {
            assert_eq!(status_label(index), code.to_string());
        }
    }

    #[test]
    fn every_label_set_has_its_own_slot() {
        let mut seen = std::collections::HashSet::new();
        for m in 0..METHODS.len() {
            for r in 0..Route::ALL.len() {
                for s in 0..STATUSES.len() {
                    let slot = (m * Route::ALL.len() + r) * STATUSES.len() + s;
                    assert!(slot < SLOTS && seen.insert(slot));
                }
            }
        }
        for (index, route) in Route::ALL.iter().enumerate() {
            assert_eq!(route.index(), index);
        }
    }
}
