//! The front: every client request passes here, in phases (after Pingora's `ProxyHttp`),
//! one function each:
//!
//! 1. [`FrontSettings::authenticate`]: the route names a worker kind; the bearer token
//!    verifies (401 otherwise; 404 for no route).
//! 2. [`FrontSettings::admit`]: `Content-Length` and the body within `max_body_bytes`, the
//!    whole body read within `request_timeout` (413, 408, 400).
//! 3. [`Exchange::choose`]: a ready instance of the kind, waiting up to `queue_timeout`
//!    (503 with `Retry-After`; at once when every instance says its store is down); a
//!    request refused as poison stops before this (503).
//! 4. [`Exchange::attempt`]: one exchange with that instance within `request_timeout`,
//!    the whole answer taken off the worker connection (504 at the deadline); its outcome
//!    reported to `registry::KindSet::record_outcome` (traffic verdicts).
//! 5. [`Exchange::retry_or_fail`]: after a failed attempt, a poison strike, then another
//!    instance (any request whose connection failed before anything was sent; a safe
//!    request once) or a 502. Phases 3 and 4 run again for the retry: the same functions.
//! 6. [`Front::record`]: the duration histogram, the slow-request warning, the access log.
//!
//! Errors are problem+json. Policy (which instance) lives in `choose`; the plumbing
//! (connections) in `upstream`; the poison list in `poison`.

use crate::auth::{AuthError, Identity, Verifier};
use crate::buffered::{Budget, Buffered, MEMORY_BUDGET};
use crate::instance::Instance;
use crate::instance::Kind;
use crate::poison::{PoisonList, RequestKey};
use crate::registry::{KindSet, Registry};
use crate::request_metrics::{method_label, RequestDurations};
use crate::traffic::Outcome;
use crate::upstream::{self, UpstreamError};
use arc_swap::ArcSwap;
use bytes::Bytes;
use firemode_config::Config;
use firemode_wire::{ids, Problem, DATA_FAULT, IDENTITY, IDENTITY_PREFIX, REQUEST_ID};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

pub type FrontBody = Either<Full<Bytes>, Buffered>;

/// The `wait` a `GET …/changes` asks to be held for (design §3: 0–60 s), added to its
/// deadline. Anything else, or a `wait` the worker will refuse, adds nothing.
fn long_poll_wait(route: Route, query: Option<&str>) -> Duration {
    if route != Route::Changes {
        return Duration::ZERO;
    }
    let wait = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("wait="))
        .find_map(|seconds| seconds.parse::<u64>().ok())
        .filter(|seconds| *seconds <= 60)
        .unwrap_or(0);
    Duration::from_secs(wait)
}

/// Lowers the `wait` of a long-poll's query to at most `left` (whole seconds, rounded down).
fn shorten_wait(uri: &mut Uri, left: Duration) {
    let (Some(path), Some(query)) = (uri.path_and_query().map(|pq| pq.path()), uri.query()) else {
        return;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.strip_prefix("wait=") {
            Some(seconds) => match seconds.parse::<u64>() {
                Ok(seconds) => format!("wait={}", seconds.min(left.as_secs())),
                Err(_) => pair.to_owned(),
            },
            None => pair.to_owned(),
        })
        .collect();
    if let Ok(shorter) = format!("{path}?{}", query.join("&")).parse::<Uri>() {
        *uri = shorter;
    }
}

/// Route templates: what logs and metrics name a request by (never the raw path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Classify,
    SessionResults,
    Session,
    OfflineBundle,
    /// `GET …/changes?since=&wait=`: its deadline grows by the `wait` it asks for.
    Changes,
    Conflicts,
    /// Under `/v1/` but no such route: authenticated, then 404.
    UnknownV1,
    NotFound,
}

impl Route {
    /// Every route, in [`Route::index`] order.
    pub const ALL: [Route; 8] = [
        Route::Classify,
        Route::SessionResults,
        Route::Session,
        Route::OfflineBundle,
        Route::Changes,
        Route::Conflicts,
        Route::UnknownV1,
        Route::NotFound,
    ];

