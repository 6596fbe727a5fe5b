//! Tenants are exact (design §3): the `org` claim byte for byte, or the `sub` without one;
//! odd claims are 401; `nbf` is honoured; a worker never serves a request whose identity it
//! cannot read. On SQLite and on PostgreSQL.

use bytes::Bytes;
use firemode_tests::{request, token_claims, unix_now, Reply, SystemOptions, TestSystem};
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

fn claims(sub: &str, org: Option<&str>) -> Value {
    let mut c = json!({"sub": sub, "exp": unix_now() + 3600});
    if let Some(org) = org {
        c["org"] = org.into();
    }
    c
}

async fn write(sys: &TestSystem, token: &str, session: &str, key: &str, value: &str) -> Reply {
    let body = json!({"changes": [{"op": "set", "path": "/owner", "value": value}]});
    request(
        sys.front,
        Method::POST,
        &format!("/v1/tests/sessions/{session}/results"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("idempotency-key", key),
        ],
        body.to_string(),
    )
    .await
    .unwrap()
}

async fn read(sys: &TestSystem, token: &str, session: &str) -> Reply {
    request(
        sys.front,
        Method::GET,
        &format!("/v1/tests/sessions/{session}"),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
    .unwrap()
}

/// Every one of these is its own tenant: each writes session S1 and reads back only its own.
async fn every_tenant_sees_only_its_own_sessions(sys: &TestSystem) {
    let tenants = [
        ("u", Some("café")),
        ("u", Some("crème")),
        ("u", Some("cafe\u{301}")), // é decomposed: another byte string, another tenant
        ("café", None),
        ("u", None),
        ("u", Some("acme")),
        ("u", Some(" acme")),
        ("u", Some("acme ")),
        ("u", Some("Acme")),
        ("acme", None),
        ("u", Some("org:acme")),
        ("u", Some("a.b")),
        ("🔥", Some("租户")),
    ];
    for (i, (sub, org)) in tenants.iter().enumerate() {
        let t = token_claims(&claims(sub, *org));
        let r = write(sys, &t, "S1", &format!("k{i}"), &format!("{sub}/{org:?}")).await;
        assert_eq!(r.status, 200, "{sub}/{org:?}: {:?}", r.body);
        assert_eq!(
            r.json()["vector_clock"],
            json!({ *sub: 1 }),
            "{sub}/{org:?}"
        );
    }
    for (sub, org) in tenants {
        let t = token_claims(&claims(sub, org));
        let r = read(sys, &t, "S1").await;
        assert_eq!(r.status, 200, "{sub}/{org:?}: {:?}", r.body);
        assert_eq!(
            r.json()["document"],
            json!({"owner": format!("{sub}/{org:?}")}),
            "{sub}/{org:?} read another tenant's session"
        );
    }
}

/// Control characters and empty claims are 401 problems; nothing reaches a worker.
async fn odd_claims_are_refused(sys: &TestSystem) {
    let now = unix_now();
    let cases = [
        (
            "org with a tab",
            json!({"sub": "u", "org": "acme\t", "exp": now + 60}),
        ),
        (
            "org with a newline",
            json!({"sub": "u", "org": "ac\nme", "exp": now + 60}),
        ),
        (
            "org with NUL",
            json!({"sub": "u", "org": "acme\u{0}", "exp": now + 60}),
        ),
        (
            "org with C1",
            json!({"sub": "u", "org": "acme\u{85}", "exp": now + 60}),
        ),
        ("empty org", json!({"sub": "u", "org": "", "exp": now + 60})),
        ("empty sub", json!({"sub": "", "exp": now + 60})),
        ("sub with DEL", json!({"sub": "u\u{7f}", "exp": now + 60})),
        (
            "org not a string",
            json!({"sub": "u", "org": 7, "exp": now + 60}),
        ),
        (
            "sub too long",
            json!({"sub": "x".repeat(257), "exp": now + 60}),
        ),
        (
            "nbf in an hour",
            json!({"sub": "u", "nbf": now + 3600, "exp": now + 7200}),
        ),
    ];
    for (what, c) in cases {
        let r = read(sys, &token_claims(&c), "S1").await;
        r.problem(401);
        assert!(r.header("www-authenticate").is_some(), "{what}");
    }
    // A token already valid by its nbf passes; NumericDates may be fractional.
    let ok = json!({"sub": "u", "nbf": now - 60, "exp": now + 60});
    assert_eq!(read(sys, &token_claims(&ok), "S1").await.status, 200);
    let fractional = json!({"sub": "u", "nbf": now as f64 - 0.5, "exp": now as f64 + 60.25});
    assert_eq!(
        read(sys, &token_claims(&fractional), "S1").await.status,
        200
    );
    let expired = json!({"sub": "u", "exp": now as f64 - 120.5});
    read(sys, &token_claims(&expired), "S1").await.problem(401);
}

#[tokio::test]
async fn tenants_are_exact_on_sqlite() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    every_tenant_sees_only_its_own_sessions(&sys).await;
    odd_claims_are_refused(&sys).await;
}

#[tokio::test]
async fn tenants_are_exact_on_postgres() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    every_tenant_sees_only_its_own_sessions(&sys).await;
    odd_claims_are_refused(&sys).await;
}

/// GET `path` on a worker's own socket, with `headers`: what a worker does when something
/// other than the front talks to it.
async fn worker_get(socket: &std::path::Path, path: &str, headers: &[(&str, &[u8])]) -> u16 {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder().uri(path).header("host", "worker");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn a_worker_refuses_an_identity_it_cannot_read() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    // A session that a fallback tenant (sub:u) would find.
    let t = token_claims(&claims("u", None));
    assert_eq!(write(&sys, &t, "S1", "k", "u").await.status, 200);
    let socket = std::fs::read_dir(sys.dir.join("run"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("sync") && name.ends_with(".sock")
        })
        .expect("a sync worker socket in the runtime dir");
    let path = "/v1/tests/sessions/S1";
    for (what, headers) in [
        ("no identity", vec![]),
        ("the old headers", vec![("x-firemode-sub", &b"u"[..])]),
        (
            "undecodable",
            vec![("x-firemode-identity", &b"not base64!"[..])],
        ),
        (
            "three parts",
            vec![("x-firemode-identity", &b"dQ.dQ.dQ"[..])],
        ),
        (
            "non-UTF-8 org",
            vec![("x-firemode-identity", &b"dQ.gA"[..])],
        ),
        (
            "raw non-ASCII",
            vec![("x-firemode-identity", "café".as_bytes())],
        ),
    ] {
        assert_eq!(worker_get(&socket, path, &headers).await, 401, "{what}");
    }
    // The encoding the front uses is accepted (base64url of "u").
    assert_eq!(
        worker_get(&socket, path, &[("x-firemode-identity", b"dQ")]).await,
        200
    );
}
