//! Waking long-pollers when a session changes (design §3, `wait`).
//!
//! This module owns the in-process registry of watched sessions and the waiting
//! algorithm; [`pg`] owns the PostgreSQL side (one `LISTEN` connection per process and the
//! `NOTIFY` a merge sends).
//!
//! # How a wake-up travels
//! * Every watched session (one with at least one waiter in this process) has one
//!   [`Entry`]: a `tokio::sync::watch` channel holding the session's stored version as last
//!   read, a `Notify` that asks for a re-read ("kick"), and one checker task that does the
//!   reads. However many waiters a session has, a kick costs one `SELECT version`, and
//!   kicks that arrive during a read fold into one more read.
//! * PostgreSQL: a merge sends `NOTIFY firemode_session_changed, '<digest>'` in its
//!   transaction (delivered at commit, dropped on rollback); the process's listening
//!   connection kicks the entries of that digest. After the listener (re)connects it kicks
//!   every entry, since notifications sent while it was down are lost.
//! * SQLite: a merge through this process kicks its session's entry after commit; merges
//!   by another process on the same file are found by the checker re-reading every
//!   [`SQLITE_POLL`] while the session has waiters.
//!
//! No wake-up is lost: a waiter joins the entry first and only then looks at the version
//! it holds. A version the entry holds was read after the entry existed (and, on
//! PostgreSQL, after `LISTEN` was in force on the connection that read it), so a merge that
//! committed later kicks it again.

pub(crate) mod pg;

use crate::sqlite::SqliteStore;
use crate::StoreError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How often a watched SQLite session is re-read for merges made by other processes.
pub(crate) const SQLITE_POLL: Duration = Duration::from_millis(100);

/// Waiters one process holds at most; more are refused with [`StoreError::Busy`], which
/// bounds the registry whatever clients do.
pub(crate) const MAX_WAITERS: usize = 100_000;

/// A session's name in notifications: the first 16 bytes of SHA-256 over tenant and
/// session id. Sessions sharing a digest only wake each other for a re-read.
pub(crate) type Digest = [u8; 16];

pub(crate) fn session_digest(tenant: &str, session_id: &str) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"firemode-watch\0");
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(session_id.as_bytes());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&h.finalize()[..16]);
    digest
}

/// What this process knows of a watched session's stored version.
#[derive(Clone, Debug, PartialEq)]
enum Known {
    /// The first read has not finished.
    Unread,
    /// The `sync_sessions.version` last read (0: no applied batch yet).
    Version(i64),
    /// The first read failed (later failures keep the last version and retry).
    Failed(Arc<str>),
}

/// One watched session, shared by all its waiters in this process.
struct Entry {
    tenant: String,
    session_id: String,
    known: watch::Sender<Known>,
    /// Asks the checker for a re-read; permits fold, so a burst costs one read.
    kick: Notify,
    /// Set when the last waiter left; the checker then stops.
    closed: AtomicBool,
}

/// An entry with its waiter count (changed only under the registry lock).
struct Slot {
    entry: Arc<Entry>,
    waiters: usize,
}

/// Where versions come from.
pub(crate) enum Source {
    Sqlite(SqliteStore),
    Postgres(Box<pg::Listener>),
}

/// Counters of the watch machinery, for tests and `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Sessions with at least one waiter in this process.
    pub sessions: usize,
    /// Waiters in this process.
    pub waiters: usize,
    /// Version reads done for waiters since the store was opened (shared per session).
    pub version_reads: u64,
    /// PostgreSQL: times the listening connection was established (1 after the first
    /// waiter; more after reconnects). Always 0 on SQLite.
    pub listener_connects: u64,
}

/// The registry of watched sessions of one [`crate::Store`] (shared by its clones).
pub(crate) struct Hub {
    sessions: Mutex<HashMap<Digest, Vec<Slot>>>,
    waiters: AtomicU64,
    version_reads: AtomicU64,
    source: Source,
    /// SQLite: how often a watched session is re-read.
    poll: Duration,
}