    /// The route's position in [`Route::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn of(path: &str) -> Route {
        if path == "/v1/classify" {
            return Route::Classify;
        }
        if let Some(rest) = path.strip_prefix("/v1/tests/sessions/") {
            let mut parts = rest.splitn(2, '/');
            let _id = parts.next();
            return match parts.next() {
                None => Route::Session,
                Some("results") => Route::SessionResults,
                Some("offline_bundle") => Route::OfflineBundle,
                Some("changes") => Route::Changes,
                Some("conflicts") => Route::Conflicts,
                Some(_) => Route::UnknownV1,
            };
        }
        if path.starts_with("/v1/") {
            Route::UnknownV1
        } else {
            Route::NotFound
        }
    }

    pub fn template(self) -> &'static str {
        match self {
            Route::Classify => "/v1/classify",
            Route::SessionResults => "/v1/tests/sessions/{id}/results",
            Route::Session => "/v1/tests/sessions/{id}",
            Route::OfflineBundle => "/v1/tests/sessions/{id}/offline_bundle",
            Route::Changes => "/v1/tests/sessions/{id}/changes",
            Route::Conflicts => "/v1/tests/sessions/{id}/conflicts",
            Route::UnknownV1 | Route::NotFound => "unmatched",
        }
    }

    fn kind(self) -> Option<Kind> {
        match self {
            Route::Classify => Some(Kind::Classify),
            Route::SessionResults
            | Route::Session
            | Route::OfflineBundle
            | Route::Changes
            | Route::Conflicts => Some(Kind::Sync),
            Route::UnknownV1 | Route::NotFound => None,
        }
    }
}

/// What a reload may change in the front, swapped atomically.
pub struct FrontSettings {
    verifier: Verifier,
    max_body_bytes: u64,
    queue_timeout: Duration,
    request_timeout: Duration,
    slow_threshold: Duration,
    /// `telemetry.access_log`: one line per request (see `access_log`).
    access_log: bool,
    traffic_threshold: u32,
    /// Where answers too large for memory are spilled (`supervisor.runtime_dir`).
    spill_dir: PathBuf,
}

impl FrontSettings {
    pub fn new(config: &Config, verifier: Verifier) -> Self {
        Self {
            traffic_threshold: config.supervisor.traffic_failure_threshold,
            verifier,
            max_body_bytes: config.server.max_body_bytes,
            queue_timeout: config.server.queue_timeout.get(),
            request_timeout: config.server.request_timeout.get(),
            slow_threshold: config.telemetry.slow_request_threshold.get(),
            access_log: config.telemetry.access_log,
            spill_dir: config.supervisor.runtime_dir.clone(),
        }
    }
}

pub struct Front {
    registry: Arc<Registry>,
    poison: PoisonList,
    /// Memory shared by every answer buffered for a client (see `buffered`).
    budget: Arc<Budget>,
    settings: ArcSwap<FrontSettings>,
    /// Client requests being answered right now (for the drain's status line).
    in_flight: AtomicUsize,
    id_prefix: u64,
    id_counter: AtomicU64,
    durations: RequestDurations,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

impl Front {
    pub fn new(registry: Arc<Registry>, settings: FrontSettings, poison_threshold: u32) -> Self {
        Self {
            registry,
            poison: PoisonList::new(poison_threshold),
            budget: Budget::new(MEMORY_BUDGET),
            settings: ArcSwap::from_pointee(settings),
            in_flight: AtomicUsize::new(0),
            id_prefix: rand::random(),
            id_counter: AtomicU64::new(0),
            durations: RequestDurations::default(),
        }
    }

