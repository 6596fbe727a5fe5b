//! Observability: one Prometheus scrape shows the whole system with bounded labels.

use firemode_tests::{request, token, SystemOptions, TestSystem};
use http::Method;

#[tokio::test]
async fn one_scrape_shows_front_supervisor_and_workers_with_route_templates() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let auth = format!("Bearer {t}");
    let classify = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;
    assert_eq!(
        sys.post("/v1/classify", &t, classify).await.unwrap().status,
        200
    );
    // Many sessions: none of their ids may become a label.
    for i in 0..30 {
        let body = format!(
            r#"{{"changes":[{{"op":"set","path":"/a","value":{i}}}],"_sync_meta":{{"vector_clock":{{"t-{i}":1}},"replica_id":"t-{i}"}}}}"#
        );
        let r = request(
            sys.front,
            Method::POST,
            &format!("/v1/tests/sessions/secret-session-{i}/results"),
            &[
                ("authorization", &auth),
                ("idempotency-key", &format!("k{i}")),
                ("x-client-type", "tablet"),
            ],
            body,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let g = request(
            sys.front,
            Method::GET,
            &format!("/v1/tests/sessions/secret-session-{i}/offline_bundle"),
            &[("authorization", &auth)],
            "",
        )
        .await
        .unwrap();
        assert_eq!(g.status, 200);
    }
    // A conflict, so crdt_conflicts_total moves.
    for (replica, ts) in [("c-1", 1000), ("c-2", 2000)] {
        let body = format!(
            r#"{{"changes":[{{"op":"set","path":"/x","value":"{replica}"}}],"_sync_meta":{{"vector_clock":{{"{replica}":1}},"replica_id":"{replica}","timestamp":{ts}}}}}"#
        );
        let merged = request(
            sys.front,
            Method::POST,
            "/v1/tests/sessions/C/results",
            &[("authorization", &auth), ("idempotency-key", replica)],
            body,
        )
        .await
        .unwrap();
        assert_eq!(merged.status, 200, "{:?}", merged.body);
    }
    // And a 404 through the front.
    request(
        sys.front,
        Method::GET,
        "/v1/unknown/route/12345",
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap()
    .problem(404);

    // Every instance up (readiness needs only one per kind) before the scrape is read.
    sys.wait_all_ready().await;
    let scrape = sys.admin_get("/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(scrape
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(scrape.body.to_vec()).unwrap();
    for series in [
        "http_request_duration_seconds_bucket",
        "crdt_conflicts_total",
        "sync_latency_seconds_bucket",
        "offline_bundle_bytes_bucket",
        "active_connections",
        "firemode_worker_up",
        "firemode_worker_restarts_total",
        "firemode_worker_backoff",
        "firemode_health_check_failures_total",
        "firemode_upstream_retries_total",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    assert!(
        text.contains(r#"endpoint="/v1/tests/sessions/{id}/results""#),
        "{text}"
    );
    assert!(text.contains(r#"endpoint="/v1/tests/sessions/{id}/offline_bundle""#));
    assert!(text.contains(r#"endpoint="/v1/classify""#));
    assert!(text.contains(r#"endpoint="unmatched""#));
    assert!(
        !text.contains("secret-session"),
        "a raw session id leaked into a label"
    );
    assert!(!text.contains("12345"), "a raw path leaked into a label");
    for (kind, instance) in [
        ("classify", "0"),
        ("classify", "1"),
        ("sync", "0"),
        ("sync", "1"),
    ] {
        assert!(
            text.contains(&format!(
                r#"firemode_worker_up{{kind="{kind}",instance="{instance}"}} 1"#
            )),
            "{kind}/{instance} not up in:\n{text}"
        );
    }
    // Worker series carry the worker's kind and instance.
    assert!(
        text.contains(r#"sync_latency_seconds_count{kind="sync",instance="#),
        "{text}"
    );
    assert!(text.contains(r#"client_type="tablet""#));
    let conflicts: f64 = text
        .lines()
        .filter(|l| l.starts_with("crdt_conflicts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(conflicts, 1.0, "{text}");
    // Sub-millisecond buckets exist.
    assert!(text.contains(r#"le="0.0005""#));
    // One TYPE line per family, even with two sync workers.
    assert_eq!(
        text.matches("# TYPE sync_latency_seconds histogram")
            .count(),
        1
    );
}

/// A known W3C trace context sent by the "client".
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn otel_env(url: &str) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), url.to_string()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
        // Export promptly so the test does not wait for the default 5 s batch delay.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]
}

async fn spans_of(
    receiver: &firemode_tests::OtlpReceiver,
    trace: &str,
    want: impl Fn(&[firemode_tests::ReceivedSpan]) -> bool,
) -> Vec<firemode_tests::ReceivedSpan> {
    firemode_tests::eventually(
        "the spans of the trace to arrive",
        std::time::Duration::from_secs(20),
        || {
            let spans = receiver.trace(trace);
            let ok = want(&spans);
            async move { ok.then_some(spans) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_front_the_worker_and_the_store() {
    let (receiver, url) = firemode_tests::OtlpReceiver::start().await;
    let sys = TestSystem::start(SystemOptions {
        env: otel_env(&url),
        ..SystemOptions::default()
    })
    .await;
    let t = token("tablet-1", Some("acme"));
    let auth = format!("Bearer {t}");
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");

    // Classify: front → classify worker.
    let r = request(
        sys.front,
        Method::POST,
        "/v1/classify",
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("x-request-id", "trace-req-1"),
        ],
        r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let spans = spans_of(&receiver, TRACE_ID, |s| {
        s.iter().any(|x| x.service == "firemode")
            && s.iter().any(|x| x.service == "firemode-classify")
    })
    .await;
    let front = spans.iter().find(|s| s.service == "firemode").unwrap();
    let worker = spans
        .iter()
        .find(|s| s.service == "firemode-classify")
        .unwrap();
    assert_eq!(
        front.parent_span_id, CLIENT_SPAN,
        "the front continues the client's trace"
    );
    assert_eq!(
        worker.parent_span_id, front.span_id,
        "the worker's span is the front span's child"
    );
    assert_eq!(front.name, "/v1/classify");
    assert_eq!(front.attribute("request_id"), Some("trace-req-1"));
    assert_eq!(worker.attribute("request_id"), Some("trace-req-1"));

    // Sync: front → sync worker → store.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace2}-{CLIENT_SPAN}-01");
    let r = request(
        sys.front,
        Method::POST,
        "/v1/tests/sessions/T1/results",
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("idempotency-key", "trace-1"),
        ],
        r#"{"changes":[{"op":"set","path":"/a","value":1}],"_sync_meta":{"vector_clock":{}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // Each process exports on its own schedule: wait for all three spans.
    let spans = spans_of(&receiver, trace2, |s| {
        s.iter().any(|x| x.name == "store.merge_session")
            && s.iter().any(|x| x.service == "firemode")
            && s.iter()
                .any(|x| x.service == "firemode-sync" && x.name == "sync")
    })
    .await;
    let front = spans.iter().find(|s| s.service == "firemode").unwrap();
    let worker = spans
        .iter()
        .find(|s| s.service == "firemode-sync" && s.name == "sync")
        .unwrap();
    let store = spans
        .iter()
        .find(|s| s.name == "store.merge_session")
        .unwrap();
    assert_eq!(front.parent_span_id, CLIENT_SPAN);
    assert_eq!(worker.parent_span_id, front.span_id);
    assert_eq!(
        store.parent_span_id, worker.span_id,
        "store spans sit inside the worker's"
    );
    assert_eq!(store.service, "firemode-sync");
    assert_eq!(store.attribute("db.system"), Some("sqlite"));
}

#[tokio::test]
async fn a_dead_collector_costs_no_errors() {
    // Nothing listens on port 1 of loopback.
    let sys = TestSystem::start(SystemOptions {
        env: otel_env("http://127.0.0.1:1"),
        ..SystemOptions::default()
    })
    .await;
    let t = token("t", None);
    for _ in 0..50 {
        let r = sys
            .post(
                "/v1/classify",
                &t,
                r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // The lost spans are counted, and said once in the log.
    let admin = sys.admin;
    firemode_tests::eventually(
        "export failures to be counted",
        std::time::Duration::from_secs(20),
        || async move {
            let scrape = request(admin, Method::GET, "/metrics", &[], "")
                .await
                .ok()?;
            let text = String::from_utf8_lossy(&scrape.body).into_owned();
            text.lines()
                .filter(|l| l.starts_with("firemode_span_export_failures_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .any(|n| n > 0.0)
                .then_some(())
        },
    )
    .await;
    assert!(sys.logs().contains("span export failed"));
}