impl Hub {
    pub(crate) fn new(source: Source, poll: Duration) -> Arc<Hub> {
        Arc::new(Hub {
            sessions: Mutex::new(HashMap::new()),
            waiters: AtomicU64::new(0),
            version_reads: AtomicU64::new(0),
            source,
            poll,
        })
    }

    pub(crate) fn listener(&self) -> Option<&pg::Listener> {
        match &self.source {
            Source::Postgres(listener) => Some(listener),
            Source::Sqlite(_) => None,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Digest, Vec<Slot>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the stored version of the session exceeds `seen_version` (`Ok(true)`)
    /// or `deadline` passes (`Ok(false)`). See [`crate::Store::wait_for_change`].
    pub(crate) async fn wait(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        seen_version: i64,
        deadline: Instant,
    ) -> Result<bool, StoreError> {
        let waiter = self.join(tenant, session_id)?;
        let mut known = waiter.entry.known.subscribe();
        let mut first = true;
        loop {
            match &*known.borrow_and_update() {
                Known::Version(v) if *v > seen_version => return Ok(true),
                Known::Failed(e) if !first => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot watch the session for changes ({e}); retry the request"
                    )))
                }
                // A failure from before this waiter came: try again for it.
                Known::Failed(_) => waiter.entry.kick.notify_one(),
                _ => {}
            }
            first = false;
            tokio::select! {
                changed = known.changed() => {
                    // The waiter holds the entry, so its sender lives; never taken.
                    if changed.is_err() {
                        return Err(StoreError::Unavailable("the session watch closed".into()));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(false),
            }
        }
    }

    /// Registers a waiter on the session: joins its entry, or creates the entry and its
    /// checker.
    fn join(self: &Arc<Self>, tenant: &str, session_id: &str) -> Result<Waiter, StoreError> {
        let digest = session_digest(tenant, session_id);
        let (entry, created) = {
            let mut map = self.map();
            if self.waiters.load(Ordering::Relaxed) >= MAX_WAITERS as u64 {
                return Err(StoreError::Busy(format!(
                    "{MAX_WAITERS} requests are already waiting for changes on this worker; \
                     retry later or without wait"
                )));
            }
            let slots = map.entry(digest).or_default();
            let existing = slots
                .iter_mut()
                .find(|s| s.entry.tenant == tenant && s.entry.session_id == session_id);
            let joined = match existing {
                Some(slot) => {
                    slot.waiters += 1;
                    (slot.entry.clone(), false)
                }
                None => {
                    let entry = Arc::new(Entry {
                        tenant: tenant.to_string(),
                        session_id: session_id.to_string(),
                        known: watch::Sender::new(Known::Unread),
                        kick: Notify::new(),
                        closed: AtomicBool::new(false),
                    });
                    slots.push(Slot {
                        entry: entry.clone(),
                        waiters: 1,
                    });
                    (entry, true)
                }
            };
            self.waiters.fetch_add(1, Ordering::Relaxed);
            joined
        };
        // From here the guard undoes the registration, whatever happens.
        let waiter = Waiter {
            hub: self.clone(),
            digest,
            entry: entry.clone(),
        };
        if let Source::Postgres(listener) = &self.source {
            listener.ensure_started(self);
        }
        if created {
            tokio::spawn(check(self.clone(), entry));
        }
        Ok(waiter)
    }

    /// Removes one waiter; the last one of a session removes its entry and stops its checker.
    fn leave(&self, digest: &Digest, entry: &Arc<Entry>) {
        let mut map = self.map();
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        let Some(slots) = map.get_mut(digest) else {
            return;
        };
        if let Some(i) = slots.iter().position(|s| Arc::ptr_eq(&s.entry, entry)) {
            slots[i].waiters -= 1;
            if slots[i].waiters == 0 {
                slots.swap_remove(i);
                entry.closed.store(true, Ordering::Relaxed);
                entry.kick.notify_one();
            }
        }
        if slots.is_empty() {
            map.remove(digest);
        }
    }

