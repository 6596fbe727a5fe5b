//! PostgreSQL's side of [`crate::dots`]: filling the dots of rows an older release wrote, and
//! the catch-up read.

use firemode_merge::{Reads, SessionRows, VectorClock};
use tokio_postgres::types::Type;

use super::{read_registers, unavailable, MergeAt, PgStore};
use crate::dots::{
    filled, new_dot_ranges, stored_sequence, worth_reading, CatchUpRead, MAX_NEW_REGISTERS,
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
    let Ok(clock) = firemode_merge::rows::clock_of_head(&head) else {
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

/// Gives every register row an older release wrote its dots ([`crate::dots`]), inside the
/// migration's transaction.
pub(super) async fn fill_dots(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT tenant, session_id, path_key, register FROM sync_registers",
            &[],
        )
        .await
        .map_err(unavailable)?;
    for row in rows {
        let (tenant, session_id, key, register): (String, String, Vec<u8>, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let Some((dot, made)) = filled(&tenant, &session_id, &register) else {
            continue;
        };
        tx.execute_typed(
            "UPDATE sync_registers SET replica_id = $4, seq = $5, made_replica = $6, made_seq = $7
             WHERE tenant = $1 AND session_id = $2 AND path_key = $3",
            &[
                (&tenant, Type::TEXT),
                (&session_id, Type::TEXT),
                (&key, Type::BYTEA),
                (&dot.replica_id.as_bytes(), Type::BYTEA),
                (&stored_sequence(dot.sequence), Type::INT8),
                (&made.as_ref().map(|m| m.replica_id.as_bytes()), Type::BYTEA),
                (
                    &made.as_ref().map(|m| stored_sequence(m.sequence)),
                    Type::INT8,
                ),
            ],
        )
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}
