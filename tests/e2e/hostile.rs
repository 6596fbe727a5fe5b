//! Hostile input at the front: never a 5xx, never a worker crash, other clients keep being
//! served. Plus poison requests and identity headers that clients try to forge.

use firemode_tests::{eventually, request, token, SystemOptions, TestSystem};
use http::Method;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: &str = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;

/// Writes raw bytes and reads what comes back until the server closes or goes quiet.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every HTTP status line in a raw answer.
fn statuses(answer: &str) -> Vec<u16> {
    answer
        .lines()
        .filter_map(|l| l.strip_prefix("HTTP/1.1 "))
        .filter_map(|l| l.get(..3)?.parse().ok())
        .collect()
}

fn no_5xx(what: &str, answer: &str) {
    for s in statuses(answer) {
        assert!(s < 500, "{what}: answered {s}:\n{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_never_gets_a_5xx_and_never_crashes_a_worker() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("server.header_read_timeout", "1s".into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let auth = format!("Bearer {t}");
    let f = sys.front;

    // Deeply nested JSON, to both kinds.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    sys.post("/v1/classify", &t, &deep)
        .await
        .unwrap()
        .problem(400);
    let r = request(
        f,
        Method::POST,
        "/v1/tests/sessions/H1/results",
        &[("authorization", &auth), ("idempotency-key", "deep")],
        deep.clone(),
    )
    .await
    .unwrap();
    r.problem(400);
    let nested_value = format!(
        r#"{{"changes":[{{"op":"set","path":"/a","value":{}1{}}}]}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let r = request(
        f,
        Method::POST,
        "/v1/tests/sessions/H1/results",
        &[("authorization", &auth), ("idempotency-key", "deep2")],
        nested_value,
    )
    .await
    .unwrap();
    assert!(r.status.as_u16() < 500, "{}", r.status);
    // Huge strings and arrays within the body limit.
    let huge_array = format!("[{}0]", "0,".repeat(400_000));
    sys.post("/v1/classify", &t, &huge_array)
        .await
        .unwrap()
        .problem(400);
    let huge_string = format!(
        r#"{{"item_code":"{}","observed_condition":"x"}}"#,
        "A".repeat(900_000)
    );
    sys.post("/v1/classify", &t, &huge_string)
        .await
        .unwrap()
        .problem(404);
    let big_value = format!(
        r#"{{"changes":[{{"op":"set","path":"/blob","value":"{}"}}]}}"#,
        "b".repeat(900_000)
    );
    let r = request(
        f,
        Method::POST,
        "/v1/tests/sessions/H2/results",
        &[("authorization", &auth), ("idempotency-key", "big")],
        big_value,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);

    // Header floods and overlong headers.
    let mut flood = String::from("GET /v1/classify HTTP/1.1\r\nHost: x\r\n");
    for i in 0..500 {
        flood.push_str(&format!("x-flood-{i}: {i}\r\n"));
    }
    flood.push_str("\r\n");
    no_5xx("header flood", &raw(f, flood.as_bytes()).await);
    let long = format!(
        "GET /v1/classify HTTP/1.1\r\nHost: x\r\nx-long: {}\r\n\r\n",
        "a".repeat(1_000_000)
    );
    no_5xx("overlong header", &raw(f, long.as_bytes()).await);

    // Not HTTP at all; a TLS ClientHello on the plain port.
    no_5xx(
        "garbage",
        &raw(f, b"\x00\x01\x02 this is not http\r\n\r\n").await,
    );
    let client_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x00, 0x01, 0x02, 0x03,
    ];
    no_5xx("TLS hello", &raw(f, client_hello).await);

    // Smuggling attempts: CL and TE together, conflicting CLs.
    let smuggle = format!(
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/tests/sessions/X HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let answer = raw(f, smuggle.as_bytes()).await;
    no_5xx("CL+TE", &answer);
    assert!(statuses(&answer).len() <= 2, "{answer}");
    let conflicting = format!(
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 5\r\nContent-Length: 60\r\n\r\n{BODY}"
    );
    let answer = raw(f, conflicting.as_bytes()).await;
    no_5xx("conflicting CL", &answer);
    assert!(statuses(&answer).iter().all(|s| *s == 400), "{answer}");

    // Hundreds of idle and slow (slowloris) connections while others are served.
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(f).await.unwrap();
        if i % 3 == 0 {
            let _ = s
                .write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await;
        }
        idle.push(s);
    }
    for _ in 0..20 {
        assert_eq!(
            sys.post("/v1/classify", &t, BODY).await.unwrap().status,
            200
        );
    }
    // The slow ones are cut off by server.header_read_timeout (1 s here).
    let mut slow = idle.swap_remove(0);
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "a slowloris connection must be closed");
    drop(idle);

    // Nothing crashed.
    for kind in ["classify", "sync"] {
        for inst in sys.instances(kind).await {
            assert_eq!(inst["restarts"], 0, "{kind} restarted: {inst}");
        }
    }
    assert_eq!(
        sys.post("/v1/classify", &t, BODY).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn forged_identity_headers_never_reach_a_worker() {
    let sys = TestSystem::start(SystemOptions {
        set: firemode_tests::fixture_worker("sync", &["--echo-headers"]),
        ..SystemOptions::default()
    })
    .await;
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    let r = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/ID1",
        &[
            ("authorization", &auth),
            ("x-firemode-org", "evil-corp"),
            ("x-firemode-sub", "mallory"),
            ("x-firemode-admin", "true"),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json();
    // base64url("tablet-1") "." base64url("acme"): the verified identity, nothing forged.
    assert_eq!(seen["x-firemode-identity"], "dGFibGV0LTE.YWNtZQ");
    assert!(seen.get("x-firemode-org").is_none(), "{seen}");
    assert!(seen.get("x-firemode-sub").is_none(), "{seen}");
    assert!(seen.get("x-firemode-admin").is_none(), "{seen}");
    assert!(
        seen.get("authorization").is_none(),
        "the token stays at the front: {seen}"
    );
    // Without org in the token, no org header at all (not the forged one).
    let auth = format!("Bearer {}", token("tablet-2", None));
    let seen = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/ID1",
        &[
            ("authorization", &auth),
            ("x-firemode-org", "evil-corp"),
            ("x-firemode-identity", "bWFsbG9yeQ.ZXZpbC1jb3Jw"),
        ],
        "",
    )
    .await
    .unwrap()
    .json();
    assert!(seen.get("x-firemode-org").is_none(), "{seen}");
    assert_eq!(seen["x-firemode-identity"], "dGFibGV0LTI", "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_keeps_crashing_workers_is_refused() {
    let sys = TestSystem::start(SystemOptions {
        set: [
            firemode_tests::fixture_worker(
                "classify",
                &["--status", "200", "--crash-on", "POISON"],
            ),
            vec![("server.poison_threshold", 3.into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let t = token("t", None);
    let poison = r#"{"item_code":"POISON","observed_condition":"x"}"#;
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = sys.post("/v1/classify", &t, poison).await.unwrap();
        answers.push(r.status.as_u16());
        if r.status == 503 {
            let p = r.problem(503);
            assert!(p["type"].as_str().unwrap().ends_with("poison-request"));
            assert!(p["fingerprint"].as_str().is_some());
            let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=600).contains(&retry), "Retry-After {retry}");
            break;
        }
    }
    assert_eq!(answers.last(), Some(&503), "{answers:?}");
    let restarts = |v: &[serde_json::Value]| {
        v.iter()
            .map(|i| i["restarts"].as_u64().unwrap())
            .sum::<u64>()
    };
    // Each strike was a worker exit; the supervisor may notice the last one a moment after
    // the front did, so wait for it rather than read the count at once.
    let before = eventually(
        "three restarts, both instances back",
        Duration::from_secs(15),
        || async {
            let c = sys.instances("classify").await;
            let n = restarts(&c);
            (n >= 3 && c.iter().all(|i| i["state"] == "ready")).then_some(n)
        },
    )
    .await;
    // Refused again, without reaching a worker: no new restarts.
    let again = sys.post("/v1/classify", &t, poison).await.unwrap();
    again.problem(503);
    assert!(again.header("retry-after").is_some());
    assert_eq!(restarts(&sys.instances("classify").await), before);
    // Other requests are served.
    let ok = sys.post("/v1/classify", &t, BODY).await.unwrap();
    assert_eq!(ok.status, 200);
    assert!(sys.logs().contains("poison request"));
    let metrics = String::from_utf8_lossy(&sys.admin_get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("firemode_poison_requests_total"),
        "{metrics}"
    );
}
