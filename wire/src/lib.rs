//! The HTTP contract shared by the front (in `firemode`) and the workers: RFC 9457
//! problem responses, the header names that carry identity across the process hop, and the
//! rules for ids that clients send.
//!
//! # Layout
//! * [`problem`]: `application/problem+json` bodies and responses.
//! * [`ids`]: session ids and request ids.
//! * [`identity`]: the verified caller across the hop, and its tenant.
//! * [`route`]: the sessions API's paths (`/v1/tests/sessions/{id}[/resource]`).
//!
//! Architecture invariant: nothing here does I/O or knows about sockets.

#![forbid(unsafe_code)]

pub mod identity;
pub mod ids;
pub mod problem;
pub mod route;

pub use identity::{Identity, IDENTITY};
pub use problem::Problem;
pub use route::{SessionPath, SessionResource, SESSIONS_PREFIX};

/// Request id header, echoed on every response.
pub const REQUEST_ID: &str = "x-request-id";
/// Prefix of every header the front owns on the upstream hop (a client-sent one never reaches
/// a worker); the verified caller travels in [`IDENTITY`].
pub const IDENTITY_PREFIX: &str = "x-firemode-";
/// Set by a worker on a 500 caused by stored data (a session that does not load), which
/// restarting the worker cannot fix: the front removes it and does not count the answer
/// against the instance (`supervisor.traffic_failure_threshold`).
pub const DATA_FAULT: &str = "x-firemode-data-fault";
/// Content type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";
