//! Upgrading a database written by a release that kept each session as one JSON value
//! (`fixtures/schema-v4.sql`, and states written by that release's merge in
//! `fixtures/legacy-sessions.json`): `migrate` moves every session to rows in the migration's
//! transaction, each reads back with the same document, clock, horizon and catch-up, later
//! batches merge as that release merged them, and a value that does not load is left alone
//! (its session answers "unreadable" as before) without stopping the others.

#[path = "support/pg.rs"]
mod pg;
#[path = "support/options.rs"]
mod store_options;
use store_options::options;

use firemode_merge::{Batch, Change, Outcome, SessionRows, SessionState, VectorClock};
use firemode_store::{CatchUpRead, IdempotencyKey, MergeOutcome, MergeStep, Store};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SCHEMA_V4: &str = include_str!("fixtures/schema-v4.sql");
const SCHEMA_V5: &str = include_str!("fixtures/schema-v5.sql");
const LEGACY: &str = include_str!("fixtures/legacy-sessions.json");
const TENANT: &str = "org:upgrade";
/// A value the old release could not have written: left as it is.
const CORRUPT: &str = r#"{"clock":{"a":1},"stamps":{"a":[]},"registers":[]}"#;

pub fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}_{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn cases() -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(LEGACY).expect("fixture")
}

/// A key of `len` characters that does not compress (a PostgreSQL index entry takes at most
/// 2,704 bytes, after compression).
fn incompressible_key(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize])
        })
        .collect()
}

/// A session with keys far longer than a btree entry, as the older release kept it (its
/// one-value layout is what `SessionState` still serializes to), and its document.
fn long_keys_session() -> (String, Value) {
    let long = incompressible_key(3000, 7);
    let deep: Vec<String> = (0..64).map(|i| incompressible_key(200, i + 11)).collect();
    let deep_path = format!("/{}", deep.join("/"));
    let mut state = SessionState::default();
    let batch = Batch {
        replica_id: "t1".into(),
        replica_named: true,
        clock: VectorClock::new(),
        timestamp_ms: 1_000,
        changes: vec![
            Change::Set {
                path: firemode_merge::Pointer::parse(&format!("/{long}")).expect("pointer"),
                value: json!("long"),
            },
            Change::Set {
                path: firemode_merge::Pointer::parse(&deep_path).expect("pointer"),
                value: json!("deep"),
            },
        ],
    };
    state.apply(&batch).expect("applies");
    let document = state.document();
    (serde_json::to_string(&state).expect("serializes"), document)
}

