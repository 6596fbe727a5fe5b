//! The instances of every kind, and the wake-up for requests waiting for a ready one.
//! Shared by the supervision tasks (which write states) and the front (which reads them).

use crate::choose::{least_outstanding, Candidate};
use crate::instance::{Instance, Kind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The instances of one kind.
pub struct KindSet {
    pub kind: Kind,
    pub instances: Vec<Arc<Instance>>,
    /// Notified whenever an instance of this kind becomes ready.
    ready: Notify,
    /// Rotates the routing scan's start.
    next: AtomicUsize,
}

pub struct Registry {
    kinds: Vec<KindSet>,
}

impl Registry {
    pub fn new(kinds: Vec<(Kind, Vec<Arc<Instance>>)>) -> Self {
        Self {
            kinds: kinds
                .into_iter()
                .map(|(kind, instances)| KindSet {
                    kind,
                    instances,
                    ready: Notify::new(),
                    next: AtomicUsize::new(0),
                })
                .collect(),
        }
    }

    pub fn kinds(&self) -> &[KindSet] {
        &self.kinds
    }

    pub fn set(&self, kind: Kind) -> Option<&KindSet> {
        self.kinds.iter().find(|k| k.kind == kind)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.kinds.iter().flat_map(|k| k.instances.iter())
    }

    /// Every kind has at least one ready instance.
    pub fn all_kinds_ready(&self) -> bool {
        self.kinds
            .iter()
            .all(|k| k.instances.iter().any(|i| i.is_ready()))
    }

    /// Wakes requests waiting for an instance of `kind`.
    pub fn notify_ready(&self, kind: Kind) {
        if let Some(set) = self.set(kind) {
            set.ready.notify_waiters();
        }
    }
}

impl KindSet {
    /// A ready instance now, by the routing policy.
    pub fn pick(&self, exclude: Option<usize>) -> Option<(usize, &Arc<Instance>)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = self.instances.iter().map(|i| Candidate {
            ready: i.is_ready(),
            outstanding: i.outstanding(),
        });
        least_outstanding(candidates, start, exclude).map(|i| (i, &self.instances[i]))
    }

    /// A ready instance, waiting until `deadline` for one to become ready.
    pub async fn wait_pick(
        &self,
        exclude: Option<usize>,
        deadline: Instant,
    ) -> Option<(usize, &Arc<Instance>)> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Register before checking, so a wake-up between the check and the wait is kept.
            notified.as_mut().enable();
            if let Some(found) = self.pick(exclude) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pick(exclude);
            }
        }
    }

    /// The soonest restart among this kind's instances in backoff: what `Retry-After` says.
    pub fn next_start_in(&self) -> Option<Duration> {
        self.instances
            .iter()
            .filter_map(|i| i.next_start_in())
            .min()
    }
}
