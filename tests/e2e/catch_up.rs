//! Catching up through the front, on both stores (design §3 "Catching up, waiting, conflicts
//! kept"): `GET …/changes?since=&wait=` rebuilds the document from any clock the session
//! gave, holds a long-poll until a merge brings something (also past `request_timeout`),
//! refuses clocks ahead of the session (409) and bad queries (400); `GET …/conflicts` keeps
//! every reported conflict, numbered and paged, per tenant.

use firemode_tests::{request, token, Reply, SystemOptions, TestSystem};
use http::Method;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;

fn results(session: &str) -> String {
    format!("/v1/tests/sessions/{session}/results")
}

async fn post(front: SocketAddr, tok: &str, session: &str, key: &str, body: Value) -> Reply {
    let auth = format!("Bearer {tok}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", key),
        ("x-request-id", key),
    ];
    let reply = request(
        front,
        Method::POST,
        &results(session),
        &headers,
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply
}

async fn get(front: SocketAddr, tok: &str, path: &str) -> Reply {
    let auth = format!("Bearer {tok}");
    request(
        front,
        Method::GET,
        path,
        &[("authorization", auth.as_str())],
        "",
    )
    .await
    .unwrap()
}

fn changes_path(session: &str, since: &Value, wait: u64) -> String {
    let since: String = form_urlencoded::byte_serialize(since.to_string().as_bytes()).collect();
    format!("/v1/tests/sessions/{session}/changes?since={since}&wait={wait}")
}

fn batch(replica: &str, clock: Value, ts: u64, changes: Value) -> Value {
    json!({"changes": changes, "_sync_meta": {"vector_clock": clock, "replica_id": replica, "timestamp": ts}})
}

fn set(path: &str, value: Value) -> Value {
    json!({"op": "set", "path": path, "value": value})
}

/// The client's rules: `set` creates missing and replaces non-object parents; `remove`
/// deletes the key if present.
fn apply(document: &mut Value, changes: &Value) {
    for change in changes.as_array().unwrap() {
        let path = change["path"].as_str().unwrap();
        let tokens: Vec<String> = path[1..]
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = tokens.split_last().unwrap();
        if change["op"] == "set" {
            let mut node = &mut *document;
            for token in parents {
                if !node[token.as_str()].is_object() {
                    node[token.as_str()] = json!({});
                }
                node = &mut node[token.as_str()];
            }
            node[last.as_str()] = change["value"].clone();
        } else {
            let mut node = Some(&mut *document);
            for token in parents {
                node = node.and_then(|n| n.get_mut(token.as_str()));
            }
            if let Some(Value::Object(object)) = node {
                object.remove(last);
            }
        }
    }
}

