//! The embedded backend: SQLite in WAL mode, a bb8 pool of rusqlite connections, each query
//! on tokio's blocking threads. Writers take `BEGIN IMMEDIATE`, so concurrent processes
//! queue on SQLite's lock (with a busy timeout) instead of failing.

mod dots;
mod file;

use crate::dots::stored_sequence;
use crate::migrations::{MIGRATIONS, REGISTER_DOTS, ROWS_LAYOUT, SCHEMA_TABLE};
use crate::sessions::{
    group_journal, live_since, CompactFn, GroupDone, GroupFn, GroupStep, IdempotencyKey,
    JournalEntry, MergeOutcome, StoredSession,
};
use crate::{catalog_conflict, now_ms, StoreError, StoreOptions};
use file::DatabaseFile;
use firemode_merge::{Reads, RowChanges, SessionRows, StampRow};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::Arc;
use std::time::Duration;

pub struct SqliteManager {
    file: Arc<DatabaseFile>,
    busy_timeout: Duration,
}

impl bb8::ManageConnection for SqliteManager {
    type Connection = Connection;
    type Error = StoreError;

    async fn connect(&self) -> Result<Connection, StoreError> {
        let (file, busy_timeout) = (self.file.clone(), self.busy_timeout);
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open(file.path()).map_err(|e| {
                StoreError::Unavailable(format!("cannot open {}: {e}", file.path().display()))
            })?;
            file.opened()?;
            conn.busy_timeout(busy_timeout).map_err(unavailable)?;
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(unavailable)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(unavailable)?;
            conn.pragma_update(None, "foreign_keys", "ON")
                .map_err(unavailable)?;
            Ok(conn)
        })
        .await
        .map_err(unavailable)?
    }

    async fn is_valid(&self, _conn: &mut Connection) -> Result<(), StoreError> {
        Ok(())
    }

    fn has_broken(&self, _conn: &mut Connection) -> bool {
        false
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    pool: bb8::Pool<SqliteManager>,
    file: Arc<DatabaseFile>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    pub fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        // Private: the store holds every tenant's sessions (an existing dir is left as the
        // operator made it).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.data_dir)
            .map_err(|e| {
                StoreError::Config(format!(
                    "cannot create data_dir {}: {e}",
                    opts.data_dir.display()
                ))
            })?;
        let file = Arc::new(DatabaseFile::new(opts.data_dir.join("firemode.sqlite3")));
        let pool = bb8::Pool::builder()
            .max_size(opts.pool_size.clamp(1, 64))
            .connection_timeout(opts.lock_timeout.max(opts.connect_timeout))
            // A failed connect is an error now (the store is down), not a wait until the
            // timeout; a timeout then means every connection stayed busy that long.
            .retry_connection(false)
            .build_unchecked(SqliteManager {
                file: file.clone(),
                busy_timeout: opts.lock_timeout,
            });
        Ok(Self { pool, file })
    }

    /// Runs `f` on a pooled connection on a blocking thread.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let mut conn = self.pool.get_owned().await.map_err(|e| match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut if self.pool.state().connections > 0 => {
                StoreError::Busy("every SQLite connection is in use".into())
            }
            bb8::RunError::TimedOut => unavailable("cannot open the SQLite database"),
        })?;
        let file = self.file.clone();
        // Checked after as well: what a write committed to a file deleted meanwhile is lost,
        // so its client must not be told it was kept.
        tokio::task::spawn_blocking(move || {
            file.check()?;
            let done = f(&mut conn)?;
            file.check()?;
            Ok(done)
        })
        .await
        .map_err(unavailable)?
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.execute_batch(SCHEMA_TABLE).map_err(unavailable)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let applied: Option<i64> = tx
                .query_row("SELECT max(version) FROM firemode_schema", [], |r| r.get(0))
                .map_err(unavailable)?;
            crate::migrations::refuse_newer(applied)?;
            let (mut convert_legacy, mut finish_dots) = (false, false);
            for (version, sql) in MIGRATIONS {
                let done: Option<i64> = tx
                    .query_row(
                        "SELECT version FROM firemode_schema WHERE version = ?1",
                        params![version],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(unavailable)?;
                if done.is_none() {
                    tx.execute_batch(sql).map_err(unavailable)?;
                    // Sessions kept as one value move to rows once the rows have every column;
                    // then the register rows get their dots and the heads their mark.
                    convert_legacy |= *version == ROWS_LAYOUT;
                    finish_dots |= *version == REGISTER_DOTS;
                    tx.execute(
                        "INSERT INTO firemode_schema (version, applied_at) VALUES (?1, ?2)",
                        params![version, now_ms()],
                    )
                    .map_err(unavailable)?;
                }
            }
            if convert_legacy {
                convert_legacy_sessions(&tx)?;
            }
            if finish_dots {
                dots::finish_register_dots(&tx)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let result = self
            .with_conn(|conn| {
                conn.query_row("SELECT 1", [], |_| Ok(()))
                    .map_err(unavailable)
            })
            .await;
        match result {
            // Every connection busy with requests: the store works, it is just loaded.
            Err(StoreError::Busy(_)) => Ok(()),
            other => other,
        }
    }

    pub async fn install_catalog(&self, version: &str, body: String) -> Result<(), StoreError> {
        let version = version.to_string();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let stored: Option<String> = tx
                .query_row(
                    "SELECT body FROM catalog_versions WHERE version = ?1",
                    params![version],
                    |r| r.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            match stored {
                Some(b) if b != body => return Err(catalog_conflict(&version)),
                Some(_) => {}
                None => {
                    tx.execute(
                        "INSERT INTO catalog_versions (version, body, loaded_at) VALUES (?1, ?2, ?3)",
                        params![version, body, now_ms()],
                    )
                    .map_err(unavailable)?;
                }
            }
            tx.execute(
                "INSERT INTO catalog_current (id, version) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                params![version],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    pub async fn current_catalog_version(&self) -> Result<Option<String>, StoreError> {
        self.with_conn(|conn| {
            conn.query_row(
                "SELECT version FROM catalog_current WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    pub async fn current_catalog(&self) -> Result<Option<(String, String)>, StoreError> {
        self.with_conn(|conn| {
            conn.query_row(
                "SELECT v.version, v.body FROM catalog_current c
                 JOIN catalog_versions v ON v.version = c.version WHERE c.id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    /// A group of merges in one `BEGIN IMMEDIATE` transaction: each key's expired record is
    /// dropped and a live one answers its member; the closure decides the rest on the rows
    /// `reads` names, and what it decided is written.
    pub async fn merge_group(
        &self,
        tenant: &str,
        session_id: &str,
        idems: Vec<IdempotencyKey>,
        ttl: Duration,
        reads: Reads,
        merge: GroupFn,
    ) -> Result<GroupDone, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            let tx = begin_merge(conn)?;
            let live = live_since(ttl);
            let mut recorded = Vec::with_capacity(idems.len());
            for idem in &idems {
                let record = live_record(&tx, &tenant, idem, live)?;
                recorded.push(record.map(|(hash, status, body)| {
                    idem.answer_from_record(&hash, status as u16, body)
                }));
            }
            if recorded.iter().all(Option::is_some) {
                tx.commit().map_err(unavailable)?;
                let answers = recorded.into_iter().flatten().collect();
                return Ok(GroupDone {
                    answers,
                    changed: false,
                    compact: false,
                });
            }
            let stored = read_for_merge(&tx, &tenant, &session_id, &reads)?;
            let step = merge(stored, recorded);
            save_group(&tx, &tenant, &session_id, &idems, &step, now_ms())?;
            tx.commit().map_err(unavailable)?;
            Ok(GroupDone {
                changed: step.changes.is_some(),
                compact: step.compact,
                answers: step.answers,
            })
        })
        .await
    }

    /// Compaction in one `BEGIN IMMEDIATE` transaction: every row of the session but its
    /// stamps, handed to `compact`, and what it changed written (the version stays: the
    /// document does not change).
    pub async fn compact_session(
        &self,
        tenant: &str,
        session_id: &str,
        compact: CompactFn,
    ) -> Result<bool, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            let tx = begin_merge(conn)?;
            let Some(stored) = read_whole(&tx, &tenant, &session_id)? else {
                return Ok(false);
            };
            let Some(changes) = compact(stored.rows) else {
                return Ok(false);
            };
            write_rows(&tx, &tenant, &session_id, &changes)?;
            set_head(&tx, &tenant, &session_id, &changes.head)?;
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    /// The whole session in one read transaction (one snapshot: a merge committing meanwhile
    /// is seen entirely or not at all).
    pub async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<StoredSession>, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(unavailable)?;
            let stored = read_whole(&tx, &tenant, &session_id)?;
            tx.commit().map_err(unavailable)?;
            Ok(stored)
        })
        .await
    }

    pub async fn conflicts(
        &self,
        tenant: &str,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            let mut statement = conn
                .prepare(
                    "SELECT seq, entry FROM sync_conflicts
                     WHERE tenant = ?1 AND session_id = ?2 AND seq > ?3
                     ORDER BY seq LIMIT ?4",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![tenant, session_id, after, limit], |r| {
                    Ok(JournalEntry {
                        seq: r.get(0)?,
                        entry: r.get(1)?,
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    pub async fn purge_conflicts(&self, retention: Duration) -> Result<u64, StoreError> {
        self.with_conn(move |conn| {
            conn.execute(
                "DELETE FROM sync_conflicts WHERE at < ?1",
                params![live_since(retention)],
            )
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    pub async fn session_head(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(String, i64)>, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT state, version FROM sync_sessions WHERE tenant = ?1 AND session_id = ?2",
                params![tenant, session_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    /// `sync_sessions.version`, 0 when the session has no applied batch.
    pub async fn session_version(&self, tenant: &str, session_id: &str) -> Result<i64, StoreError> {
        let (tenant, session_id) = (tenant.to_string(), session_id.to_string());
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT version FROM sync_sessions WHERE tenant = ?1 AND session_id = ?2",
                params![tenant, session_id],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(unavailable)
        })
        .await
    }

    pub async fn purge_idempotency(&self, ttl: Duration) -> Result<u64, StoreError> {
        self.with_conn(move |conn| {
            conn.execute(
                "DELETE FROM sync_idempotency WHERE created_at < ?1",
                params![live_since(ttl)],
            )
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }
}

/// Begins a merge's transaction. IMMEDIATE: the write lock is taken now, so concurrent merges
/// queue here (up to the busy timeout, the merge's lock timeout).
fn begin_merge(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy("the session is being merged by another request".into())
            }
            _ => unavailable(e),
        })
}

/// Deletes the key's record if it expired (created before `live`), then reads the live one:
/// the request it answered (its hash), and its status and body.
fn live_record(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    idem: &IdempotencyKey,
    live: i64,
) -> Result<Option<(String, i64, String)>, StoreError> {
    tx.execute(
        "DELETE FROM sync_idempotency
                 WHERE tenant = ?1 AND subject = ?2 AND idem_key = ?3 AND created_at < ?4",
        params![tenant, idem.subject, idem.key, live],
    )
    .map_err(unavailable)?;
    tx.query_row(
        "SELECT request_hash, status, body FROM sync_idempotency
                     WHERE tenant = ?1 AND subject = ?2 AND idem_key = ?3",
        params![tenant, idem.subject, idem.key],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(unavailable)
}

/// The head and the rows `reads` names, `None` for a new session.
fn read_for_merge(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    reads: &Reads,
) -> Result<Option<SessionRows>, StoreError> {
    let head: Option<String> = tx
        .query_row(
            "SELECT state FROM sync_sessions WHERE tenant = ?1 AND session_id = ?2",
            params![tenant, session_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    let Some(head) = head else {
        return Ok(None);
    };
    let registers = read_registers(tx, tenant, session_id, reads)?;
    let mut stamps = Vec::new();
    let mut at = tx
        .prepare(
            "SELECT stamp FROM sync_stamps
             WHERE tenant = ?1 AND session_id = ?2 AND replica_id = ?3 AND seq = ?4",
        )
        .map_err(unavailable)?;
    for (replica_id, sequence) in &reads.stamps {
        let stamp: Option<i64> = at
            .query_row(
                params![tenant, session_id, replica_id.as_bytes(), *sequence as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        if let Some(stamp) = stamp {
            stamps.push(StampRow {
                replica_id: replica_id.clone(),
                sequence: *sequence,
                stamp: stamp as u64,
            });
        }
    }
    Ok(Some(SessionRows {
        head,
        base: None,
        registers,
        stamps,
    }))
}

/// The registers in the key ranges of `reads` and at its ancestor keys.
fn read_registers(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    reads: &Reads,
) -> Result<Vec<String>, StoreError> {
    let mut registers = Vec::new();
    let mut in_range = tx
        .prepare(
            "SELECT register FROM sync_registers
             WHERE tenant = ?1 AND session_id = ?2 AND path_key >= ?3 AND path_key < ?4",
        )
        .map_err(unavailable)?;
    for range in &reads.registers {
        let rows = in_range
            .query_map(params![tenant, session_id, range.start, range.end], |r| {
                r.get::<_, String>(0)
            })
            .map_err(unavailable)?;
        for row in rows {
            registers.push(row.map_err(unavailable)?);
        }
    }
    let mut at_key = tx
        .prepare(
            "SELECT register FROM sync_registers
             WHERE tenant = ?1 AND session_id = ?2 AND path_key = ?3",
        )
        .map_err(unavailable)?;
    for key in reads.ancestor_keys() {
        let register: Option<String> = at_key
            .query_row(params![tenant, session_id, key], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        registers.extend(register);
    }
    Ok(registers)
}

/// The session row's head, base and version, `None` without a row.
fn read_session_row(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
) -> Result<Option<(String, Option<String>, i64)>, StoreError> {
    tx.query_row(
        "SELECT state, base, version FROM sync_sessions WHERE tenant = ?1 AND session_id = ?2",
        params![tenant, session_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(unavailable)
}

/// The session's head, base, version and every register (no stamps), `None` without a row.
fn read_whole(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
) -> Result<Option<StoredSession>, StoreError> {
    let row = read_session_row(tx, tenant, session_id)?;
    let Some((head, base, version)) = row else {
        return Ok(None);
    };
    let mut statement = tx
        .prepare(
            "SELECT register FROM sync_registers WHERE tenant = ?1 AND session_id = ?2
             ORDER BY path_key",
        )
        .map_err(unavailable)?;
    let registers = statement
        .query_map(params![tenant, session_id], |r| r.get::<_, String>(0))
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    Ok(Some(StoredSession {
        rows: SessionRows {
            head,
            base,
            registers,
            stamps: Vec::new(),
        },
        version,
    }))
}

/// Writes the register and stamp rows and the base of `changes` (not the head), and deletes
/// the stamp rows behind a new horizon.
fn write_rows(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    changes: &RowChanges,
) -> Result<(), StoreError> {
    let mut delete = tx
        .prepare(
            "DELETE FROM sync_registers WHERE tenant = ?1 AND session_id = ?2 AND path_key = ?3",
        )
        .map_err(unavailable)?;
    for key in &changes.deletes {
        delete
            .execute(params![tenant, session_id, key])
            .map_err(unavailable)?;
    }
    let mut upsert = tx
        .prepare(
            "INSERT INTO sync_registers
                 (tenant, session_id, path_key, register, replica_id, seq, made_replica, made_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (tenant, session_id, path_key) DO UPDATE SET
                 register = excluded.register, replica_id = excluded.replica_id,
                 seq = excluded.seq, made_replica = excluded.made_replica,
                 made_seq = excluded.made_seq",
        )
        .map_err(unavailable)?;
    for row in &changes.upserts {
        upsert
            .execute(params![
                tenant,
                session_id,
                row.key,
                row.register,
                row.dot.replica_id.as_bytes(),
                stored_sequence(row.dot.sequence),
                row.made.as_ref().map(|made| made.replica_id.as_bytes()),
                row.made.as_ref().map(|made| stored_sequence(made.sequence)),
            ])
            .map_err(unavailable)?;
    }
    let mut stamp = tx
        .prepare(
            "INSERT INTO sync_stamps (tenant, session_id, replica_id, seq, stamp)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(unavailable)?;
    for row in &changes.stamps {
        stamp
            .execute(params![
                tenant,
                session_id,
                row.replica_id.as_bytes(),
                row.sequence as i64,
                row.stamp as i64
            ])
            .map_err(unavailable)?;
    }
    let mut trim = tx
        .prepare(
            "DELETE FROM sync_stamps
             WHERE tenant = ?1 AND session_id = ?2 AND replica_id = ?3 AND seq < ?4",
        )
        .map_err(unavailable)?;
    for (replica_id, below) in &changes.stamps_below {
        trim.execute(params![
            tenant,
            session_id,
            replica_id.as_bytes(),
            *below as i64
        ])
        .map_err(unavailable)?;
    }
    if let Some(base) = &changes.base {
        tx.execute(
            "UPDATE sync_sessions SET base = ?3 WHERE tenant = ?1 AND session_id = ?2",
            params![tenant, session_id, base],
        )
        .map_err(unavailable)?;
    }
    Ok(())
}

/// Replaces the session's head without bumping its version (compaction, migration).
fn set_head(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    head: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE sync_sessions SET state = ?3 WHERE tenant = ?1 AND session_id = ?2",
        params![tenant, session_id, head],
    )
    .map(drop)
    .map_err(unavailable)
}

/// Moves every session kept as one value to rows ([`crate::legacy`]), inside the migration's
/// transaction.
fn convert_legacy_sessions(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let keys: Vec<(String, String)> = tx
        .prepare("SELECT tenant, session_id FROM sync_sessions")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(unavailable)?;
    for (tenant, session_id) in keys {
        let state: String = tx
            .query_row(
                "SELECT state FROM sync_sessions WHERE tenant = ?1 AND session_id = ?2",
                params![tenant, session_id],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        match crate::legacy::to_rows(&state) {
            Ok(changes) => {
                write_rows(tx, &tenant, &session_id, &changes)?;
                set_head(tx, &tenant, &session_id, &changes.head)?;
            }
            Err(why) => crate::legacy::left_unconverted(&tenant, &session_id, &why),
        }
    }
    Ok(())
}

/// Writes what a group decided: its head, rows and its members' journal entries (when it
/// changed anything), then each remembered answer's idempotency record.
fn save_group(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    idems: &[IdempotencyKey],
    step: &GroupStep,
    now: i64,
) -> Result<(), StoreError> {
    if let Some(changes) = &step.changes {
        tx.execute(
            "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
                     VALUES (?1, ?2, ?3, 1, ?4)
                     ON CONFLICT (tenant, session_id) DO UPDATE
                     SET state = excluded.state, version = sync_sessions.version + 1,
                         updated_at = excluded.updated_at",
            params![tenant, session_id, changes.head, now],
        )
        .map_err(unavailable)?;
        write_rows(tx, tenant, session_id, changes)?;
        journal(tx, tenant, session_id, &group_journal(step), now)?;
    }
    for (idem, answer) in idems.iter().zip(&step.answers) {
        let MergeOutcome::Ran(ran) = answer else {
            continue;
        };
        if !ran.remember {
            continue;
        }
        tx.execute(
            "INSERT INTO sync_idempotency
                     (tenant, subject, idem_key, request_hash, status, body, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                tenant,
                idem.subject,
                idem.key,
                idem.request_hash,
                ran.status as i64,
                ran.body,
                now
            ],
        )
        .map_err(unavailable)?;
    }
    Ok(())
}

/// Appends `entries` to the session's conflict journal, numbered after its `conflicts_seq`,
/// inside the merge's transaction (the session row exists: the merge just wrote it).
fn journal(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    entries: &[String],
    now: i64,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let count = i64::try_from(entries.len()).unwrap_or(i64::MAX);
    let last: i64 = tx
        .query_row(
            "UPDATE sync_sessions SET conflicts_seq = conflicts_seq + ?3
             WHERE tenant = ?1 AND session_id = ?2 RETURNING conflicts_seq",
            params![tenant, session_id, count],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    let mut insert = tx
        .prepare(
            "INSERT INTO sync_conflicts (tenant, session_id, seq, entry, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(unavailable)?;
    for (seq, entry) in (last - count + 1..).zip(entries) {
        insert
            .execute(params![tenant, session_id, seq, entry, now])
            .map_err(unavailable)?;
    }
    Ok(())
}
