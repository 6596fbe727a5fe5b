//! The optional access log (`telemetry.access_log`): one info line per front request under
//! its own target, [`TARGET`], so it can be filtered (`RUST_LOG=info,firemode::access=off`)
//! or routed apart. The front calls [`record`] only when the setting is on: off, it costs
//! one `bool` test per request.

use http::{Method, StatusCode};
use std::time::Duration;

/// The `tracing` target of access lines.
pub const TARGET: &str = "firemode::access";

/// One answered request, as the access log line shows it.
pub struct Access<'a> {
    pub method: &'a Method,
    /// The route template (`/v1/tests/sessions/{id}`), never the raw path.
    pub route: &'static str,
    pub status: StatusCode,
    pub elapsed: Duration,
    pub request_id: &'a str,
    /// The answer's body length when known up front (buffered answers know it).
    pub bytes: Option<u64>,
}

/// Writes the line: `access` with `method`, `route`, `status`, `duration_ms`,
/// `request_id` and, when known, `bytes`.
pub fn record(a: &Access<'_>) {
    // An `Option` field is recorded only when `Some`.
    tracing::info!(
        target: TARGET,
        method = %a.method,
        route = a.route,
        status = a.status.as_u16(),
        duration_ms = a.elapsed.as_secs_f64() * 1000.0,
        request_id = a.request_id,
        bytes = a.bytes,
        "access"
    );
}
