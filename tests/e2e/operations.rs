//! Operations: SIGHUP reload with a rolling restart under load, systemd notify messages,
//! socket activation, the shipped units, `firemode plan`.

use firemode_tests::{bin_dir, eventually, request, token, SystemOptions, TestSystem};
use http::Method;
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BODY: &str = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;

/// Classify and sync traffic in a loop; returns (ok, failures).
fn traffic(
    sys: &TestSystem,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let front = sys.front;
    tokio::spawn(async move {
        let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
        let mut ok = 0;
        let mut failures = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let r = if n.is_multiple_of(2) {
                request(
                    front,
                    Method::POST,
                    "/v1/classify",
                    &[("authorization", &auth)],
                    BODY,
                )
                .await
            } else {
                let key = format!("reload-{n}");
                let body = format!(
                    r#"{{"changes":[{{"op":"set","path":"/n","value":{n}}}],"_sync_meta":{{"vector_clock":{{}}}}}}"#
                );
                request(
                    front,
                    Method::POST,
                    "/v1/tests/sessions/RELOAD/results",
                    &[("authorization", &auth), ("idempotency-key", &key)],
                    body,
                )
                .await
            };
            match r {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => {
                    failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        (ok, failures)
    })
}

fn pids(instances: &[serde_json::Value]) -> HashSet<u64> {
    instances.iter().filter_map(|i| i["pid"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_every_instance_without_a_failed_request() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let old_classify = pids(&sys.instances("classify").await);
    let old_sync = pids(&sys.instances("sync").await);
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&sys, stop.clone());

    // Scale classify 2 → 3 and sync 1 → 2 with a rolling restart.
    sys.rewrite_config(vec![
        ("workers.classify.instances", 3.into()),
        ("workers.sync.instances", 2.into()),
    ]);
    sys.signal(Signal::SIGHUP);
    eventually("the reload to complete", Duration::from_secs(30), || {
        let done = sys.logs().matches("reload complete").count() == 1;
        async move { done.then_some(()) }
    })
    .await;
    let replaced = eventually(
        "the new counts, all ready",
        Duration::from_secs(10),
        || async {
            let c = sys.instances("classify").await;
            let s = sys.instances("sync").await;
            let ready = |v: &[serde_json::Value], n: usize| {
                v.iter().filter(|i| i["state"] == "ready").count() == n && v.len() == n
            };
            (ready(&c, 3) && ready(&s, 2)).then_some((c, s))
        },
    )
    .await;
    assert!(
        pids(&replaced.0).is_disjoint(&old_classify),
        "every classify instance is new"
    );
    assert!(
        pids(&replaced.1).is_disjoint(&old_sync),
        "every sync instance is new"
    );
    eventually(
        "the old instances to be gone",
        Duration::from_secs(15),
        || {
            let gone = old_classify
                .iter()
                .chain(&old_sync)
                .all(|p| firemode_tests::process_gone(*p as u32));
            async move { gone.then_some(()) }
        },
    )
    .await;

    // Scale back down: 1 classify.
    sys.rewrite_config(vec![("workers.classify.instances", 1.into())]);
    sys.signal(Signal::SIGHUP);
    eventually(
        "classify scaled down to one",
        Duration::from_secs(30),
        || async {
            let c = sys.instances("classify").await;
            (c.len() == 1 && c[0]["state"] == "ready").then_some(())
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = load.await.unwrap();
    assert!(ok > 20, "traffic flowed ({ok})");
    assert!(
        failures.is_empty(),
        "{} failed requests during reloads: {failures:?}",
        failures.len()
    );
    assert!(sys.logs().contains("reload complete"));
}

#[tokio::test]
async fn an_invalid_config_on_sighup_is_rejected_and_the_old_one_kept() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let before = pids(&sys.instances("classify").await);
    std::fs::write(&sys.config_path, "[server]\nlisen = 1\n").unwrap();
    sys.signal(Signal::SIGHUP);
    eventually(
        "the rejection to be logged",
        Duration::from_secs(10),
        || {
            let logs = sys.logs();
            async move {
                (logs.contains("the new configuration is invalid") && logs.contains("server.lisen"))
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        pids(&sys.instances("classify").await),
        before,
        "nothing was restarted"
    );
    let r = sys
        .post("/v1/classify", &token("t", None), BODY)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// A stand-in for systemd's notify socket that remembers every message.
struct NotifyListener {
    socket: tokio::net::UnixDatagram,
    heard: Vec<String>,
}

impl NotifyListener {
    /// Waits for a message containing `needle` among those from index `from` on; returns its
    /// index.
    async fn wait_for(&mut self, needle: &str, from: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(i) = self
                .heard
                .iter()
                .skip(from)
                .position(|m| m.contains(needle))
            {
                return from + i;
            }
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} from firemode; heard {:?}", self.heard))
                .unwrap();
            self.heard
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[tokio::test]
async fn systemd_hears_ready_status_reloading_and_stopping() {
    let dir = std::env::temp_dir().join(format!("fm-notify-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let mut notify = NotifyListener {
        socket: tokio::net::UnixDatagram::bind(&path).unwrap(),
        heard: Vec::new(),
    };
    let mut sys = TestSystem::start(SystemOptions {
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..SystemOptions::default()
    })
    .await;
    let ready = notify.wait_for("READY=1", 0).await;
    assert!(
        notify.heard[ready].contains("STATUS=3/3 instances ready"),
        "{:?}",
        notify.heard
    );
    // Workers must not inherit the notify socket.
    let workers = sys.worker_pids().await;
    assert!(!workers.is_empty(), "no worker pids in /status");
    for pid in workers {
        let env = std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_else(|e| panic!("reading worker {pid}'s environment: {e}"));
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).filter(|v| !v.is_empty()).collect();
        assert!(
            vars.iter().any(|v| v.starts_with(b"PATH=")),
            "worker {pid}'s environment was not read: {:?}",
            String::from_utf8_lossy(&env)
        );
        assert!(
            !vars.iter().any(|v| v.starts_with(b"NOTIFY_SOCKET=")),
            "worker {pid} inherited NOTIFY_SOCKET"
        );
    }
    sys.signal(Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", ready + 1).await;
    assert!(notify.heard[reloading].contains("MONOTONIC_USEC="));
    notify.wait_for("READY=1", reloading + 1).await;
    sys.signal(Signal::SIGTERM);
    let stopping = notify.wait_for("STOPPING=1", reloading + 1).await;
    notify.wait_for("EXTEND_TIMEOUT_USEC=", stopping).await;
    notify.wait_for("STATUS=draining", stopping).await;
    assert_eq!(sys.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn have(program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{program} is required in CI (Debian package systemd)");
        }
        eprintln!("\n!!! SKIPPING: {program} not installed (apt-get install systemd)\n");
    }
    found
}

#[tokio::test]
async fn the_front_serves_on_a_socket_passed_by_systemd() {
    if !have("systemd-socket-activate") {
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Like systemd, systemd-socket-activate starts firemode on the first connection: this
    // request, sent before firemode runs, waits in the socket's backlog and is answered.
    let early = tokio::spawn({
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        async move {
            let auth = format!("Bearer {}", token("early", None));
            loop {
                match request(
                    addr,
                    Method::POST,
                    "/v1/classify",
                    &[("authorization", &auth)],
                    BODY,
                )
                .await
                {
                    Ok(r) => return r,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    });
    let sys = TestSystem::start(SystemOptions {
        wrapper: vec![
            "systemd-socket-activate".into(),
            "-l".into(),
            addr.clone(),
            "-E".into(),
            "RUST_LOG=info".into(),
        ],
        // An address this host cannot bind: serving at all proves the passed socket is used.
        // The early request waits for the workers' cold start.
        set: vec![
            ("server.listen", "192.0.2.1:80".into()),
            ("server.queue_timeout", "30s".into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    assert_eq!(sys.front.port(), port);
    let first = early.await.unwrap();
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(sys.logs().contains("using the socket passed by systemd"));
    let r = sys
        .post("/v1/classify", &token("t", None), BODY)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn the_shipped_units_verify_and_are_hardened() {
    if !have("systemd-analyze") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = std::env::temp_dir().join(format!("fm-units-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let service = std::fs::read_to_string(root.join("firemode.service")).unwrap();
    assert!(
        service.contains("Type=notify")
            && service.contains("ExecReload=")
            && service.contains("KillMode=mixed")
    );
    let firemode = bin_dir().join("firemode");
    std::fs::write(
        dir.join("firemode.service"),
        service.replace("/usr/local/bin/firemode", &firemode.display().to_string()),
    )
    .unwrap();
    std::fs::copy(root.join("firemode.socket"), dir.join("firemode.socket")).unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("firemode.service"))
        .arg(dir.join("firemode.socket"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(dir.join("firemode.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for firemode.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");
    // The unit's stop budget matches what it tells the supervisor.
    assert!(
        service.contains("TimeoutStopSec=90s")
            && service.contains("FIREMODE_SUPERVISOR__STOP_TIMEOUT=90s")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plan_prints_the_timeline_and_refuses_a_budget_that_does_not_fit() {
    let dir = std::env::temp_dir().join(format!("fm-plan-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f.toml");
    std::fs::write(
        &file,
        "[supervisor.backoff]\ninitial = \"250ms\"\nmax = \"2s\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin_dir().join("firemode"))
        .args(["plan", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("restart  1  after 250ms"), "{text}");
    assert!(text.contains("restart  4+ after 2s"), "{text}");
    assert!(text.contains("fits"), "{text}");
    std::fs::write(&file, "[supervisor]\ndrain_timeout = \"2m\"\n").unwrap();
    let out = std::process::Command::new(bin_dir().join("firemode"))
        .args(["plan", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("supervisor.stop_timeout"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_instance_that_fails_real_requests_is_replaced_though_healthz_passes() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        set: [
            firemode_tests::fixture_worker("classify", &["--status", "500"]),
            vec![("supervisor.traffic_failure_threshold", 3.into())],
        ]
        .concat(),
        ..SystemOptions::default()
    })
    .await;
    let first = sys.instances("classify").await[0]["pid"].as_u64().unwrap();
    let t = token("t", None);
    for _ in 0..3 {
        let r = sys.post("/v1/classify", &t, BODY).await.unwrap();
        assert_eq!(r.status, 500, "the worker's own answer passes through");
    }
    // The only instance of its kind is replaced the rolling way: the new process is ready
    // before the old one leaves rotation.
    eventually(
        "the failing instance to be replaced",
        Duration::from_secs(10),
        || async {
            let now = sys.instances("classify").await;
            (now.len() == 1
                && now[0]["state"] == "ready"
                && now[0]["pid"].as_u64().is_some_and(|p| p != first))
            .then_some(())
        },
    )
    .await;
    assert!(sys.logs().contains("real requests failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_recycled_after_max_requests_without_a_failed_request() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("workers.classify.max_requests", 20.into())],
        ..SystemOptions::default()
    })
    .await;
    let before = pids(&sys.instances("classify").await);
    let t = token("t", None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    // Traffic until every instance that served at the start has been replaced.
    loop {
        let now = sys.instances("classify").await;
        let serving: HashSet<u64> = now
            .iter()
            .filter(|i| i["state"] == "ready")
            .filter_map(|i| i["pid"].as_u64())
            .collect();
        if serving.len() == 2 && serving.is_disjoint(&before) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recycled after {sent} requests: {now:?}"
        );
        for _ in 0..10 {
            let r = sys.post("/v1/classify", &t, BODY).await.unwrap();
            assert_eq!(
                r.status,
                200,
                "request {sent} failed: {}",
                String::from_utf8_lossy(&r.body)
            );
            sent += 1;
        }
    }
    assert!(sys.logs().contains("\"instance recycled\""));
    assert!(
        sys.logs().contains("(max_requests 20)"),
        "the reason is logged"
    );
}

#[test]
fn the_replit_config_builds_and_runs_the_release_binary_on_port() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.replit")).unwrap();
    let replit: toml::Table = toml::from_str(&text).expect(".replit is TOML");
    let run = replit["run"].as_str().unwrap();
    assert!(run.contains("cargo build --release") && run.contains("./target/release/firemode"));
    let deploy = replit["deployment"]["run"].as_array().unwrap();
    assert!(deploy.iter().any(|a| a
        .as_str()
        .is_some_and(|s| s.contains("target/release/firemode"))));
    // Its environment is valid FireMode config.
    let env = replit["env"].as_table().unwrap();
    let mut cmd = std::process::Command::new(bin_dir().join("firemode"));
    cmd.arg("check-config").env("PORT", "3000");
    for (k, v) in env {
        cmd.env(k, v.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"0.0.0.0:3000\""));

    // A reserved VM, not autoscale (which loses ./data on every cold start).
    assert_eq!(
        replit["deployment"]["deploymentTarget"].as_str(),
        Some("gce")
    );
    // The signing key and the store are documented as Secrets.
    assert!(text.contains("FIREMODE_AUTH__JWT_SECRET") && text.contains("DATABASE_URL"));
    // The original load test, as its authors ran it.
    let workflows = replit["workflows"]["workflow"].as_array().unwrap();
    let commands: Vec<&str> = workflows
        .iter()
        .flat_map(|w| w["tasks"].as_array().unwrap())
        .filter_map(|t| t["args"].as_str())
        .collect();
    assert!(
        commands.iter().any(|c| c.contains(
            "locust -f tests/load/locustfile.py --headless -u 500 -r 10 --run-time 2m --host"
        )),
        "{commands:?}"
    );
    // DATABASE_URL (what Replit's PostgreSQL sets) is the store when database.url is unset.
    let out = std::process::Command::new(bin_dir().join("firemode"))
        .arg("check-config")
        .env("DATABASE_URL", "postgres://app:hunter2@db.replit/fm")
        .env_remove("FIREMODE_DATABASE__URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("url = \"postgres://app:<redacted>@db.replit/fm\""),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"));
}
