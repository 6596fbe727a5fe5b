//! The shared backend: PostgreSQL through a bb8-postgres pool. Migrations run under a
//! transaction-scoped advisory lock, so workers on several hosts can start at once.

use crate::migrations::{MIGRATIONS, SCHEMA_TABLE};
use crate::sessions::{
    live_since, IdempotencyKey, JournalEntry, MergeFn, MergeOutcome, MergeStep, StoredSession,
};
use crate::{catalog_conflict, now_ms, StoreError, StoreOptions};
use bb8_postgres::PostgresConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;

/// Key of the advisory lock that serialises migrations ("AS1851" in spirit).
const MIGRATION_LOCK: i64 = 0x4153_1851;

type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// `SET LOCAL lock_timeout = …`, run at the start of every merge.
    set_lock_timeout: Arc<str>,
}

/// How saving a merge ended.
enum Saved {
    Done,
    /// A live record of the key appeared (the same key used for another session meanwhile).
    KeyTaken,
    /// The session row changed without the advisory lock (a writer of an older release).
    Raced,
}

/// The session a merge writes, and the moments its statements use.
struct MergeAt<'a> {
    tenant: &'a str,
    session_id: &'a str,
    /// When the merge runs (ms since the epoch): `updated_at`, `created_at`, the journal's `at`.
    now: i64,
    /// Idempotency records created at or after this are live ([`live_since`]).
    live: i64,
}

/// What a merge found under the session's lock.
enum Locked {
    /// The key has a live idempotency record: the request it answered and its answer.
    Recorded {
        hash: String,
        status: i32,
        body: String,
    },
    /// No live record: the session's stored state and version (`None` without a row).
    Session { state: String, version: Option<i64> },
}

/// The advisory-lock key of a session: the first 8 bytes of SHA-256 over tenant and session
/// id. Two sessions sharing a key only wait for each other.
fn session_lock_key(tenant: &str, session_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"firemode-session\0");
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(session_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    match e {
        bb8::RunError::User(e) => unavailable(e),
        bb8::RunError::TimedOut => unavailable("timed out waiting for a PostgreSQL connection"),
    }
}

/// A lock wait past `lock_timeout` is [`StoreError::Busy`]; anything else is unavailability.
fn lock_error(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        StoreError::Busy("the session is being merged by another request".into())
    } else {
        unavailable(e)
    }
}

