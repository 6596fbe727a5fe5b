//! Reading a sync request: the body of `POST /v1/tests/sessions/{id}/results` into a
//! [`Batch`], with a 400 that names what is wrong for anything malformed. Pure.

use firemode_merge::{Batch, Change, Pointer, VectorClock};
use serde_json::{Map, Value};
use std::time::Duration;

/// Limits and defaults that come from the config and the caller.
pub struct RequestContext<'a> {
    /// The token's `sub`: the replica when the body names none.
    pub subject: &'a str,
    /// The server's clock, ms since the epoch.
    pub now_ms: u64,
    pub max_clock_skew: Duration,
    pub max_changes: usize,
}

const MAX_REPLICA_ID: usize = 128;

/// Parses and validates a sync request body.
pub fn parse_batch(body: &[u8], ctx: &RequestContext<'_>) -> Result<Batch, String> {
    batch_from_value(parse_json(body)?, ctx)
}

/// The body as a JSON value (a 400 when it is not JSON).
pub fn parse_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
}

/// Validates a parsed sync request body into a [`Batch`], moving the written values out of
/// it (a copy of a 60,000-key object costs ~6 MB of `serde_json` maps).
pub fn batch_from_value(value: Value, ctx: &RequestContext<'_>) -> Result<Batch, String> {
    let Value::Object(mut obj) = value else {
        return Err(
            "the body must be a JSON object {\"changes\": [...], \"_sync_meta\": {...}}".into(),
        );
    };
    let changes = changes_from(&mut obj, ctx.max_changes)?;
    let empty = Map::new();
    let meta = match obj.get("_sync_meta") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err("`_sync_meta` must be an object".into()),
    };
    let clock = clock_from(meta)?;
    let (replica_id, replica_named) = replica_from(meta, ctx.subject)?;
    let timestamp_ms = timestamp_from(meta, ctx)?;
    let batch = Batch {
        replica_id,
        replica_named,
        clock,
        timestamp_ms,
        changes,
    };
    batch.validate().map_err(|e| e.to_string())?;
    Ok(batch)
}

/// The body's `changes`: a list of at most `max_changes`, each a valid change.
fn changes_from(obj: &mut Map<String, Value>, max_changes: usize) -> Result<Vec<Change>, String> {
    let changes = match obj.get_mut("changes") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err("`changes` must be a list".into()),
        None => return Err("`changes` is missing".into()),
    };
    if changes.len() > max_changes {
        return Err(format!(
            "`changes` has {} entries; at most {} per batch (sync.max_changes_per_batch)",
            changes.len(),
            max_changes
        ));
    }
    changes
        .iter_mut()
        .enumerate()
        .map(|(i, c)| parse_change(c).map_err(|e| format!("changes[{i}]: {e}")))
        .collect()
}

/// `_sync_meta.vector_clock`, empty when absent.
fn clock_from(meta: &Map<String, Value>) -> Result<VectorClock, String> {
    match meta.get("vector_clock") {
        None | Some(Value::Null) => Ok(VectorClock::new()),
        Some(Value::Object(m)) => parse_clock(m),
        Some(_) => {
            Err("`_sync_meta.vector_clock` must be an object of replica id → counter".into())
        }
    }
}

/// `_sync_meta.replica_id`, or the token's subject when the body names none; and whether the
/// body named it.
fn replica_from(meta: &Map<String, Value>, subject: &str) -> Result<(String, bool), String> {
    let (replica_id, replica_named) = match meta.get("replica_id") {
        None | Some(Value::Null) => (subject.to_string(), false),
        Some(Value::String(s)) => (s.clone(), true),
        Some(_) => return Err("`_sync_meta.replica_id` must be a string".into()),
    };
    check_replica_id(&replica_id, "`_sync_meta.replica_id`")?;
    // Like the identity claims: no control characters in a new replica's name. (Clock
    // entries may still name a replica an older release accepted.)
    if replica_id.chars().any(char::is_control) {
        return Err("`_sync_meta.replica_id` must not contain control characters".into());
    }
    Ok((replica_id, replica_named))
}

/// `_sync_meta.timestamp`, the server's clock when absent, never later than the server's
/// clock plus the allowed skew.
fn timestamp_from(meta: &Map<String, Value>, ctx: &RequestContext<'_>) -> Result<u64, String> {
    let ceiling = ctx
        .now_ms
        .saturating_add(ctx.max_clock_skew.as_millis() as u64);
    Ok(match meta.get("timestamp") {
        None | Some(Value::Null) => ctx.now_ms,
        Some(v) => v
            .as_u64()
            .ok_or("`_sync_meta.timestamp` must be a non-negative integer (ms since the epoch)")?
            .min(ceiling),
    })
}

