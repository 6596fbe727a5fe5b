//! Every black-box test, in one binary (one link, shared build of the binaries under test).
//! Each test starts its own `firemode` in its own temporary directory.

#![forbid(unsafe_code)]

mod auth;
mod backup;
mod catch_up;
mod classify;
mod config;
mod control;
mod faults;
mod fuzz_corpus;
mod health_checks;
mod hostile;
mod hostile_front;
mod hostile_ops;
mod hostile_sync;
mod hot_session;
mod install;
mod journal;
mod multihost;
mod observability;
mod operations;
mod operator_view;
mod operators;
mod store_contract;
mod subtree_cost;
mod supervision;
mod sync;
mod tenants;
mod unreadable;
mod upgrade;