async fn check_catch_up(sys: &TestSystem) {
    let f = sys.front;
    let t = token("tablet-1", Some("acme"));
    // Nothing yet: no changes, an empty clock.
    let empty = get(f, &t, &changes_path("C1", &json!({}), 0)).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["changes"], json!([]));
    assert_eq!(empty.json()["vector_clock"], json!({}));

    let first = post(
        f,
        &t,
        "C1",
        "c-1",
        batch(
            "t1",
            json!({}),
            1_000,
            json!([
                set("/pumps/P1/pressure", json!("ok")),
                set("/notes", json!("x")),
                set("/big", json!(12345678901234567890123u128.to_string()))
            ]),
        ),
    )
    .await
    .json();
    let after_first = first["vector_clock"].clone();
    let second = post(
        f,
        &t,
        "C1",
        "c-2",
        batch(
            "t1",
            json!({}),
            2_000,
            json!([
                set("/pumps/P1/pressure/psi", json!(92)), {"op": "remove", "path": "/notes"}
            ]),
        ),
    )
    .await
    .json();

    let whole = get(f, &t, "/v1/tests/sessions/C1").await.json();
    // From nothing, the changes rebuild the document.
    let all = get(f, &t, &changes_path("C1", &json!({}), 0)).await.json();
    assert_eq!(all["vector_clock"], second["vector_clock"]);
    let mut rebuilt = Value::Object(Map::new());
    apply(&mut rebuilt, &all["changes"]);
    assert_eq!(rebuilt, whole["document"]);
    // From the first clock, only what the second batch changed, and they make the document.
    let delta = get(f, &t, &changes_path("C1", &after_first, 0))
        .await
        .json();
    let paths: Vec<&str> = delta["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(!paths.contains(&"/big"), "{delta}");
    let mut at_first = json!({"pumps": {"P1": {"pressure": "ok"}}, "notes": "x", "big": "12345678901234567890123"});
    apply(&mut at_first, &delta["changes"]);
    assert_eq!(at_first, whole["document"]);
    // Up to date: nothing.
    let none = get(f, &t, &changes_path("C1", &second["vector_clock"], 0))
        .await
        .json();
    assert_eq!(none["changes"], json!([]));

    // A clock ahead of the session: 409 with the session clock.
    let ahead = get(f, &t, &changes_path("C1", &json!({"t1": 9}), 0)).await;
    let problem = ahead.problem(409);
    assert_eq!(problem["vector_clock"], second["vector_clock"]);
    // Bad queries: 400 naming the parameter.
    for (query, needle) in [
        ("since=nope", "since"),
        ("wait=61", "wait"),
        ("since=%7B%22t1%22%3A-1%7D", "since"),
    ] {
        let p = get(f, &t, &format!("/v1/tests/sessions/C1/changes?{query}"))
            .await
            .problem(400);
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{query}: {p}"
        );
    }
    // Another tenant sees nothing of it.
    let other = token("tablet-1", Some("globex"));
    assert_eq!(
        get(f, &other, &changes_path("C1", &json!({}), 0))
            .await
            .json()["changes"],
        json!([])
    );

    // A long-poll at the current clock is held until a merge brings something.
    let clock = second["vector_clock"].clone();
    let waiting = {
        let (t, path) = (t.clone(), changes_path("C1", &clock, 20));
        tokio::spawn(async move { get(f, &t, &path).await })
    };
    // The waiter may not have arrived yet; the merge is then found by its first read. Either
    // way the answer must carry the change (a wait that ended empty fails here).
    post(
        f,
        &t,
        "C1",
        "c-3",
        batch("t1", json!({}), 3_000, json!([set("/door", json!("shut"))])),
    )
    .await;
    let woken = waiting.await.unwrap();
    assert_eq!(
        woken.status,
        200,
        "{}",
        String::from_utf8_lossy(&woken.body)
    );
    assert_eq!(
        woken.json()["changes"],
        json!([set("/door", json!("shut"))]),
        "{}",
        String::from_utf8_lossy(&woken.body)
    );
    // A wait with nothing new ends empty, at the session clock; so does one whose `since`
    // names the same events with an extra zero entry (it waits the same way, and the answer
    // names the session clock, not the client's spelling of it).
    let now = woken.json()["vector_clock"].clone();
    let quiet = get(f, &t, &changes_path("C1", &now, 1)).await;
    assert_eq!(quiet.status, 200);
    assert_eq!(quiet.json()["changes"], json!([]));
    assert_eq!(quiet.json()["vector_clock"], now);
    let mut with_zero = now.clone();
    with_zero["never-wrote"] = json!(0);
    let started = std::time::Instant::now();
    let quiet = get(f, &t, &changes_path("C1", &with_zero, 1)).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "it did not wait"
    );
    assert_eq!(quiet.json()["changes"], json!([]));
    assert_eq!(quiet.json()["vector_clock"], now);
}

