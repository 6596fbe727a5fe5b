//! SQLite's side of [`crate::dots`]: filling the dots of rows an older release wrote, and
//! the catch-up read.

use firemode_merge::{Reads, SessionRows, VectorClock};
use rusqlite::{params, TransactionBehavior};

use super::{read_registers, read_session_row, unavailable, SqliteStore};
use crate::dots::{
    filled, new_dot_ranges, stored_sequence, worth_reading, CatchUpRead, MAX_NEW_REGISTERS,
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

/// Gives every register row an older release wrote its dots ([`crate::dots`]), inside the
/// migration's transaction.
pub(super) fn fill_dots(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let rows: Vec<(String, String, Vec<u8>, String)> = tx
        .prepare("SELECT tenant, session_id, path_key, register FROM sync_registers")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(unavailable)?;
    let mut fill = tx
        .prepare(
            "UPDATE sync_registers SET replica_id = ?4, seq = ?5, made_replica = ?6, made_seq = ?7
             WHERE tenant = ?1 AND session_id = ?2 AND path_key = ?3",
        )
        .map_err(unavailable)?;
    for (tenant, session_id, key, register) in rows {
        let Some((dot, made)) = filled(&tenant, &session_id, &register) else {
            continue;
        };
        fill.execute(params![
            tenant,
            session_id,
            key,
            dot.replica_id.as_bytes(),
            stored_sequence(dot.sequence),
            made.as_ref().map(|made| made.replica_id.as_bytes()),
            made.as_ref().map(|made| stored_sequence(made.sequence)),
        ])
        .map_err(unavailable)?;
    }
    Ok(())
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
    let Ok(clock) = firemode_merge::rows::clock_of_head(&head) else {
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
