//! Catching up (design §3 "Catching up, waiting, conflicts kept"):
//!
//! * `GET …/changes?since=<clock>&wait=<seconds>`: the changes from the document of the
//!   batches `since` covers to the session's (`SessionState::changes_since_indexed`, with the
//!   document and delta index of the shared snapshot: the thousand waiters a merge wakes each
//!   visit only the registers new to them); when there are none and `wait` > 0, held until a
//!   merge (through any instance or host) brings some or the wait ends. 409 with the session
//!   clock when `since` names unseen events.
//! * `GET …/conflicts?after=<n>&limit=<m>`: the session's conflict journal, oldest first.

use crate::app::SyncApp;
use crate::caller::Caller;
use crate::problems::store_problem;
use crate::session;
use crate::shared_reads::{Freshness, Reach, Snapshot};
use crate::HttpResponse;
use bytes::Bytes;
use firemode_merge::{Change, SessionState, SinceAhead, SinceRefused, VectorClock};
use firemode_store::CatchUpRead;
use firemode_wire::Problem;
use firemode_worker::json_response;
use http::request::Parts;
use http::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// The longest `wait` a client may ask for, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// The most journal entries one `GET …/conflicts` returns.
pub const MAX_CONFLICTS_PAGE: i64 = 1000;
/// Journal entries per page when the client names no `limit`.
pub const DEFAULT_CONFLICTS_PAGE: i64 = 100;

/// A query string that does not say what the endpoint needs (400, naming the parameter).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("`since` must be a vector clock as JSON, percent-encoded: an object of replica id → count (got {0})")]
    Since(String),
    #[error("`wait` must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}")]
    Wait,
    #[error("`after` must be a whole number from 0 (the `next` of the previous page)")]
    After,
    #[error("`limit` must be a whole number from 1 to {MAX_CONFLICTS_PAGE}")]
    Limit,
    #[error("`{0}` is given twice")]
    Repeated(String),
    #[error("`{0}` is not UTF-8 once percent-decoded")]
    NotUtf8(String),
}

impl From<QueryError> for Problem {
    fn from(e: QueryError) -> Problem {
        Problem::bad_request(e.to_string())
    }
}

/// The query of `GET …/changes`.
#[derive(Debug, Default, PartialEq)]
pub struct ChangesQuery {
    pub since: VectorClock,
    pub wait: Duration,
}

/// The query of `GET …/conflicts`.
#[derive(Debug, PartialEq)]
pub struct ConflictsQuery {
    pub after: i64,
    pub limit: i64,
}

/// Each named parameter once; unknown ones are ignored. Values are form-decoded (`+` is a
/// space, `%XX` a byte) and must then be UTF-8: a lossy decoding would read `%FF` as U+FFFD,
/// the name of another replica (attack round 7).
fn parameters(query: Option<&str>, names: &[&str]) -> Result<Vec<Option<String>>, QueryError> {
    let decode = |text: &str| -> Option<String> {
        let spaced = text.replace('+', " ");
        let decoded = percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .ok()?;
        Some(decoded.into_owned())
    };
    let mut found: Vec<Option<String>> = vec![None; names.len()];
    let pairs = query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty());
    for pair in pairs {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(name) = decode(name) else { continue };
        if let Some(slot) = names.iter().position(|known| *known == name) {
            if found[slot].is_some() {
                return Err(QueryError::Repeated(name));
            }
            found[slot] = Some(decode(value).ok_or(QueryError::NotUtf8(name))?);
        }
    }
    Ok(found)
}

/// A whole number as a query writes it: decimal digits only, no sign, no leading zero
/// (`Rust`'s `parse` would also take `+5`).
fn whole_number(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let canonical = text == "0" || !text.starts_with('0');
    if digits && canonical {
        text.parse().ok()
    } else {
        None
    }
}

/// A clock entry: a whole number within u64, said so whatever else is sent (serde's own words
/// for `18446744073709551616` were "invalid type: floating point").
struct Count(u64);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        struct Whole;
        impl serde::de::Visitor<'_> for Whole {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a count: a non-negative integer within u64 (at most 18446744073709551615)",
                )
            }
            fn visit_u64<E: serde::de::Error>(self, count: u64) -> Result<u64, E> {
                Ok(count)
            }
        }
        deserializer.deserialize_u64(Whole).map(Count)
    }
}

