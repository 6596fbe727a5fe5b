//! The HTTP contract shared by the front (in `firemode`) and the workers: RFC 9457
//! problem responses, the header names that carry identity across the process hop, and the
//! rules for ids that clients send.
//!
//! # Layout
//! * [`problem`]: `application/problem+json` bodies and responses.
//! * [`ids`]: session ids and request ids.
//!
//! Architecture invariant: nothing here does I/O or knows about sockets.

pub mod ids;
pub mod problem;

pub use problem::Problem;

/// Request id header, echoed on every response.
pub const REQUEST_ID: &str = "x-request-id";
/// The verified JWT `sub`, set by the front; a client-sent value never reaches a worker.
pub const IDENTITY_SUB: &str = "x-firemode-sub";
/// The verified JWT `org` (tenant), set by the front when the token has one.
pub const IDENTITY_ORG: &str = "x-firemode-org";
/// Prefix of every header the front owns on the upstream hop.
pub const IDENTITY_PREFIX: &str = "x-firemode-";
/// Content type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";
