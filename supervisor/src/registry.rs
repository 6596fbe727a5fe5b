//! The routable instances of every kind, and the wake-up for requests waiting for a ready
//! one. The supervision side replaces a kind's list atomically (rolling restarts, scaling);
//! the front reads it without locks.
//!
//! Verdicts (a failed health check, failing real traffic) take an instance out of rotation
//! only while every other instance of its kind is ready: they never take the last ready
//! instance of a kind out, nor several at once for a cause they share (a slow database, a
//! burst of heavy requests). One lock per kind makes "check the others, then leave" atomic.
//! A health verdict is executed under that lock by the instance's own task; a traffic
//! verdict is a `Condemn` command to the instance, recorded as pending under the lock until
//! its task has taken the instance out of rotation.

use crate::choose::{least_outstanding, Candidate};
use crate::instance::{Command, Instance, Kind};
use crate::traffic::Outcome;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The instances of one kind that take requests.
pub struct KindSet {
    pub kind: Kind,
    instances: ArcSwap<Vec<Arc<Instance>>>,
    /// Notified whenever an instance of this kind becomes ready or the list changes.
    ready: Notify,
    /// Rotates the routing scan's start.
    next: AtomicUsize,
    /// Held while a verdict checks the other instances and takes one out of rotation.
    verdicts: Mutex<Pending>,
}

/// Traffic verdicts sent and not yet acted on: each instance with the pid it was about.
/// One counts as out of rotation while it still runs that process and is still ready.
#[derive(Default)]
pub struct Pending(Vec<(Weak<Instance>, Option<u32>)>);

impl Pending {
    fn prune(&mut self) {
        self.0
            .retain(|(i, pid)| i.upgrade().is_some_and(|i| i.is_ready() && i.pid() == *pid));
    }

    fn contains(&self, inst: &Arc<Instance>) -> bool {
        self.0.iter().any(|(i, pid)| {
            std::ptr::eq(i.as_ptr(), Arc::as_ptr(inst)) && inst.pid() == *pid && inst.is_ready()
        })
    }

    fn add(&mut self, inst: &Arc<Instance>) {
        self.0.push((Arc::downgrade(inst), inst.pid()));
    }
}

pub struct Registry {
    kinds: Vec<KindSet>,
    /// Every instance with a live task, routable or not (for `/status`).
    members: ArcSwap<Vec<Arc<Instance>>>,
}

impl Registry {
    pub fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            kinds: kinds
                .into_iter()
                .map(|kind| KindSet {
                    kind,
                    instances: ArcSwap::from_pointee(Vec::new()),
                    ready: Notify::new(),
                    next: AtomicUsize::new(0),
                    verdicts: Mutex::default(),
                })
                .collect(),
            members: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The kinds whose every instance is crash-looping (what `/healthz` refuses to hide).
    pub fn crash_looping_kinds(&self) -> Vec<&'static str> {
        self.kinds
            .iter()
            .filter(|k| k.all_crash_looping())
            .map(|k| k.kind.name())
            .collect()
    }

    /// Records the instances the fleet runs (routable or draining).
    pub fn set_members(&self, members: Vec<Arc<Instance>>) {
        self.members.store(Arc::new(members));
    }

    /// Every instance the fleet runs, for `/status`.
    pub fn members(&self) -> Arc<Vec<Arc<Instance>>> {
        self.members.load_full()
    }

    pub fn kinds(&self) -> &[KindSet] {
        &self.kinds
    }

    /// The routable instances of `kind`.
    pub fn kind(&self, kind: Kind) -> Option<&KindSet> {
        self.kinds.iter().find(|k| k.kind == kind)
    }

    /// Every kind has at least one ready instance.
    pub fn all_kinds_ready(&self) -> bool {
        self.kinds.iter().all(|k| k.ready_count() > 0)
    }

    /// (ready, total) over every kind.
    pub fn ready_counts(&self) -> (usize, usize) {
        self.kinds.iter().fold((0, 0), |(r, t), k| {
            (r + k.ready_count(), t + k.instances().len())
        })
    }

    /// Wakes requests waiting for an instance of `kind`.
    pub fn notify_ready(&self, kind: Kind) {
        if let Some(set) = self.kind(kind) {
            set.ready.notify_waiters();
        }
    }
}

