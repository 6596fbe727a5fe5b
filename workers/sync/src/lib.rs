//! The sync worker (`firemode-sync`): merges offline test-session edits from many tablets
//! and serves offline bundles. The binary (`main.rs`) only wires this library.
//!
//! * `POST /v1/tests/sessions/{id}/results` — one batch, merged by the CRDT of
//!   `firemode-merge` inside one store transaction with its `Idempotency-Key` record.
//! * `GET /v1/tests/sessions/{id}` — the merged document and the session clock.
//! * `GET /v1/tests/sessions/{id}/offline_bundle` — session + catalog for offline work.
//! * `GET /v1/tests/sessions/{id}/changes?since=&wait=` — catching up, long-polled.
//! * `GET /v1/tests/sessions/{id}/conflicts?after=&limit=` — the conflict journal.
//!
//! Sessions belong to a tenant: the token's `org` (`org:<org>`), or for a token without one
//! its subject alone (`sub:<sub>`), byte for byte (`firemode_wire::identity`). No request can
//! name another tenant's session.
//!
//! # Layout
//! * [`app`]: the `App` the worker runtime serves, and what it starts with.
//! * [`routes`]: path, id, caller and method checks, then one handler per endpoint.
//! * [`caller`]: the verified caller and their tenant, from the front's identity header.
//! * [`problems`]: every problem+json answer, and the store's errors mapped to them.
//! * [`request`]: a request body into a `Batch` (pure; fuzzed).
//! * [`idempotency`]: the `Idempotency-Key` rule and the request fingerprint.
//! * [`results`]: `POST …/results`, from key and body to the answer.
//! * [`merge`]: the merge step the store runs under the session's lock (no I/O).
//! * [`merge_queue`]: merges of one session arriving together share one transaction.
//! * [`session`]: session reads (the stored state decoded, the session as JSON, `GET`).
//! * [`shared_reads`]: one whole-session read for every request that wants it at once.
//! * [`bundle`]: the offline bundle's pure parts; [`bundle_http`]: its route.
//! * [`catch_up`]: `GET …/changes` and `GET …/conflicts`.
//! * [`commands`]: the one-shot `--check-store` and `--backup FILE`.
//! * [`memory`]: the memory a large read or merge freed, given back to the system.

// `deny`, not `forbid`: `memory` makes one FFI call, allowed there alone.
#![deny(unsafe_code)]

pub mod app;
pub mod bundle;
pub mod bundle_http;
pub mod caller;
pub mod catch_up;
pub mod commands;
pub mod idempotency;
pub mod memory;
pub mod merge;
pub mod merge_queue;
pub mod problems;
pub mod request;
pub mod results;
pub mod routes;
pub mod session;
pub mod shared_reads;

pub use app::SyncApp;
pub use commands::Command;

/// The response type of every handler.
pub type HttpResponse = http::Response<http_body_util::Full<bytes::Bytes>>;