impl PgStore {
    pub fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = opts.url.trim().parse().map_err(|e| {
            StoreError::Config(format!(
                "database.url is not a valid PostgreSQL connection string: {e}"
            ))
        })?;
        config.application_name("firemode");
        config.connect_timeout(opts.connect_timeout);
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = bb8::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .connection_timeout(opts.connect_timeout)
            // A failed connect is an error now (the store is down), not a wait until the
            // timeout; a timeout then means every connection is busy.
            .retry_connection(false)
            .build_unchecked(manager);
        Ok(Self {
            pool,
            set_lock_timeout: format!(
                "SET LOCAL lock_timeout = {}",
                opts.lock_timeout.as_millis().max(1)
            )
            .into(),
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(SCHEMA_TABLE).await.map_err(unavailable)?;
        let applied: Option<i64> = tx
            .query_one("SELECT max(version) FROM firemode_schema", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        crate::migrations::refuse_newer(applied)?;
        for (version, sql) in MIGRATIONS {
            let done = tx
                .query_opt(
                    "SELECT version FROM firemode_schema WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(unavailable)?;
            if done.is_none() {
                tx.batch_execute(sql).await.map_err(unavailable)?;
                tx.execute(
                    "INSERT INTO firemode_schema (version, applied_at) VALUES ($1, $2)",
                    &[version, &now_ms()],
                )
                .await
                .map_err(unavailable)?;
            }
        }
        tx.commit().await.map_err(unavailable)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = match self.pool.get().await {
            Ok(c) => c,
            // Connections exist and all are busy with requests: the database answers, it is
            // just loaded. (bb8 reports a failing connect as a timeout too: no connection
            // at all means unreachable.)
            Err(bb8::RunError::TimedOut) if self.pool.state().connections > 0 => return Ok(()),
            Err(e) => return Err(pool_error(e)),
        };
        conn.simple_query("SELECT 1").await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn install_catalog(&self, version: &str, body: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        // Serialise installs of the same version across hosts.
        tx.execute(
            "INSERT INTO catalog_versions (version, body, loaded_at) VALUES ($1, $2, $3)
             ON CONFLICT (version) DO NOTHING",
            &[&version, &body, &now_ms()],
        )
        .await
        .map_err(unavailable)?;
        let row = tx
            .query_one(
                "SELECT body FROM catalog_versions WHERE version = $1",
                &[&version],
            )
            .await
            .map_err(unavailable)?;
        let stored: String = row.get(0);
        if stored != body {
            return Err(catalog_conflict(version));
        }
        tx.execute(
            "INSERT INTO catalog_current (id, version) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            &[&version],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    pub async fn current_catalog_version(&self) -> Result<Option<String>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = conn
            .query_opt("SELECT version FROM catalog_current WHERE id = 1", &[])
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn current_catalog(&self) -> Result<Option<(String, String)>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = conn
            .query_opt(
                "SELECT v.version, v.body FROM catalog_current c
                 JOIN catalog_versions v ON v.version = c.version WHERE c.id = 1",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// One merge in one transaction, in four round trips: `BEGIN`; then, pipelined, the lock
    /// timeout, the session's lock, its row and the key's live record (statements of a
    /// transaction run in order, so both are read under the lock); then, pipelined, the new
    /// state and the idempotency record; then `COMMIT`. Statements go out with their parameter
    /// types (`query_typed`), so none costs a separate prepare round trip.
    ///
    /// The lock is a transaction-scoped advisory lock on the session's key, so a session
    /// without a row is locked without writing anything: a refused request leaves no row,
    /// and a duplicate that arrives while the first merge commits waits for it (up to the lock
    /// timeout) and then finds its record. The row is also locked `FOR UPDATE`, which keeps
    /// the exclusion with releases that locked only the row; their placeholder rows
    /// (`version = 0`) read as a new session.
    pub async fn merge_session(
        &self,
        tenant: &str,
        session_id: &str,
        idem: IdempotencyKey,
        ttl: Duration,
        merge: MergeFn,
    ) -> Result<MergeOutcome, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let at = MergeAt {
            tenant,
            session_id,
            now: now_ms(),
            live: live_since(ttl),
        };
        let (state, version) = match self.lock_and_read(&tx, &at, &idem).await? {
            Locked::Recorded { hash, status, body } => {
                tx.commit().await.map_err(unavailable)?;
                return Ok(idem.answer_from_record(&hash, status as u16, body));
            }
            Locked::Session { state, version } => (state, version),
        };
        let step = merge(version.is_some_and(|v| v > 0).then_some(state.as_str()));
        let saved = save_merge(&tx, &at, version, &idem, &step);
        // Long-pollers on every host hear of the new version at commit (pipelined).
        let notified = async {
            match step.new_state {
                Some(_) => crate::watch::pg::notify_changed(&tx, tenant, session_id).await,
                None => Ok(()),
            }
        };
        let (saved, notified) = tokio::join!(saved, notified);
        let saved = saved?;
        notified.map_err(unavailable)?;
        match saved {
            Saved::Done => {}
            Saved::KeyTaken => return Ok(MergeOutcome::KeyReused), // rolls back on drop
            Saved::Raced => {
                return Err(StoreError::Busy(
                    "the session changed under this merge (an older release holds it)".into(),
                ))
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(MergeOutcome::Ran(step))
    }

    /// The merge's first pipelined round trip: the lock timeout, the session's advisory
    /// lock, then (under the lock, as a transaction's statements run in order) the session's
    /// row and the key's live idempotency record.
    async fn lock_and_read(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        at: &MergeAt<'_>,
        idem: &IdempotencyKey,
    ) -> Result<Locked, StoreError> {
        let lock_key = session_lock_key(at.tenant, at.session_id);
        let session_params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&at.tenant, Type::TEXT), (&at.session_id, Type::TEXT)];
        let record_params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&at.tenant, Type::TEXT),
            (&idem.subject, Type::TEXT),
            (&idem.key, Type::TEXT),
            (&at.live, Type::INT8),
        ];
        let lock_params: [(&(dyn ToSql + Sync), Type); 1] = [(&lock_key, Type::INT8)];
        let (timeout_set, locked, row, record) = tokio::join!(
            tx.batch_execute(&self.set_lock_timeout),
            tx.query_typed("SELECT pg_advisory_xact_lock($1)", &lock_params),
            tx.query_typed_opt(
                "SELECT state, version FROM sync_sessions
                 WHERE tenant = $1 AND session_id = $2 FOR UPDATE",
                &session_params,
            ),
            tx.query_typed_opt(
                "SELECT request_hash, status, body FROM sync_idempotency
                 WHERE tenant = $1 AND subject = $2 AND idem_key = $3 AND created_at >= $4",
                &record_params,
            ),
        );
        // The first failure is the cause; the statements after it only report the aborted
        // transaction.
        timeout_set.map_err(unavailable)?;
        locked.map_err(lock_error)?;
        let row = row.map_err(lock_error)?;
        let record = record.map_err(unavailable)?;
        if let Some(r) = record {
            return Ok(Locked::Recorded {
                hash: r.get(0),
                status: r.get(1),
                body: r.get(2),
            });
        }
        Ok(match &row {
            Some(r) => Locked::Session {
                state: r.get(0),
                version: Some(r.get(1)),
            },
            None => Locked::Session {
                state: String::new(),
                version: None,
            },
        })
    }

    pub async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<StoredSession>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = conn
            .query_opt(
                "SELECT state, version FROM sync_sessions
                 WHERE tenant = $1 AND session_id = $2 AND version > 0",
                &[&tenant, &session_id],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| StoredSession {
            state: r.get(0),
            version: r.get(1),
        }))
    }

    pub async fn conflicts(
        &self,
        tenant: &str,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let rows = conn
            .query_typed(
                "SELECT seq, entry FROM sync_conflicts
                 WHERE tenant = $1 AND session_id = $2 AND seq > $3
                 ORDER BY seq LIMIT $4",
                &[
                    (&tenant, Type::TEXT),
                    (&session_id, Type::TEXT),
                    (&after, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| JournalEntry {
                seq: r.get(0),
                entry: r.get(1),
            })
            .collect())
    }

    pub async fn purge_conflicts(&self, retention: Duration) -> Result<u64, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let cutoff = live_since(retention);
        conn.execute_typed(
            "DELETE FROM sync_conflicts WHERE at < $1",
            &[(&cutoff, Type::INT8)],
        )
        .await
        .map_err(unavailable)
    }

    pub async fn session_version(&self, tenant: &str, session_id: &str) -> Result<i64, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        crate::watch::pg::read_version(&conn, tenant, session_id)
            .await
            .map_err(unavailable)
    }

    pub async fn purge_idempotency(&self, ttl: Duration) -> Result<u64, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        conn.execute(
            "DELETE FROM sync_idempotency WHERE created_at < $1",
            &[&live_since(ttl)],
        )
        .await
        .map_err(unavailable)
    }
}

