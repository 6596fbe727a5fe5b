//! Faults under load: a SIGKILL storm, a drain while requests flow, a database outage.
//! Each reports what it measured (requests sent, failed, writes acknowledged, lost); see
//! RELIABILITY.md.

use firemode_tests::{
    eventually, request, token, Reply, SystemOptions, TestSystem, ThrowawayCluster,
};
use http::Method;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CLASSIFY: &str = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;

/// Classify in a loop until stopped: (sent, failures).
fn classify_load(
    front: SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let auth = format!("Bearer {}", token("loader", None));
        let (mut sent, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            sent += 1;
            match request(
                front,
                Method::POST,
                "/v1/classify",
                &[("authorization", &auth)],
                CLASSIFY,
            )
            .await
            {
                Ok(r) if r.status == 200 => {}
                Ok(r) => {
                    failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        (sent, failures)
    })
}

/// One tablet writing batches `1..` to `session`, retrying each with its key until it is
/// acknowledged; returns the acknowledged sequence numbers and how many attempts failed.
fn tablet(
    front: SocketAddr,
    replica: String,
    session: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u64>, usize)> {
    tokio::spawn(async move {
        let auth = format!("Bearer {}", token(&replica, Some("acme")));
        let (mut acked, mut failed_attempts) = (Vec::new(), 0);
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            k += 1;
            let body = json!({"changes": [{"op": "set", "path": format!("/{replica}/n{k}"), "value": k}],
                              "_sync_meta": {"vector_clock": {replica.clone(): k}, "replica_id": replica}});
            let key = format!("{replica}-{k}");
            let mut attempts = 0;
            loop {
                attempts += 1;
                let r = request(
                    front,
                    Method::POST,
                    &format!("/v1/tests/sessions/{session}/results"),
                    &[("authorization", &auth), ("idempotency-key", &key)],
                    body.to_string(),
                )
                .await;
                match r {
                    Ok(r) if r.status == 200 => {
                        assert_eq!(
                            r.json()["vector_clock"][&replica],
                            k,
                            "acknowledged with its own dot"
                        );
                        break;
                    }
                    _ => {
                        failed_attempts += 1;
                        assert!(attempts < 200, "batch {key} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            acked.push(k);
        }
        (acked, failed_attempts)
    })
}

async fn document(front: SocketAddr, session: &str) -> Value {
    let auth = format!("Bearer {}", token("reader", Some("acme")));
    let r: Reply = request(
        front,
        Method::GET,
        &format!("/v1/tests/sessions/{session}"),
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    r.json()
}

fn check_every_ack_is_in(doc: &Value, replica: &str, acked: &[u64]) {
    assert_eq!(
        doc["vector_clock"][replica],
        acked.len() as u64,
        "{replica}: clock"
    );
    for k in acked {
        assert_eq!(
            doc["document"][replica][format!("n{k}")],
            *k,
            "{replica}: acknowledged write {k} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_storm_loses_nothing_and_fails_no_classify_request() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 2,
        sync_instances: 2,
        ..SystemOptions::default()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let classify = [
        classify_load(sys.front, stop.clone()),
        classify_load(sys.front, stop.clone()),
    ];
    let tablets: Vec<_> = (0..3)
        .map(|i| tablet(sys.front, format!("tab-{i}"), "STORM", stop.clone()))
        .collect();

    // A random ready instance SIGKILLed every second, for 10 seconds.
    let mut killed = 0;
    for round in 0..10u64 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = sys.admin_get("/status").await.json();
        let ready: Vec<u64> = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "ready")
            .filter_map(|i| i["pid"].as_u64())
            .collect();
        if ready.is_empty() {
            continue;
        }
        let victim = ready[(round as usize * 7 + 3) % ready.len()];
        if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut classify_sent = 0;
    for c in classify {
        let (sent, failures) = c.await.unwrap();
        classify_sent += sent;
        assert!(
            failures.is_empty(),
            "{} classify requests failed: {failures:?}",
            failures.len()
        );
    }
    let mut acked_total = 0;
    let mut retried = 0;
    let mut acks = Vec::new();
    for (i, t) in tablets.into_iter().enumerate() {
        let (acked, failed) = t.await.unwrap();
        acked_total += acked.len();
        retried += failed;
        acks.push((format!("tab-{i}"), acked));
    }
    let doc = document(sys.front, "STORM").await;
    for (replica, acked) in &acks {
        check_every_ack_is_in(&doc, replica, acked);
    }
    eprintln!(
        "SIGKILL storm: {killed} kills; classify sent {classify_sent}, failed 0; sync batches acknowledged {acked_total} (attempts retried {retried}), lost 0"
    );
    assert!(killed >= 8, "the storm happened");
    assert!(acked_total > 0 && classify_sent > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_accepted_request_and_exits_zero() {
    let mut sys = TestSystem::start(SystemOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let front = sys.front;
    // Each client opens a new connection per request and counts answers. A connection
    // refused once the listener is closed is not an accepted request (the client stops
    // there); anything else that is not a 200 — a 4xx, a 5xx, a reset, a broken pipe, an
    // EOF before the answer — is a failure.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let auth = format!("Bearer {}", token("t", None));
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match request(
                        front,
                        Method::POST,
                        "/v1/classify",
                        &[("authorization", &auth)],
                        CLASSIFY,
                    )
                    .await
                    {
                        Ok(r) if r.status == 200 => {
                            ok += 1;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failed.push(format!("{}", r.status)),
                        Err(e) => {
                            let refused = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                                io.kind() == std::io::ErrorKind::ConnectionRefused
                            });
                            if refused {
                                break;
                            }
                            failed.push(format!("{e:#}"));
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    eventually("traffic to flow", Duration::from_secs(15), || {
        let n = answered.load(Ordering::Relaxed);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    sys.signal(Signal::SIGTERM);
    let started = std::time::Instant::now();
    let status = sys.wait_exit(Duration::from_secs(15)).await;
    let took = started.elapsed();
    // Clients stop on a refused connect; `stop` is the backstop for one whose SYN the closed
    // listener never answers.
    let backstop = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    backstop.abort();
    eprintln!(
        "drain under load: {ok} answered, {} failed, exit {:?} after {took:?}",
        failed.len(),
        status.code()
    );
    assert_eq!(status.code(), Some(0), "{}", sys.logs());
    assert!(took < Duration::from_secs(10), "within the drain timeout");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gives_fast_503s_then_heals_without_losing_writes() {
    let Some(cluster) = ThrowawayCluster::start() else {
        return;
    };
    let sys = TestSystem::start(SystemOptions {
        database_url: Some(cluster.url()),
        sync_instances: 2,
        ..SystemOptions::default()
    })
    .await;
    let t = token("tab-1", Some("acme"));
    let auth = format!("Bearer {t}");
    let front = sys.front;
    let write = |k: u64| {
        let body = json!({"changes": [{"op": "set", "path": format!("/tab-1/n{k}"), "value": k}],
                          "_sync_meta": {"vector_clock": {"tab-1": k}, "replica_id": "tab-1"}});
        let auth = auth.clone();
        async move {
            request(
                front,
                Method::POST,
                "/v1/tests/sessions/OUT/results",
                &[
                    ("authorization", &auth),
                    ("idempotency-key", &format!("out-{k}")),
                ],
                body.to_string(),
            )
            .await
            .unwrap()
        }
    };
    let mut acked = Vec::new();
    for k in 1..=5 {
        assert_eq!(write(k).await.status, 200);
        acked.push(k);
    }

    // Both sync instances in service first (readiness needs only one per kind): one still
    // starting when the database stops would stay "starting", never "unhealthy".
    eventually(
        "every sync instance ready",
        Duration::from_secs(20),
        || async {
            let s = sys.instances("sync").await;
            s.iter().all(|i| i["state"] == "ready").then_some(())
        },
    )
    .await;
    cluster.stop();
    // The workers notice and report not ready; requests get a fast 503, never a hang.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = sys.instances("sync").await;
        if s.iter().all(|i| i["state"] == "unhealthy") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sync instances did not report not ready: {s:?}\n{}",
            sys.logs()
                .lines()
                .filter(|l| l.contains("sync"))
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut outage_503 = 0;
    for k in 6..=10 {
        let started = std::time::Instant::now();
        let r = write(k).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        r.problem(503);
        assert!(
            took < Duration::from_secs(2),
            "a 503 during the outage took {took:?}"
        );
        outage_503 += 1;
    }
    // Classify answers from memory through the outage.
    assert_eq!(
        sys.post("/v1/classify", &t, CLASSIFY).await.unwrap().status,
        200
    );
    // No crash loop.
    for kind in ["classify", "sync"] {
        for i in sys.instances(kind).await {
            assert_eq!(i["restarts"], 0, "{kind} restarted during the outage: {i}");
        }
    }

    cluster.restart();
    eventually(
        "sync to be ready again",
        Duration::from_secs(20),
        || async {
            let s = sys.instances("sync").await;
            s.iter().all(|i| i["state"] == "ready").then_some(())
        },
    )
    .await;
    for k in 6..=8 {
        assert_eq!(write(k).await.status, 200);
        acked.push(k);
    }
    let doc = document(sys.front, "OUT").await;
    check_every_ack_is_in(&doc, "tab-1", &acked);
    eprintln!("database outage: {} writes acknowledged, {outage_503} fast 503s during the outage, 0 lost, 0 restarts", acked.len());
}