async fn check_conflicts(sys: &TestSystem) {
    let f = sys.front;
    let t = token("tablet-1", Some("acme"));
    let journal = |after: u64, limit: u64| {
        format!("/v1/tests/sessions/K1/conflicts?after={after}&limit={limit}")
    };
    assert_eq!(
        get(f, &t, &journal(0, 10)).await.json(),
        json!({"session_id": "K1", "conflicts": [], "next": 0})
    );
    post(
        f,
        &t,
        "K1",
        "k-a",
        batch(
            "a",
            json!({}),
            500,
            json!([set("/x", json!("from a")), set("/y", json!(1))]),
        ),
    )
    .await;
    let b = post(
        f,
        &t,
        "K1",
        "k-b",
        batch(
            "b",
            json!({}),
            100,
            json!([set("/x", json!("from b")), set("/y", json!(2))]),
        ),
    )
    .await
    .json();
    assert_eq!(b["conflicts_total"], 2, "{b}");
    let page = get(f, &t, &journal(0, 10)).await.json();
    let kept = page["conflicts"].as_array().unwrap();
    assert_eq!(kept.len(), 2, "{page}");
    assert_eq!(page["next"], 2);
    assert_eq!(kept[0]["seq"], 1);
    assert_eq!(kept[0]["path"], "/x");
    assert_eq!(kept[0]["winner"]["replica_id"], "a");
    assert_eq!(kept[0]["winner"]["value"], "from a");
    assert_eq!(kept[0]["winner"]["timestamp"], 500);
    assert_eq!(kept[0]["loser"]["replica_id"], "b");
    assert_eq!(kept[0]["loser"]["value"], "from b");
    assert_eq!(kept[0]["request_id"], "k-b");
    assert!(kept[0]["at"].as_u64().is_some(), "{page}");
    // The loser's tablet pages through: one at a time, then nothing after the last.
    let one = get(f, &t, &journal(1, 1)).await.json();
    assert_eq!(one["conflicts"].as_array().unwrap().len(), 1);
    assert_eq!(one["conflicts"][0]["seq"], 2);
    assert_eq!(one["next"], 2);
    assert_eq!(
        get(f, &t, &journal(2, 10)).await.json()["conflicts"],
        json!([])
    );
    // A replayed merge does not journal twice.
    post(
        f,
        &t,
        "K1",
        "k-b",
        batch(
            "b",
            json!({}),
            100,
            json!([set("/x", json!("from b")), set("/y", json!(2))]),
        ),
    )
    .await;
    assert_eq!(get(f, &t, &journal(0, 10)).await.json()["next"], 2);
    // Bad paging: 400; another tenant: nothing.
    get(f, &t, "/v1/tests/sessions/K1/conflicts?limit=0")
        .await
        .problem(400);
    get(f, &t, "/v1/tests/sessions/K1/conflicts?after=-1")
        .await
        .problem(400);
    let other = token("tablet-1", Some("globex"));
    assert_eq!(
        get(f, &other, &journal(0, 10)).await.json()["conflicts"],
        json!([])
    );
    // Only GET and HEAD.
    let auth = format!("Bearer {t}");
    let r = request(
        f,
        Method::POST,
        "/v1/tests/sessions/K1/conflicts",
        &[("authorization", auth.as_str())],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn catch_up_on_sqlite() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    check_catch_up(&sys).await;
    check_conflicts(&sys).await;
}

#[tokio::test]
async fn catch_up_on_postgres() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    check_catch_up(&sys).await;
    check_conflicts(&sys).await;
}

/// A long-poll may wait longer than `server.request_timeout`: the front's deadline for
/// `GET …/changes` grows by the `wait` asked for.
#[tokio::test]
async fn a_long_poll_outlives_the_request_timeout() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("server.request_timeout", "1s".into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let held = get(sys.front, &t, &changes_path("L1", &json!({}), 3)).await;
    assert_eq!(held.status, 200, "{}", String::from_utf8_lossy(&held.body));
    assert_eq!(held.json()["changes"], json!([]));
}

/// The waiting long-polls of the sync instances, from the workers' gauge in `/metrics`.
async fn long_polls_waiting(sys: &TestSystem) -> f64 {
    sys.metric_sum("sync_long_polls_waiting").await
}

