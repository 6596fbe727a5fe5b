//! The shared backend: PostgreSQL through a bb8-postgres pool. Migrations run under a
//! transaction-scoped advisory lock, so workers on several hosts can start at once.

use crate::migrations::{MIGRATIONS, SCHEMA_TABLE};
use crate::sessions::{live_since, IdempotencyKey, MergeFn, MergeOutcome, StoredSession};
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
    /// timeout, the placeholder row, the row lock and the key's live record (statements of a
    /// transaction run in order, so the record is read under the lock); then, pipelined, the
    /// new state and the idempotency record; then `COMMIT`. Statements go out with their
    /// parameter types (`query_typed`), so none costs a separate prepare round trip.
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
        let now = now_ms();
        let live = live_since(ttl);
        let placeholder_params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&tenant, Type::TEXT),
            (&session_id, Type::TEXT),
            (&now, Type::INT8),
        ];
        let record_params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&tenant, Type::TEXT),
            (&idem.subject, Type::TEXT),
            (&idem.key, Type::TEXT),
            (&live, Type::INT8),
        ];
        let (timeout_set, placeholder, locked, record) = tokio::join!(
            tx.batch_execute(&self.set_lock_timeout),
            // The session's row lock serialises merges of one session across every host; a
            // placeholder row (version 0) makes the lock exist before the first batch.
            tx.query_typed(
                "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
                 VALUES ($1, $2, '', 0, $3) ON CONFLICT DO NOTHING",
                &placeholder_params,
            ),
            tx.query_typed_one(
                "SELECT state, version FROM sync_sessions
                 WHERE tenant = $1 AND session_id = $2 FOR UPDATE",
                &placeholder_params[..2],
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
        placeholder.map_err(unavailable)?;
        let row = locked.map_err(lock_error)?;
        let record = record.map_err(unavailable)?;
        let (state, version): (String, i64) = (row.get(0), row.get(1));
        if let Some(r) = record {
            let (hash, status, body): (String, i32, String) = (r.get(0), r.get(1), r.get(2));
            tx.commit().await.map_err(unavailable)?;
            return Ok(if hash == idem.request_hash {
                MergeOutcome::Replay {
                    status: status as u16,
                    body,
                }
            } else {
                MergeOutcome::KeyReused
            });
        }
        let step = merge((version > 0).then_some(state.as_str()));
        let status = i32::from(step.status);
        let save_state = async {
            match &step.new_state {
                Some(new_state) => tx
                    .query_typed(
                        "UPDATE sync_sessions SET state = $3, version = version + 1, updated_at = $4
                         WHERE tenant = $1 AND session_id = $2",
                        &[
                            (&tenant, Type::TEXT),
                            (&session_id, Type::TEXT),
                            (new_state, Type::TEXT),
                            (&now, Type::INT8),
                        ],
                    )
                    .await
                    .map(drop),
                None => Ok(()),
            }
        };
        // An expired record of the same key is replaced; a live one (the same key, at the
        // same moment, for another session) is kept and nothing of this merge is.
        let remember = async {
            if !step.remember {
                return Ok(None);
            }
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
                    (&tenant, Type::TEXT),
                    (&idem.subject, Type::TEXT),
                    (&idem.key, Type::TEXT),
                    (&idem.request_hash, Type::TEXT),
                    (&status, Type::INT4),
                    (&step.body, Type::TEXT),
                    (&now, Type::INT8),
                    (&live, Type::INT8),
                ],
            )
            .await
            .map(|rows| Some(rows.len()))
        };
        let (saved, remembered) = tokio::join!(save_state, remember);
        saved.map_err(unavailable)?;
        if remembered.map_err(unavailable)? == Some(0) {
            // The transaction rolls back on drop.
            return Ok(MergeOutcome::KeyReused);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(MergeOutcome::Ran(step))
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