    /// Applies a reloaded config to requests that start from now on.
    pub fn reconfigure(&self, settings: FrontSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// How long a client may take no bytes of an answer before it is dropped.
    pub fn send_timeout(&self) -> Duration {
        self.settings.load().request_timeout
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn request_id(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(REQUEST_ID) {
            if ids::is_sane_request_id(v.as_bytes()) {
                return v.clone();
            }
        }
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        hex_request_id(self.id_prefix, n)
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<FrontBody> {
        let started = Instant::now();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        let settings = self.settings.load_full();
        let request_id = self.request_id(req.headers());
        let route = Route::of(req.uri().path());
        let method = req.method().clone();
        // One span per request when spans are exported: it continues the client's W3C trace,
        // and its context goes to the worker (see `Upstream::new`). Without an exporter no
        // one reads it, and creating, formatting and entering it on every poll was a cost
        // of every request: the front's own log lines name the request_id themselves.
        let span = if firemode_telemetry::traces::exporting() {
            let span = tracing::info_span!(
                "front",
                otel.name = route.template(),
                otel.kind = "server",
                http.request.method = method_label(&method),
                request_id = request_id.to_str().unwrap_or(""),
            );
            firemode_telemetry::traces::continue_trace(&span, req.headers());
            span
        } else {
            tracing::Span::none()
        };
        let mut resp = match self
            .serve(&settings, route, req, &request_id, started)
            .instrument(span)
            .await
        {
            Ok(r) => r.map(Either::Right),
            Err(Reply(r)) => r.map(Either::Left),
        };
        resp.headers_mut().insert(REQUEST_ID, request_id.clone());
        let request = Served {
            method: &method,
            route,
            request_id: request_id.to_str().unwrap_or(""),
            elapsed: started.elapsed(),
        };
        Self::record(&settings, &self.durations, &request, &resp);
        resp
    }

    /// Phases 1 to 5 (see the module docs).
    async fn serve(
        &self,
        settings: &FrontSettings,
        route: Route,
        req: Request<Incoming>,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Result<Response<Buffered>, Reply> {
        let (kind, identity) = settings.authenticate(route, &req).map_err(|r| *r)?;
        let (parts, body) = req.into_parts();
        let deadline =
            started + settings.request_timeout + long_poll_wait(route, parts.uri.query());
        let body = settings.admit(&parts.headers, body, deadline).await?;
        let retryable = parts.method == Method::GET
            || parts.method == Method::HEAD
            || route == Route::Classify
            || parts.headers.contains_key("idempotency-key");
        let upstream = Upstream::new(
            parts.method,
            parts.uri,
            parts.headers,
            body,
            identity,
            request_id,
        );
        let exchange = Exchange {
            settings,
            request_id: request_id.to_str().unwrap_or(""),
            kind,
            route,
            retryable,
            poison: Poisoning::new(&self.poison, &upstream),
            upstream: &upstream,
            deadline,
        };
        exchange.run(&self.registry, &self.budget).await
    }

    /// Phase 6, record: what every request leaves behind, whatever its outcome.
    fn record(
        settings: &FrontSettings,
        durations: &RequestDurations,
        request: &Served<'_>,
        resp: &Response<FrontBody>,
    ) {
        let Served {
            method,
            route,
            request_id,
            elapsed,
        } = *request;
        durations.record(method, route, resp.status(), elapsed.as_secs_f64());
        // A long-poll is slow by design: its wait is not a slow request.
        if elapsed >= settings.slow_threshold && route != Route::Changes {
            tracing::warn!(
                request_id,
                route = route.template(),
                method = %method,
                status = resp.status().as_u16(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "slow request"
            );
        }
        if settings.access_log {
            crate::access_log::record(&crate::access_log::Access {
                method,
                route: route.template(),
                status: resp.status(),
                elapsed,
                request_id,
                bytes: hyper::body::Body::size_hint(resp.body()).exact(),
            });
        }
    }
}

/// One answered request, as [`Front::record`] reports it.
#[derive(Clone, Copy)]
struct Served<'a> {
    method: &'a Method,
    route: Route,
    request_id: &'a str,
    elapsed: Duration,
}

impl FrontSettings {
    /// Phase 1, authenticate: the worker kind the route names, and the verified caller.
    fn authenticate(&self, route: Route, req: &Request<Incoming>) -> Authenticated {
        let no_route = || Problem::not_found(format!("no route for {}", req.uri().path()));
        if route == Route::NotFound {
            return Err(Box::new(no_route().into()));
        }
        let identity = self
            .verifier
            .verify(req.headers().get(header::AUTHORIZATION))
            .map_err(|e| Box::new(unauthorized(e)))?;
        // Under `/v1/` but no such route: 404 only for a caller who may know the API.
        let kind = route.kind().ok_or_else(|| Box::new(no_route().into()))?;
        Ok((kind, identity))
    }

    /// Phase 2, admit: the body, whole, within `max_body_bytes` (a `Content-Length` over it
    /// is refused before reading) and within the request's deadline.
    async fn admit(
        &self,
        headers: &HeaderMap,
        body: Incoming,
        deadline: Instant,
    ) -> Result<Bytes, Reply> {
        if let Some(len) = headers.get(header::CONTENT_LENGTH) {
            let len: u64 = len
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Problem::bad_request("Content-Length is not a number"))?;
            if len > self.max_body_bytes {
                return Err(self.too_large().into());
            }
        }
        let reading = Limited::new(body, self.max_body_bytes as usize).collect();
        let Ok(read) = tokio::time::timeout_at(deadline, reading).await else {
            return Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request body too slow",
                "the request body did not arrive within server.request_timeout",
            )
            .into());
        };
        match read {
            Ok(b) => Ok(b.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(self.too_large().into())
            }
            Err(e) => {
                Err(Problem::bad_request(format!("could not read the request body: {e}")).into())
            }
        }
    }
}

/// How long a request waits before it tries another instance after a connection that
/// failed before anything was sent.
const NEVER_SENT_PAUSE: Duration = Duration::from_millis(10);

/// One request's way to a worker and back (phases 3 to 5): pick a ready instance
/// (queueing up to `queue_timeout`), take its whole answer, retry a safe request once on
/// another instance (and any request, any number of times within `queue_timeout`, whose
/// connection failed before anything was sent), and keep the poison and traffic accounting.
struct Exchange<'a> {
    settings: &'a FrontSettings,
    /// For the front's own log lines (there is no request span unless spans are exported).
    request_id: &'a str,
    kind: Kind,
    route: Route,
    retryable: bool,
    poison: Poisoning<'a>,
    upstream: &'a Upstream,
    deadline: Instant,
}

impl Exchange<'_> {
    async fn run(
        &self,
        registry: &Registry,
        budget: &Arc<Budget>,
    ) -> Result<Response<Buffered>, Reply> {
        if let Some(refused) = self.poison.refused() {
            return Err(refused);
        }
        let set = registry
            .kind(self.kind)
            .ok_or_else(|| Problem::internal("no such worker kind"))?;
        let queue_deadline = (Instant::now() + self.settings.queue_timeout).min(self.deadline);
        let mut instance = self.choose(set, queue_deadline).await?;
        let mut retried = false;
        loop {
            let pid = instance.pid();
            let err = match self.attempt(set, &instance, budget, retried).await? {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            self.retry_or_fail(&err, &instance, pid, &mut retried)
                .await?;
            metrics::counter!("firemode_upstream_retries_total", "kind" => self.kind.name())
                .increment(1);
            // A long-poll may fail late in its wait: it queues afresh for its retry.
            let queue_until = if self.route == Route::Changes {
                (Instant::now() + self.settings.queue_timeout).min(self.deadline)
            } else {
                queue_deadline.max(Instant::now())
            };
            instance = set
                .wait_pick(Some((&instance, pid)), queue_until)
                .await
                .ok_or_else(|| bad_gateway(&err))?;
        }
    }

    /// Phase 3, choose: a ready instance now, else the first to become ready before
    /// `queue_deadline`. No wait when every instance is up but says it cannot serve.
    async fn choose(&self, set: &KindSet, queue_deadline: Instant) -> Result<Arc<Instance>, Reply> {
        let kind = self.kind;
        if let Some(now) = set.pick(None) {
            return Ok(now);
        }
        // Every instance is up but says it cannot serve (its store is down): nothing is
        // restarting, so waiting would only delay the answer.
        if set.all_report_not_ready() {
            return Err(Problem::unavailable(format!(
                "every {} worker reports it cannot serve right now (its store is unreachable); retry shortly",
                kind.name()
            ))
            .into());
        }
        // No ready instance: queue (the wait is what this histogram shows).
        let waited = Instant::now();
        let found = set.wait_pick(None, queue_deadline).await;
        metrics::histogram!("firemode_queue_wait_seconds", "kind" => kind.name())
            .record(waited.elapsed().as_secs_f64());
        found.ok_or_else(|| self.settings.no_instance(set.next_start_in(), kind))
    }

    /// Phase 5, retry or fail: `Ok` when the request may go to another instance; the error
    /// answer otherwise (poison, the front's own trouble, an unsafe request, the one retry
    /// used).
    async fn retry_or_fail(
        &self,
        err: &UpstreamError,
        instance: &Instance,
        pid: Option<u32>,
        retried: &mut bool,
    ) -> Result<(), Reply> {
        let kind = self.kind.name();
        let request_id = self.request_id;
        tracing::warn!(kind, request_id, instance = instance.index, error = %err, retry = self.retryable, "upstream request failed");
        if let Some(refused) = self.poison.strike(err, instance, pid, self) {
            return Err(refused);
        }
        if err.is_local() {
            tracing::error!(kind, request_id, error = %err, "cannot buffer a worker's answer");
            return Err(Problem::unavailable(format!(
                "the front could not store the answer ({err}); retry shortly"
            ))
            .into());
        }
        if err.never_sent() {
            // Nothing reached a worker (its socket refused or vanished: a process that just
            // died, a deleted runtime dir): any request may go elsewhere, and this does not
            // use up the one retry. A short pause keeps two dead sockets from being tried in
            // a tight loop before the supervisor notices.
            tokio::time::sleep(NEVER_SENT_PAUSE).await;
        } else if !self.retryable || *retried {
            return Err(bad_gateway(err));
        } else {
            *retried = true;
        }
        Ok(())
    }

    /// Phase 4, exchange: one try at `instance` within the request deadline, its outcome
    /// reported for traffic verdicts. The outer `Err` is a timeout (a 504).
    async fn attempt(
        &self,
        set: &KindSet,
        instance: &Arc<Instance>,
        budget: &Arc<Budget>,
        retry: bool,
    ) -> Result<Result<Response<Buffered>, UpstreamError>, Reply> {
        let threshold = self.settings.traffic_threshold;
        let answered_before = instance.answered();
        let mut request = self.upstream.request();
        if retry && self.route == Route::Changes {
            // A retried long-poll waits only what its deadline has left.
            let left = self
                .deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(self.settings.request_timeout);
            shorten_wait(request.uri_mut(), left);
        }
        let sent = upstream::exchange(instance, request, budget, &self.settings.spill_dir);
        match tokio::time::timeout_at(self.deadline, sent).await {
            Ok(Ok(mut resp)) => {
                // The worker's own mark, for the front only.
                let data_fault = resp.headers_mut().remove(DATA_FAULT).is_some();
                let status = resp.status().as_u16();
                let outcome = Outcome::Answered { status, data_fault };
                set.record_outcome(instance, outcome, threshold);
                self.poison.forgive();
                Ok(Ok(finish(resp)))
            }
            Ok(Err(e)) => {
                if !e.is_local() {
                    set.record_outcome(instance, Outcome::Lost, threshold);
                }
                Ok(Err(e))
            }
            Err(_) => {
                // A worker that finished other answers meanwhile is busy, not broken: a
                // timeout there says the request was slow (a heavy read, a long queue),
                // and replacing the worker would only add to the load.
                if instance.answered() == answered_before {
                    set.record_outcome(instance, Outcome::Lost, threshold);
                }
                Err(self.settings.timeout())
            }
        }
    }
}

/// Poison accounting for one request (see `poison`): reads are exempt; a write's
/// fingerprint is computed only when the list is active or a strike happens.
struct Poisoning<'a> {
    list: &'a PoisonList,
    upstream: &'a Upstream,
    exempt: bool,
}