fn check_replica_id(id: &str, what: &str) -> Result<(), String> {
    if id.is_empty() || id.chars().count() > MAX_REPLICA_ID {
        return Err(format!("{what} must be 1-{MAX_REPLICA_ID} characters"));
    }
    Ok(())
}

fn parse_clock(m: &Map<String, Value>) -> Result<VectorClock, String> {
    let mut clock = VectorClock::new();
    for (replica, counter) in m {
        check_replica_id(replica, "a replica id in `_sync_meta.vector_clock`")?;
        let n = counter.as_u64().ok_or_else(|| {
            format!(
                "`_sync_meta.vector_clock[{replica:?}]` must be a non-negative integer within u64"
            )
        })?;
        clock.insert(replica.clone(), n);
    }
    Ok(clock)
}

/// One change; a `set`'s value is moved out of `c`.
fn parse_change(c: &mut Value) -> Result<Change, String> {
    let Value::Object(obj) = c else {
        return Err("must be an object {\"op\", \"path\", \"value\"}".into());
    };
    let path = match obj.get("path") {
        Some(Value::String(p)) => Pointer::parse(p).map_err(|e| format!("`path` {p:?}: {e}"))?,
        Some(_) => return Err("`path` must be a string (a JSON Pointer such as \"/a/b\")".into()),
        None => return Err("`path` is missing".into()),
    };
    match obj.get("op").and_then(Value::as_str) {
        Some("set") => match obj.remove("value") {
            Some(value) => Ok(Change::Set { path, value }),
            None => Err("`set` needs a `value`".into()),
        },
        Some("remove") => Ok(Change::Remove { path }),
        Some(other) => Err(format!("unknown `op` {other:?}; use \"set\" or \"remove\"")),
        None => Err("`op` is missing (\"set\" or \"remove\")".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestContext<'static> {
        RequestContext {
            subject: "tablet-sub",
            now_ms: 1_000_000,
            max_clock_skew: Duration::from_secs(300),
            max_changes: 3,
        }
    }

    #[test]
    fn the_seed_payload_works() {
        let b = parse_batch(
            br#"{"changes":[{"op":"set","path":"/a/b","value":1}],"_sync_meta":{"vector_clock":{}}}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(b.replica_id, "tablet-sub");
        assert_eq!(b.timestamp_ms, 1_000_000);
        assert!(b.clock.is_empty());
        assert_eq!(b.changes.len(), 1);
    }

    #[test]
    fn timestamps_are_clamped_to_the_allowed_skew() {
        let b = parse_batch(
            br#"{"changes":[],"_sync_meta":{"timestamp":99999999999,"replica_id":"t7","vector_clock":{"t7":1}}}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(b.timestamp_ms, 1_000_000 + 300_000);
        assert_eq!(b.replica_id, "t7");
    }

    #[test]
    fn bad_input_is_named() {
        for (body, needle) in [
            (&b"[]"[..], "JSON object"),
            (br#"{"changes":{}}"#, "`changes` must be a list"),
            (br#"{}"#, "`changes` is missing"),
            (br#"{"changes":[{"op":"move","path":"/a"}]}"#, "unknown `op`"),
            (br#"{"changes":[{"op":"set","path":"a"}]}"#, "changes[0]: `path`"),
            (br#"{"changes":[{"op":"set","path":"/a"}]}"#, "needs a `value`"),
            (br#"{"changes":[],"_sync_meta":{"vector_clock":{"t":-1}}}"#, "non-negative"),
            (br#"{"changes":[],"_sync_meta":{"vector_clock":{"t":1.5}}}"#, "non-negative"),
            (br#"{"changes":[],"_sync_meta":{"replica_id":""}}"#, "replica_id"),
            (br#"{"changes":[],"_sync_meta":{"replica_id":"tab\u0000A"}}"#, "control characters"),
            (br#"{"changes":[],"_sync_meta":{"replica_id":"tab\nA"}}"#, "control characters"),
            (br#"{"changes":[{"op":"remove","path":"/a"},{"op":"remove","path":"/b"},{"op":"remove","path":"/c"},{"op":"remove","path":"/d"}]}"#, "at most 3"),
        ] {
            let err = parse_batch(body, &ctx()).unwrap_err();
            assert!(err.contains(needle), "{}: {err}", String::from_utf8_lossy(body));
        }
        let long = format!(
            r#"{{"changes":[],"_sync_meta":{{"replica_id":"{}"}}}}"#,
            "r".repeat(129)
        );
        assert!(parse_batch(long.as_bytes(), &ctx()).is_err());
    }
}
