//! Liveness and readiness. `/healthz` answers while the process can serve at all and says
//! whether it is ready; `/readyz` is 200 only when the store answers (and the kind's own
//! checks pass). The supervisor routes only to instances whose health check says ready.

use firemode_store::Store;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared readiness flags of one worker process.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Flags>,
}

#[derive(Default)]
struct Flags {
    store: AtomicBool,
    /// The kind's own readiness (e.g. the catalog is loaded). Starts false.
    app: AtomicBool,
    /// Serving needs the store right now (false for a kind that answers from memory).
    store_optional: AtomicBool,
    /// The schema was migrated (or found current) once: never serve on a schema this
    /// binary does not know, even from memory.
    schema: AtomicBool,
    /// SIGUSR1 (the supervisor takes this process out of rotation or stops) or SIGTERM
    /// arrived: requests that wait for something (long-polls) answer now instead of holding
    /// the drain up.
    waiters_released: AtomicBool,
    release: tokio::sync::Notify,
}

impl Readiness {
    pub fn set_app_ready(&self, ready: bool) {
        self.inner.app.store(ready, Ordering::Release);
    }
    pub fn store_ready(&self) -> bool {
        self.inner.store.load(Ordering::Acquire)
    }
    /// Declares that this kind serves without the store once it is app-ready (classify
    /// answers from its in-memory catalog during a database outage).
    pub fn set_store_optional(&self) {
        self.inner.store_optional.store(true, Ordering::Release);
    }

    /// Releases every held request (and every later one) and wakes what waits in
    /// [`Readiness::waiters_released`]; the process keeps serving.
    pub fn release_waiters(&self) {
        self.inner.waiters_released.store(true, Ordering::Release);
        self.inner.release.notify_waiters();
    }

    /// Resolves once the process is leaving (at once if it already is): a request that
    /// holds its answer for an event (a long-poll) selects on this and answers early.
    pub async fn waiters_released(&self) {
        loop {
            // Registered before the flag is read, so a release in between is not missed.
            let released = self.inner.release.notified();
            if self.inner.waiters_released.load(Ordering::Acquire) {
                return;
            }
            released.await;
        }
    }

    pub fn is_ready(&self) -> bool {
        let app = self.inner.app.load(Ordering::Acquire);
        app && self.inner.schema.load(Ordering::Acquire)
            && (self.store_ready() || self.inner.store_optional.load(Ordering::Acquire))
    }
}

/// Applies migrations until they succeed, then pings the store every second and keeps the
/// store flag current.
pub fn spawn_store_probe(store: Store, readiness: Readiness) {
    tokio::spawn(async move {
        let mut migrated = false;
        let mut was_ok = None;
        loop {
            let result = if migrated {
                store.ping().await
            } else {
                let r = store.migrate().await;
                migrated = r.is_ok();
                readiness.inner.schema.store(migrated, Ordering::Release);
                r
            };
            let ok = result.is_ok();
            if was_ok != Some(ok) {
                match &result {
                    Ok(()) => tracing::info!(backend = ?store.backend(), "store ready"),
                    Err(e @ firemode_store::StoreError::SchemaTooNew { .. }) => {
                        tracing::error!(backend = ?store.backend(), error = %e, "store refused")
                    }
                    Err(e) => {
                        tracing::warn!(backend = ?store.backend(), error = %e, "store not ready")
                    }
                }
                was_ok = Some(ok);
            }
            readiness.inner.store.store(ok, Ordering::Release);
            tokio::time::sleep(if ok {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(250)
            })
            .await;
        }
    });
}
