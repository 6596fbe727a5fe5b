//! The store behind the workers: one interface, two backends.
//!
//! * PostgreSQL through bb8-postgres when `database.url` is set — several hosts may share it;
//!   every piece of shared state lives here, never in a process.
//! * Embedded SQLite (rusqlite, bundled, WAL) in `data_dir` otherwise, so a first run needs
//!   nothing installed. Its connections sit in a bb8 pool too and run on tokio's blocking
//!   threads.
//!
//! # Layout
//! * [`migrations`]: the schema, applied at start under a lock (advisory lock / immediate
//!   transaction), so concurrent workers never race.
//! * `sessions`: the sync session API — a group of merges of one session in one
//!   transaction ([`Store::merge_group`]), reading and writing only the rows it names
//!   (`firemode_merge::rows`); whole-session reads in one snapshot; compaction.
//! * `legacy`: moving sessions an older release kept as one JSON value to rows (schema 5).
//! * `sqlite`, `postgres`: the two backends, with the same queries.
//! * [`check`]: one connection attempt for `firemode check-config --connect`.
//! * [`backup`]: an online copy of the SQLite store for `firemode backup FILE`.
//! * `watch`: waking long-pollers when a session changes ([`Store::wait_for_change`]):
//!   `LISTEN/NOTIFY` on PostgreSQL, a shared re-read per watched session on SQLite.
//!
//! Architecture invariant: the workers see only [`Store`]; no SQL outside this crate.

#![forbid(unsafe_code)]

pub mod backup;
pub mod check;
mod dots;
mod legacy;
mod migrations;
mod postgres;
mod sessions;
mod sqlite;
mod watch;

pub use dots::{CatchUpRead, MAX_NEW_REGISTERS, MAX_PARENT_LOOKUPS};
pub use sessions::{
    CompactFn, GroupDone, GroupFn, GroupStep, IdempotencyKey, JournalEntry, MergeFn, MergeOutcome,
    MergeStep, Reads, RowChanges, SessionRows, StoredSession,
};
pub use watch::pg::CHANNEL as WATCH_CHANNEL;
pub use watch::WatchStats;

use firemode_catalog::Catalog;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How to reach the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Empty: embedded SQLite in `data_dir`. Otherwise a PostgreSQL URL or key=value string.
    pub url: String,
    pub pool_size: u32,
    pub data_dir: PathBuf,
    /// How long connecting to PostgreSQL may take before the store counts as unavailable.
    pub connect_timeout: Duration,
    /// How long a merge waits for its session's lock (another merge of the same session, or
    /// a duplicate in flight) before giving up with [`StoreError::Busy`]; also how long a
    /// request waits for a pooled connection while all are busy (at least `connect_timeout`).
    /// A crowd of tablets catching up at once queues for the pool instead of getting 503s
    /// after a fixed 2 s (a hundred deep catch-ups did, beside 16 connections).
    pub lock_timeout: Duration,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (down, pool exhausted, timed out). Retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The session is locked by another merge for longer than the lock timeout.
    #[error("busy: {0}")]
    Busy(String),
    /// The request contradicts what is stored.
    #[error("{0}")]
    Conflict(String),
    /// Bad configuration (e.g. an unparsable database URL).
    #[error("store configuration: {0}")]
    Config(String),
    /// Stored data that does not parse.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A newer release migrated the database past what this binary knows: it refuses to
    /// run on it rather than misread it.
    #[error("the database schema is at version {found}, newer than this binary knows ({known}): a newer FireMode release migrated it; run that release (or restore a backup taken before the upgrade)")]
    SchemaTooNew { found: i64, known: i64 },
}

/// Which backend a store uses, for logs and `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Inner,
    /// Watched sessions and their waiters (shared by clones of this handle).
    watch: Arc<watch::Hub>,
}

#[derive(Clone)]
enum Inner {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// The catalog version currently in force, with its body.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCatalog {
    pub version: String,
    pub catalog: Catalog,
}

impl Store {
    /// Opens the pool lazily: a database that is down now does not stop the worker from
    /// starting; [`Store::migrate`] and [`Store::ping`] tell when it is usable.
    pub fn open(opts: &StoreOptions) -> Result<Store, StoreError> {
        let (inner, source) = if opts.url.trim().is_empty() {
            let sqlite = sqlite::SqliteStore::open(opts)?;
            let source = watch::Source::Sqlite(sqlite.clone());
            (Inner::Sqlite(sqlite), source)
        } else {
            let listener = watch::pg::Listener::new(&opts.url, opts.connect_timeout)?;
            let pg = postgres::PgStore::open(opts)?;
            (
                Inner::Postgres(pg),
                watch::Source::Postgres(Box::new(listener)),
            )
        };
        let watch = watch::Hub::new(source, watch::SQLITE_POLL);
        Ok(Store { inner, watch })
    }