/// The merge's second pipelined round trip: its new state (when it has one), its
/// idempotency record (when it is remembered) and its journal entries, sent in that order.
async fn save_merge(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    version: Option<i64>,
    idem: &IdempotencyKey,
    step: &MergeStep,
) -> Result<Saved, StoreError> {
    let (saved, remembered, journaled) = tokio::join!(
        save_state(tx, at, version, step),
        remember(tx, at, idem, step),
        // After the state's statement (pipelined in order): the session row exists.
        append_journal(tx, at, step),
    );
    let saved = saved.map_err(lock_error)?;
    let remembered = remembered.map_err(lock_error)?;
    journaled.map_err(lock_error)?;
    Ok(if saved == 0 {
        Saved::Raced
    } else if remembered == 0 {
        Saved::KeyTaken
    } else {
        Saved::Done
    })
}

/// Writes the merge's new state, if it has one: the rows written (0 when the session changed
/// without the lock), or 1 when there is nothing to write.
async fn save_state(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    version: Option<i64>,
    step: &MergeStep,
) -> Result<usize, tokio_postgres::Error> {
    let Some(new_state) = &step.new_state else {
        return Ok(1);
    };
    let version_or_new = version.unwrap_or(0);
    let params: [(&(dyn ToSql + Sync), Type); 5] = [
        (&at.tenant, Type::TEXT),
        (&at.session_id, Type::TEXT),
        (new_state, Type::TEXT),
        (&at.now, Type::INT8),
        (&version_or_new, Type::INT8),
    ];
    let rows = match version {
        // The row is locked; the version check only guards against a writer that
        // did not take the advisory lock.
        Some(_) => tx.query_typed(
            "UPDATE sync_sessions SET state = $3, version = version + 1, updated_at = $4
                     WHERE tenant = $1 AND session_id = $2 AND version = $5 RETURNING 1",
            &params,
        ),
        None => tx.query_typed(
            "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
                     VALUES ($1, $2, $3, 1, $4) ON CONFLICT DO NOTHING RETURNING 1",
            &params[..4],
        ),
    };
    rows.await.map(|rows| rows.len())
}

