//! Logs and traces for every FireMode process: `tracing` with a pretty or JSON log layer,
//! plus an OpenTelemetry layer exporting spans over OTLP when an endpoint is configured.
//!
//! The standard environment is honoured: `OTEL_EXPORTER_OTLP_ENDPOINT` (wins over
//! `telemetry.otlp_endpoint`), `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf` by default, or
//! `grpc`), `OTEL_SERVICE_NAME` (the base name; workers append their kind),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG`. Without an endpoint there is no
//! exporter and no connection attempt. Export runs on the batch processor's own thread with a
//! bounded queue and a timeout, so a slow or dead collector never slows a request.
//!
//! Log lines carry syslog priorities when stderr is the journal ([`crate::journal`]), and
//! colours only when stderr is a terminal.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStyle {
    Json,
    Pretty,
}

/// Who is logging and tracing.
pub struct ServiceIdentity<'a> {
    /// Appended to the base service name (`firemode`, or `OTEL_SERVICE_NAME`): "" for the
    /// supervisor, "classify" / "sync" for workers.
    pub kind: &'a str,
    /// `service.instance.id`.
    pub instance_id: String,
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (so propagation headers are worth writing).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes and shuts the exporter down when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

/// Wraps the OTLP exporter: failed exports (collector down or slow) are counted in
/// `firemode_span_export_failures_total` (spans lost) and warned about at most once a minute.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    last_warning: std::sync::Mutex<Option<std::time::Instant>>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for CountingExporter<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            metrics::counter!("firemode_span_export_failures_total").increment(spans);
            let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *last = Some(std::time::Instant::now());
                tracing::warn!(error = %e, spans, "span export failed; spans are dropped (collector down or slow?)");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP endpoint in force: the environment's, else the config's, else none.
fn endpoint(configured: &str) -> Option<(String, bool)> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if std::env::var(var).is_ok_and(|v| !v.trim().is_empty()) {
            // The exporter reads it itself (and appends /v1/traces for HTTP).
            return Some((String::new(), true));
        }
    }
    (!configured.trim().is_empty()).then(|| (configured.trim().to_string(), false))
}

fn protocol_is_grpc() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok())
    .is_some_and(|p| p.trim() == "grpc")
}

fn build_provider(
    configured: &str,
    who: &ServiceIdentity<'_>,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    let Some((url, from_env)) = endpoint(configured) else {
        return Ok(None);
    };
    let timeout = Duration::from_secs(3);
    let exporter = if protocol_is_grpc() {
        let mut b = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(timeout);
        if !from_env {
            b = b.with_endpoint(url);
        }
        b.build()
    } else {
        let mut b = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_timeout(timeout);
        if !from_env {
            let url = if url.ends_with("/v1/traces") {
                url
            } else {
                format!("{}/v1/traces", url.trim_end_matches('/'))
            };
            b = b.with_endpoint(url);
        }
        b.build()
    }?;
    let base = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "firemode".into());
    let name = if who.kind.is_empty() {
        base
    } else {
        format!("{base}-{}", who.kind)
    };
    let resource = Resource::builder()
        .with_service_name(name)
        .with_attribute(KeyValue::new(
            "service.instance.id",
            who.instance_id.clone(),
        ))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(CountingExporter {
                inner: exporter,
                last_warning: std::sync::Mutex::new(None),
            })
            .with_resource(resource)
            .build(),
    ))
}

/// Installs logging (and span export when configured) for this process. Call once, inside
/// the tokio runtime; keep the guard until the process ends.
pub fn init(style: LogStyle, otlp_endpoint: &str, who: ServiceIdentity<'_>) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = crate::journal::stderr_is_journal();
    let writer = crate::journal::Stderr { enabled: journal };
    let log: Box<dyn Layer<Registry> + Send + Sync> = match style {
        LogStyle::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        // Colours only for a terminal: never escape codes in a file, a pipe or the journal.
        LogStyle::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_writer(writer)
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, problem) = match build_provider(otlp_endpoint, &who) {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("firemode"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(otel)
        .with(filter)
        .try_init();
    if let Some(e) = problem {
        tracing::warn!(error = %e, "cannot set up OTLP span export; continuing without it");
    }
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!("exporting spans over OTLP");
    }
    TelemetryGuard { provider }
}

/// Makes `span` a child of the W3C trace context in `headers` (`traceparent`), if any.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

/// Writes `span`'s trace context into `headers` for the next hop.
pub fn inject_trace(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = span.context();
    TraceContextPropagator::new()
        .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
}