/// A `GET …/changes` from nothing with `wait` seconds, held at the worker when this returns.
async fn hold_long_poll(
    sys: &TestSystem,
    tok: &str,
    session: &str,
    wait: u64,
) -> tokio::task::JoinHandle<Reply> {
    let (f, t, path) = (
        sys.front,
        tok.to_owned(),
        changes_path(session, &json!({}), wait),
    );
    let held = tokio::spawn(async move { get(f, &t, &path).await });
    firemode_tests::eventually(
        "the long-poll held at the worker",
        std::time::Duration::from_secs(20),
        || async { (long_polls_waiting(sys).await >= 1.0).then_some(()) },
    )
    .await;
    held
}

/// A hundred tablets long-polling one session (more than the 64 connections the front keeps
/// for ordinary requests to an instance) neither block other requests nor miss the merge
/// that ends their wait.
#[tokio::test]
async fn many_long_polls_leave_room_for_other_requests() {
    const WAITERS: usize = 100;
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 1,
        set: vec![("server.request_timeout", "5s".into())],
        ..SystemOptions::default()
    })
    .await;
    let f = sys.front;
    let t = token("tablet-1", Some("acme"));
    let clock = post(
        f,
        &t,
        "HOT",
        "h-0",
        batch("t1", json!({}), 1, json!([set("/a", json!(0))])),
    )
    .await
    .json()["vector_clock"]
        .clone();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (t, path) = (t.clone(), changes_path("HOT", &clock, 20));
            tokio::spawn(async move { get(f, &t, &path).await })
        })
        .collect();
    firemode_tests::eventually(
        "every long-poll held at the worker",
        std::time::Duration::from_secs(20),
        || async { (long_polls_waiting(&sys).await >= WAITERS as f64).then_some(()) },
    )
    .await;
    // Ordinary requests still get a connection at once (a 5 s request_timeout would end them
    // while 100 long-polls held every connection).
    let read = get(f, &t, "/v1/tests/sessions/HOT").await;
    assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
    post(
        f,
        &t,
        "HOT",
        "h-1",
        batch("t1", json!({}), 2, json!([set("/a", json!(1))])),
    )
    .await;
    for waiter in waiters {
        let woken = waiter.await.unwrap();
        assert_eq!(
            woken.status,
            200,
            "{}",
            String::from_utf8_lossy(&woken.body)
        );
        assert_eq!(woken.json()["changes"], json!([set("/a", json!(1))]));
    }
}

