//! Sync through the front, on both stores: every rule of the merge contract, idempotency,
//! tenants, the offline bundle; and two supervisors converging on one PostgreSQL.

use firemode_tests::{pg_database, request, token, Reply, SystemOptions, TestSystem};
use http::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;

fn results_path(session: &str) -> String {
    format!("/v1/tests/sessions/{session}/results")
}

async fn post(
    front: SocketAddr,
    tok: &str,
    session: &str,
    key: Option<&str>,
    body: &Value,
) -> Reply {
    let auth = format!("Bearer {tok}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    request(
        front,
        Method::POST,
        &results_path(session),
        &headers,
        body.to_string(),
    )
    .await
    .unwrap()
}

/// A post that must be merged: 200, or the test fails here with the answer.
async fn post_ok(
    front: SocketAddr,
    tok: &str,
    session: &str,
    key: Option<&str>,
    body: &Value,
) -> Reply {
    let reply = post(front, tok, session, key, body).await;
    assert_eq!(
        reply.status,
        200,
        "{session}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    reply
}

async fn get(front: SocketAddr, tok: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {tok}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    request(front, Method::GET, path, &headers, "")
        .await
        .unwrap()
}

async fn document(front: SocketAddr, tok: &str, session: &str) -> Value {
    let r = get(front, tok, &format!("/v1/tests/sessions/{session}"), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["session_id"], session);
    v
}

fn batch(replica: &str, clock: Value, ts: u64, changes: Value) -> Value {
    json!({"changes": changes, "_sync_meta": {"vector_clock": clock, "replica_id": replica, "timestamp": ts}})
}

fn set(path: &str, value: Value) -> Value {
    json!({"op": "set", "path": path, "value": value})
}

async fn check_sync_contract(sys: &TestSystem) {
    let f = sys.front;
    let t = token("tablet-7", Some("acme"));

    // A session with no results yet is {}, not 404.
    let empty = document(f, &t, "S-new").await;
    assert_eq!(empty["document"], json!({}));
    assert_eq!(empty["vector_clock"], json!({}));

    // The seeds' payload, as is: the replica defaults to the token's sub.
    let seed = json!({"changes": [{"op": "set", "path": "/extinguishers/FE-01/pressure", "value": "low"}],
                      "_sync_meta": {"vector_clock": {}}});
    let r = post(f, &t, "S1", Some("k-seed"), &seed).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["session_id"], "S1");
    assert_eq!(v["applied"], 1);
    assert_eq!(v["vector_clock"], json!({"tablet-7": 1}));
    assert_eq!(v["conflicts"], json!([]));
    let d = document(f, &t, "S1").await;
    assert_eq!(
        d["document"],
        json!({"extinguishers": {"FE-01": {"pressure": "low"}}})
    );

    // Same key + same body: the stored answer again, nothing re-applied.
    let again = post(f, &t, "S1", Some("k-seed"), &seed).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), v);
    assert_eq!(
        document(f, &t, "S1").await["vector_clock"],
        json!({"tablet-7": 1})
    );
    // Same key + another body: 422.
    let other = json!({"changes": [], "_sync_meta": {"vector_clock": {}}});
    post(f, &t, "S1", Some("k-seed"), &other).await.problem(422);
    // No key: 400.
    post(f, &t, "S1", None, &seed).await.problem(400);

    // Concurrent writes, delivered in both orders to two sessions: same outcome.
    let w1 = batch(
        "tablet-1",
        json!({"tablet-1": 1}),
        1_000,
        json!([set("/a", json!(1))]),
    );
    let w2 = batch(
        "tablet-2",
        json!({"tablet-2": 1}),
        2_000,
        json!([set("/a", json!(2))]),
    );
    post_ok(f, &t, "C1", Some("c1-w1"), &w1).await;
    let second = post_ok(f, &t, "C1", Some("c1-w2"), &w2).await.json();
    post_ok(f, &t, "C2", Some("c2-w2"), &w2).await;
    let second_rev = post_ok(f, &t, "C2", Some("c2-w1"), &w1).await.json();
    let (c1, c2) = (document(f, &t, "C1").await, document(f, &t, "C2").await);
    assert_eq!(c1["document"], json!({"a": 2}), "the larger stamp wins");
    assert_eq!(c1["document"], c2["document"]);
    assert_eq!(c1["vector_clock"], c2["vector_clock"]);
    for reply in [&second, &second_rev] {
        let conflicts = reply["conflicts"].as_array().unwrap();
        assert_eq!(conflicts.len(), 1, "{reply}");
        assert_eq!(conflicts[0]["path"], "/a");
        assert_eq!(conflicts[0]["winner"]["replica_id"], "tablet-2");
        assert_eq!(conflicts[0]["loser"]["replica_id"], "tablet-1");
    }

    // Causal overwrite: tablet-2 saw tablet-1's write, so its write wins even though its
    // device clock is far behind; no conflict.
    let first = batch(
        "tablet-1",
        json!({"tablet-1": 1}),
        50_000,
        json!([set("/b", json!("first"))]),
    );
    let after = batch(
        "tablet-2",
        json!({"tablet-1": 1, "tablet-2": 1}),
        10,
        json!([set("/b", json!("second"))]),
    );
    post_ok(f, &t, "K1", Some("k1-1"), &first).await;
    let r = post(f, &t, "K1", Some("k1-2"), &after).await.json();
    assert_eq!(r["conflicts"], json!([]));
    assert_eq!(
        document(f, &t, "K1").await["document"],
        json!({"b": "second"})
    );

    // A duplicate dot under a new key: 200, nothing applied.
    let dup = post(f, &t, "K1", Some("k1-dup"), &first).await;
    assert_eq!(dup.status, 200);
    assert_eq!(dup.json()["applied"], 0);
    assert_eq!(
        document(f, &t, "K1").await["document"],
        json!({"b": "second"})
    );

    // Remove writes a tombstone.
    let rm = batch(
        "tablet-1",
        json!({"tablet-1": 2, "tablet-2": 1}),
        60_000,
        json!([{"op": "remove", "path": "/b"}]),
    );
    assert_eq!(post(f, &t, "K1", Some("k1-rm"), &rm).await.status, 200);
    assert_eq!(document(f, &t, "K1").await["document"], json!({}));

    // A batch that claims unseen events: 409 with the session clock, and nothing changes.
    let ahead = batch(
        "tablet-3",
        json!({"tablet-3": 1, "tablet-9": 5}),
        1,
        json!([set("/z", json!(1))]),
    );
    let p = post(f, &t, "K1", Some("k1-ahead"), &ahead)
        .await
        .problem(409);
    assert_eq!(p["vector_clock"], json!({"tablet-1": 2, "tablet-2": 1}));
    let gap = batch(
        "tablet-1",
        json!({"tablet-1": 5}),
        1,
        json!([set("/z", json!(1))]),
    );
    post(f, &t, "K1", Some("k1-gap"), &gap).await.problem(409);
    assert_eq!(document(f, &t, "K1").await["document"], json!({}));
    // After syncing, the refused request itself goes through under its refused key and body
    // (a 409 is not remembered).
    for (sequence, key) in [(3, "k1-s3"), (4, "k1-s4")] {
        let next = batch(
            "tablet-1",
            json!({ "tablet-1": sequence }),
            1,
            json!([set("/n", json!(sequence))]),
        );
        assert_eq!(post(f, &t, "K1", Some(key), &next).await.status, 200);
    }
    let retried = post(f, &t, "K1", Some("k1-gap"), &gap).await;
    assert_eq!(
        retried.status,
        200,
        "{}",
        String::from_utf8_lossy(&retried.body)
    );
    assert!(retried.header("idempotent-replayed").is_none());
    assert_eq!(retried.json()["applied"], 1);
    assert_eq!(
        document(f, &t, "K1").await["document"],
        json!({"n": 4, "z": 1})
    );

    // Tenants: another org sees nothing of acme's session and writes its own.
    let rival = token("tablet-7", Some("rival"));
    assert_eq!(document(f, &rival, "S1").await["document"], json!({}));
    let mine = json!({"changes": [set("/mine", json!(true))], "_sync_meta": {"vector_clock": {}}});
    assert_eq!(
        post(f, &rival, "S1", Some("k-seed"), &mine).await.status,
        200,
        "keys are per tenant"
    );
    assert_eq!(
        document(f, &rival, "S1").await["document"],
        json!({"mine": true})
    );
    assert_eq!(
        document(f, &t, "S1").await["document"],
        json!({"extinguishers": {"FE-01": {"pressure": "low"}}})
    );
    // A token without org is its own tenant.
    let solo = token("tablet-7", None);
    assert_eq!(document(f, &solo, "S1").await["document"], json!({}));

    // The offline bundle: session + catalog, ETag, 304, gzip.
    let path = "/v1/tests/sessions/S1/offline_bundle";
    let b = get(f, &t, path, &[]).await;
    assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
    let etag = b.header("etag").expect("ETag").to_string();
    let bundle = b.json();
    assert_eq!(bundle["schema_version"], 1);
    assert!(bundle["generated_at"].as_str().is_some());
    assert_eq!(bundle["session"]["session_id"], "S1");
    assert_eq!(
        bundle["session"]["document"],
        json!({"extinguishers": {"FE-01": {"pressure": "low"}}})
    );
    assert_eq!(bundle["session"]["vector_clock"], json!({"tablet-7": 1}));
    assert_eq!(bundle["catalog"]["version"], "as1851-2012-sample-2");
    let items = bundle["catalog"]["items"].as_array().unwrap();
    assert!(items.len() >= 24);
    assert!(items[0]["conditions"][0]["classification"].is_string());
    let not_modified = get(f, &t, path, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    let zipped = get(f, &t, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    let mut unzipped = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&zipped.body[..]),
        &mut unzipped,
    )
    .unwrap();
    let unzipped: Value = serde_json::from_str(&unzipped).unwrap();
    assert_eq!(unzipped["session"], bundle["session"]);
    assert_eq!(unzipped["catalog"], bundle["catalog"]);
    // A write changes the ETag.
    let more = json!({"changes": [set("/notes", json!("ok"))], "_sync_meta": {"vector_clock": {}}});
    post_ok(f, &t, "S1", Some("k-more"), &more).await;
    let changed = get(f, &t, path, &[("if-none-match", &etag)]).await;
    assert_eq!(changed.status, 200);
    assert_ne!(changed.header("etag").unwrap(), etag);

    // Bad input: 400 naming the problem, never a 500.
    let ok_body = json!({"changes": [], "_sync_meta": {"vector_clock": {}}});
    for (session, body, needle) in [
        ("bad.id", ok_body.clone(), "session id"),
        (&"x".repeat(65)[..], ok_body.clone(), "session id"),
        ("B1", json!({"changes": {}}), "list"),
        ("B1", json!([1, 2]), "object"),
        (
            "B1",
            json!({"changes": [{"op": "move", "path": "/a"}]}),
            "op",
        ),
        (
            "B1",
            json!({"changes": [{"op": "set", "path": "a/b", "value": 1}]}),
            "path",
        ),
        (
            "B1",
            json!({"changes": [{"op": "set", "path": "/a"}]}),
            "value",
        ),
        (
            "B1",
            json!({"changes": [], "_sync_meta": {"vector_clock": {"t": -1}}}),
            "non-negative",
        ),
        (
            "B1",
            json!({"changes": [], "_sync_meta": {"vector_clock": {"t": 18446744073709551616u128.to_string()}}}),
            "non-negative",
        ),
        (
            "B1",
            json!({"changes": [], "_sync_meta": {"replica_id": "r".repeat(129)}}),
            "replica_id",
        ),
        (
            "B1",
            json!({"changes": [], "_sync_meta": {"replica_id": "tablet-7", "vector_clock": {"tablet-7": 0}}}),
            "0",
        ),
    ] {
        let r = post(f, &t, session, Some("k-bad"), &body).await;
        let p = r.problem(400);
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{needle}: {p}"
        );
    }
    let long_key = "k".repeat(256);
    post(f, &t, "B1", Some(&long_key), &ok_body)
        .await
        .problem(400);
    let too_many =
        json!({"changes": (0..1001).map(|i| set(&format!("/n{i}"), json!(i))).collect::<Vec<_>>()});
    let p = post(f, &t, "B1", Some("k-many"), &too_many)
        .await
        .problem(400);
    assert!(p["detail"].as_str().unwrap().contains("1000"), "{p}");
    let auth = format!("Bearer {t}");
    let r = request(
        f,
        Method::POST,
        &results_path("B1"),
        &[("authorization", &auth), ("idempotency-key", "k-utf8")],
        vec![0xff, 0xfe],
    )
    .await
    .unwrap();
    r.problem(400);
    // Wrong method.
    get(f, &t, &results_path("B1"), &[]).await.problem(405);

    check_overwritten_values_stay_gone(sys).await;
}

