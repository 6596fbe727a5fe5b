//! The shared backend: PostgreSQL through a bb8-postgres pool. Migrations run under a
//! transaction-scoped advisory lock, so workers on several hosts can start at once.

mod dots;

use crate::dots::stored_sequence;
use crate::migrations::{MIGRATIONS, REGISTER_DOTS, ROWS_LAYOUT, SCHEMA_TABLE};
use crate::sessions::{
    group_journal, live_since, CompactFn, GroupDone, GroupFn, GroupStep, IdempotencyKey,
    JournalEntry, MergeOutcome, MergeStep, StoredSession,
};
use crate::{catalog_conflict, now_ms, StoreError, StoreOptions};
use bb8_postgres::PostgresConnectionManager;
use firemode_merge::{Reads, RegisterRow, RowChanges, SessionRows, StampRow};
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

/// What a group found under the session's lock.
struct Locked {
    /// The rows asked for, `None` without a session row.
    rows: Option<SessionRows>,
    /// The session's version, `None` without a row.
    version: Option<i64>,
    /// Per member, its key's live record: the request it answered, its status and body.
    records: Vec<Option<(String, i32, String)>>,
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

/// The database's own words (tokio-postgres says only "db error" and keeps the server's
/// message in the source chain), so a log names the cause.
fn unavailable(e: impl std::error::Error) -> StoreError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    StoreError::Unavailable(text)
}

fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    match e {
        bb8::RunError::User(e) => unavailable(e),
        bb8::RunError::TimedOut => {
            StoreError::Unavailable("timed out waiting for a PostgreSQL connection".into())
        }
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

/// The connection settings from `database.url`, with our application name and JIT
/// compilation off unless the URL's `options` say otherwise: every statement here is short,
/// and a large one (a catch-up looking up 65,536 parents, a merge of a deep batch) passes
/// PostgreSQL's `jit_above_cost` and paid ~100 ms of compiling for a 120 ms query.
fn connection_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url.trim().parse().map_err(|e| {
        StoreError::Config(format!(
            "database.url is not a valid PostgreSQL connection string: {e}"
        ))
    })?;
    config.application_name("firemode");
    let options = match config.get_options() {
        Some(options) if options.contains("jit") => options.to_owned(),
        Some(options) if !options.trim().is_empty() => format!("{options} -c jit=off"),
        _ => "-c jit=off".to_owned(),
    };
    config.options(&options);
    Ok(config)
}