/// Writes the merge's idempotency record, if it is remembered: the rows written (0 when the
/// key has a live record), or 1 when there is nothing to write.
///
/// An expired record of the same key is replaced; a live one (the same key, at the same
/// moment, for another session) is kept and nothing of this merge is.
async fn remember(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    idem: &IdempotencyKey,
    step: &MergeStep,
) -> Result<usize, tokio_postgres::Error> {
    if !step.remember {
        return Ok(1);
    }
    let status = i32::from(step.status);
    tx.query_typed(
        "INSERT INTO sync_idempotency
                 (tenant, subject, idem_key, request_hash, status, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (tenant, subject, idem_key) DO UPDATE
                 SET request_hash = EXCLUDED.request_hash, status = EXCLUDED.status,
                     body = EXCLUDED.body, created_at = EXCLUDED.created_at
                 WHERE sync_idempotency.created_at < $8
                 RETURNING 1",
        &[
            (&at.tenant, Type::TEXT),
            (&idem.subject, Type::TEXT),
            (&idem.key, Type::TEXT),
            (&idem.request_hash, Type::TEXT),
            (&status, Type::INT4),
            (&step.body, Type::TEXT),
            (&at.now, Type::INT8),
            (&at.live, Type::INT8),
        ],
    )
    .await
    .map(|rows| rows.len())
}

/// Appends the merge's conflicts to the session's journal, numbered after its
/// `conflicts_seq`, when it has a new state and conflicts to keep.
async fn append_journal(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    step: &MergeStep,
) -> Result<usize, tokio_postgres::Error> {
    if step.journal.is_empty() || step.new_state.is_none() {
        return Ok(0);
    }
    let count = i64::try_from(step.journal.len()).unwrap_or(i64::MAX);
    tx.query_typed(
        "WITH numbered AS (
                     UPDATE sync_sessions SET conflicts_seq = conflicts_seq + $3
                     WHERE tenant = $1 AND session_id = $2 RETURNING conflicts_seq)
                 INSERT INTO sync_conflicts (tenant, session_id, seq, entry, at)
                 SELECT $1, $2, numbered.conflicts_seq - $3 + kept.ord, kept.entry, $5
                 FROM numbered, unnest($4::text[]) WITH ORDINALITY AS kept(entry, ord)",
        &[
            (&at.tenant, Type::TEXT),
            (&at.session_id, Type::TEXT),
            (&count, Type::INT8),
            (&step.journal, Type::TEXT_ARRAY),
            (&at.now, Type::INT8),
        ],
    )
    .await
    .map(|rows| rows.len())
}
