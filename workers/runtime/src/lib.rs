//! What every worker binary shares: its command line, logging, the store handle, and the
//! HTTP/1.1 server on its Unix socket with health, readiness and a graceful drain.
//!
//! # Layout
//! * [`run`]: the whole life of a worker process — parse args, read the config the
//!   supervisor wrote, open the store, serve until SIGTERM, drain, exit 0.
//! * [`App`]: what a worker kind adds — its `/v1` routes and any readiness of its own.
//! * `server`: the accept loop and the drain (after mini-redis: one shutdown signal fanned
//!   out to every connection, then wait for them all). It runs on a control thread of its
//!   own, with `/healthz`, `/readyz` and `/metrics`; the kind's routes run on the app
//!   runtime, so a health check never queues behind real work.
//! * `health`: `/healthz` and `/readyz`, and the background store probe behind them.
//! * [`catalog`]: following the store's current catalog version.
//! * [`WorkerError`], [`CatalogFileError`]: why a worker stops, each cause kept as a source.

#![forbid(unsafe_code)]

pub mod catalog;
mod error;
mod health;
mod server;

pub use error::{CatalogFileError, WorkerError};
pub use health::Readiness;

use bytes::Bytes;
use firemode_config::Config;
use firemode_store::{Store, StoreOptions};
use http::request::Parts;
use http::Response;
use http_body_util::Full;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The command line the supervisor gives a worker.
#[derive(clap::Parser, Debug)]
pub struct WorkerArgs {
    /// Unix socket to serve HTTP/1.1 on (created; a stale file is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// The effective config, as JSON written by the supervisor.
    #[arg(long)]
    pub config_json: PathBuf,
    /// Instance number within the kind, for logs.
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
}

/// Parses the command line as `firemode-<kind>`, whose `--version` shows the version and
/// the git commit of the build.
fn parse_args(kind: &'static str) -> WorkerArgs {
    use clap::{CommandFactory, FromArgMatches};
    // Once per process: the program name clap prints in `--version` and `--help`.
    let name: &'static str = Box::leak(format!("firemode-{kind}").into_boxed_str());
    let matches = WorkerArgs::command()
        .name(name)
        .bin_name(name)
        .version(firemode_telemetry::build_info::VERSION_LINE)
        .about("A FireMode worker; the supervisor starts it (see `firemode plan`)")
        .get_matches();
    WorkerArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Everything a worker kind needs to build its [`App`].
#[derive(Clone)]
pub struct WorkerContext {
    pub config: Arc<Config>,
    pub store: Store,
    pub instance: u32,
    pub readiness: Readiness,
}

/// A worker kind's routes.
pub trait App: Send + Sync + 'static {
    /// Answers one request other than `/healthz` and `/readyz`. `body` is the whole
    /// request body (the front has already enforced `max_body_bytes`).
    fn handle(&self, req: Parts, body: Bytes)
        -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Runs a worker process to completion. `make_app` builds the kind's routes once the store
/// handle exists; the store may still be unreachable (readiness says so).
pub fn run<A, F, Fut>(kind: &'static str, make_app: F) -> ExitCode
where
    A: App,
    F: FnOnce(WorkerContext) -> Fut,
    Fut: Future<Output = anyhow::Result<A>>,
{
    let args = parse_args(kind);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firemode-{kind}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(kind, args, make_app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging may not be set up yet: one JSON line the supervisor can re-emit, the
            // error with its causes (`binding /x.sock: Permission denied`).
            let e = anyhow::Error::from(e);
            let line = serde_json::json!({"level": "ERROR", "message": "worker failed", "error": format!("{e:#}")});
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

async fn serve<A, F, Fut>(
    kind: &'static str,
    args: WorkerArgs,
    make_app: F,
) -> Result<(), WorkerError>
where
    A: App,
    F: FnOnce(WorkerContext) -> Fut,
    Fut: Future<Output = anyhow::Result<A>>,
{
    let text =
        std::fs::read_to_string(&args.config_json).map_err(|source| WorkerError::ReadConfig {
            path: args.config_json.clone(),
            source,
        })?;
    let config = Arc::new(Config::from_json(&text)?);
    // JSON lines on stderr: the supervisor re-emits them tagged with kind and instance.
    let _telemetry = firemode_telemetry::traces::init(
        firemode_telemetry::traces::LogStyle::Json,
        &config.telemetry.otlp_endpoint,
        firemode_telemetry::traces::ServiceIdentity {
            kind,
            instance_id: format!("{kind}-{}-{}", args.instance, std::process::id()),
        },
    );
    firemode_telemetry::install_metrics();
    let store = Store::open(&StoreOptions {
        url: config.database.url.clone(),
        pool_size: config.database.pool_size,
        data_dir: config.data_dir.clone(),
        connect_timeout: Duration::from_secs(2),
        // Give up on a busy session well before the front's request_timeout.
        lock_timeout: config.server.request_timeout.get().mul_f64(0.8),
    })?;
    let readiness = Readiness::default();
    health::spawn_store_probe(store.clone(), readiness.clone());
    let ctx = WorkerContext {
        config: config.clone(),
        store,
        instance: args.instance,
        readiness: readiness.clone(),
    };
    let app = Arc::new(make_app(ctx).await.map_err(WorkerError::App)?);
    tracing::info!(
        kind,
        instance = args.instance,
        socket = %args.socket.display(),
        version = firemode_telemetry::build_info::VERSION,
        commit = firemode_telemetry::build_info::COMMIT,
        "worker starting"
    );
    server::serve(kind, &args.socket, app, readiness).await
}

/// A plain JSON 200.
pub fn json_response(status: http::StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