impl<'a> Poisoning<'a> {
    fn new(list: &'a PoisonList, upstream: &'a Upstream) -> Self {
        Self {
            list,
            upstream,
            exempt: list.threshold() == 0 || matches!(upstream.method, Method::GET | Method::HEAD),
        }
    }

    fn fingerprint(&self) -> u64 {
        // The verified caller exactly as the worker sees it (sub and org, any bytes).
        let identity: Vec<&[u8]> = self
            .upstream
            .headers
            .get(IDENTITY)
            .map(HeaderValue::as_bytes)
            .into_iter()
            .collect();
        self.list.fingerprint(&RequestKey {
            method: self.upstream.method.as_str(),
            path: self.upstream.uri.path(),
            identity: &identity,
            body: &self.upstream.body,
        })
    }

    /// A 503 with `Retry-After` while this exact request is refused.
    fn refused(&self) -> Option<Reply> {
        if self.exempt || !self.list.active() {
            return None;
        }
        let fp = self.fingerprint();
        let left = self.list.refused_for(fp, Instant::now().into_std())?;
        Some(poisoned(fp, left))
    }

    /// A worker connection died under this request: one strike, unless the supervisor
    /// itself was stopping that process. At the threshold the request is refused from now
    /// on instead of being retried.
    fn strike(
        &self,
        err: &UpstreamError,
        instance: &Instance,
        pid: Option<u32>,
        ex: &Exchange<'_>,
    ) -> Option<Reply> {
        if self.exempt || !err.died_under_request() || instance.stopped_by_supervisor(pid) {
            return None;
        }
        let fp = self.fingerprint();
        // Strikes count dying processes: a pid seen again adds nothing. Without a pid the
        // process had not started; nothing died.
        let pid = pid?;
        let n = self.list.strike(fp, pid, Instant::now().into_std());
        if n < self.list.threshold() {
            return None;
        }
        let (kind, route, request_id) = (ex.kind.name(), ex.route.template(), ex.request_id);
        metrics::counter!("firemode_poison_requests_total", "kind" => kind).increment(1);
        tracing::error!(kind, route, request_id, fingerprint = %format!("{fp:016x}"), strikes = n, "poison request: workers died under it; refusing it");
        Some(poisoned(fp, crate::poison::WINDOW))
    }

