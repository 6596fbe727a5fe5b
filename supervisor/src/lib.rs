//! The FireMode supervisor: spawns and health-checks the worker processes, restarts them
//! with backoff, drains them on SIGTERM, and fronts them with an authenticating HTTP
//! listener that routes to ready instances over Unix sockets.
//!
//! # Layout
//! * [`run`]: the whole system's life — listeners, reload, the drain.
//! * [`fleet`]: every instance task; start, rolling replacement, scaling, drain.
//! * [`runtime_dir`]: the runtime dir and the worker config files, recreated on demand.
//! * [`systemd`]: sd_notify and socket activation.
//! * Supervision: [`supervise`] (one task per instance, the only writer of its state),
//!   [`instance`] (what others see of an instance and the commands it takes), [`spawn`] (the process),
//!   [`health`] (the check), [`backoff`] (when to restart; pure), [`child_log`] (worker
//!   output into our log).
//! * Front: [`front`] (the request path, one function per phase), [`poison`] (requests that crash workers), [`traffic`] (real requests as a health signal; pure), [`auth`] (JWT), [`token_cache`] (tokens already verified), [`choose`] (which instance; pure),
//!   [`registry`] (instances and the ready wake-up), [`upstream`] (connections to workers),
//!   [`buffered`] (answers taken off the worker at worker speed, spilled when large),
//!   [`send_timeout`] (clients that stop taking bytes are dropped).
//! * [`admin`]: `/healthz`, `/readyz`, `/status`, `/metrics`, `POST /reload`.
//! * [`access_log`]: the optional line per front request (`telemetry.access_log`).
//! * [`control`]: `firemode status` and `firemode reload` against a running supervisor.
//! * [`backup`]: `firemode backup FILE`, made by the sync worker binary.
//! * [`signals`]: what each signal means.
//! * [`plan`]: `firemode plan`, the timeline the config implies.
//! * [`preflight`]: `firemode check-config`'s checks of files, commands, directories, store.

// No #![forbid(unsafe_code)]: spawn.rs (pre_exec), listener.rs (setsockopt) and systemd.rs (from_raw_fd) need unsafe.
pub mod access_log;
pub mod admin;
pub mod auth;
pub mod backoff;
pub mod backup;
pub mod buffered;
pub mod child_log;
pub mod choose;
pub mod control;
pub mod fleet;
pub mod front;
pub mod health;
pub mod instance;
pub mod listener;
pub mod logging;
pub mod plan;
pub mod poison;
pub mod preflight;
pub mod registry;
pub mod request_metrics;
pub mod run;
pub mod runtime_dir;
pub mod send_timeout;
pub mod signals;
pub mod spawn;
pub mod supervise;
pub mod systemd;
pub mod token_cache;
pub mod traffic;
pub mod upstream;