    /// A merge through this store committed a new version of the session. On SQLite this is
    /// the only way this process hears of its own merges at once; on PostgreSQL the
    /// `NOTIFY` of the merge wakes every host, this one included.
    pub(crate) fn merged(&self, tenant: &str, session_id: &str) {
        if matches!(self.source, Source::Sqlite(_)) {
            self.kick_session(tenant, session_id);
        }
    }

    fn kick_session(&self, tenant: &str, session_id: &str) {
        let digest = session_digest(tenant, session_id);
        if let Some(slots) = self.map().get(&digest) {
            for slot in slots {
                if slot.entry.tenant == tenant && slot.entry.session_id == session_id {
                    slot.entry.kick.notify_one();
                }
            }
        }
    }

    /// A notification named this digest: every session under it re-reads.
    pub(crate) fn kick_digest(&self, digest: &Digest) {
        if let Some(slots) = self.map().get(digest) {
            for slot in slots {
                slot.entry.kick.notify_one();
            }
        }
    }

    /// Every watched session re-reads (after a reconnect, or a notification this release
    /// cannot parse).
    pub(crate) fn kick_all(&self) {
        for slot in self.map().values().flatten() {
            slot.entry.kick.notify_one();
        }
    }

    pub(crate) fn stats(&self) -> WatchStats {
        let sessions = self.map().values().map(Vec::len).sum();
        WatchStats {
            sessions,
            waiters: self.waiters.load(Ordering::Relaxed) as usize,
            version_reads: self.version_reads.load(Ordering::Relaxed),
            listener_connects: match &self.source {
                Source::Postgres(listener) => listener.connects(),
                Source::Sqlite(_) => 0,
            },
        }
    }

    async fn read_version(&self, entry: &Entry) -> Result<i64, StoreError> {
        self.version_reads.fetch_add(1, Ordering::Relaxed);
        match &self.source {
            Source::Sqlite(s) => s.session_version(&entry.tenant, &entry.session_id).await,
            Source::Postgres(l) => l.read_version(&entry.tenant, &entry.session_id).await,
        }
    }
}

/// A registered waiter; dropping it (return, deadline, or a cancelled request) leaves.
struct Waiter {
    hub: Arc<Hub>,
    digest: Digest,
    entry: Arc<Entry>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.hub.leave(&self.digest, &self.entry);
    }
}

/// The checker of one watched session: reads its version, publishes it, and waits for the
/// next kick (or, on SQLite, the next poll), until the last waiter leaves.
async fn check(hub: Arc<Hub>, entry: Arc<Entry>) {
    // Warn once per run of failures (SQLite retries every poll).
    let mut failing = false;
    while !entry.closed.load(Ordering::Relaxed) {
        match hub.read_version(&entry).await {
            Ok(v) => {
                failing = false;
                entry.known.send_if_modified(|known| {
                    let newer = match known {
                        Known::Version(old) => v != *old,
                        Known::Unread | Known::Failed(_) => true,
                    };
                    if newer {
                        *known = Known::Version(v);
                    }
                    newer
                });
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "reading a watched session's version failed; retrying");
                }
                failing = true;
                // Waiters keep a version already read (a later read or kick catches up);
                // only waiters with none are told.
                entry.known.send_if_modified(|known| match known {
                    Known::Version(_) => false,
                    Known::Unread | Known::Failed(_) => {
                        *known = Known::Failed(e.to_string().into());
                        true
                    }
                });
            }
        }
        match hub.source {
            Source::Sqlite(_) => {
                tokio::select! {
                    () = entry.kick.notified() => {}
                    () = tokio::time::sleep(hub.poll) => {}
                }
            }
            Source::Postgres(_) => entry.kick.notified().await,
        }
    }
}

#[cfg(test)]
mod tests;