/// The old rows: every fixture session (version 3), one with very long keys, and the
/// corrupt one.
fn old_rows() -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = cases()
        .iter()
        .map(|case| {
            (
                case["name"].as_str().expect("name").to_owned(),
                case["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect();
    rows.push(("long-keys".to_owned(), long_keys_session().0));
    rows.push(("corrupt".to_owned(), CORRUPT.to_owned()));
    rows
}

fn write_old_sqlite(dir: &Path) {
    std::fs::create_dir_all(dir).expect("dir");
    let conn = rusqlite::Connection::open(dir.join("firemode.sqlite3")).expect("open");
    conn.execute_batch(SCHEMA_V4).expect("old schema");
    for (session_id, state) in old_rows() {
        conn.execute(
            "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
             VALUES (?1, ?2, ?3, 3, 0)",
            rusqlite::params![TENANT, session_id, state],
        )
        .expect("old row");
    }
}

async fn write_old_postgres(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client.batch_execute(SCHEMA_V4).await.expect("old schema");
    for (session_id, state) in old_rows() {
        client
            .execute(
                "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
                 VALUES ($1, $2, $3, 3, 0)",
                &[&TENANT, &session_id, &state],
            )
            .await
            .expect("old row");
    }
}

fn batch_of(value: &Value) -> Batch {
    Batch {
        replica_id: value["replica_id"].as_str().expect("replica").to_owned(),
        replica_named: value["replica_named"].as_bool().expect("named"),
        clock: serde_json::from_value(value["clock"].clone()).expect("clock"),
        timestamp_ms: value["timestamp_ms"].as_u64().expect("timestamp"),
        changes: serde_json::from_value::<Vec<Change>>(value["changes"].clone()).expect("changes"),
    }
}

/// What the old release's merge answered, in the fixture's shape.
fn answer_of(result: Result<Outcome, firemode_merge::NotApplied>) -> Value {
    match result {
        Err(e) => json!({"refused": e.to_string()}),
        Ok(Outcome::Duplicate) => json!("duplicate"),
        Ok(Outcome::Applied(a)) => json!({
            "applied": a.applied, "conflicts_total": a.conflicts_total,
            "dot": [a.dot.0, a.dot.1], "effective_timestamp": a.effective_timestamp}),
    }
}

/// Merges `batch` through the store as the sync worker does; returns the merge's answer.
async fn merge(store: &Store, session_id: &str, batch: Batch) -> Value {
    let key = unique();
    let idem = IdempotencyKey {
        subject: "tester".into(),
        key: key.clone(),
        request_hash: key,
        legacy_request_hash: None,
    };
    let reads = batch.reads();
    let outcome = store
        .merge_session(
            TENANT,
            session_id,
            idem,
            Duration::from_secs(3600),
            reads,
            Box::new(move |rows: Option<SessionRows>| {
                let mut state = match rows {
                    Some(rows) => SessionState::from_rows(&rows).expect("rows load"),
                    None => SessionState::default(),
                };
                let before = state.clone();
                let result = state.apply(&batch);
                let applied = matches!(result, Ok(Outcome::Applied(_)));
                MergeStep {
                    changes: applied.then(|| state.changed_rows(&before)),
                    status: 200,
                    body: answer_of(result).to_string(),
                    remember: false,
                    journal: Vec::new(),
                    compact: false,
                }
            }),
        )
        .await
        .expect("merge");
    match outcome {
        MergeOutcome::Ran(step) => serde_json::from_str(&step.body).expect("answer"),
        other => panic!("{other:?}"),
    }
}

async fn whole(store: &Store, session_id: &str) -> Result<SessionState, String> {
    let stored = store
        .session(TENANT, session_id)
        .await
        .expect("read")
        .expect("the session exists");
    SessionState::from_rows(&stored.rows).map_err(|e| e.to_string())
}

/// Every clock a client of `state` could hold that this test asks with: nothing, the session
/// clock, and the session clock one event short for each replica.
fn client_clocks(state: &SessionState) -> Vec<VectorClock> {
    let mut clocks = vec![VectorClock::new(), state.clock().clone()];
    for (replica, &count) in state.clock() {
        let mut short = state.clock().clone();
        short.insert(replica.clone(), count - 1);
        clocks.push(short);
    }
    clocks
}

/// A catch-up read from the rows found by their dots answers as the whole session does (or
/// declines); returns how many it answered.
async fn check_catch_up(store: &Store, name: &str, state: &SessionState) -> usize {
    let mut answered = 0;
    for since in client_clocks(state) {
        let expected = state.changes_since(&since);
        match store.catch_up(TENANT, name, &since).await.expect("reads") {
            CatchUpRead::Part(stored) => {
                let part = SessionState::from_rows(&stored.rows).expect("the part loads");
                match part.changes_from_part(&since) {
                    Ok(None) => {}
                    Ok(Some(changes)) => {
                        assert_eq!(Ok(changes), expected, "{name} since {since:?}");
                        answered += 1;
                    }
                    Err(refused) => assert_eq!(Err(refused), expected, "{name} since {since:?}"),
                }
            }
            other => panic!("{name} since {since:?}: {other:?}"),
        }
    }
    answered
}

async fn check_upgraded(store: &Store) {
    store.migrate().await.expect("migrates");
    // A second start finds nothing to do.
    store.migrate().await.expect("migrates again");
    let mut answered = 0;
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        let state = whole(store, name).await.expect("an upgraded session loads");
        answered += check_catch_up(store, name, &state).await;
        assert_eq!(state.document(), case["document"], "{name}: document");
        let clock: VectorClock =
            serde_json::from_value(case["vector_clock"].clone()).expect("clock");
        assert_eq!(state.clock(), &clock, "{name}: clock");
        let horizon: VectorClock =
            serde_json::from_value(case["horizon"].clone()).expect("horizon");
        assert_eq!(state.horizon(), &horizon, "{name}: horizon");
        let changes =
            serde_json::to_value(state.changes_since(&VectorClock::new()).ok()).expect("json");
        assert_eq!(changes, case["changes_from_nothing"], "{name}: catch-up");
        let next = case["next"].as_array().expect("next");
        for (batch, expected) in next
            .iter()
            .zip(case["next_answers"].as_array().expect("answers"))
        {
            let answer = merge(store, name, batch_of(batch)).await;
            assert_eq!(&answer, expected, "{name}: a later batch");
        }
        let after = whole(store, name).await.expect("loads after merges");
        assert_eq!(
            after.document(),
            case["next_document"],
            "{name}: document after"
        );
        let clock: VectorClock =
            serde_json::from_value(case["next_vector_clock"].clone()).expect("clock");
        assert_eq!(after.clock(), &clock, "{name}: clock after");
        answered += check_catch_up(store, name, &after).await;
    }
    assert!(
        answered >= 10,
        "only {answered} catch-ups answered from rows"
    );
    // Keys longer than an index entry: moved, read back, and merged into again.
    let (_, document) = long_keys_session();
    let long = whole(store, "long-keys").await.expect("loads");
    assert_eq!(long.document(), document);
    let again = Batch {
        replica_id: "t2".into(),
        replica_named: true,
        clock: long.clock().clone(),
        timestamp_ms: 2_000,
        changes: vec![Change::Remove {
            path: firemode_merge::Pointer::parse(&format!("/{}", incompressible_key(3000, 7)))
                .expect("pointer"),
        }],
    };
    assert_eq!(merge(store, "long-keys", again).await["applied"], 1);
    let after = whole(store, "long-keys").await.expect("loads");
    assert_eq!(after.document().as_object().map(|o| o.len()), Some(1));
    let corrupt = whole(store, "corrupt").await.expect_err("left unreadable");
    assert!(corrupt.contains("head"), "{corrupt}");
}

/// The compacted session's stamp rows after the upgrade and its later batch: its horizon is
/// {t1: 2}, so (t1, 1) is gone (no batch may be behind the horizon), the rest is kept.
fn compacted_stamps() -> Vec<(Vec<u8>, i64)> {
    vec![
        (b"t1".to_vec(), 2),
        (b"t1".to_vec(), 3),
        (b"t2".to_vec(), 1),
        (b"t2".to_vec(), 2),
    ]
}

#[tokio::test]
async fn a_sqlite_database_of_the_one_value_layout_moves_to_rows() {
    let dir: PathBuf = std::env::temp_dir().join(format!("fm-upgrade-{}", unique()));
    write_old_sqlite(&dir);
    let store = Store::open(&options("", &dir)).expect("open");
    check_upgraded(&store).await;
    let conn = rusqlite::Connection::open(dir.join("firemode.sqlite3")).expect("open");
    let kept: Vec<(Vec<u8>, i64)> = conn
        .prepare(
            "SELECT replica_id, seq FROM sync_stamps WHERE session_id = 'compacted' ORDER BY 1, 2",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("stamps");
    assert_eq!(kept, compacted_stamps());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_postgres_database_of_the_one_value_layout_moves_to_rows() {
    let Some(db) = pg::pg_database().await else {
        return;
    };
    write_old_postgres(&db.url).await;
    let dir: PathBuf = std::env::temp_dir().join(format!("fm-upgrade-{}", unique()));
    let store = Store::open(&options(&db.url, &dir)).expect("open");
    check_upgraded(&store).await;
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let kept: Vec<(Vec<u8>, i64)> = client
        .query(
            "SELECT replica_id, seq FROM sync_stamps WHERE session_id = 'compacted' ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("stamps")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kept, compacted_stamps());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A head as the release before the dots wrote it: without the `dots` mark.
fn unmarked(head: &str) -> String {
    let mut head: Value = serde_json::from_str(head).expect("a head");
    head.as_object_mut().expect("an object").remove("dots");
    head.to_string()
}

/// Whether a stored head carries the mark a release with the dots writes.
fn marked(head: &str) -> bool {
    serde_json::from_str::<Value>(head).expect("a head")["dots"] == json!(true)
}

/// A session of schema 5 with one register row that does not parse: the migration gives it
/// a placeholder dot, new to no clock.
const BAD_REGISTER: &str = "bad-register";

/// The fixture sessions as releases with the row layout but no register dots (schema 5)
/// wrote them: head (unmarked), base and stamp rows, and register rows without dots.
fn v5_rows() -> Vec<(String, firemode_merge::RowChanges)> {
    let mut rows: Vec<(String, firemode_merge::RowChanges)> = cases()
        .iter()
        .map(|case| {
            let state: SessionState =
                serde_json::from_str(case["state"].as_str().expect("state")).expect("loads");
            (
                case["name"].as_str().expect("name").to_owned(),
                state.all_rows(),
            )
        })
        .chain(std::iter::once((
            "long-keys".to_owned(),
            serde_json::from_str::<SessionState>(&long_keys_session().0)
                .expect("loads")
                .all_rows(),
        )))
        .collect();
    for (_, session) in &mut rows {
        session.head = unmarked(&session.head);
    }
    rows
}

/// [`v5_rows`] and the session with a register that does not parse.
fn v5_rows_written() -> Vec<(String, firemode_merge::RowChanges)> {
    let mut rows = v5_rows();
    let mut bad = rows[0].1.clone();
    bad.upserts.truncate(1);
    bad.upserts[0].register = "not a register".to_owned();
    rows.push((BAD_REGISTER.to_owned(), bad));
    rows
}

fn write_v5_sqlite(dir: &Path) {
    std::fs::create_dir_all(dir).expect("dir");
    let conn = rusqlite::Connection::open(dir.join("firemode.sqlite3")).expect("open");
    conn.execute_batch(SCHEMA_V4).expect("schema 4");
    conn.execute_batch(SCHEMA_V5).expect("schema 5");
    for (session_id, rows) in v5_rows_written() {
        conn.execute(
            "INSERT INTO sync_sessions (tenant, session_id, state, base, version, updated_at)
             VALUES (?1, ?2, ?3, ?4, 3, 0)",
            rusqlite::params![TENANT, session_id, rows.head, rows.base],
        )
        .expect("session row");
        for row in &rows.upserts {
            conn.execute(
                "INSERT INTO sync_registers (tenant, session_id, path_key, register)
                 VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![TENANT, session_id, row.key, row.register],
            )
            .expect("register row");
        }
        for stamp in &rows.stamps {
            conn.execute(
                "INSERT INTO sync_stamps (tenant, session_id, replica_id, seq, stamp)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    TENANT,
                    session_id,
                    stamp.replica_id.as_bytes(),
                    stamp.sequence as i64,
                    stamp.stamp as i64
                ],
            )
            .expect("stamp row");
        }
    }
}

async fn write_v5_postgres(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client.batch_execute(SCHEMA_V4).await.expect("schema 4");
    client.batch_execute(SCHEMA_V5).await.expect("schema 5");
    for (session_id, rows) in v5_rows_written() {
        client
            .execute(
                "INSERT INTO sync_sessions (tenant, session_id, state, base, version, updated_at)
                 VALUES ($1, $2, $3, $4, 3, 0)",
                &[&TENANT, &session_id, &rows.head, &rows.base],
            )
            .await
            .expect("session row");
        for row in &rows.upserts {
            client
                .execute(
                    "INSERT INTO sync_registers (tenant, session_id, path_key, register)
                     VALUES ($1, $2, $3, $4)",
                    &[&TENANT, &session_id, &row.key, &row.register],
                )
                .await
                .expect("register row");
        }
        for stamp in &rows.stamps {
            client
                .execute(
                    "INSERT INTO sync_stamps (tenant, session_id, replica_id, seq, stamp)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &TENANT,
                        &session_id,
                        &stamp.replica_id.as_bytes(),
                        &(stamp.sequence as i64),
                        &(stamp.stamp as i64),
                    ],
                )
                .await
                .expect("stamp row");
        }
    }
}

/// After the upgrade from schema 5, every register has its dots: catch-ups read by them
/// answer as the whole session does, before and after later merges.
async fn check_dots_filled(store: &Store) {
    store.migrate().await.expect("migrates");
    let mut answered = 0;
    for (name, _) in v5_rows() {
        let state = whole(store, &name).await.expect("loads");
        answered += check_catch_up(store, &name, &state).await;
    }
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        for batch in case["next"].as_array().expect("next") {
            merge(store, name, batch_of(batch)).await;
        }
        let after = whole(store, name).await.expect("loads after merges");
        answered += check_catch_up(store, name, &after).await;
    }
    assert!(
        answered >= 10,
        "only {answered} catch-ups answered from rows"
    );
}

/// A register row as the release before the dots writes it (its statements, verbatim), on
/// a new path and over an existing row.
const OLD_INSERT_SQLITE: &str =
    "INSERT INTO sync_registers (tenant, session_id, path_key, register)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (tenant, session_id, path_key) DO UPDATE SET register = excluded.register";
const OLD_INSERT_POSTGRES: &str =
    "INSERT INTO sync_registers (tenant, session_id, path_key, register)
     SELECT $1, $2, k, r FROM unnest($3::bytea[], $4::text[]) AS u(k, r)
     ON CONFLICT (tenant, session_id, path_key) DO UPDATE SET register = EXCLUDED.register";

/// A session (of the fixtures) the test unmarks: a catch-up by dots read it in part before.
fn unmarked_case() -> String {
    cases()[0]["name"].as_str().expect("name").to_owned()
}

/// A catch-up from nothing reads `name` by its dots (in part): the head is marked.
async fn check_reads_in_part(store: &Store, name: &str) {
    let since = VectorClock::new();
    let read = store.catch_up(TENANT, name, &since).await.expect("reads");
    assert!(matches!(read, CatchUpRead::Part(_)), "{read:?}");
}

#[tokio::test]
async fn a_sqlite_database_of_registers_without_dots_gets_them() {
    let dir: PathBuf = std::env::temp_dir().join(format!("fm-upgrade-{}", unique()));
    write_v5_sqlite(&dir);
    let store = Store::open(&options("", &dir)).expect("open");
    check_dots_filled(&store).await;
    let conn = rusqlite::Connection::open(dir.join("firemode.sqlite3")).expect("open");
    let heads: Vec<String> = conn
        .prepare("SELECT state FROM sync_sessions")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("heads");
    assert_eq!(heads.len(), v5_rows_written().len());
    assert!(heads.iter().all(|head| marked(head)), "{heads:?}");
    let placeholder: (Vec<u8>, i64) = conn
        .query_row(
            "SELECT replica_id, seq FROM sync_registers WHERE session_id = ?1",
            [BAD_REGISTER],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("the bad row");
    assert_eq!(placeholder, (Vec::new(), -1));
    let indexes: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master
             WHERE type = 'index' AND name IN ('sync_registers_dot', 'sync_registers_made')",
            [],
            |r| r.get(0),
        )
        .expect("indexes");
    assert_eq!(indexes, 2);
    let name = unmarked_case();
    let existing: Vec<u8> = conn
        .query_row(
            "SELECT path_key FROM sync_registers WHERE session_id = ?1 LIMIT 1",
            [&name],
            |r| r.get(0),
        )
        .expect("a row");
    for (session_id, key) in [("old-writer", b"new".to_vec()), (name.as_str(), existing)] {
        let refused = conn
            .execute(
                OLD_INSERT_SQLITE,
                rusqlite::params![TENANT, session_id, key, "{}"],
            )
            .expect_err("an old release's register row is refused");
        assert!(
            refused
                .to_string()
                .contains("older than the database schema"),
            "{refused}"
        );
    }
    check_reads_in_part(&store, &name).await;
    let head: String = conn
        .query_row(
            "SELECT state FROM sync_sessions WHERE session_id = ?1",
            [&name],
            |r| r.get(0),
        )
        .expect("head");
    conn.execute(
        "UPDATE sync_sessions SET state = ?1 WHERE session_id = ?2",
        rusqlite::params![unmarked(&head), name],
    )
    .expect("unmark");
    let read = store
        .catch_up(TENANT, &name, &VectorClock::new())
        .await
        .expect("reads");
    assert!(matches!(read, CatchUpRead::Whole), "{read:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_postgres_database_of_registers_without_dots_gets_them() {
    let Some(db) = pg::pg_database().await else {
        return;
    };
    write_v5_postgres(&db.url).await;
    let dir: PathBuf = std::env::temp_dir().join(format!("fm-upgrade-{}", unique()));
    let store = Store::open(&options(&db.url, &dir)).expect("open");
    check_dots_filled(&store).await;
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let heads: Vec<String> = client
        .query("SELECT state FROM sync_sessions", &[])
        .await
        .expect("heads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(heads.len(), v5_rows_written().len());
    assert!(heads.iter().all(|head| marked(head)), "{heads:?}");
    let placeholder = client
        .query_one(
            "SELECT replica_id, seq FROM sync_registers WHERE session_id = $1",
            &[&BAD_REGISTER],
        )
        .await
        .expect("the bad row");
    let placeholder: (Vec<u8>, i64) = (placeholder.get(0), placeholder.get(1));
    assert_eq!(placeholder, (Vec::new(), -1));
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes
             WHERE indexname IN ('sync_registers_dot', 'sync_registers_made')",
            &[],
        )
        .await
        .expect("indexes")
        .get(0);
    assert_eq!(indexes, 2);
    let name = unmarked_case();
    let existing: Vec<u8> = client
        .query_one(
            "SELECT path_key FROM sync_registers WHERE session_id = $1 LIMIT 1",
            &[&name],
        )
        .await
        .expect("a row")
        .get(0);
    for (session_id, key) in [("old-writer", b"new".to_vec()), (name.as_str(), existing)] {
        let refused = client
            .execute(
                OLD_INSERT_POSTGRES,
                &[&TENANT, &session_id, &vec![key], &vec!["{}"]],
            )
            .await
            .expect_err("an old release's register row is refused");
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION),
            "{refused}"
        );
    }
    check_reads_in_part(&store, &name).await;
    let head: String = client
        .query_one(
            "SELECT state FROM sync_sessions WHERE session_id = $1",
            &[&name],
        )
        .await
        .expect("head")
        .get(0);
    client
        .execute(
            "UPDATE sync_sessions SET state = $1 WHERE session_id = $2",
            &[&unmarked(&head), &name],
        )
        .await
        .expect("unmark");
    let read = store
        .catch_up(TENANT, &name, &VectorClock::new())
        .await
        .expect("reads");
    assert!(matches!(read, CatchUpRead::Whole), "{read:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Migration 6 beside a merge of the release before, in flight: the merge holds its session's
/// head row, then reads its registers, as that release does. The migration takes both tables
/// before touching either, so it waits for the merge, which finishes; then it runs. (Attack
/// round 6: the migration took `sync_registers` first and then waited on a head row such a
/// merge held while the merge waited on `sync_registers`: `deadlock detected`, 3–5 times,
/// each retry redoing the whole fill.)
#[tokio::test]
async fn migration_6_waits_for_a_merge_in_flight_instead_of_deadlocking_postgres() {
    let Some(db) = pg::pg_database().await else {
        return;
    };
    write_v5_postgres(&db.url).await;
    let (old, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    old.batch_execute("BEGIN").await.expect("begin");
    let session: String = old
        .query_one(
            "SELECT session_id FROM sync_sessions ORDER BY session_id LIMIT 1 FOR UPDATE",
            &[],
        )
        .await
        .expect("the merge locks its head")
        .get(0);
    let dir: PathBuf = std::env::temp_dir().join(format!("fm-upgrade-{}", unique()));
    let store = Store::open(&options(&db.url, &dir)).expect("open");
    let migrating = tokio::spawn(async move { store.migrate().await });
    // The migration waits for a lock (the readiness signal: pg_stat_activity).
    let (watch, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the migration never waited for the merge in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old.query(
        "SELECT count(*) FROM sync_registers WHERE session_id = $1",
        &[&session],
    )
    .await
    .expect("the merge reads its registers");
    old.batch_execute("COMMIT")
        .await
        .expect("the merge commits");
    migrating
        .await
        .expect("the migration task")
        .expect("the migration completes");
    let _ = std::fs::remove_dir_all(&dir);
}