impl PgStore {
    pub fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        let mut config = connection_config(&opts.url)?;
        config.connect_timeout(opts.connect_timeout);
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = bb8::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .connection_timeout(opts.lock_timeout.max(opts.connect_timeout))
            // A failed connect is an error now (the store is down), not a wait until the
            // timeout; a timeout then means every connection stayed busy that long.
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
        let (mut convert_legacy, mut finish_dots) = (false, false);
        for (version, sql) in MIGRATIONS {
            let done = tx
                .query_opt(
                    "SELECT version FROM firemode_schema WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(unavailable)?;
            if done.is_none() {
                if *version == REGISTER_DOTS {
                    // Both tables before either: a merge of the release before, in flight,
                    // holds its head row and then reads its registers; taking
                    // `sync_registers` first (the ALTER) and then waiting on that head row
                    // deadlocked with it (attack round 6). So wait for it to finish instead.
                    tx.batch_execute(
                        "LOCK TABLE sync_sessions, sync_registers IN ACCESS EXCLUSIVE MODE",
                    )
                    .await
                    .map_err(unavailable)?;
                }
                tx.batch_execute(sql).await.map_err(unavailable)?;
                // Sessions kept as one value move to rows once the rows have every column;
                // then the register rows get their dots and the heads their mark.
                convert_legacy |= *version == ROWS_LAYOUT;
                finish_dots |= *version == REGISTER_DOTS;
                tx.execute(
                    "INSERT INTO firemode_schema (version, applied_at) VALUES ($1, $2)",
                    &[version, &now_ms()],
                )
                .await
                .map_err(unavailable)?;
            }
        }
        if convert_legacy {
            convert_legacy_sessions(&tx).await?;
        }
        if finish_dots {
            dots::finish_register_dots(&tx).await?;
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

    /// A group of merges in one transaction, in four round trips: `BEGIN`; then, pipelined,
    /// the lock timeout, the session's lock, its head, the register and stamp rows `reads`
    /// names and the members' live records (statements of a transaction run in order, so all
    /// are read under the lock); then, pipelined, the head, the changed rows, the journal and
    /// the idempotency records; then `COMMIT`. Statements go out with their parameter types
    /// (`query_typed`), so none costs a separate prepare round trip.
    ///
    /// The lock is a transaction-scoped advisory lock on the session's key, so a session
    /// without a row is locked without writing anything: a refused request leaves no row,
    /// and a duplicate that arrives while the first merge commits waits for it (up to the lock
    /// timeout) and then finds its record. The row is also locked `FOR UPDATE`, which keeps
    /// the exclusion with releases that locked only the row; their placeholder rows
    /// (`version = 0`) read as a new session.
    pub async fn merge_group(
        &self,
        tenant: &str,
        session_id: &str,
        idems: Vec<IdempotencyKey>,
        ttl: Duration,
        reads: Reads,
        merge: GroupFn,
    ) -> Result<GroupDone, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let at = MergeAt {
            tenant,
            session_id,
            now: now_ms(),
            live: live_since(ttl),
        };
        let locked = self.lock_and_read(&tx, &at, &idems, &reads).await?;
        let recorded: Vec<Option<MergeOutcome>> = idems
            .iter()
            .zip(locked.records)
            .map(|(idem, record)| {
                record
                    .map(|(hash, status, body)| idem.answer_from_record(&hash, status as u16, body))
            })
            .collect();
        if recorded.iter().all(Option::is_some) {
            tx.commit().await.map_err(unavailable)?;
            return Ok(GroupDone {
                answers: recorded.into_iter().flatten().collect(),
                changed: false,
                compact: false,
            });
        }
        let version = locked.version;
        let step = merge(
            locked.rows.filter(|_| version.is_some_and(|v| v > 0)),
            recorded,
        );
        let saved = save_group(&tx, &at, version, &idems, &step);
        // Long-pollers on every host hear of the new version at commit (pipelined).
        let notified = async {
            match step.changes {
                Some(_) => crate::watch::pg::notify_changed(&tx, tenant, session_id).await,
                None => Ok(()),
            }
        };
        let (saved, notified) = tokio::join!(saved, notified);
        let saved = saved?;
        notified.map_err(unavailable)?;
        match saved {
            Saved::Done => {}
            // Rolls back on drop.
            Saved::KeyTaken if idems.len() == 1 => {
                return Ok(GroupDone {
                    answers: vec![MergeOutcome::KeyReused],
                    changed: false,
                    compact: false,
                })
            }
            Saved::KeyTaken => {
                return Err(StoreError::Busy(
                    "an idempotency key of this group was used for another request meanwhile"
                        .into(),
                ))
            }
            Saved::Raced => {
                return Err(StoreError::Busy(
                    "the session changed under this merge (an older release holds it)".into(),
                ))
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(GroupDone {
            changed: step.changes.is_some(),
            compact: step.compact,
            answers: step.answers,
        })
    }

    /// The merge's first pipelined round trip: the lock timeout, the session's advisory
    /// lock, then (under the lock, as a transaction's statements run in order) the session's
    /// head, the rows `reads` names and the members' live idempotency records.
    async fn lock_and_read(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        at: &MergeAt<'_>,
        idems: &[IdempotencyKey],
        reads: &Reads,
    ) -> Result<Locked, StoreError> {
        let lock_key = session_lock_key(at.tenant, at.session_id);
        let session_params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&at.tenant, Type::TEXT), (&at.session_id, Type::TEXT)];
        let lock_params: [(&(dyn ToSql + Sync), Type); 1] = [(&lock_key, Type::INT8)];
        let (timeout_set, locked, row, registers, stamps, records) = tokio::join!(
            tx.batch_execute(&self.set_lock_timeout),
            tx.query_typed("SELECT pg_advisory_xact_lock($1)", &lock_params),
            tx.query_typed_opt(
                "SELECT state, version FROM sync_sessions
                 WHERE tenant = $1 AND session_id = $2 FOR UPDATE",
                &session_params,
            ),
            read_registers(tx, at, reads),
            read_stamps(tx, at, reads),
            read_records(tx, at, idems),
        );
        // The first failure is the cause; the statements after it only report the aborted
        // transaction.
        timeout_set.map_err(unavailable)?;
        locked.map_err(lock_error)?;
        let row = row.map_err(lock_error)?;
        let registers = registers.map_err(unavailable)?;
        let stamps = stamps.map_err(unavailable)?;
        let records = records.map_err(unavailable)?;
        Ok(Locked {
            rows: row.as_ref().map(|r| SessionRows {
                head: r.get(0),
                base: None,
                registers,
                stamps,
            }),
            version: row.as_ref().map(|r| r.get(1)),
            records,
        })
    }

    /// Compaction in one transaction under the session's lock: every row of the session but
    /// its stamps, handed to `compact`, and what it changed written (the version stays: the
    /// document does not change).
    pub async fn compact_session(
        &self,
        tenant: &str,
        session_id: &str,
        compact: CompactFn,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        tx.batch_execute(&self.set_lock_timeout)
            .await
            .map_err(unavailable)?;
        let lock_key = session_lock_key(tenant, session_id);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key])
            .await
            .map_err(lock_error)?;
        let Some(stored) = read_whole(&tx, tenant, session_id).await? else {
            return Ok(false);
        };
        let Some(changes) = compact(stored.rows) else {
            return Ok(false);
        };
        let head_params: [&(dyn ToSql + Sync); 3] = [&tenant, &session_id, &changes.head];
        let (written, head) = tokio::join!(
            write_rows(&tx, tenant, session_id, &changes),
            tx.execute(
                "UPDATE sync_sessions SET state = $3 WHERE tenant = $1 AND session_id = $2",
                &head_params,
            )
        );
        written.map_err(unavailable)?;
        head.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    /// The whole session in one repeatable-read transaction (one snapshot: a merge
    /// committing meanwhile is seen entirely or not at all).
    pub async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<StoredSession>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let stored = read_whole(&tx, tenant, session_id).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(stored)
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