/// A vector clock from JSON, refusing a replica named twice (`{"A":5,"A":1}`: a map would
/// keep the last and answer as if the client had said only that).
fn parse_clock(text: &str) -> Result<VectorClock, String> {
    struct Strict;
    impl<'de> serde::de::Visitor<'de> for Strict {
        type Value = VectorClock;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of replica id → count")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<VectorClock, A::Error> {
            let mut clock = VectorClock::new();
            while let Some((replica, Count(count))) = map.next_entry::<String, Count>()? {
                if clock.contains_key(&replica) {
                    return Err(serde::de::Error::custom(format!(
                        "replica {replica:?} is named twice"
                    )));
                }
                clock.insert(replica, count);
            }
            Ok(clock)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let clock = serde::Deserializer::deserialize_map(&mut deserializer, Strict)
        .and_then(|clock| deserializer.end().map(|()| clock))
        .map_err(|e| e.to_string())?;
    Ok(clock)
}

impl ChangesQuery {
    pub fn parse(query: Option<&str>) -> Result<ChangesQuery, QueryError> {
        let mut values = parameters(query, &["since", "wait"])?.into_iter();
        let (since, wait) = (values.next().flatten(), values.next().flatten());
        let since = match since.as_deref().map(str::trim) {
            None | Some("") => VectorClock::new(),
            Some(text) => parse_clock(text).map_err(QueryError::Since)?,
        };
        let wait = match wait {
            None => 0,
            Some(text) => whole_number(&text)
                .filter(|seconds| *seconds <= MAX_WAIT_SECONDS)
                .ok_or(QueryError::Wait)?,
        };
        Ok(ChangesQuery {
            since,
            wait: Duration::from_secs(wait),
        })
    }
}

impl ConflictsQuery {
    pub fn parse(query: Option<&str>) -> Result<ConflictsQuery, QueryError> {
        let mut values = parameters(query, &["after", "limit"])?.into_iter();
        let (after, limit) = (values.next().flatten(), values.next().flatten());
        let after = match after {
            None => 0,
            Some(text) => whole_number(&text)
                .and_then(|n| i64::try_from(n).ok())
                .ok_or(QueryError::After)?,
        };
        let limit = match limit {
            None => DEFAULT_CONFLICTS_PAGE,
            Some(text) => whole_number(&text)
                .and_then(|n| i64::try_from(n).ok())
                .filter(|n| (1..=MAX_CONFLICTS_PAGE).contains(n))
                .ok_or(QueryError::Limit)?,
        };
        Ok(ConflictsQuery { after, limit })
    }
}

/// `GET …/changes`.
pub async fn changes(
    app: &SyncApp,
    req: &Parts,
    caller: &Caller,
    session_id: &str,
) -> Result<HttpResponse, Problem> {
    let query = ChangesQuery::parse(req.uri.query())?;
    let deadline = tokio::time::Instant::now() + query.wait;
    let head = look_at_head(app, caller, session_id, &query.since).await?;
    // A read at least as new as the head: it holds the caller's own merges, and a crowd of
    // tablets arriving together shares one.
    let mut freshness = Freshness::Beyond(head.version - 1);
    if let (Some(clock), false) = (&head.up_to_date, query.wait.is_zero()) {
        // A tablet that is up to date and waits for news: the head said so, so it waits
        // without reading the whole session.
        if !wait(app, caller, session_id, head.version, deadline).await? {
            return Ok(changes_answer(session_id, clock, &[]));
        }
        freshness = Freshness::Beyond(head.version);
    }
    loop {
        let (clock, changes, version) =
            read_changes(app, caller, session_id, &query.since, freshness).await?;
        let now = tokio::time::Instant::now();
        if !changes.is_empty() || now >= deadline {
            return Ok(changes_answer(session_id, &clock, &changes));
        }
        // `version` comes from the same read that found nothing new: a merge after it wakes us.
        if !wait(app, caller, session_id, version, deadline).await? {
            // The wait ended with nothing new: answer the (empty) changes at this clock.
            return Ok(changes_answer(session_id, &clock, &changes));
        }
        // Woken by a merge: the waiters of this session share one read beyond `version`.
        freshness = Freshness::Beyond(version);
    }
}

/// The changes for a client at `since`, with the session clock and version they lead to.
///
/// Read from the registers around those new to `since` (found by their dots; the requests at
/// the same `since` and as fresh share the read), so a tablet one change behind costs what it
/// has not seen. The whole session is read (shared as [`session::load`] shares it) when more
/// than [`firemode_store::MAX_NEW_REGISTERS`] are new, or when the answer needs more than
/// that part of the session (`SessionState::changes_from_part`).
async fn read_changes(
    app: &SyncApp,
    caller: &Caller,
    session_id: &str,
    since: &VectorClock,
    freshness: Freshness,
) -> Result<(VectorClock, Vec<Change>, i64), Problem> {
    let key = (caller.tenant.clone(), session_id.to_owned(), since.clone());
    let part = app
        .catch_up_reads
        .read_keyed(key, freshness, || async {
            let read = app
                .store
                .catch_up(&caller.tenant, session_id, since)
                .await
                .map_err(store_problem)?;
            match read {
                CatchUpRead::NoSession => Ok(Snapshot::new(SessionState::default(), 0)),
                CatchUpRead::Part(stored) => {
                    let version = stored.version;
                    let state = session::decode_owned(session_id, Some(stored.rows))?;
                    Ok(Snapshot::around_new(state, version))
                }
                CatchUpRead::Whole => Ok(Snapshot::declined()),
            }
        })
        .await?;
    let freshness = match part.reach {
        Reach::Whole => return answer_from_whole(&part, since),
        Reach::AroundNew => {
            if let Some(changes) = part.state.changes_from_part(since).map_err(since_refused)? {
                return Ok((part.state.clock().clone(), changes, part.version));
            }
            // As fresh as the part read: the whole one must hold what it held.
            Freshness::Beyond(part.version - 1)
        }
        Reach::Declined => freshness,
    };
    let whole = session::load(app, caller, session_id, freshness).await?;
    answer_from_whole(&whole, since)
}

/// [`read_changes`] from a snapshot of the whole session.
fn answer_from_whole(
    snapshot: &Snapshot,
    since: &VectorClock,
) -> Result<(VectorClock, Vec<Change>, i64), Problem> {
    let changes = snapshot
        .state
        .changes_since_indexed(since, snapshot.document(), snapshot.delta_index())
        .map_err(since_refused)?;
    Ok((snapshot.state.clock().clone(), changes, snapshot.version))
}

/// What the session's head row says of a `since` (one primary-key read, no register).
struct HeadLook {
    /// The session's version (0 for a session never written).
    version: i64,
    /// The session clock, when `since` names exactly its events (entries of 0 name none):
    /// nothing is new for the client.
    up_to_date: Option<VectorClock>,
}

async fn look_at_head(
    app: &SyncApp,
    caller: &Caller,
    session_id: &str,
    since: &VectorClock,
) -> Result<HeadLook, Problem> {
    let head = app
        .store
        .session_head(&caller.tenant, session_id)
        .await
        .map_err(store_problem)?;
    let (clock, version) = match head {
        // A head that does not parse: the whole read says so, with its 500.
        Some((head, version)) => (firemode_merge::rows::clock_of_head(&head).ok(), version),
        None => (Some(VectorClock::new()), 0),
    };
    let up_to_date = clock.filter(|clock| same_events(clock, since));
    Ok(HeadLook {
        version,
        up_to_date,
    })
}

/// Whether two clocks name the same events (an entry of 0 names none).
fn same_events(a: &VectorClock, b: &VectorClock) -> bool {
    fn events(clock: &VectorClock) -> impl Iterator<Item = (&String, &u64)> {
        clock.iter().filter(|(_, &count)| count > 0)
    }
    events(a).eq(events(b))
}

/// Holds the request until the session's version passes `version` (`true`) or the wait
/// ends or the worker leaves rotation (`false`: a worker leaving rotation answers at once
/// with nothing new, and the client's next poll goes to an instance that stays).
async fn wait(
    app: &SyncApp,
    caller: &Caller,
    session_id: &str,
    version: i64,
    deadline: tokio::time::Instant,
) -> Result<bool, Problem> {
    let _waiting = Waiting::start();
    tokio::select! {
        changed = app.store.wait_for_change(&caller.tenant, session_id, version, deadline) => {
            changed.map_err(store_problem)
        }
        () = app.readiness.waiters_released() => Ok(false),
    }
}

/// The 200 of `GET …/changes`: the session clock and the changes up to it.
///
/// Serialized straight from the changes, keys in the order `json!` would sort them: building
/// a `Value` first cost a `Map` (a B-tree node, ~600 bytes) and a copy of the value per change,
/// ~3 KiB a changed path on top of a ~50-byte answer line.
fn changes_answer(
    session_id: &str,
    clock: &VectorClock,
    changes: &[firemode_merge::Change],
) -> HttpResponse {
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        changes: &'a [firemode_merge::Change],
        session_id: &'a str,
        vector_clock: &'a VectorClock,
    }
    let answer = Answer {
        changes,
        session_id,
        vector_clock: clock,
    };
    // Writing JSON with string keys into memory cannot fail.
    let body = serde_json::to_vec(&answer).unwrap_or_default();
    json_response(StatusCode::OK, Bytes::from(body))
}

