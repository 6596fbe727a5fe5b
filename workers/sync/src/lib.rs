//! The sync worker's pure parts, as a library so they are tested and fuzzed directly:
//! reading a sync request ([`request`]) and building the offline bundle ([`bundle`]).
//! The binary (`main.rs`) holds the routes and the store calls.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod request;