    pub async fn session_head(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(String, i64)>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = conn
            .query_typed_opt(
                "SELECT state, version FROM sync_sessions
                 WHERE tenant = $1 AND session_id = $2 AND version > 0",
                &[(&tenant, Type::TEXT), (&session_id, Type::TEXT)],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
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

/// The group's second pipelined round trip: its head and rows (when it changed anything),
/// its members' idempotency records (those remembered) and journal entries, in that order.
async fn save_group(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    version: Option<i64>,
    idems: &[IdempotencyKey],
    step: &GroupStep,
) -> Result<Saved, StoreError> {
    let (saved, remembered, journaled) = tokio::join!(
        save_state(tx, at, version, step),
        remember(tx, at, idems, step),
        // After the state's statement (pipelined in order): the session row exists.
        append_journal(tx, at, step),
    );
    let saved = saved.map_err(lock_error)?;
    let remembered = remembered.map_err(lock_error)?;
    journaled.map_err(lock_error)?;
    Ok(if saved == 0 {
        Saved::Raced
    } else if !remembered {
        Saved::KeyTaken
    } else {
        Saved::Done
    })
}

/// Writes the merge's head and rows, if it changed anything: the session rows written (0
/// when the session changed without the lock), or 1 when there is nothing to write.
async fn save_state(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    version: Option<i64>,
    step: &GroupStep,
) -> Result<usize, tokio_postgres::Error> {
    let Some(changes) = &step.changes else {
        return Ok(1);
    };
    let new_state = &changes.head;
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
    let (head, written) = tokio::join!(rows, write_rows(tx, at.tenant, at.session_id, changes));
    written?;
    head.map(|rows| rows.len())
}

/// Writes the remembered answers' idempotency records: whether every one was written (not,
/// when a key has a live record: the same key, at the same moment, for another session).
/// An expired record of the same key is replaced; a live one is kept and nothing of this
/// group is.
async fn remember(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    idems: &[IdempotencyKey],
    step: &GroupStep,
) -> Result<bool, tokio_postgres::Error> {
    let kept: Vec<(&IdempotencyKey, &MergeStep)> = idems
        .iter()
        .zip(&step.answers)
        .filter_map(|(idem, answer)| match answer {
            MergeOutcome::Ran(ran) if ran.remember => Some((idem, ran)),
            _ => None,
        })
        .collect();
    if kept.is_empty() {
        return Ok(true);
    }
    let subjects: Vec<&str> = kept.iter().map(|(i, _)| i.subject.as_str()).collect();
    let keys: Vec<&str> = kept.iter().map(|(i, _)| i.key.as_str()).collect();
    let hashes: Vec<&str> = kept.iter().map(|(i, _)| i.request_hash.as_str()).collect();
    let statuses: Vec<i32> = kept.iter().map(|(_, r)| i32::from(r.status)).collect();
    let bodies: Vec<&str> = kept.iter().map(|(_, r)| r.body.as_str()).collect();
    let written = tx
        .query_typed(
            "INSERT INTO sync_idempotency
                 (tenant, subject, idem_key, request_hash, status, body, created_at)
             SELECT $1, u.s, u.k, u.h, u.st, u.b, $7
             FROM unnest($2::text[], $3::text[], $4::text[], $5::int4[], $6::text[])
                  AS u(s, k, h, st, b)
             ON CONFLICT (tenant, subject, idem_key) DO UPDATE
             SET request_hash = EXCLUDED.request_hash, status = EXCLUDED.status,
                 body = EXCLUDED.body, created_at = EXCLUDED.created_at
             WHERE sync_idempotency.created_at < $8
             RETURNING 1",
            &[
                (&at.tenant, Type::TEXT),
                (&subjects, Type::TEXT_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&hashes, Type::TEXT_ARRAY),
                (&statuses, Type::INT4_ARRAY),
                (&bodies, Type::TEXT_ARRAY),
                (&at.now, Type::INT8),
                (&at.live, Type::INT8),
            ],
        )
        .await?;
    Ok(written.len() == kept.len())
}

/// Per member, its key's live record (created at or after `at.live`), one statement for all.
async fn read_records(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    idems: &[IdempotencyKey],
) -> Result<Vec<Option<(String, i32, String)>>, tokio_postgres::Error> {
    let subjects: Vec<&str> = idems.iter().map(|i| i.subject.as_str()).collect();
    let keys: Vec<&str> = idems.iter().map(|i| i.key.as_str()).collect();
    let rows = tx
        .query_typed(
            "SELECT q.ord, r.request_hash, r.status, r.body
             FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS q(subject, idem_key, ord)
             CROSS JOIN LATERAL (
                 SELECT request_hash, status, body FROM sync_idempotency
                 WHERE tenant = $1 AND subject = q.subject AND idem_key = q.idem_key
                   AND created_at >= $4
                 OFFSET 0
             ) r",
            &[
                (&at.tenant, Type::TEXT),
                (&subjects, Type::TEXT_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&at.live, Type::INT8),
            ],
        )
        .await?;
    let mut records = vec![None; idems.len()];
    for row in rows {
        let position = usize::try_from(row.get::<_, i64>(0) - 1).unwrap_or(usize::MAX);
        if let Some(slot) = records.get_mut(position) {
            *slot = Some((row.get(1), row.get(2), row.get(3)));
        }
    }
    Ok(records)
}

/// Appends the merge's conflicts to the session's journal, numbered after its
/// `conflicts_seq`, when it has a new state and conflicts to keep.
async fn append_journal(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    step: &GroupStep,
) -> Result<usize, tokio_postgres::Error> {
    let journal = group_journal(step);
    if journal.is_empty() || step.changes.is_none() {
        return Ok(0);
    }
    let count = i64::try_from(journal.len()).unwrap_or(i64::MAX);
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
            (&journal, Type::TEXT_ARRAY),
            (&at.now, Type::INT8),
        ],
    )
    .await
    .map(|rows| rows.len())
}

/// The registers `reads` names: its key ranges and its ancestor keys, one statement each,
/// pipelined.
async fn read_registers(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    reads: &Reads,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let (mut in_ranges, at_ancestors) =
        tokio::join!(read_ranges(tx, at, reads), read_ancestors(tx, at, reads));
    if let Ok(registers) = &mut in_ranges {
        registers.extend(at_ancestors?);
    }
    in_ranges
}

/// The registers in the key ranges of `reads`.
async fn read_ranges(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    reads: &Reads,
) -> Result<Vec<String>, tokio_postgres::Error> {
    if reads.registers.is_empty() {
        return Ok(Vec::new());
    }
    let starts: Vec<&[u8]> = reads.registers.iter().map(|r| r.start.as_slice()).collect();
    let ends: Vec<&[u8]> = reads.registers.iter().map(|r| r.end.as_slice()).collect();
    let rows = tx
        .query_typed(
            // One primary-key range scan per range, whatever the table's statistics say: as
            // a join (or a LATERAL the planner flattens into one), a table not analysed yet
            // was scanned for the whole session and filtered. `OFFSET 0` keeps the subquery
            // apart, so each range is its index condition.
            "SELECT r.register FROM unnest($3::bytea[], $4::bytea[]) AS q(lo, hi)
             CROSS JOIN LATERAL (
                 SELECT register FROM sync_registers
                 WHERE tenant = $1 AND session_id = $2 AND path_key >= q.lo AND path_key < q.hi
                 OFFSET 0
             ) r",
            &[
                (&at.tenant, Type::TEXT),
                (&at.session_id, Type::TEXT),
                (&starts, Type::BYTEA_ARRAY),
                (&ends, Type::BYTEA_ARRAY),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The registers at the ancestor keys of `reads`: sent as the paths' keys and, per ancestor,
/// which key and how long a prefix of it (so a deep path costs its key once, not once per
/// ancestor); each found by its own primary-key lookup.
async fn read_ancestors(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    reads: &Reads,
) -> Result<Vec<String>, tokio_postgres::Error> {
    if reads.ancestors.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&[u8]> = reads.keys.iter().map(Vec::as_slice).collect();
    // PostgreSQL arrays count from 1.
    let which: Vec<i32> = reads
        .ancestors
        .iter()
        .map(|&(index, _)| i32::try_from(index).unwrap_or(i32::MAX).saturating_add(1))
        .collect();
    let lengths: Vec<i32> = reads
        .ancestors
        .iter()
        .map(|&(_, end)| i32::try_from(end).unwrap_or(i32::MAX))
        .collect();
    let rows = tx
        .query_typed(
            // The key by a join on its ordinal, not `($5::bytea[])[a.i]`: subscripting an
            // array of variable-length elements walks it from the start, so 65,536 parents
            // of 4,096 keys took 0.5–0.9 s that way, 0.12–0.27 s joined.
            "SELECT r.register FROM unnest($3::int4[], $4::int4[]) AS a(i, len)
             JOIN unnest($5::bytea[]) WITH ORDINALITY AS k(key, i) ON k.i = a.i
             CROSS JOIN LATERAL (
                 SELECT register FROM sync_registers
                 WHERE tenant = $1 AND session_id = $2
                   AND path_key = substring(k.key FROM 1 FOR a.len)
                 OFFSET 0
             ) r",
            &[
                (&at.tenant, Type::TEXT),
                (&at.session_id, Type::TEXT),
                (&which, Type::INT4_ARRAY),
                (&lengths, Type::INT4_ARRAY),
                (&keys, Type::BYTEA_ARRAY),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The stamp rows `reads` names, one statement for all of them.
async fn read_stamps(
    tx: &tokio_postgres::Transaction<'_>,
    at: &MergeAt<'_>,
    reads: &Reads,
) -> Result<Vec<StampRow>, tokio_postgres::Error> {
    if reads.stamps.is_empty() {
        return Ok(Vec::new());
    }
    let replicas: Vec<&[u8]> = reads.stamps.iter().map(|(r, _)| r.as_bytes()).collect();
    let sequences: Vec<i64> = reads.stamps.iter().map(|(_, s)| *s as i64).collect();
    let rows = tx
        .query_typed(
            "SELECT s.replica_id, s.seq, s.stamp FROM unnest($3::bytea[], $4::int8[]) AS q(replica_id, seq)
             CROSS JOIN LATERAL (
                 SELECT replica_id, seq, stamp FROM sync_stamps
                 WHERE tenant = $1 AND session_id = $2 AND replica_id = q.replica_id AND seq = q.seq
                 OFFSET 0
             ) s",
            &[
                (&at.tenant, Type::TEXT),
                (&at.session_id, Type::TEXT),
                (&replicas, Type::BYTEA_ARRAY),
                (&sequences, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StampRow {
            replica_id: String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned(),
            sequence: r.get::<_, i64>(1) as u64,
            stamp: r.get::<_, i64>(2) as u64,
        })
        .collect())
}

/// The session's head, base, version and every register (no stamps), `None` without a row.
async fn read_whole(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    session_id: &str,
) -> Result<Option<StoredSession>, StoreError> {
    let params: [&(dyn ToSql + Sync); 2] = [&tenant, &session_id];
    let (row, registers) = tokio::join!(
        tx.query_opt(
            "SELECT state, base, version FROM sync_sessions
             WHERE tenant = $1 AND session_id = $2 AND version > 0",
            &params,
        ),
        tx.query(
            "SELECT register FROM sync_registers WHERE tenant = $1 AND session_id = $2
             ORDER BY path_key",
            &params,
        )
    );
    let Some(row) = row.map_err(unavailable)? else {
        return Ok(None);
    };
    let registers = registers.map_err(unavailable)?;
    Ok(Some(StoredSession {
        rows: SessionRows {
            head: row.get(0),
            base: row.get(1),
            registers: registers.iter().map(|r| r.get(0)).collect(),
            stamps: Vec::new(),
        },
        version: row.get(2),
    }))
}

/// Writes the register and stamp rows and the base of `changes` (not the head), and deletes
/// the stamp rows behind a new horizon, pipelined.
async fn write_rows(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    changes: &RowChanges,
) -> Result<(), tokio_postgres::Error> {
    let session: [(&(dyn ToSql + Sync), Type); 2] =
        [(&tenant, Type::TEXT), (&session_id, Type::TEXT)];
    let (deleted, upserted, stamped, trimmed, based) = tokio::join!(
        delete_registers(tx, &session, &changes.deletes),
        upsert_registers(tx, &session, &changes.upserts),
        insert_stamps(tx, &session, &changes.stamps),
        trim_stamps(tx, &session, &changes.stamps_below),
        async {
            let Some(base) = &changes.base else {
                return Ok(0);
            };
            tx.execute_typed(
                "UPDATE sync_sessions SET base = $3 WHERE tenant = $1 AND session_id = $2",
                &[session[0].clone(), session[1].clone(), (base, Type::TEXT)],
            )
            .await
        },
    );
    deleted?;
    upserted?;
    stamped?;
    trimmed?;
    based?;
    Ok(())
}

/// Deletes the stamp rows behind a new horizon: `(r, k)` with `k < below[r]`.
async fn trim_stamps(
    tx: &tokio_postgres::Transaction<'_>,
    session: &SessionParams<'_>,
    below: &firemode_merge::VectorClock,
) -> Result<u64, tokio_postgres::Error> {
    if below.is_empty() {
        return Ok(0);
    }
    let replicas: Vec<&[u8]> = below.keys().map(|r| r.as_bytes()).collect();
    let counts: Vec<i64> = below.values().map(|&k| k as i64).collect();
    tx.execute_typed(
        "DELETE FROM sync_stamps s USING unnest($3::bytea[], $4::int8[]) AS h(replica_id, below)
         WHERE s.tenant = $1 AND s.session_id = $2
           AND s.replica_id = h.replica_id AND s.seq < h.below",
        &[
            session[0].clone(),
            session[1].clone(),
            (&replicas, Type::BYTEA_ARRAY),
            (&counts, Type::INT8_ARRAY),
        ],
    )
    .await
}

/// `(tenant, session_id)` as typed parameters `$1, $2`.
type SessionParams<'a> = [(&'a (dyn ToSql + Sync), Type); 2];

async fn delete_registers(
    tx: &tokio_postgres::Transaction<'_>,
    session: &SessionParams<'_>,
    deletes: &[Vec<u8>],
) -> Result<u64, tokio_postgres::Error> {
    if deletes.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = deletes.iter().map(Vec::as_slice).collect();
    tx.execute_typed(
        // Each key found by its own primary-key lookup (fenced, as in `read_registers`), then
        // deleted by row id: `path_key = ANY($3)` was a filter over the whole session on a
        // table not analysed yet.
        "DELETE FROM sync_registers r
         USING (SELECT found.ctid FROM unnest($3::bytea[]) AS d(k)
                CROSS JOIN LATERAL (
                    SELECT ctid FROM sync_registers
                    WHERE tenant = $1 AND session_id = $2 AND path_key = d.k
                    OFFSET 0
                ) found) gone
         WHERE r.ctid = gone.ctid",
        &[
            session[0].clone(),
            session[1].clone(),
            (&keys, Type::BYTEA_ARRAY),
        ],
    )
    .await
}

async fn upsert_registers(
    tx: &tokio_postgres::Transaction<'_>,
    session: &SessionParams<'_>,
    upserts: &[RegisterRow],
) -> Result<u64, tokio_postgres::Error> {
    if upserts.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = upserts.iter().map(|r| r.key.as_slice()).collect();
    let registers: Vec<&str> = upserts.iter().map(|r| r.register.as_str()).collect();
    let replicas: Vec<&[u8]> = upserts
        .iter()
        .map(|r| r.dot.replica_id.as_bytes())
        .collect();
    let sequences: Vec<i64> = upserts
        .iter()
        .map(|r| stored_sequence(r.dot.sequence))
        .collect();
    let made_replicas: Vec<Option<&[u8]>> = upserts
        .iter()
        .map(|r| r.made.as_ref().map(|m| m.replica_id.as_bytes()))
        .collect();
    let made_sequences: Vec<Option<i64>> = upserts
        .iter()
        .map(|r| r.made.as_ref().map(|m| stored_sequence(m.sequence)))
        .collect();
    tx.execute_typed(
        "INSERT INTO sync_registers
             (tenant, session_id, path_key, register, replica_id, seq, made_replica, made_seq)
         SELECT $1, $2, k, r, d, s, mr, ms
         FROM unnest($3::bytea[], $4::text[], $5::bytea[], $6::int8[], $7::bytea[], $8::int8[])
             AS u(k, r, d, s, mr, ms)
         ON CONFLICT (tenant, session_id, path_key) DO UPDATE SET
             register = EXCLUDED.register, replica_id = EXCLUDED.replica_id,
             seq = EXCLUDED.seq, made_replica = EXCLUDED.made_replica,
             made_seq = EXCLUDED.made_seq",
        &[
            session[0].clone(),
            session[1].clone(),
            (&keys, Type::BYTEA_ARRAY),
            (&registers, Type::TEXT_ARRAY),
            (&replicas, Type::BYTEA_ARRAY),
            (&sequences, Type::INT8_ARRAY),
            (&made_replicas, Type::BYTEA_ARRAY),
            (&made_sequences, Type::INT8_ARRAY),
        ],
    )
    .await
}

async fn insert_stamps(
    tx: &tokio_postgres::Transaction<'_>,
    session: &SessionParams<'_>,
    stamps: &[StampRow],
) -> Result<u64, tokio_postgres::Error> {
    if stamps.is_empty() {
        return Ok(0);
    }
    let replicas: Vec<&[u8]> = stamps.iter().map(|r| r.replica_id.as_bytes()).collect();
    let sequences: Vec<i64> = stamps.iter().map(|r| r.sequence as i64).collect();
    let values: Vec<i64> = stamps.iter().map(|r| r.stamp as i64).collect();
    tx.execute_typed(
        "INSERT INTO sync_stamps (tenant, session_id, replica_id, seq, stamp)
         SELECT $1, $2, r, q, s FROM unnest($3::bytea[], $4::int8[], $5::int8[]) AS u(r, q, s)",
        &[
            session[0].clone(),
            session[1].clone(),
            (&replicas, Type::BYTEA_ARRAY),
            (&sequences, Type::INT8_ARRAY),
            (&values, Type::INT8_ARRAY),
        ],
    )
    .await
}

/// Moves every session kept as one value to rows ([`crate::legacy`]), inside the migration's
/// transaction.
async fn convert_legacy_sessions(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    let keys = tx
        .query("SELECT tenant, session_id FROM sync_sessions", &[])
        .await
        .map_err(unavailable)?;
    for key in keys {
        let (tenant, session_id): (String, String) = (key.get(0), key.get(1));
        let state: String = tx
            .query_one(
                "SELECT state FROM sync_sessions WHERE tenant = $1 AND session_id = $2",
                &[&tenant, &session_id],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        match crate::legacy::to_rows(&state) {
            Ok(changes) => {
                write_rows(tx, &tenant, &session_id, &changes)
                    .await
                    .map_err(unavailable)?;
                tx.execute(
                    "UPDATE sync_sessions SET state = $3 WHERE tenant = $1 AND session_id = $2",
                    &[&tenant, &session_id, &changes.head],
                )
                .await
                .map_err(unavailable)?;
            }
            Err(why) => crate::legacy::left_unconverted(&tenant, &session_id, &why),
        }
    }
    // Statistics for the tables just filled, so the first merges are planned on them.
    tx.batch_execute("ANALYZE sync_registers; ANALYZE sync_stamps")
        .await
        .map_err(unavailable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::connection_config;

    #[test]
    fn connections_run_without_jit_unless_the_url_says() {
        let plain = connection_config("host=db user=app dbname=app").unwrap();
        assert_eq!(plain.get_options(), Some("-c jit=off"));
        assert_eq!(plain.get_application_name(), Some("firemode"));
        let theirs =
            connection_config("postgres://app@db/app?options=-c%20statement_timeout%3D5s").unwrap();
        assert_eq!(
            theirs.get_options(),
            Some("-c statement_timeout=5s -c jit=off")
        );
        let jit_on = connection_config("host=db options='-c jit=on'").unwrap();
        assert_eq!(jit_on.get_options(), Some("-c jit=on"));
        assert!(connection_config("host=db port=notaport").is_err());
    }
}