/// Counts a long-poll in `sync_long_polls_waiting` while it waits.
struct Waiting;

impl Waiting {
    fn start() -> Waiting {
        metrics::gauge!("sync_long_polls_waiting").increment(1.0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("sync_long_polls_waiting").decrement(1.0);
    }
}

/// 409 with the session clock when `since` names events this session has not seen; 410
/// `must-refetch` when it predates the compaction horizon.
fn since_refused(e: SinceRefused) -> Problem {
    match e {
        SinceRefused::Ahead(e) => since_ahead(e),
        SinceRefused::MustRefetch(e) => crate::problems::must_refetch(&e),
    }
}

fn since_ahead(e: SinceAhead) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "since-ahead",
        "Clock ahead of the session",
        e.to_string(),
    )
    .with("vector_clock", json!(e.session_clock))
}

/// `GET …/conflicts`.
pub async fn conflicts(
    app: &SyncApp,
    req: &Parts,
    caller: &Caller,
    session_id: &str,
) -> Result<HttpResponse, Problem> {
    let query = ConflictsQuery::parse(req.uri.query())?;
    let rows = app
        .store
        .conflicts(&caller.tenant, session_id, query.after, query.limit)
        .await
        .map_err(store_problem)?;
    let next = rows.last().map_or(query.after, |row| row.seq);
    let conflicts: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let mut entry: Value = serde_json::from_str(&row.entry).unwrap_or_else(|e| {
                tracing::error!(session_id, seq = row.seq, error = %e, "a kept conflict does not parse");
                json!({})
            });
            entry["seq"] = json!(row.seq);
            entry
        })
        .collect();
    let body = json!({"session_id": session_id, "conflicts": conflicts, "next": next});
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_queries() {
        assert_eq!(
            ChangesQuery::parse(None).ok(),
            Some(ChangesQuery::default())
        );
        let q = ChangesQuery::parse(Some("since=%7B%22t1%22%3A3%7D&wait=25")).expect("valid");
        assert_eq!(q.since.get("t1"), Some(&3));
        assert_eq!(q.wait, Duration::from_secs(25));
        assert!(ChangesQuery::parse(Some("since=%7B%7D")).is_ok());
        // U+FFFD itself, encoded, is a replica id like any other; `+` is a space.
        let q = ChangesQuery::parse(Some("since=%7B%22%EF%BF%BD+x%22%3A1%7D")).expect("valid");
        assert_eq!(q.since.get("\u{fffd} x"), Some(&1));
        assert_eq!(
            ChangesQuery::parse(Some("wait=0")).map(|q| q.wait).ok(),
            Some(Duration::ZERO)
        );
        for bad in [
            "since=nope",
            "since=%7B%22t1%22%3A-1%7D",
            "since=%7B%22t1%22%3A1.5%7D",
            "since=%5B%5D",
            "wait=61",
            "wait=-1",
            "wait=1.5",
            "wait=1&wait=2",
            "wait=+1",
            "wait=01",
            "wait=",
            // A replica named twice: a map would keep one of the two.
            "since=%7B%22A%22%3A5%2C%22A%22%3A1%7D",
            "since=%7B%7D%7B%7D",
            // Not UTF-8 once decoded: `%FF` is no character (a lossy decoding read U+FFFD).
            "since=%7B%22%FF%22%3A1%7D",
        ] {
            assert!(ChangesQuery::parse(Some(bad)).is_err(), "{bad}");
        }
        // Past u64, a count is still a count, not "a floating point" (attack round 8).
        let past = ChangesQuery::parse(Some("since=%7B%22r%22%3A18446744073709551616%7D"));
        let message = past.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("non-negative integer within u64"),
            "{message}"
        );
    }

    #[test]
    fn conflicts_queries() {
        assert_eq!(
            ConflictsQuery::parse(None).ok(),
            Some(ConflictsQuery {
                after: 0,
                limit: DEFAULT_CONFLICTS_PAGE
            })
        );
        assert_eq!(
            ConflictsQuery::parse(Some("after=7&limit=2")).ok(),
            Some(ConflictsQuery { after: 7, limit: 2 })
        );
        for bad in [
            "after=-1",
            "limit=0",
            "limit=1001",
            "after=x",
            "limit=1&limit=2",
            "after=+1",
            "limit=+5",
            "after=01",
            "after=9223372036854775808",
        ] {
            assert!(ConflictsQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_entries_name_no_events() {
        let clock = |entries: &[(&str, u64)]| -> VectorClock {
            entries.iter().map(|(r, c)| ((*r).to_owned(), *c)).collect()
        };
        assert!(same_events(
            &clock(&[("a", 2)]),
            &clock(&[("a", 2), ("z", 0)])
        ));
        assert!(same_events(&clock(&[]), &clock(&[("z", 0)])));
        assert!(!same_events(&clock(&[("a", 2)]), &clock(&[("a", 1)])));
        assert!(!same_events(
            &clock(&[("a", 2)]),
            &clock(&[("a", 2), ("b", 1)])
        ));
    }
}
