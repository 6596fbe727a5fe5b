//! Attacks on the front's request path (issue #11 items 4, 5, 6 and 14): slow readers that
//! would pin every worker connection, heavy reads and slow commits that would get healthy
//! workers killed, poison accounting that would lock out innocent readers, and HEAD on the
//! admin and worker routes.

use firemode_tests::{eventually, request, token, Reply, SystemOptions, TestSystem};
use http::Method;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Sum of a Prometheus series' samples over the lines that contain every `filter`.
fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(sys: &TestSystem) -> String {
    String::from_utf8_lossy(&sys.admin_get("/metrics").await.body).into_owned()
}

/// Resident memory of a process in bytes, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn get(sys: &TestSystem, path: &str, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    request(
        sys.front,
        Method::GET,
        path,
        &[("authorization", &auth)],
        "",
    )
    .await
    .expect("front answers")
}

/// Writes one `set` of `value` at `/blob` into `session`.
async fn write_blob(sys: &TestSystem, token: &str, session: &str, value: &str) {
    let auth = format!("Bearer {token}");
    let body = serde_json::json!({
        "changes": [{"op": "set", "path": "/blob", "value": value}],
        "_sync_meta": {"vector_clock": {}}
    })
    .to_string();
    let r = request(
        sys.front,
        Method::POST,
        &format!("/v1/tests/sessions/{session}/results"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            (
                "idempotency-key",
                &format!("blob-{}", rand::random::<u64>()),
            ),
        ],
        body,
    )
    .await
    .expect("front answers");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A client with a 4 KB receive buffer that sends a GET and never reads the answer.
async fn stalled_reader(
    front: std::net::SocketAddr,
    path: &str,
    token: &str,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(front).await.expect("connect");
    let head =
        format!("GET {path} HTTP/1.1\r\nhost: front\r\nauthorization: Bearer {token}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_pin_the_workers_and_are_dropped() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![
            ("server.max_body_bytes", (8 * 1024 * 1024).into()),
            ("server.request_timeout", "10s".into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    let big = token("reader", Some("org-big"));
    write_blob(&sys, &big, "BIG", &"x".repeat(6 * 1024 * 1024)).await;

    // 72 stalled readers of a 6 MB answer (more than the kernel's socket buffers absorb):
    // more than the 64 connections one sync instance takes, and over 400 MB if the front
    // kept every answer in memory.
    let mut stalled = Vec::new();
    for _ in 0..72 {
        stalled.push(stalled_reader(sys.front, "/v1/tests/sessions/BIG", &big).await);
    }
    let session_gets = |text: &str| {
        metric_sum(
            text,
            "http_request_duration_seconds_count",
            &["endpoint=\"/v1/tests/sessions/{id}\"", "method=\"GET\""],
        )
    };
    eventually(
        "the workers answered the first 64 stalled reads",
        Duration::from_secs(60),
        || async { (session_gets(&metrics(&sys).await) >= 64.0).then_some(()) },
    )
    .await;

    // Another tenant's small read is served at once, not after request_timeout (a 504).
    let other = token("someone", Some("org-small"));
    let started = Instant::now();
    let r = get(&sys, "/v1/tests/sessions/SMALL", &other).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the small read waited {:?} behind the stalled readers",
        started.elapsed()
    );

    // Every stalled answer was taken off the worker; the front's memory stays within its
    // budget (64 MiB in memory, the rest spilled) plus generous room for the process.
    eventually(
        "every stalled read answered by a worker",
        Duration::from_secs(60),
        || async { (session_gets(&metrics(&sys).await) >= 72.0).then_some(()) },
    )
    .await;
    let rss = rss_bytes(sys.pid());
    assert!(rss < 200 * 1024 * 1024, "the front holds {} MiB", rss >> 20);
    let spilled: Vec<PathBuf> = std::fs::read_dir(sys.dir.join("run"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    assert!(
        spilled
            .iter()
            .all(|p| !p.to_string_lossy().contains(".answer-")),
        "spill files are unlinked at once: {spilled:?}"
    );

    // A client that takes no bytes for request_timeout is dropped.
    eventually(
        "stalled readers dropped",
        Duration::from_secs(40),
        || async {
            let open = metric_sum(
                &metrics(&sys).await,
                "active_connections",
                &["listener=\"front\""],
            );
            (open <= 1.0).then_some(())
        },
    )
    .await;
    drop(stalled);
    assert_eq!(
        get(&sys, "/v1/tests/sessions/SMALL", &other).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_reads_do_not_get_busy_workers_killed() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        set: vec![
            ("server.max_body_bytes", (8 * 1024 * 1024).into()),
            ("server.request_timeout", "60s".into()),
            ("supervisor.health_timeout", "150ms".into()),
            // An instance is killed after this many failed checks in a row with no answer
            // completed between them. With the default three (one check a second), running
            // beside the rest of the suite on a 2-core machine, an instance with 50 reads of
            // 4 MiB queued sometimes went three seconds between completed answers and was
            // killed (the load starved even idle classify instances' checks): about one run
            // in three.
            ("supervisor.unhealthy_threshold", 6.into()),
            // Enough store connections that the store never answers "busy" here.
            ("database.pool_size", 16.into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    let t = token("heavy", Some("org-heavy"));
    write_blob(&sys, &t, "HEAVY", &"y".repeat(4 * 1024 * 1024)).await;
    let pids: Vec<u64> = sys
        .instances("sync")
        .await
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 2);

    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (front, auth) = (sys.front, format!("Bearer {t}"));
        reads.spawn(async move {
            request(
                front,
                Method::GET,
                "/v1/tests/sessions/HEAVY",
                &[("authorization", &auth)],
                "",
            )
            .await
        });
    }
    while let Some(done) = reads.join_next().await {
        let r = done.expect("task").expect("answer");
        match r.status.as_u16() {
            200 => assert!(r.body.len() > 4 * 1024 * 1024),
            // The store's own bounded wait for a connection (SQLite pool) may say "busy":
            // an answer, not a worker killed under the request.
            503 => assert!(
                String::from_utf8_lossy(&r.body).contains("the store is busy"),
                "{}",
                String::from_utf8_lossy(&r.body)
            ),
            other => panic!(
                "a heavy read failed with {other}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    let after = sys.instances("sync").await;
    let restarts: u64 = after
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap_or(0))
        .sum();
    let now: Vec<u64> = after.iter().filter_map(|i| i["pid"].as_u64()).collect();
    assert_eq!(
        (restarts, now),
        (0, pids),
        "busy workers were killed:\n{}",
        sys.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_never_take_every_instance_of_a_kind_out() {
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        set: [
            firemode_tests::fixture_worker("sync", &["--status", "200", "--delay-ms", "2500"]),
            vec![("server.request_timeout", "1s".into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    // Watch /status throughout: at least one sync instance is ready at every look.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let admin = sys.admin;
    let watcher = tokio::spawn(async move {
        let mut worst = usize::MAX;
        while !*stopped.borrow() {
            if let Ok(r) = request(admin, Method::GET, "/status", &[], "").await {
                let v = r.json();
                let ready = v["instances"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|i| i["kind"] == "sync" && i["state"] == "ready")
                            .count()
                    })
                    .unwrap_or(0);
                worst = worst.min(ready);
            }
            tokio::select! {
                _ = stopped.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        worst
    });
    // A dozen requests that all time out (a slow database, say): a cause both share.
    let t = token("slow", Some("org-slow"));
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (front, auth) = (sys.front, format!("Bearer {t}"));
        reads.spawn(async move {
            let path = format!("/v1/tests/sessions/S{i}");
            request(front, Method::GET, &path, &[("authorization", &auth)], "")
                .await
                .map(|r| r.status.as_u16())
        });
    }
    while let Some(done) = reads.join_next().await {
        assert_eq!(done.expect("task").expect("answer"), 504);
    }
    // Give a condemned instance the time to be replaced and come back (polled).
    eventually(
        "both sync instances ready again",
        Duration::from_secs(20),
        || async {
            let s = sys.instances("sync").await;
            s.iter().all(|i| i["state"] == "ready").then_some(())
        },
    )
    .await;
    let _ = stop.send(true);
    let worst = watcher.await.expect("watcher");
    assert!(worst >= 1, "at some moment no sync instance was ready");
    let replaced = metric_sum(
        &metrics(&sys).await,
        "firemode_traffic_replacements_total",
        &["kind=\"sync\""],
    );
    assert!(
        replaced <= 1.0,
        "{replaced} sync instances condemned at once"
    );
}

/// Runs one GET and SIGKILLs every sync worker each time the request reaches one, until
/// the GET has an answer. Returns its status.
async fn read_under_sigkill(sys: &TestSystem, mark: &Path, path: &str, token: &str) -> u16 {
    let (front, auth, path) = (sys.front, format!("Bearer {token}"), path.to_string());
    let read = tokio::spawn(async move {
        request(front, Method::GET, &path, &[("authorization", &auth)], "")
            .await
            .map(|r| r.status.as_u16())
    });
    let mut kills = 0;
    while !read.is_finished() {
        if mark.exists() && kills < 2 {
            let _ = std::fs::remove_file(mark);
            for pid in sys
                .instances("sync")
                .await
                .iter()
                .filter_map(|i| i["pid"].as_u64())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(mark);
    read.await.expect("task").expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_never_refused_as_poison() {
    let dir = std::env::temp_dir().join(format!("fm-mark-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("mark dir");
    let mark = dir.join("in-flight");
    let mark_arg = mark.display().to_string();
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 2,
        set: [
            firemode_tests::fixture_worker(
                "sync",
                &["--status", "200", "--delay-ms", "300", "--mark", &mark_arg],
            ),
            vec![("server.poison_threshold", 2.into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let a = token("a", Some("org-a"));
    // Workers die twice under each of two reads of one session: four deaths with the same
    // read in flight, well past the threshold.
    for _ in 0..2 {
        read_under_sigkill(&sys, &mark, "/v1/tests/sessions/S1", &a).await;
        sys.wait_ready().await;
    }
    for (who, t) in [
        ("the same tenant", &a),
        ("another tenant", &token("b", Some("org-b"))),
    ] {
        let r = get(&sys, "/v1/tests/sessions/S1", t).await;
        assert_eq!(
            r.status,
            200,
            "{who}'s read was refused: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_one_request_of_one_tenant() {
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
    let poison = r#"{"item_code":"POISON","observed_condition":"x"}"#;
    let a = token("a", Some("org-a"));
    // Two deaths (the first try and its retry), then the third: refused from then on.
    assert_eq!(
        sys.post("/v1/classify", &a, poison).await.unwrap().status,
        502
    );
    sys.wait_ready().await;
    let refused = sys.post("/v1/classify", &a, poison).await.unwrap();
    let p = refused.problem(503);
    assert!(
        p["type"].as_str().unwrap().ends_with("poison-request"),
        "{p}"
    );
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=600).contains(&retry), "Retry-After {retry}");
    // Another tenant's identical request is its own request: it reaches a worker.
    sys.wait_ready().await;
    let b = sys
        .post("/v1/classify", &token("b", Some("org-b")), poison)
        .await
        .unwrap();
    assert_eq!(b.status, 502, "{}", String::from_utf8_lossy(&b.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_the_supervisor_kills_are_not_poison_strikes() {
    let dir = std::env::temp_dir().join(format!("fm-mark-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("mark dir");
    let mark = dir.join("in-flight");
    let mark_arg = mark.display().to_string();
    let sys = TestSystem::start(SystemOptions {
        set: [
            firemode_tests::fixture_worker(
                "sync",
                &["--status", "200", "--delay-ms", "4000", "--mark", &mark_arg],
            ),
            vec![("server.poison_threshold", 1.into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let t = token("w", Some("org-w"));
    let body = r#"{"changes":[],"_sync_meta":{"vector_clock":{}}}"#;
    let post = {
        let (front, auth) = (sys.front, format!("Bearer {t}"));
        tokio::spawn(async move {
            request(
                front,
                Method::POST,
                "/v1/tests/sessions/W/results",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
            .map(|r| r.status.as_u16())
        })
    };
    eventually(
        "the write reached a worker",
        Duration::from_secs(10),
        || async { mark.exists().then_some(()) },
    )
    .await;
    // A rolling restart whose drain deadline passes with the write in flight: the
    // supervisor SIGKILLs the old worker under it.
    sys.rewrite_config(vec![("supervisor.drain_timeout", "200ms".into())]);
    sys.signal(nix::sys::signal::Signal::SIGHUP);
    let status = post.await.expect("task").expect("answer");
    assert_eq!(
        status, 502,
        "the killed write is a failed exchange, not poison"
    );
    // The same write again is not refused: the kill was not a strike.
    let _ = std::fs::remove_file(&mark);
    let again = sys
        .post("/v1/tests/sessions/W/results", &t, body)
        .await
        .unwrap();
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_works_wherever_get_does_and_every_405_says_allow() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    for path in ["/healthz", "/readyz", "/status", "/metrics"] {
        let head = request(sys.admin, Method::HEAD, path, &[], "")
            .await
            .unwrap();
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
        let post = request(sys.admin, Method::POST, path, &[], "")
            .await
            .unwrap();
        post.problem(405);
        let allow = post.header("allow").unwrap_or_default();
        assert!(
            allow.contains("GET") && allow.contains("HEAD"),
            "POST {path}: Allow {allow:?}"
        );
    }
    // The worker runtime's own routes, on a worker's socket. `/readyz` above needs one
    // ready instance per kind; the socket picked here may be another one still starting.
    sys.wait_all_ready().await;
    let socket = std::fs::read_dir(sys.dir.join("run"))
        .expect("runtime dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .expect("a worker socket");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, body) = over_unix(&socket, Method::HEAD, path).await;
        assert_eq!((status, body.len()), (200, 0), "worker HEAD {path}");
        let (status, allow, _) = over_unix(&socket, Method::DELETE, path).await;
        assert_eq!(status, 405, "worker DELETE {path}");
        assert_eq!(allow.as_deref(), Some("GET, HEAD"));
    }
}

/// One request to a worker's Unix socket: status, `Allow`, body.
async fn over_unix(
    socket: &Path,
    method: Method,
    path: &str,
) -> (u16, Option<String>, bytes::Bytes) {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("worker socket");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "worker")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("answer");
    let status = resp.status().as_u16();
    let allow = resp
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, allow, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_through_the_front_gets_the_get_head_without_a_body() {
    let sys = TestSystem::start(SystemOptions {
        set: firemode_tests::fixture_worker("sync", &["--status", "200"]),
        ..SystemOptions::default()
    })
    .await;
    let auth = format!("Bearer {}", token("h", Some("org-h")));
    let headers = [("authorization", auth.as_str())];
    let get = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/H1",
        &headers,
        "",
    )
    .await
    .unwrap();
    let head = request(
        sys.front,
        Method::HEAD,
        "/v1/tests/sessions/H1",
        &headers,
        "",
    )
    .await
    .unwrap();
    assert_eq!((get.status.as_u16(), head.status.as_u16()), (200, 200));
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length").map(str::to_string),
        Some(get.body.len().to_string()),
        "HEAD says how long the GET answer is"
    );
    assert!(head.header("x-request-id").is_some());
}

/// One worker death with many identical requests in flight (the original load test posts
/// one body with fresh keys; an OOM kill takes the process) is one strike, not one per copy:
/// the request is never refused after a single death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_death_under_many_identical_requests_is_one_strike() {
    let dir = std::env::temp_dir().join(format!("fm-peak-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("peak dir");
    let peak = dir.join("peak");
    let peak_arg = peak.display().to_string();
    let sys = TestSystem::start(SystemOptions {
        sync_instances: 1,
        set: [
            firemode_tests::fixture_worker(
                "sync",
                &[
                    "--status",
                    "200",
                    "--delay-ms",
                    "1500",
                    "--peak-file",
                    &peak_arg,
                ],
            ),
            vec![("server.poison_threshold", 3.into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let auth = format!("Bearer {}", token("bob", Some("good")));
    let body = r#"{"changes":[{"op":"set","path":"/test","value":"data"}],"_sync_meta":{"vector_clock":{}}}"#;
    let post = |key: String| {
        let (front, auth) = (sys.front, auth.clone());
        async move {
            request(
                front,
                Method::POST,
                "/v1/tests/sessions/123/results",
                &[("authorization", &auth), ("idempotency-key", &key)],
                body,
            )
            .await
            .map(|r| r.status.as_u16())
        }
    };
    let copies: Vec<_> = (0..6)
        .map(|i| tokio::spawn(post(format!("copy-{i}"))))
        .collect();
    eventually(
        "six copies in flight at the worker",
        Duration::from_secs(10),
        || {
            let n = std::fs::read_to_string(&peak)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .unwrap_or(0);
            async move { (n >= 6).then_some(()) }
        },
    )
    .await;
    let pid = sys.instances("sync").await[0]["pid"].as_u64().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    // Each copy is retried on the restarted worker (it carries an Idempotency-Key); none is
    // refused as poison.
    for (i, c) in copies.into_iter().enumerate() {
        let status = c.await.expect("task").expect("an answer");
        assert_eq!(status, 200, "copy {i} after one worker death");
    }
    sys.wait_ready().await;
    let status = post("after".into()).await.expect("an answer");
    assert_eq!(status, 200, "refused as poison after one worker death");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hundreds of stalled readers of large answers cost the front its answer budget plus a
/// small, fixed amount each (one read-back chunk and a 64 KiB write window), not the
/// ~1 MiB each that hyper's default write buffer and tokio's file buffer cost before
/// (measured here: ~1,080 KiB each before, 60-540 KiB after, depending on the load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_cost_little_memory_each() {
    const READERS: usize = 160;
    const ANSWER: usize = 5 * 1024 * 1024;
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        sync_instances: 2,
        set: [
            firemode_tests::fixture_worker(
                "sync",
                &["--status", "200", "--body-bytes", &ANSWER.to_string()],
            ),
            vec![("server.request_timeout", "60s".into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let t = token("reader", Some("org-big"));
    let before = rss_bytes(sys.pid());
    let mut stalled = Vec::new();
    for _ in 0..READERS {
        stalled.push(stalled_reader(sys.front, "/v1/tests/sessions/BIG", &t).await);
    }
    let answered = |text: &str| {
        metric_sum(
            text,
            "http_request_duration_seconds_count",
            &["endpoint=\"/v1/tests/sessions/{id}\"", "method=\"GET\""],
        )
    };
    eventually(
        "every stalled read taken off the workers",
        Duration::from_secs(120),
        || async { (answered(&metrics(&sys).await) >= READERS as f64).then_some(()) },
    )
    .await;
    // What stays held while the readers stall (transient buffers of the copying are freed
    // and returned by the allocator within a moment): the lowest figure over 5 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut settled = u64::MAX;
    for _ in 0..50 {
        settled = settled.min(rss_bytes(sys.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = settled.saturating_sub(before);
    let budget = 64 * 1024 * 1024;
    let per_reader = grown.saturating_sub(budget) / READERS as u64;
    eprintln!(
        "stalled readers: {READERS}, front grew {} MiB, {} KiB each beyond the budget",
        grown >> 20,
        per_reader >> 10
    );
    assert!(
        per_reader < 800 * 1024,
        "{READERS} stalled readers grew the front by {} MiB: {} KiB each beyond the 64 MiB answer budget",
        grown >> 20,
        per_reader >> 10
    );
    drop(stalled);
}

/// Worker sockets that vanish (a tmp cleaner in the runtime dir) refuse connections until
/// the supervisor replaces the instances: a request that reached no worker waits for one
/// instead of failing, so clients see no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_worker_sockets_cost_no_failed_request() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    sys.wait_all_ready().await;
    let t = token("tech", Some("acme"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, t, front) = (stop.clone(), t.clone(), sys.front);
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                let r = request(
                    front,
                    Method::POST,
                    "/v1/classify",
                    &[("authorization", &format!("Bearer {t}"))],
                    r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
                )
                .await;
                match r {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (sent, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before: Vec<u64> = sys
        .instances("classify")
        .await
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    for entry in std::fs::read_dir(sys.dir.join("run"))
        .expect("runtime dir")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("classify") && name.ends_with(".sock") {
            std::fs::remove_file(entry.path()).expect("remove socket");
        }
    }
    eventually(
        "both classify instances replaced and ready",
        Duration::from_secs(20),
        || async {
            let now = sys.instances("classify").await;
            let replaced = now.iter().all(|i| {
                i["state"] == "ready" && !before.contains(&i["pid"].as_u64().unwrap_or(0))
            });
            replaced.then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    let mut failures = Vec::new();
    for c in clients {
        let (n, f) = c.await.expect("client");
        sent += n;
        failures.extend(f);
    }
    assert!(sent > 20, "the clients sent only {sent} requests");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
}