    fn db_system(&self) -> &'static str {
        match self.inner {
            Inner::Sqlite(_) => "sqlite",
            Inner::Postgres(_) => "postgresql",
        }
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies pending migrations; safe to call from many processes at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.migrate().await,
            Inner::Postgres(p) => p.migrate().await,
        }
    }

    /// One round trip: is the store usable right now?
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.ping().await,
            Inner::Postgres(p) => p.ping().await,
        }
    }

    /// Stores `catalog` under its version (refusing a different body under a version already
    /// stored) and makes it the current catalog.
    pub async fn install_catalog(&self, catalog: &Catalog) -> Result<(), StoreError> {
        let body = catalog.to_json();
        match &self.inner {
            Inner::Sqlite(s) => s.install_catalog(&catalog.version, body).await,
            Inner::Postgres(p) => p.install_catalog(&catalog.version, &body).await,
        }
    }

    /// The version of the current catalog (a cheap query, for cache checks).
    pub async fn current_catalog_version(&self) -> Result<Option<String>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.current_catalog_version().await,
            Inner::Postgres(p) => p.current_catalog_version().await,
        }
    }

    /// The current catalog with its body.
    pub async fn current_catalog(&self) -> Result<Option<StoredCatalog>, StoreError> {
        let row = match &self.inner {
            Inner::Sqlite(s) => s.current_catalog().await?,
            Inner::Postgres(p) => p.current_catalog().await?,
        };
        row.map(|(version, body)| {
            Catalog::from_json(&body)
                .map(|catalog| StoredCatalog { version, catalog })
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }
}

impl Store {
    /// Runs one sync merge in one transaction: the session's lock, the idempotency check,
    /// `merge` on the session's head and the rows `reads` names (the registers and stamps a
    /// batch can meet: `Batch::reads`), then the rows it changed and the idempotency record.
    /// A group of one ([`Store::merge_group`]).
    pub async fn merge_session(
        &self,
        tenant: &str,
        session_id: &str,
        idem: IdempotencyKey,
        ttl: Duration,
        reads: Reads,
        merge: MergeFn,
    ) -> Result<MergeOutcome, StoreError> {
        let group: GroupFn = Box::new(move |rows, mut recorded| {
            if let Some(Some(answer)) = recorded.pop() {
                return GroupStep {
                    changes: None,
                    answers: vec![answer],
                    compact: false,
                };
            }
            let mut step = merge(rows);
            GroupStep {
                changes: step.changes.take(),
                compact: step.compact,
                answers: vec![MergeOutcome::Ran(step)],
            }
        });
        let done = self
            .merge_group(tenant, session_id, vec![idem], ttl, reads, group)
            .await?;
        done.answers
            .into_iter()
            .next()
            .map(|answer| match answer {
                MergeOutcome::Ran(mut step) => {
                    step.compact = done.compact;
                    MergeOutcome::Ran(step)
                }
                other => other,
            })
            .ok_or_else(|| StoreError::Unavailable("the merge gave no answer".into()))
    }

    /// Runs several merges of one session in one transaction (design §3: concurrent merges
    /// to one session may share one, each keeping its own idempotency record and answer):
    /// the session's lock once, every member's idempotency check, `merge` on the head and the
    /// rows `reads` names (the union of the members' reads), then the rows written once and
    /// each member's record and journal entries. Either all of it is kept or none of it.
    ///
    /// On PostgreSQL, when a member's key got a live record meanwhile (the same key used for
    /// another session at the same moment), the group is rolled back: a group of one answers
    /// [`MergeOutcome::KeyReused`], a larger one [`StoreError::Busy`] (the clients' retries,
    /// with the same keys, then get the answers their keys have).
    #[tracing::instrument(name = "store.merge_session", skip_all, fields(db.system = self.db_system(), merges = idems.len()))]
    pub async fn merge_group(
        &self,
        tenant: &str,
        session_id: &str,
        idems: Vec<IdempotencyKey>,
        ttl: Duration,
        reads: Reads,
        merge: GroupFn,
    ) -> Result<GroupDone, StoreError> {
        let done = match &self.inner {
            Inner::Sqlite(s) => {
                s.merge_group(tenant, session_id, idems, ttl, reads, merge)
                    .await
            }
            Inner::Postgres(p) => {
                p.merge_group(tenant, session_id, idems, ttl, reads, merge)
                    .await
            }
        };
        if let Ok(GroupDone { changed: true, .. }) = &done {
            self.watch.merged(tenant, session_id);
        }
        done
    }

    /// Compacts a session under its lock: `compact` gets every row but the stamps and returns
    /// what to write. `Ok(false)` when the session has no row or there was nothing to write.
    #[tracing::instrument(name = "store.compact_session", skip_all, fields(db.system = self.db_system()))]
    pub async fn compact_session(
        &self,
        tenant: &str,
        session_id: &str,
        compact: CompactFn,
    ) -> Result<bool, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.compact_session(tenant, session_id, compact).await,
            Inner::Postgres(p) => p.compact_session(tenant, session_id, compact).await,
        }
    }

    /// A session's stored rows (every register, read in one snapshot), `None` when it has
    /// no applied batch yet.
    #[tracing::instrument(name = "store.session", skip_all, fields(db.system = self.db_system()))]
    pub async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<StoredSession>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.session(tenant, session_id).await,
            Inner::Postgres(p) => p.session(tenant, session_id).await,
        }
    }

    /// For a client at `since`, in one snapshot: the session's head, base and the registers
    /// around every register new to `since` ([`CatchUpRead`]), found by their dots.
    #[tracing::instrument(name = "store.catch_up", skip_all, fields(db.system = self.db_system()))]
    pub async fn catch_up(
        &self,
        tenant: &str,
        session_id: &str,
        since: &firemode_merge::VectorClock,
    ) -> Result<CatchUpRead, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.catch_up(tenant, session_id, since).await,
            Inner::Postgres(p) => p.catch_up(tenant, session_id, since).await,
        }
    }

    /// The session's kept conflicts numbered after `after`, oldest first, at most `limit`.
    #[tracing::instrument(name = "store.conflicts", skip_all, fields(db.system = self.db_system()))]
    pub async fn conflicts(
        &self,
        tenant: &str,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.conflicts(tenant, session_id, after, limit).await,
            Inner::Postgres(p) => p.conflicts(tenant, session_id, after, limit).await,
        }
    }

    /// Deletes kept conflicts older than `retention`; returns how many.
    pub async fn purge_conflicts(&self, retention: Duration) -> Result<u64, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.purge_conflicts(retention).await,
            Inner::Postgres(p) => p.purge_conflicts(retention).await,
        }
    }

    /// The session's head row and version (one primary-key read; no register), `None` when
    /// it has no applied batch yet.
    pub async fn session_head(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(String, i64)>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.session_head(tenant, session_id).await,
            Inner::Postgres(p) => p.session_head(tenant, session_id).await,
        }
    }

    /// The session's stored version (`sync_sessions.version`, bumped by every applied
    /// batch), 0 when it has no applied batch yet. One cheap query.
    pub async fn session_version(&self, tenant: &str, session_id: &str) -> Result<i64, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.session_version(tenant, session_id).await,
            Inner::Postgres(p) => p.session_version(tenant, session_id).await,
        }
    }

    /// Waits until the session's stored version exceeds `seen_version`: `Ok(true)` as soon
    /// as it does (at once if it already does), `Ok(false)` when `deadline` passes first.
    ///
    /// For `GET …/changes?wait=` (design §3): take `seen_version` from the same read that
    /// found nothing new beyond `since` (or from a read made *before* it), never from a
    /// later one, or a merge between the two reads is missed until the next merge. On
    /// `true`, compute the changes again (the version may have moved without anything new
    /// for this `since`: then wait again with the new version until the deadline).
    ///
    /// A merge through any handle, process or host sharing the database wakes the waiter,
    /// normally within milliseconds (PostgreSQL: `LISTEN/NOTIFY`; SQLite: at once for
    /// merges of this process, within 100 ms for other processes). However
    /// many waiters a session has, a merge costs one `NOTIFY` and one version read per
    /// watching process. Cancel-safe: dropping the future unregisters the waiter.
    ///
    /// Errors: [`StoreError::Busy`] when this process already holds
    /// 100,000 waiters; [`StoreError::Unavailable`] when the version cannot
    /// be read at all (PostgreSQL: the listening connection cannot be opened).
    #[tracing::instrument(name = "store.wait_for_change", skip_all, fields(db.system = self.db_system()))]
    pub async fn wait_for_change(
        &self,
        tenant: &str,
        session_id: &str,
        seen_version: i64,
        deadline: tokio::time::Instant,
    ) -> Result<bool, StoreError> {
        self.watch
            .wait(tenant, session_id, seen_version, deadline)
            .await
    }

    /// Counters of the waiting machinery of this handle and its clones.
    pub fn watch_stats(&self) -> WatchStats {
        self.watch.stats()
    }

    /// Deletes idempotency records older than `ttl`; returns how many.
    pub async fn purge_idempotency(&self, ttl: Duration) -> Result<u64, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.purge_idempotency(ttl).await,
            Inner::Postgres(p) => p.purge_idempotency(ttl).await,
        }
    }
}

fn catalog_conflict(version: &str) -> StoreError {
    StoreError::Conflict(format!(
        "catalog version {version:?} is already stored with different contents; \
         give the changed catalog file a new \"version\""
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