/// Compaction (design §3): history older than `sync.tombstone_retention` is folded away; the
/// document stays as it was, a batch or `since` from before the horizon gets 410
/// `must-refetch`, and a tablet that refetches carries on from the session's clock.
#[tokio::test]
async fn clocks_behind_the_compaction_horizon_must_refetch() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("sync.tombstone_retention", "1s".into())],
        ..SystemOptions::default()
    })
    .await;
    let f = sys.front;
    let t = token("tablet-1", Some("acme"));
    post(
        f,
        &t,
        "OLD",
        "o-1",
        batch(
            "t1",
            json!({}),
            1,
            json!([set("/a/b", json!(1)), set("/x", json!(1))]),
        ),
    )
    .await;
    post(
        f,
        &t,
        "OLD",
        "o-2",
        batch(
            "t1",
            json!({}),
            2,
            json!([{"op": "remove", "path": "/a/b"}]),
        ),
    )
    .await;
    let before = get(f, &t, "/v1/tests/sessions/OLD").await.json();
    // The retention is time itself: let it pass, then the next merge compacts.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let after = post(
        f,
        &t,
        "OLD",
        "o-3",
        batch("t1", json!({}), 3, json!([set("/y", json!(2))])),
    )
    .await
    .json();
    // The merge that found the session due answers first; the compaction follows it.
    let from_nothing = changes_path("OLD", &json!({}), 0);
    firemode_tests::eventually(
        "the compaction",
        std::time::Duration::from_secs(10),
        || async {
            let reply = get(f, &t, &from_nothing).await;
            (reply.status == 410).then_some(())
        },
    )
    .await;
    let now = get(f, &t, "/v1/tests/sessions/OLD").await.json();
    let mut expected = before["document"].clone();
    expected["y"] = json!(2);
    assert_eq!(now["document"], expected, "compaction changed the document");
    assert_eq!(
        now["document"]["a"],
        json!({}),
        "the removed value came back"
    );

    // A tablet that never synced (its clock is older than the horizon) must refetch.
    let late = request(
        f,
        Method::POST,
        &results("OLD"),
        &[
            ("authorization", &format!("Bearer {t}")),
            ("idempotency-key", "o-late"),
        ],
        batch("t2", json!({}), 4, json!([set("/a/b", json!("late"))])).to_string(),
    )
    .await
    .unwrap();
    let problem = late.problem(410);
    assert_eq!(problem["type"], "tag:firemode,2026:problem/must-refetch");
    assert!(problem["horizon"].is_object(), "{problem}");
    get(f, &t, &changes_path("OLD", &json!({}), 0))
        .await
        .problem(410);
    // After a full GET, from the session's clock, both work.
    let clock = now["vector_clock"].clone();
    assert_eq!(
        get(f, &t, &changes_path("OLD", &clock, 0)).await.json()["changes"],
        json!([])
    );
    post(
        f,
        &t,
        "OLD",
        "o-late-2",
        batch("t2", clock, 4, json!([set("/a/b", json!("again"))])),
    )
    .await;
    let last = get(f, &t, "/v1/tests/sessions/OLD").await.json();
    assert_eq!(last["document"]["a"], json!({"b": "again"}));
    assert_eq!(after["vector_clock"]["t1"], 3);
}

/// A long-poll held at a worker that drains (SIGTERM) is answered at once with what is new
/// (nothing): the stop does not wait for it, and the client sees a 200, never a 502/504.
#[tokio::test]
async fn a_draining_worker_answers_its_long_polls_at_once() {
    let mut sys = TestSystem::start(SystemOptions {
        sync_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let held = hold_long_poll(&sys, &t, "D1", 60).await;
    sys.signal(nix::sys::signal::Signal::SIGTERM);
    let answer = held.await.unwrap();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["changes"], json!([]));
    // The drain did not wait for the long-poll's minute (nor the 30 s drain timeout).
    let status = sys.wait_exit(std::time::Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", sys.logs());
}

/// A rolling reload takes the old sync instance out of rotation: its held long-polls are
/// answered at once (200, nothing new) rather than held until its drain deadline.
#[tokio::test]
async fn a_reload_releases_the_long_polls_of_the_instances_it_replaces() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let old = sys.worker_pids().await;
    let held = hold_long_poll(&sys, &t, "R1", 60).await;
    sys.signal(nix::sys::signal::Signal::SIGHUP);
    // The guard is far below the 60 s wait: only a release answers in time.
    let answer = tokio::time::timeout(std::time::Duration::from_secs(40), held)
        .await
        .expect("the held long-poll was released by the reload")
        .unwrap();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["changes"], json!([]));
    firemode_tests::eventually(
        "the old instances replaced",
        std::time::Duration::from_secs(30),
        || async {
            let now = sys.worker_pids().await;
            old.iter().all(|pid| !now.contains(pid)).then_some(())
        },
    )
    .await;
}

/// A long-poll whose worker is SIGKILLed late in its wait is retried on the restarted
/// worker with only the wait its deadline has left, so the client gets a 200, not a 504.
#[tokio::test]
async fn a_retried_long_poll_waits_only_what_its_deadline_has_left() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 1,
        set: vec![("server.request_timeout", "2s".into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let held = hold_long_poll(&sys, &t, "K9", 8).await;
    // Late in the 8 s wait (the front's deadline is 2 s + 8 s): a full 8 s retry would not fit.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let victim = sys.instances("sync").await[0]["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let answer = held.await.unwrap();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["changes"], json!([]));
}