impl KindSet {
    pub fn instances(&self) -> arc_swap::Guard<Arc<Vec<Arc<Instance>>>> {
        self.instances.load()
    }

    pub fn ready_count(&self) -> usize {
        self.instances().iter().filter(|i| i.is_ready()).count()
    }

    /// Replaces the routable list (adds, removals, replacements).
    pub fn update(&self, f: impl Fn(&mut Vec<Arc<Instance>>)) {
        self.instances.rcu(|current| {
            let mut next = Vec::clone(current);
            f(&mut next);
            next
        });
        self.ready.notify_waiters();
    }

    fn verdicts(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means a panic elsewhere; the list stays consistent.
        let mut pending = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        pending.prune();
        pending
    }

    /// Whether `inst` may leave rotation on a verdict: at least one other instance of the
    /// kind exists and every other one is ready, with no verdict pending against it.
    fn others_all_ready(&self, inst: &Arc<Instance>, pending: &Pending) -> bool {
        let list = self.instances();
        let mut others = list.iter().filter(|i| !Arc::ptr_eq(i, inst)).peekable();
        others.peek().is_some() && others.all(|i| i.is_ready() && !pending.contains(i))
    }

    /// A health verdict: `Some` (the kind's verdict lock, held) when `inst` may leave
    /// rotation; its task changes its state before dropping the guard.
    pub fn may_leave_rotation(&self, inst: &Arc<Instance>) -> Option<MutexGuard<'_, Pending>> {
        let pending = self.verdicts();
        self.others_all_ready(inst, &pending).then_some(pending)
    }

    /// Reports a real request's outcome (`None`: no response). When real traffic says
    /// the instance is broken, it is replaced: condemned (drained at once) while its
    /// siblings are all ready; the rolling way (new process ready first) when it is its
    /// kind's only instance; not yet while a sibling is already out (the cause is likely
    /// shared): the verdict is asked again on the next failure.
    pub fn record_outcome(&self, inst: &Arc<Instance>, outcome: Outcome, threshold: u32) {
        if !inst.count_outcome(outcome, threshold) {
            return;
        }
        let reason = format!(
            "{threshold} real requests failed in a row (supervisor.traffic_failure_threshold)"
        );
        let mut pending = self.verdicts();
        let alone = !self.instances().iter().any(|i| !Arc::ptr_eq(i, inst));
        if alone {
            inst.reset_failures();
            inst.send(Command::Recycle { reason });
        } else if inst.is_ready()
            && !pending.contains(inst)
            && self.others_all_ready(inst, &pending)
        {
            inst.reset_failures();
            pending.add(inst);
            inst.send(Command::Condemn { reason });
        } else {
            tracing::debug!(
                kind = inst.kind.name(),
                instance = inst.index,
                "real requests are failing, but no other instance of the kind is ready: kept in rotation"
            );
        }
    }

    /// A ready instance now, by the routing policy. `exclude` names an instance and the pid
    /// it had when a request failed there: it is skipped while it still runs that process
    /// (a restarted process is a fresh chance, which matters when it is the only one).
    pub fn pick(&self, exclude: Option<(&Arc<Instance>, Option<u32>)>) -> Option<Arc<Instance>> {
        let list = self.instances();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let excluded = exclude
            .filter(|(x, pid)| x.pid() == *pid)
            .and_then(|(x, _)| list.iter().position(|i| Arc::ptr_eq(i, x)));
        let candidates = list.iter().map(|i| Candidate {
            ready: i.is_ready(),
            outstanding: i.outstanding(),
        });
        least_outstanding(candidates, start, excluded).map(|i| list[i].clone())
    }

    /// A ready instance, waiting until `deadline` for one to become ready.
    pub async fn wait_pick(
        &self,
        exclude: Option<(&Arc<Instance>, Option<u32>)>,
        deadline: Instant,
    ) -> Option<Arc<Instance>> {
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

    /// No instance of the kind is ready and every one is crash-looping: nothing of this kind
    /// serves, and waiting is not healing it.
    pub fn all_crash_looping(&self) -> bool {
        let list = self.instances();
        !list.is_empty() && list.iter().all(|i| !i.is_ready() && i.is_degraded())
    }

    /// Every instance of the kind is running and answers its health check with
    /// "not ready" (e.g. its store is down).
    pub fn all_report_not_ready(&self) -> bool {
        let list = self.instances();
        !list.is_empty() && list.iter().all(|i| i.reports_not_ready())
    }

    /// The soonest restart among this kind's instances in backoff: what `Retry-After` says.
    pub fn next_start_in(&self) -> Option<Duration> {
        self.instances()
            .iter()
            .filter_map(|i| i.next_start_in())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{InstanceState, Owner};
    use std::path::PathBuf;

    fn kind_with(n: u32) -> (Registry, Vec<Arc<Instance>>, Vec<Owner>) {
        let registry = Registry::new([Kind::Sync]);
        let (list, mut owners): (Vec<_>, Vec<_>) = (0..n)
            .map(|i| Instance::new(Kind::Sync, i, PathBuf::from("/nonexistent"), 1, 1))
            .unzip();
        for (i, o) in owners.iter_mut().enumerate() {
            o.publish(|s| {
                s.state = InstanceState::Ready;
                s.pid = Some(100 + i as u32);
            });
        }
        let set = registry.kind(Kind::Sync).unwrap();
        set.update(|l| l.extend(list.iter().cloned()));
        (registry, list, owners)
    }

    #[test]
    fn verdicts_never_take_the_last_ready_instance_nor_two_at_once() {
        let (registry, list, mut owners) = kind_with(2);
        let set = registry.kind(Kind::Sync).unwrap();
        let out = set.may_leave_rotation(&list[0]);
        assert!(out.is_some());
        owners[0].publish(|s| s.state = InstanceState::Unhealthy);
        drop(out);
        assert!(!list[0].is_ready());
        assert!(set.may_leave_rotation(&list[1]).is_none());
        for _ in 0..10 {
            set.record_outcome(&list[1], Outcome::Lost, 3);
        }
        assert!(list[1].is_ready(), "the last ready one stays in rotation");
        assert_eq!(owners[1].try_command(), None);
        // Once its sibling is back, the next failure executes the waiting verdict.
        owners[0].publish(|s| s.state = InstanceState::Ready);
        set.record_outcome(&list[1], Outcome::Lost, 3);
        assert!(matches!(
            owners[1].try_command(),
            Some(Command::Condemn { .. })
        ));
        // Until its task has acted on it, the condemned one counts as out: no second
        // verdict, health or traffic, takes its sibling out too.
        assert!(set.may_leave_rotation(&list[0]).is_none());
        for _ in 0..10 {
            set.record_outcome(&list[0], Outcome::Lost, 3);
        }
        assert_eq!(owners[0].try_command(), None);
        // Its task acted (out of rotation), then a new process became ready: the verdict
        // is spent.
        owners[1].publish(|s| s.state = InstanceState::Draining);
        owners[1].publish(|s| {
            s.state = InstanceState::Ready;
            s.pid = Some(200);
        });
        assert!(set.may_leave_rotation(&list[0]).is_some());
    }

    #[test]
    fn the_only_instance_is_replaced_the_rolling_way() {
        let (registry, list, mut owners) = kind_with(1);
        let set = registry.kind(Kind::Sync).unwrap();
        for _ in 0..3 {
            set.record_outcome(&list[0], Outcome::status(500), 3);
        }
        assert!(
            list[0].is_ready(),
            "stays in rotation until its replacement is ready"
        );
        assert!(matches!(
            owners[0].try_command(),
            Some(Command::Recycle { .. })
        ));
        assert_eq!(owners[0].try_command(), None);
    }
}
