//! PostgreSQL's side of [`crate::dots`]: filling the dots of rows an older release wrote (and
//! locking that release out), and the catch-up read.

use firemode_merge::{Reads, SessionRows, VectorClock};
use tokio_postgres::types::Type;

use super::{read_registers, unavailable, MergeAt, PgStore};
use crate::dots::{
    filled, new_dot_ranges, worth_reading, CatchUpRead, FILL_BATCH, MAX_NEW_REGISTERS,
};
use crate::{StoreError, StoredSession};

impl PgStore {
    /// [`crate::Store::catch_up`], in one repeatable-read transaction.
    pub async fn catch_up(
        &self,
        tenant: &str,
        session_id: &str,
        since: &VectorClock,
    ) -> Result<CatchUpRead, StoreError> {
        let mut conn = self.pool.get().await.map_err(super::pool_error)?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let read = read_catch_up(&tx, tenant, session_id, since).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(read)
    }
}

async fn read_catch_up(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    since: &VectorClock,
) -> Result<CatchUpRead, StoreError> {
    let row = tx
        .query_typed_opt(
            "SELECT state, base, version FROM sync_sessions
             WHERE tenant = $1 AND session_id = $2 AND version > 0",
            &[(&tenant, Type::TEXT), (&session_id, Type::TEXT)],
        )
        .await
        .map_err(unavailable)?;
    let Some(row) = row else {
        return Ok(CatchUpRead::NoSession);
    };
    let (head, base, version): (String, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
    let Some(clock) = firemode_merge::rows::clock_if_dotted(&head) else {
        return Ok(CatchUpRead::Whole);
    };
    let ranges = new_dot_ranges(&clock, since);
    let replicas: Vec<&[u8]> = ranges.iter().map(|(r, _)| r.as_bytes()).collect();
    let seen: Vec<i64> = ranges.iter().map(|(_, s)| *s).collect();
    let limit = i64::try_from(MAX_NEW_REGISTERS + 1).unwrap_or(i64::MAX);
    let found = tx
        .query_typed(
            // Each replica's range by its own index scan (fenced with OFFSET 0, as the merge's
            // reads are), the registers' own dots and the remembered sets' alike.
            "SELECT DISTINCT k FROM unnest($3::bytea[], $4::int8[]) AS q(replica, seen)
             CROSS JOIN LATERAL (
                 (SELECT path_key AS k FROM sync_registers
                  WHERE tenant = $1 AND session_id = $2 AND replica_id = q.replica AND seq > q.seen
                  OFFSET 0)
                 UNION ALL
                 (SELECT path_key FROM sync_registers
                  WHERE tenant = $1 AND session_id = $2 AND made_replica = q.replica
                    AND made_seq > q.seen
                  OFFSET 0)
             ) r
             LIMIT $5",
            &[
                (&tenant, Type::TEXT),
                (&session_id, Type::TEXT),
                (&replicas, Type::BYTEA_ARRAY),
                (&seen, Type::INT8_ARRAY),
                (&limit, Type::INT8),
            ],
        )
        .await
        .map_err(unavailable)?;
    if found.len() > MAX_NEW_REGISTERS {
        return Ok(CatchUpRead::Whole);
    }
    let keys: Vec<Vec<u8>> = found.iter().map(|r| r.get(0)).collect();
    let reads = Reads::around_keys(keys);
    if !worth_reading(&reads) {
        return Ok(CatchUpRead::Whole);
    }
    let at = MergeAt {
        tenant,
        session_id,
        now: 0,
        live: 0,
    };
    let registers = read_registers(tx, &at, &reads).await.map_err(unavailable)?;
    Ok(CatchUpRead::Part(StoredSession {
        rows: SessionRows {
            head,
            base,
            registers,
            stamps: Vec::new(),
        },
        version,
    }))
}

/// What [`crate::migrations::REGISTER_DOTS`] does after its SQL, inside the migration's
/// transaction (and after any session kept as one value has moved to rows): every register
/// row an older release wrote gets its dots, every head is marked, the indexes are built,
/// and the columns refuse rows without dots from then on ([`crate::dots`]).
pub(super) async fn finish_register_dots(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let rows = fill_dots(tx).await?;
    let heads = mark_heads(tx).await?;
    tx.batch_execute(crate::migrations::REGISTER_DOTS_INDEXES)
        .await
        .map_err(unavailable)?;
    tx.batch_execute(crate::migrations::REGISTER_DOTS_GUARD_POSTGRES)
        .await
        .map_err(unavailable)?;
    tracing::info!(
        rows,
        heads,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "register rows filled with their dots"
    );
    Ok(())
}

/// Gives every register row without dots its dots, [`FILL_BATCH`] rows at a time in key
/// order, each batch one `UPDATE … FROM unnest(…)` (memory holds one batch whatever the
/// table; a statement per row took 166 s for 1.1 M rows). Returns how many rows it filled.
async fn fill_dots(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let (mut after, mut total): (Option<(String, String, Vec<u8>)>, u64) = (None, 0);
    loop {
        let rows = match &after {
            None => {
                tx.query_typed(
                    "SELECT tenant, session_id, path_key, register FROM sync_registers
                     WHERE replica_id IS NULL
                     ORDER BY tenant, session_id, path_key LIMIT $1",
                    &[(&FILL_BATCH, Type::INT8)],
                )
                .await
            }
            Some((tenant, session_id, key)) => {
                tx.query_typed(
                    "SELECT tenant, session_id, path_key, register FROM sync_registers
                     WHERE (tenant, session_id, path_key) > ($1, $2, $3) AND replica_id IS NULL
                     ORDER BY tenant, session_id, path_key LIMIT $4",
                    &[
                        (tenant, Type::TEXT),
                        (session_id, Type::TEXT),
                        (key, Type::BYTEA),
                        (&FILL_BATCH, Type::INT8),
                    ],
                )
                .await
            }
        }
        .map_err(unavailable)?;
        let Some(last) = rows.last() else {
            return Ok(total);
        };
        after = Some((last.get(0), last.get(1), last.get(2)));
        fill_batch(tx, &rows).await?;
        total += rows.len() as u64;
    }
}

/// One batch of [`fill_dots`]: the rows' dots in one statement.
async fn fill_batch(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[tokio_postgres::Row],
) -> Result<(), StoreError> {
    let (mut tenants, mut sessions, mut keys) = (Vec::new(), Vec::new(), Vec::new());
    let (mut replicas, mut seqs, mut made_replicas, mut made_seqs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let (tenant, session_id, key, register): (String, String, Vec<u8>, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let dots = filled(&tenant, &session_id, &register);
        tenants.push(tenant);
        sessions.push(session_id);
        keys.push(key);
        replicas.push(dots.replica);
        seqs.push(dots.seq);
        made_replicas.push(dots.made_replica);
        made_seqs.push(dots.made_seq);
    }
    tx.execute_typed(
        "UPDATE sync_registers r
         SET replica_id = u.d, seq = u.s, made_replica = u.mr, made_seq = u.ms
         FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::int8[], $6::bytea[],
                     $7::int8[]) AS u(t, sid, k, d, s, mr, ms)
         WHERE r.tenant = u.t AND r.session_id = u.sid AND r.path_key = u.k",
        &[
            (&tenants, Type::TEXT_ARRAY),
            (&sessions, Type::TEXT_ARRAY),
            (&keys, Type::BYTEA_ARRAY),
            (&replicas, Type::BYTEA_ARRAY),
            (&seqs, Type::INT8_ARRAY),
            (&made_replicas, Type::BYTEA_ARRAY),
            (&made_seqs, Type::INT8_ARRAY),
        ],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// Marks every head that parses (`firemode_merge::rows::mark_dotted`), [`FILL_BATCH`] at a
/// time in key order, each batch one statement; one that does not parse is left as it is.
/// Returns how many it marked.
async fn mark_heads(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let (mut after, mut total) = ((String::new(), String::new()), 0u64);
    let mut first = true;
    loop {
        let rows = tx
            .query_typed(
                "SELECT tenant, session_id, state FROM sync_sessions
                 WHERE $1 OR (tenant, session_id) > ($2, $3)
                 ORDER BY tenant, session_id LIMIT $4",
                &[
                    (&first, Type::BOOL),
                    (&after.0, Type::TEXT),
                    (&after.1, Type::TEXT),
                    (&FILL_BATCH, Type::INT8),
                ],
            )
            .await
            .map_err(unavailable)?;
        let Some(last) = rows.last() else {
            return Ok(total);
        };
        after = (last.get(0), last.get(1));
        first = false;
        let (mut tenants, mut sessions, mut heads) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            if let Some(marked) = firemode_merge::rows::mark_dotted(row.get(2)) {
                tenants.push(row.get::<_, String>(0));
                sessions.push(row.get::<_, String>(1));
                heads.push(marked);
            }
        }
        total += heads.len() as u64;
        tx.execute_typed(
            "UPDATE sync_sessions s SET state = u.h
             FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, sid, h)
             WHERE s.tenant = u.t AND s.session_id = u.sid",
            &[
                (&tenants, Type::TEXT_ARRAY),
                (&sessions, Type::TEXT_ARRAY),
                (&heads, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(unavailable)?;
    }
}