    fn forgive(&self) {
        if !self.exempt && self.list.active() {
            self.list.forgive(self.fingerprint());
        }
    }
}

impl FrontSettings {
    fn too_large(&self) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!(
                "the body is over server.max_body_bytes ({} bytes)",
                self.max_body_bytes
            ),
        )
    }

    fn timeout(&self) -> Reply {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "Request timed out",
            format!(
                "no answer within server.request_timeout ({})",
                humantime::format_duration(self.request_timeout)
            ),
        )
        .into()
    }

    fn no_instance(&self, next_start: Option<Duration>, kind: Kind) -> Reply {
        // Whole seconds, rounded up, at least 1.
        let secs = next_start
            .map(|d| d.as_secs_f64().ceil() as u64)
            .unwrap_or(1)
            .clamp(1, 3600);
        let mut resp = Problem::unavailable(format!(
            "no {} worker became ready within server.queue_timeout ({}); retry after {secs} s",
            kind.name(),
            humantime::format_duration(self.queue_timeout)
        ))
        .into_response::<Full<Bytes>>();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        Reply(resp)
    }
}

/// `{prefix:016x}{n:08x}` (lowercase hex; `n` takes more than 8 digits once it needs them),
/// written without the formatting machinery: one per request.
fn hex_request_id(prefix: u64, n: u64) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, slot) in buf[..16].iter_mut().enumerate() {
        *slot = DIGITS[((prefix >> (60 - 4 * i)) & 0xf) as usize];
    }
    let n_digits = (16 - n.leading_zeros() as usize / 4).max(8);
    for (i, slot) in buf[16..16 + n_digits].iter_mut().enumerate() {
        *slot = DIGITS[((n >> (4 * (n_digits - 1 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf[..16 + n_digits])
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// An error answer, already a response.
pub struct Reply(Response<Full<Bytes>>);

impl From<Problem> for Reply {
    fn from(p: Problem) -> Self {
        Reply(p.into_response())
    }
}

/// Phase 1's answer: the kind and caller, or the error answer (boxed: it is large and rare).
type Authenticated = Result<(Kind, Identity), Box<Reply>>;

fn unauthorized(e: AuthError) -> Reply {
    let mut resp = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        e.to_string(),
    )
    .into_response::<Full<Bytes>>();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Reply(resp)
}

fn poisoned(fp: u64, left: Duration) -> Reply {
    let secs = left.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "poison-request",
        "Request refused: it crashes workers",
        format!(
            "workers stopped while handling this exact request (same method, path, identity and body) several times; it is refused for the next {secs} s (fingerprint {fp:016x}). Operators can find it in the log by that fingerprint"
        ),
    )
    .with("fingerprint", format!("{fp:016x}"))
    .into_response::<Full<Bytes>>();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    Reply(resp)
}

fn bad_gateway(e: &UpstreamError) -> Reply {
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "Worker failed",
        format!("the worker could not answer: {e}"),
    )
    .into()
}

fn finish(mut resp: Response<Buffered>) -> Response<Buffered> {
    strip_hop_by_hop(resp.headers_mut());
    resp
}

/// The names `Connection` lists: hop-by-hop too (RFC 9110 §7.6.1). No allocation when the
/// header is absent, as it is on most requests.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    for name in listed.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Removes, in one pass over the names, what a client's request may not carry to a worker:
/// hop-by-hop headers (and the names `Connection` lists), the bearer token, the length (set
/// again for the body sent), any client-sent identity header and request id (the front
/// sets its own).
fn drop_unforwarded(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let unforwarded = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || *name == header::AUTHORIZATION
            || *name == header::CONTENT_LENGTH
            || *name == REQUEST_ID
            || matches!(name.as_str(), "keep-alive" | "proxy-connection")
            || name.as_str().starts_with(IDENTITY_PREFIX)
            || listed.contains(name)
    };
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| unforwarded(n)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The request as the worker receives it; rebuilt for a retry.
struct Upstream {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Upstream {
    fn new(
        method: Method,
        uri: Uri,
        mut headers: HeaderMap,
        body: Bytes,
        identity: Identity,
        request_id: &HeaderValue,
    ) -> Self {
        drop_unforwarded(&mut headers);
        headers.insert(IDENTITY, identity.header);
        headers.insert(REQUEST_ID, request_id.clone());
        firemode_telemetry::traces::inject_trace(&tracing::Span::current(), &mut headers);
        if !body.is_empty() || matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        // Origin form: the worker needs only the path and query.
        let uri = uri
            .path_and_query()
            .and_then(|pq| Uri::builder().path_and_query(pq.clone()).build().ok())
            .unwrap_or_else(|| Uri::from_static("/"));
        Self {
            method,
            uri,
            headers,
            body,
        }
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn a_retried_long_poll_waits_only_what_is_left() {
        let mut uri: http::Uri = "/v1/tests/sessions/S/changes?since=%7B%7D&wait=60"
            .parse()
            .unwrap();
        super::shorten_wait(&mut uri, std::time::Duration::from_millis(12_900));
        assert_eq!(uri, "/v1/tests/sessions/S/changes?since=%7B%7D&wait=12");
        let mut short: http::Uri = "/v1/tests/sessions/S/changes?wait=5".parse().unwrap();
        super::shorten_wait(&mut short, std::time::Duration::from_secs(30));
        assert_eq!(short, "/v1/tests/sessions/S/changes?wait=5");
    }

    #[test]
    fn request_ids_are_the_prefix_and_counter_in_hex() {
        for (prefix, n) in [
            (0u64, 0u64),
            (0x0123_4567_89ab_cdef, 1),
            (u64::MAX, 0xffff_ffff),
            (7, 0x1_0000_0000),
            (1 << 63, u64::MAX),
        ] {
            let id = super::hex_request_id(prefix, n);
            assert_eq!(id.to_str().unwrap(), format!("{prefix:016x}{n:08x}"));
        }
    }

    #[test]
    fn routes_by_template() {
        assert_eq!(Route::of("/v1/classify"), Route::Classify);
        assert_eq!(Route::of("/v1/tests/sessions/S1"), Route::Session);
        assert_eq!(
            Route::of("/v1/tests/sessions/S1/results"),
            Route::SessionResults
        );
        assert_eq!(
            Route::of("/v1/tests/sessions/S1/offline_bundle"),
            Route::OfflineBundle
        );
        assert_eq!(Route::of("/v1/tests/sessions/S1/other"), Route::UnknownV1);
        assert_eq!(Route::of("/v1/nope"), Route::UnknownV1);
        assert_eq!(Route::of("/"), Route::NotFound);
        assert_eq!(
            Route::of("/v1/tests/sessions/S1/results").template(),
            "/v1/tests/sessions/{id}/results"
        );
    }
}