/// Design §3: `set /a 5`, `set /a/b 1`, `remove /a/b` reads `{"a":{}}`, never 5; and two
/// tablets of one technician that send no `replica_id` are concurrent: the edit made later
/// wins even when it arrives first, and the conflict is reported.
async fn check_overwritten_values_stay_gone(sys: &TestSystem) {
    let f = sys.front;
    let t = token("tech-9", Some("acme"));
    let steps = [
        batch("t9", json!({}), 1_000, json!([set("/a", json!(5))])),
        batch("t9", json!({}), 1_001, json!([set("/a/b", json!(1))])),
        batch(
            "t9",
            json!({}),
            1_002,
            json!([{"op": "remove", "path": "/a/b"}]),
        ),
    ];
    for (i, body) in steps.iter().enumerate() {
        post_ok(f, &t, "GONE", Some(&format!("k-gone-{i}")), body).await;
    }
    assert_eq!(document(f, &t, "GONE").await["document"], json!({"a": {}}));

    let unnamed = |ts: u64, value: &str| {
        json!({"changes": [set("/door", json!(value))],
               "_sync_meta": {"vector_clock": {}, "timestamp": ts}})
    };
    // Tablet A's edit was made at t=2000 and arrives first; tablet B's at t=1000 arrives last.
    post_ok(f, &t, "TWO", Some("k-tab-a"), &unnamed(2_000, "closed")).await;
    let late = post_ok(f, &t, "TWO", Some("k-tab-b"), &unnamed(1_000, "open"))
        .await
        .json();
    assert_eq!(late["vector_clock"], json!({"tech-9": 2}));
    assert_eq!(late["conflicts_total"], 1, "{late}");
    assert_eq!(late["conflicts"][0]["winner"]["value"], "closed", "{late}");
    assert_eq!(
        document(f, &t, "TWO").await["document"],
        json!({"door": "closed"})
    );
}

