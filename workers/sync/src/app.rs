//! The sync worker as a `firemode_worker::App`: its shared state (store, config, the
//! rendered catalog), what it starts with (metric descriptions, the catalog follower that
//! makes it ready, the idempotency purge), and the hand-off of each request to [`routes`].
//!
//! [`routes`]: crate::routes

use crate::bundle_http::RenderedCatalog;
use crate::{routes, HttpResponse};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use firemode_config::Config;
use firemode_store::Store;
use firemode_worker::{App, WorkerContext};
use http::request::Parts;
use std::sync::Arc;
use std::time::Duration;

/// How often expired idempotency records are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// What every request of the sync worker shares.
pub struct SyncApp {
    pub store: Store,
    pub config: Arc<Config>,
    /// The catalog the bundle embeds; `None` until the first one is installed.
    pub catalog: Arc<ArcSwapOption<RenderedCatalog>>,
    /// Readiness, and the drain long-polls stop waiting at.
    pub readiness: firemode_worker::Readiness,
    /// Whole-session reads in flight, shared by the requests that want them.
    pub reads: crate::shared_reads::SharedReads,
    /// The places of whole-session reads ([`crate::shared_reads::WHOLE_READS_AT_ONCE`]).
    pub whole_reads: crate::shared_reads::WholeReads,
    /// Catch-up reads in flight (the registers around those new to one clock), shared by
    /// the requests at that clock.
    pub catch_up_reads:
        crate::shared_reads::SharedReads<(String, String, firemode_merge::VectorClock)>,
    /// Merges waiting for their session's next transaction.
    pub merges: Arc<crate::merge_queue::MergeQueue>,
}

impl SyncApp {
    /// Builds the app once the store handle exists; ready once the catalog is loaded.
    pub async fn start(ctx: WorkerContext) -> anyhow::Result<SyncApp> {
        describe_metrics();
        let catalog = follow_catalog(&ctx)?;
        let sync = &ctx.config.sync;
        let (ttl, retention) = (sync.idempotency_ttl.get(), sync.conflict_retention.get());
        tokio::spawn(purge_expired(ctx.store.clone(), ttl, retention));
        tokio::spawn(crate::memory::release_after_large_work());
        Ok(SyncApp {
            store: ctx.store,
            config: ctx.config,
            catalog,
            readiness: ctx.readiness,
            reads: Default::default(),
            catch_up_reads: Default::default(),
            whole_reads: Default::default(),
            merges: Default::default(),
        })
    }
}

impl App for SyncApp {
    async fn handle(&self, req: Parts, body: Bytes) -> HttpResponse {
        routes::handle(self, req, body).await
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "crdt_conflicts_total",
        "Concurrent writes resolved by the merge"
    );
    describe_histogram!(
        "sync_latency_seconds",
        Unit::Seconds,
        "Sync merge requests, by client type"
    );
    describe_histogram!(
        "offline_bundle_bytes",
        Unit::Bytes,
        "Offline bundle sizes before compression"
    );
    describe_histogram!(
        "sync_merge_group_size",
        "Merges of one session sharing one store transaction (1: alone)"
    );
    describe_gauge!(
        "sync_merges_waiting",
        "Merges waiting for their session's next transaction (behind another merge of it)"
    );
    metrics::gauge!("sync_merges_waiting").set(0.0);
    describe_gauge!(
        "sync_long_polls_waiting",
        "GET …/changes requests held until a merge or the end of their wait"
    );
    metrics::counter!("crdt_conflicts_total").absolute(0);
    metrics::gauge!("sync_long_polls_waiting").set(0.0);
}

/// Installs the configured catalog and follows the store's current one, rendering each
/// version once; the worker is ready once the first is in.
fn follow_catalog(ctx: &WorkerContext) -> anyhow::Result<Arc<ArcSwapOption<RenderedCatalog>>> {
    let configured = firemode_worker::catalog::configured_catalog(&ctx.config.catalog.file)?;
    let catalog: Arc<ArcSwapOption<RenderedCatalog>> = Arc::default();
    let (slot, readiness) = (catalog.clone(), ctx.readiness.clone());
    tokio::spawn(firemode_worker::catalog::install_and_follow(
        ctx.store.clone(),
        configured,
        ctx.config.catalog.refresh_interval.get(),
        move |stored| {
            slot.store(Some(Arc::new(RenderedCatalog {
                version: stored.version,
                json: Bytes::from(stored.catalog.to_json()),
            })));
            readiness.set_app_ready(true);
        },
    ));
    Ok(catalog)
}

/// Expired idempotency records (lookups ignore them anyway) and kept conflicts older than
/// `sync.conflict_retention` go away in the background.
async fn purge_expired(store: Store, ttl: Duration, conflict_retention: Duration) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        if let Err(e) = store.purge_idempotency(ttl).await {
            tracing::debug!(error = %e, "purging idempotency records failed");
        }
        if let Err(e) = store.purge_conflicts(conflict_retention).await {
            tracing::debug!(error = %e, "purging kept conflicts failed");
        }
    }
}
