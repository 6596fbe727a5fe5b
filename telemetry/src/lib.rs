//! Observability shared by the supervisor and the workers.
//!
//! # Layout
//! * [`install_metrics`]: the process-wide Prometheus recorder (the `metrics` facade), with
//!   histogram buckets that resolve sub-millisecond latencies.
//! * [`scrape`]: merging several Prometheus text scrapes into one, with extra labels, so
//!   the supervisor's `/metrics` shows every worker's series labelled by kind and instance.
//! * [`traces`]: logging and OpenTelemetry span export, and W3C trace context across the
//!   process hop.
//! * [`journal`]: syslog priority prefixes when stderr is the journal.
//! * [`build_info`]: the version and git commit of this build.
//! * [`render_metrics`]: one scrape of this process, with its `process_*` series read from
//!   `/proc` at that moment.

#![forbid(unsafe_code)]

pub mod build_info;
pub mod journal;
pub mod scrape;
pub mod traces;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Latency buckets (seconds): 50 µs to 10 s, dense below 10 ms where the front lives, and
/// at 15 and 20 ms so the sync target (p95 < 25 ms) reads straight off a scrape.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075, 0.01, 0.015,
    0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Size buckets (bytes) for bundles: 1 KiB to 100 MiB.
pub const SIZE_BUCKETS: &[f64] = &[
    1024.0,
    10240.0,
    102400.0,
    1048576.0,
    5242880.0,
    10485760.0,
    52428800.0,
    104857600.0,
];

/// Count buckets for `sync_merge_group_size`: 1 (alone) to 64 (the most one transaction takes).
pub const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle; later calls
/// return the same handle. Must run inside a tokio runtime (it spawns the upkeep task).
pub fn install_metrics() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("bytes".into()), SIZE_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("sync_merge_group_size".into()),
                    GROUP_BUCKETS,
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Another recorder already installed (tests): metrics then go there; keep going.
        let _ = metrics::set_global_recorder(recorder);
        describe_process_series();
        let upkeep = handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        handle
    })
}

/// The handle, if [`install_metrics`] ran.
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

/// Series every process has from its start: `firemode_build_info`, the `process_*`
/// descriptions, and counters that would otherwise appear only at their first increment
/// (an alert's `increase()` needs the 0 before it).
fn describe_process_series() {
    build_info::record();
    let process = PROCESS.get_or_init(metrics_process::Collector::default);
    process.describe();
    process.collect();
    metrics::describe_counter!(
        "firemode_span_export_failures_total",
        "Spans dropped because the OTLP export failed"
    );
    metrics::counter!("firemode_span_export_failures_total").absolute(0);
}

/// This process's scrape in Prometheus text, with the `process_*` series (RSS, CPU,
/// open fds, start time, threads) read from `/proc` now; empty before [`install_metrics`].
pub fn render_metrics() -> String {
    let Some(handle) = HANDLE.get() else {
        return String::new();
    };
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.render()
}