#[tokio::test]
async fn sync_contract_on_sqlite() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    check_sync_contract(&sys).await;
}

#[tokio::test]
async fn sync_contract_on_postgres() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    check_sync_contract(&sys).await;
}

#[tokio::test]
async fn a_bundle_over_the_cap_is_refused_whole_never_truncated() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("sync.max_bundle_bytes", 1_000_000.into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    // Worst case: several near-limit batches of large values, unique paths.
    for i in 0..3 {
        let big = "x".repeat(400_000);
        let body = json!({"changes": [set(&format!("/photos/p{i}"), json!(big))], "_sync_meta": {"vector_clock": {}}});
        let r = post(sys.front, &t, "BIG", Some(&format!("big-{i}")), &body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = get(
        sys.front,
        &t,
        "/v1/tests/sessions/BIG/offline_bundle",
        &[("accept-encoding", "gzip")],
    )
    .await;
    let p = r.problem(422);
    assert!(p["bundle_bytes"].as_u64().unwrap() > 1_000_000, "{p}");
    assert_eq!(p["max_bundle_bytes"], 1_000_000);
    // The session itself still reads back whole.
    let d = document(sys.front, &t, "BIG").await;
    assert_eq!(d["document"]["photos"].as_object().unwrap().len(), 3);
    // A smaller session of the same tenant still bundles.
    let small = json!({"changes": [set("/a", json!(1))], "_sync_meta": {"vector_clock": {}}});
    post_ok(sys.front, &t, "SMALL", Some("small-1"), &small).await;
    assert_eq!(
        get(
            sys.front,
            &t,
            "/v1/tests/sessions/SMALL/offline_bundle",
            &[]
        )
        .await
        .status,
        200
    );
}

/// Two supervisors (as on two hosts) sharing one PostgreSQL, six replicas writing
/// concurrently to one hot session through both: every acknowledged write is merged, and the
/// final document equals a reference merge of the acknowledged batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_supervisors_on_one_postgres_converge() {
    let Some(db) = pg_database().await else {
        return;
    };
    let opts = || SystemOptions {
        database_url: Some(db.url.clone()),
        ..SystemOptions::default()
    };
    let (a, b) = tokio::join!(TestSystem::start(opts()), TestSystem::start(opts()));
    let fronts = [a.front, b.front];
    const REPLICAS: usize = 6;
    const BATCHES: u64 = 12;
    let mut tasks = Vec::new();
    for r in 0..REPLICAS {
        tasks.push(tokio::spawn(async move {
            let replica = format!("tablet-{r}");
            let t = token(&replica, Some("acme"));
            let mut acked = Vec::new();
            for k in 1..=BATCHES {
                let ts = 1_700_000_000_000 + k * 10 + r as u64; // device clocks disagree a little
                let body = batch(
                    &replica,
                    json!({ replica.clone(): k }),
                    ts,
                    json!([
                        set(&format!("/by/{replica}/n{k}"), json!(k)),
                        set("/shared", json!(format!("{replica}-{k}")))
                    ]),
                );
                let key = format!("{replica}-{k}");
                // Alternate hosts; retry the same key on the other host if one fails.
                let mut reply =
                    post(fronts[(r + k as usize) % 2], &t, "HOT", Some(&key), &body).await;
                if reply.status != 200 {
                    reply = post(
                        fronts[(r + k as usize + 1) % 2],
                        &t,
                        "HOT",
                        Some(&key),
                        &body,
                    )
                    .await;
                }
                assert_eq!(
                    reply.status,
                    200,
                    "{}",
                    String::from_utf8_lossy(&reply.body)
                );
                acked.push(body);
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), REPLICAS * BATCHES as usize);

    // The reference: the same batches merged in one causal order by the pure merge.
    let mut reference = firemode_merge::SessionState::default();
    for body in &acked {
        let meta = &body["_sync_meta"];
        let changes = serde_json::from_value(body["changes"].clone()).unwrap();
        let batch = firemode_merge::Batch {
            replica_id: meta["replica_id"].as_str().unwrap().to_string(),
            replica_named: true,
            clock: serde_json::from_value(meta["vector_clock"].clone()).unwrap(),
            timestamp_ms: meta["timestamp"].as_u64().unwrap(),
            changes,
        };
        reference.apply(&batch).unwrap();
    }
    let t = token("reader", Some("acme"));
    let (da, db_) = (
        document(a.front, &t, "HOT").await,
        document(b.front, &t, "HOT").await,
    );
    assert_eq!(da, db_, "both hosts read the same session");
    assert_eq!(da["document"], reference.document());
    assert_eq!(
        da["vector_clock"],
        serde_json::to_value(reference.clock()).unwrap()
    );
    for r in 0..REPLICAS {
        assert_eq!(da["vector_clock"][format!("tablet-{r}")], BATCHES);
        assert_eq!(
            da["document"]["by"][format!("tablet-{r}")]
                .as_object()
                .unwrap()
                .len(),
            BATCHES as usize
        );
    }
}

/// A duplicate that arrives while the first is in flight waits for it and gets its replay:
/// the batch is applied exactly once.
async fn check_concurrent_duplicates(sys: &TestSystem) {
    let t = token("tablet-5", Some("acme"));
    let body = json!({"changes": [set("/count", json!(1))], "_sync_meta": {"vector_clock": {}}});
    let front = sys.front;
    let sends = (0..8).map(|_| {
        let (t, body) = (t.clone(), body.clone());
        async move { post(front, &t, "DUP", Some("same-key"), &body).await }
    });
    let replies = futures_join_all(sends).await;
    let mut fresh = 0;
    for r in &replies {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["vector_clock"], json!({"tablet-5": 1}));
        if r.header("idempotent-replayed").is_none() {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one request applied the batch");
    assert_eq!(
        document(sys.front, &t, "DUP").await["vector_clock"],
        json!({"tablet-5": 1})
    );
}

async fn futures_join_all<F: std::future::Future<Output = Reply> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<Reply> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_apply_once_on_sqlite() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        ..SystemOptions::default()
    })
    .await;
    check_concurrent_duplicates(&sys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_apply_once_on_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        database_url: Some(db.url.clone()),
        ..SystemOptions::default()
    })
    .await;
    check_concurrent_duplicates(&sys).await;
}

#[tokio::test]
async fn idempotency_keys_expire_after_the_ttl() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("sync.idempotency_ttl", "2s".into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let body = batch(
        "tablet-1",
        json!({"tablet-1": 1}),
        1_000,
        json!([set("/a", json!(1))]),
    );
    assert_eq!(
        post(sys.front, &t, "TTL", Some("k"), &body).await.status,
        200
    );
    let replay = post(sys.front, &t, "TTL", Some("k"), &body).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // The TTL is the behaviour under test: wait past it.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let later = post(sys.front, &t, "TTL", Some("k"), &body).await;
    assert_eq!(later.status, 200);
    assert_eq!(later.header("idempotent-replayed"), None, "the key expired");
    assert_eq!(
        later.json()["applied"],
        0,
        "the dot is still a duplicate: nothing re-applied"
    );
    // An expired key may now carry another request.
    let other = batch(
        "tablet-1",
        json!({"tablet-1": 2}),
        2_000,
        json!([set("/a", json!(2))]),
    );
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        post(sys.front, &t, "TTL", Some("k"), &other).await.status,
        200
    );
    assert_eq!(
        document(sys.front, &t, "TTL").await["document"],
        json!({"a": 2})
    );
}
