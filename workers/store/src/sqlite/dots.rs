//! SQLite's side of [`crate::dots`]: filling the dots of rows an older release wrote (and
//! locking that release out), and the catch-up read.

use firemode_merge::{Reads, SessionRows, VectorClock};
use rusqlite::{params, TransactionBehavior};

use super::{read_registers, read_session_row, unavailable, SqliteStore};
use crate::dots::{
    filled, new_dot_ranges, worth_reading, CatchUpRead, FILL_BATCH, MAX_NEW_REGISTERS,
};
use crate::{StoreError, StoredSession};

impl SqliteStore {
    /// [`crate::Store::catch_up`], in one read transaction.
    pub async fn catch_up(
        &self,
        tenant: &str,
        session_id: &str,
        since: &VectorClock,
    ) -> Result<CatchUpRead, StoreError> {
        let (tenant, session_id, since) =
            (tenant.to_string(), session_id.to_string(), since.clone());
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(unavailable)?;
            let read = read_catch_up(&tx, &tenant, &session_id, &since)?;
            tx.commit().map_err(unavailable)?;
            Ok(read)
        })
        .await
    }
}

/// What [`crate::migrations::REGISTER_DOTS`] does after its SQL, inside the migration's
/// transaction (and after any session kept as one value has moved to rows): every register
/// row an older release wrote gets its dots, every head is marked, the indexes are built,
/// and the table refuses rows without dots from then on ([`crate::dots`]).
pub(super) fn finish_register_dots(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let rows = fill_dots(tx)?;
    let heads = mark_heads(tx)?;
    tx.execute_batch(crate::migrations::REGISTER_DOTS_INDEXES)
        .map_err(unavailable)?;
    tx.execute_batch(crate::migrations::REGISTER_DOTS_GUARD_SQLITE)
        .map_err(unavailable)?;
    tracing::info!(
        rows,
        heads,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "register rows filled with their dots"
    );
    Ok(())
}

/// Gives every register row without dots its dots, [`FILL_BATCH`] rows at a time in rowid
/// order (so memory holds one batch whatever the table). Returns how many rows it filled.
fn fill_dots(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let mut select = tx
        .prepare(
            "SELECT rowid, tenant, session_id, register FROM sync_registers
             WHERE rowid > ?1 AND replica_id IS NULL ORDER BY rowid LIMIT ?2",
        )
        .map_err(unavailable)?;
    let mut fill = tx
        .prepare(
            "UPDATE sync_registers SET replica_id = ?2, seq = ?3, made_replica = ?4, made_seq = ?5
             WHERE rowid = ?1",
        )
        .map_err(unavailable)?;
    let (mut after, mut total) = (i64::MIN, 0u64);
    loop {
        let batch: Vec<(i64, String, String, String)> = select
            .query_map(params![after, FILL_BATCH], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(unavailable)?;
        let Some(last) = batch.last() else {
            return Ok(total);
        };
        after = last.0;
        for (rowid, tenant, session_id, register) in &batch {
            let dots = filled(tenant, session_id, register);
            fill.execute(params![
                rowid,
                dots.replica,
                dots.seq,
                dots.made_replica,
                dots.made_seq
            ])
            .map_err(unavailable)?;
        }
        total += batch.len() as u64;
    }
}

/// Marks every head that parses (`firemode_merge::rows::mark_dotted`), [`FILL_BATCH`] at a
/// time in rowid order; one that does not parse is left as it is. Returns how many it marked.
fn mark_heads(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let mut select = tx
        .prepare("SELECT rowid, state FROM sync_sessions WHERE rowid > ?1 ORDER BY rowid LIMIT ?2")
        .map_err(unavailable)?;
    let mut mark = tx
        .prepare("UPDATE sync_sessions SET state = ?2 WHERE rowid = ?1")
        .map_err(unavailable)?;
    let (mut after, mut total) = (i64::MIN, 0u64);
    loop {
        let batch: Vec<(i64, String)> = select
            .query_map(params![after, FILL_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(unavailable)?;
        let Some(last) = batch.last() else {
            return Ok(total);
        };
        after = last.0;
        for (rowid, head) in &batch {
            if let Some(marked) = firemode_merge::rows::mark_dotted(head) {
                mark.execute(params![rowid, marked]).map_err(unavailable)?;
                total += 1;
            }
        }
    }
}

/// The catch-up read of [`crate::Store::catch_up`], in `tx`.
fn read_catch_up(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    session_id: &str,
    since: &VectorClock,
) -> Result<CatchUpRead, StoreError> {
    let row = read_session_row(tx, tenant, session_id)?;
    let Some((head, base, version)) = row else {
        return Ok(CatchUpRead::NoSession);
    };
    let Some(clock) = firemode_merge::rows::clock_if_dotted(&head) else {
        return Ok(CatchUpRead::Whole);
    };
    let mut keys = std::collections::BTreeSet::new();
    let mut by_dot = tx
        .prepare(
            "SELECT path_key FROM sync_registers
             WHERE tenant = ?1 AND session_id = ?2 AND replica_id = ?3 AND seq > ?4
             UNION
             SELECT path_key FROM sync_registers
             WHERE tenant = ?1 AND session_id = ?2 AND made_replica = ?3 AND made_seq > ?4",
        )
        .map_err(unavailable)?;
    for (replica, seen) in new_dot_ranges(&clock, since) {
        let found = by_dot
            .query_map(params![tenant, session_id, replica.as_bytes(), seen], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .map_err(unavailable)?;
        for key in found {
            keys.insert(key.map_err(unavailable)?);
            if keys.len() > MAX_NEW_REGISTERS {
                return Ok(CatchUpRead::Whole);
            }
        }
    }
    let reads = Reads::around_keys(keys.into_iter().collect());
    if !worth_reading(&reads) {
        return Ok(CatchUpRead::Whole);
    }
    let registers = read_registers(tx, tenant, session_id, &reads)?;
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
