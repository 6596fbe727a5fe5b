//! A session whose stored rows do not load (a hand edit, a disk fault): its requests answer
//! 500 `session-unreadable` and change nothing, every other session keeps working, and the
//! workers stay: a restart cannot fix stored data, so those 500s do not count against an
//! instance (`supervisor.traffic_failure_threshold`), however many a client sends.

use firemode_tests::{request, token, SystemOptions, TestSystem};
use http::Method;
use serde_json::json;

#[tokio::test]
async fn an_unreadable_session_fails_alone_and_replaces_no_worker() {
    let Some((db, sys)) = TestSystem::start_on_postgres(SystemOptions {
        sync_instances: 2,
        set: vec![("supervisor.traffic_failure_threshold", 3.into())],
        ..SystemOptions::default()
    })
    .await
    else {
        return;
    };
    let t = token("tech", Some("acme"));
    let auth = format!("Bearer {t}");
    let post = |session: &'static str, key: &'static str| {
        let auth = auth.clone();
        async move {
            let body = json!({"changes": [{"op": "set", "path": "/a", "value": 1}],
                              "_sync_meta": {"replica_id": key}});
            request(
                sys.front,
                Method::POST,
                &format!("/v1/tests/sessions/{session}/results"),
                &[("authorization", &auth), ("idempotency-key", key)],
                body.to_string(),
            )
            .await
            .expect("answers")
        }
    };
    let get = |session: &'static str| {
        let auth = auth.clone();
        async move {
            request(
                sys.front,
                Method::GET,
                &format!("/v1/tests/sessions/{session}"),
                &[("authorization", &auth)],
                String::new(),
            )
            .await
            .expect("answers")
        }
    };
    assert_eq!(post("GOOD", "k-good").await.status, 200);
    assert_eq!(post("BAD", "k-bad").await.status, 200);
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE sync_sessions SET state = '{\"clock\": broken' WHERE session_id = 'BAD'",
            &[],
        )
        .await
        .expect("corrupt");
    let pids = sys.worker_pids().await;

    for round in 0..10 {
        let reply = get("BAD").await;
        let problem = reply.problem(500);
        assert_eq!(
            problem["type"], "tag:firemode,2026:problem/session-unreadable",
            "{problem}"
        );
        assert!(
            reply.header("x-firemode-data-fault").is_none(),
            "the worker's mark reached the client"
        );
        let merge = post("BAD", if round % 2 == 0 { "k-bad-2" } else { "k-bad-3" }).await;
        assert_eq!(merge.problem(500)["type"], problem["type"]);
    }
    let good = get("GOOD").await;
    assert_eq!(good.status, 200);
    assert_eq!(good.json()["document"], json!({"a": 1}));
    assert_eq!(post("GOOD", "k-good-2").await.status, 200);
    assert_eq!(sys.worker_pids().await, pids, "a worker was replaced");
    assert!(
        !sys.logs().contains("real requests failed in a row"),
        "a verdict was passed on a worker:\n{}",
        sys.logs()
    );
}
