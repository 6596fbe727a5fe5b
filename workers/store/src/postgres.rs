//! The shared backend: PostgreSQL through a bb8-postgres pool. Migrations run under a
//! transaction-scoped advisory lock, so workers on several hosts can start at once.

use crate::migrations::{MIGRATIONS, SCHEMA_TABLE};
use crate::{catalog_conflict, now_ms, StoreError, StoreOptions};
use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;

/// Key of the advisory lock that serialises migrations ("AS1851" in spirit).
const MIGRATION_LOCK: i64 = 0x4153_1851;

type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
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
            .build_unchecked(manager);
        Ok(Self { pool })
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
        let conn = self.pool.get().await.map_err(pool_error)?;
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
}
