//! Hostile operations (issue #11 items 7, 8, 9 and part of 14): reloads that would swap the
//! store, the signing key or the listeners under running clients; an empty or vanished
//! config file on SIGHUP; a deleted runtime dir; SIGTERM while clients open a new
//! connection per request; worker config files of retired generations; `firemode token`
//! with a lifetime that overflows.

use firemode_tests::{
    bin_dir, eventually, request, token, token_with, SystemOptions, TestSystem, TEST_SECRET,
};
use http::Method;
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BODY: &str = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;

fn pids(instances: &[serde_json::Value]) -> HashSet<u64> {
    instances.iter().filter_map(|i| i["pid"].as_u64()).collect()
}

async fn all_pids(sys: &TestSystem) -> HashSet<u64> {
    let mut all = pids(&sys.instances("classify").await);
    all.extend(pids(&sys.instances("sync").await));
    all
}

/// Writes one sync result into `session` (so a store switch would show as `{}`).
async fn write_session(sys: &TestSystem, session: &str) {
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    let r = request(
        sys.front,
        Method::POST,
        &format!("/v1/tests/sessions/{session}/results"),
        &[("authorization", &auth), ("idempotency-key", "ops-1")],
        r#"{"changes":[{"op":"set","path":"/kept","value":"yes"}],"_sync_meta":{"vector_clock":{}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// The system still answers with the old key and the old store, from the same processes.
async fn still_the_running_config(sys: &TestSystem, session: &str, before: &HashSet<u64>) {
    let r = sys
        .post("/v1/classify", &token("t", None), BODY)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the old key still verifies tokens");
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    let r = request(
        sys.front,
        Method::GET,
        &format!("/v1/tests/sessions/{session}"),
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["document"]["kept"],
        "yes",
        "the session is read from the same store"
    );
    assert_eq!(&all_pids(sys).await, before, "no instance was replaced");
}

/// Sends SIGHUP and waits until the log holds one more line containing `needle`.
async fn sighup_and_wait_for(sys: &TestSystem, needle: &str) {
    let seen = sys.logs().matches(needle).count();
    sys.signal(Signal::SIGHUP);
    eventually(
        &format!("a log line with {needle:?}"),
        Duration::from_secs(15),
        || {
            let n = sys.logs().matches(needle).count();
            async move { (n > seen).then_some(()) }
        },
    )
    .await;
}

/// The log lines (JSON) holding `needle`.
fn lines_with(sys: &TestSystem, needle: &str) -> Vec<String> {
    sys.logs()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Item 7: an empty, whitespace-only or vanished config file on SIGHUP is refused (never "all
/// defaults", which would generate a new signing key and switch to a fresh SQLite store), and
/// so is a change of data_dir (the embedded store and the generated secret live there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_vanished_config_on_sighup_is_refused_and_the_running_one_kept() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    write_session(&sys, "KEEP").await;
    let before = all_pids(&sys).await;
    let original = std::fs::read_to_string(&sys.config_path).unwrap();

    for (what, content) in [
        ("empty", Some("")),
        ("whitespace-only", Some(" \n\t\n  \n")),
        ("vanished", None),
    ] {
        match content {
            Some(text) => std::fs::write(&sys.config_path, text).unwrap(),
            None => std::fs::remove_file(&sys.config_path).unwrap(),
        }
        sighup_and_wait_for(&sys, "the new configuration is invalid").await;
        let refusal = lines_with(&sys, "the new configuration is invalid");
        let last = refusal.last().unwrap();
        assert!(
            last.contains(&sys.config_path.display().to_string()),
            "{what}: the refusal names the file: {last}"
        );
        still_the_running_config(&sys, "KEEP", &before).await;
    }

    // data_dir holds the embedded store and the generated secret: a restart-only key.
    std::fs::write(&sys.config_path, &original).unwrap();
    sys.rewrite_config(vec![(
        "data_dir",
        sys.dir.join("elsewhere").display().to_string().into(),
    )]);
    sighup_and_wait_for(&sys, "reload refused").await;
    let last = lines_with(&sys, "reload refused").pop().unwrap();
    assert!(
        last.contains("data_dir") && last.contains("restart"),
        "{last}"
    );
    still_the_running_config(&sys, "KEEP", &before).await;
    assert!(!sys.logs().contains("reload complete"));

    // The same file, restored, reloads normally.
    std::fs::write(&sys.config_path, &original).unwrap();
    sighup_and_wait_for(&sys, "reload complete").await;
}

/// Item 7 on PostgreSQL: a reload that would switch the store, the signing key or a listener
/// is refused with a line naming the key; the old config stays in force; a later harmless
/// change still reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_store_the_key_or_a_listener_is_refused() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    write_session(&sys, "PGKEEP").await;
    let before = all_pids(&sys).await;
    let original = std::fs::read_to_string(&sys.config_path).unwrap();
    let other_secret = "another-secret-another-secret-another-secret";
    let changes: Vec<(&str, Vec<(&'static str, toml::Value)>)> = vec![
        ("database.url", vec![("database.url", "".into())]),
        (
            "auth.jwt_secret",
            vec![("auth.jwt_secret", other_secret.into())],
        ),
        ("auth.algorithm", vec![("auth.algorithm", "HS512".into())]),
        (
            "server.listen",
            vec![("server.listen", "127.0.0.1:1".into())],
        ),
        (
            "server.admin_listen",
            vec![("server.admin_listen", "127.0.0.1:2".into())],
        ),
    ];
    for (key, set) in changes {
        std::fs::write(&sys.config_path, &original).unwrap();
        sys.rewrite_config(set);
        sighup_and_wait_for(&sys, "reload refused").await;
        let last = lines_with(&sys, "reload refused").pop().unwrap();
        assert!(
            last.contains(key) && last.contains("restart"),
            "the refusal names {key} and says it needs a restart: {last}"
        );
        still_the_running_config(&sys, "PGKEEP", &before).await;
    }
    assert!(!sys.logs().contains("reload complete"));

    // A harmless change (a timeout) still reloads, and the data is where it was.
    std::fs::write(&sys.config_path, &original).unwrap();
    sys.rewrite_config(vec![("server.queue_timeout", "4s".into())]);
    sighup_and_wait_for(&sys, "reload complete").await;
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    let r = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/PGKEEP",
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.json()["document"]["kept"], "yes");
}

/// Item 7: with a generated secret, the key lives in `data_dir/jwt_secret`; a reload after that
/// file vanished (or changed) would verify with a new key. Refused: the key needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_the_generated_secret_changed_is_refused() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("auth.jwt_secret", "".into())],
        ..SystemOptions::default()
    })
    .await;
    let secret_file = sys.dir.join("data/jwt_secret");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    let t = token_with("t", None, 3600, secret.trim().as_bytes());
    let before = all_pids(&sys).await;
    for replace in [None, Some("x".repeat(64))] {
        match &replace {
            None => std::fs::remove_file(&secret_file).unwrap(),
            Some(other) => std::fs::write(&secret_file, other).unwrap(),
        }
        sighup_and_wait_for(&sys, "reload refused").await;
        let last = lines_with(&sys, "reload refused").pop().unwrap();
        assert!(
            last.contains("jwt_secret") && last.contains("restart"),
            "{last}"
        );
        let r = sys.post("/v1/classify", &t, BODY).await.unwrap();
        assert_eq!(r.status, 200, "the running key still verifies");
        assert_eq!(all_pids(&sys).await, before, "no instance was replaced");
    }
    assert!(!sys.logs().contains("reload complete"));
}

fn worker_configs(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("worker-config"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Item 8: deleting the runtime dir under a running system is healed without an operator:
/// the dir comes back with mode 0700, new instances start (their worker config file is
/// written again) and serve; a SIGHUP right after a deletion reloads normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_runtime_dir_heals_and_sighup_still_reloads() {
    use std::os::unix::fs::PermissionsExt;
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let run = sys.dir.join("run");
    let before = all_pids(&sys).await;
    std::fs::remove_dir_all(&run).unwrap();

    let healed = eventually(
        "every instance replaced by a ready one",
        Duration::from_secs(30),
        || async {
            let c = sys.instances("classify").await;
            let s = sys.instances("sync").await;
            let ready = c.iter().chain(&s).all(|i| i["state"] == "ready");
            let now: HashSet<u64> = pids(&c).union(&pids(&s)).copied().collect();
            (ready && now.len() == 2 && now.is_disjoint(&before)).then_some(now)
        },
    )
    .await;
    let mode = std::fs::metadata(&run).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the runtime dir is private again");
    assert_eq!(worker_configs(&run).len(), 1, "{:?}", worker_configs(&run));
    let r = sys
        .post("/v1/classify", &token("t", None), BODY)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(sys.admin_get("/healthz").await.status, 200);

    // Deleted again, then a plain SIGHUP: the reload recreates what it needs.
    std::fs::remove_dir_all(&run).unwrap();
    sighup_and_wait_for(&sys, "reload complete").await;
    eventually(
        "new instances serving after the reload",
        Duration::from_secs(30),
        || async {
            let c = sys.instances("classify").await;
            let s = sys.instances("sync").await;
            let now: HashSet<u64> = pids(&c).union(&pids(&s)).copied().collect();
            let ready = c.iter().chain(&s).all(|i| i["state"] == "ready");
            (ready && now.len() == 2 && now.is_disjoint(&healed)).then_some(())
        },
    )
    .await;
    let r = sys
        .post("/v1/classify", &token("t", None), BODY)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Item 8: `/healthz` does not claim health while every instance of a kind is crash-looping
/// (nothing of that kind can serve and nothing is healing it).
#[tokio::test]
async fn healthz_is_503_while_every_instance_of_a_kind_is_crash_looping() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 2,
        wait_ready: false,
        set: vec![
            ("workers.classify.command", "/bin/false".into()),
            ("supervisor.backoff.max", "1s".into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    let reply = eventually(
        "/healthz to say 503 once classify is crash-looping",
        Duration::from_secs(20),
        || async {
            let r = sys.admin_get("/healthz").await;
            (r.status == 503).then_some(r)
        },
    )
    .await;
    let p = reply.problem(503);
    assert!(
        p["detail"].as_str().unwrap().contains("classify"),
        "names the kind: {p}"
    );
    let degraded = sys.instances("classify").await;
    assert!(
        degraded.iter().all(|i| i["degraded"] == true),
        "{degraded:?}"
    );
}

/// Item 14: each reload writes a worker config file (it holds the JWT secret and the database
/// URL); a generation's file is deleted once none of its instances runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_config_files_of_retired_generations_are_deleted() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let run = sys.dir.join("run");
    assert_eq!(worker_configs(&run), ["worker-config.g0.json"]);
    for _ in 0..2 {
        let old = all_pids(&sys).await;
        sighup_and_wait_for(&sys, "reload complete").await;
        eventually(
            "the old instances to be gone",
            Duration::from_secs(15),
            || {
                let gone = old.iter().all(|p| firemode_tests::process_gone(*p as u32));
                async move { gone.then_some(()) }
            },
        )
        .await;
    }
    eventually(
        "only the live generation's file left",
        Duration::from_secs(10),
        || {
            let names = worker_configs(&run);
            async move { (names == ["worker-config.g2.json"]).then_some(()) }
        },
    )
    .await;
}

/// Item 14: a `--ttl` so long that the expiry overflows is refused with a message naming
/// `--ttl` (exit 2), never an already-expired token with exit 0.
#[test]
fn token_with_an_overflowing_ttl_is_refused() {
    let dir = std::env::temp_dir().join(format!("fm-ttl-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("firemode.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[auth]\njwt_secret = \"{TEST_SECRET}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mint = |ttl: &str| {
        std::process::Command::new(bin_dir().join("firemode"))
            .args(["token", "--sub", "svc", "--ttl", ttl, "--config"])
            .arg(&config)
            .env_remove("PORT")
            .output()
            .unwrap()
    };
    // u64::MAX seconds minus a bit: now + ttl wraps; 10^9 years: past 2^53 seconds.
    for ttl in ["584542046090y", "1000000000y"] {
        let out = mint(ttl);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {stderr}");
        assert!(stderr.contains("--ttl"), "--ttl {ttl}: {stderr}");
        assert!(out.stdout.is_empty(), "no token printed for --ttl {ttl}");
    }
    // A long but sane lifetime still works, and the token's exp is in the future.
    let out = mint("10y");
    assert_eq!(out.status.code(), Some(0));
    let jwt = String::from_utf8(out.stdout).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        jwt.trim(),
        &jsonwebtoken::DecodingKey::from_secret(TEST_SECRET.as_bytes()),
        &validation,
    )
    .expect("a valid, unexpired token");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims.claims["exp"].as_u64().unwrap();
    assert!(exp > now + 9 * 365 * 24 * 3600, "exp {exp}");
    let _ = std::fs::remove_dir_all(dir);
}

/// What one client saw: answers, and every failure in words.
#[derive(Default)]
struct Seen {
    ok: usize,
    failures: Vec<String>,
}

/// A client opening a new connection per request until the front refuses connections (the
/// listener is closed) or `stop`. Anything but a 200 answer or a refused connect is a
/// failure: a reset, a broken pipe, an EOF before the answer, a 4xx, a 5xx.
async fn new_connection_per_request(
    front: std::net::SocketAddr,
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let auth = format!("Bearer {}", token("t", None));
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        match request(
            front,
            Method::POST,
            "/v1/classify",
            &[("authorization", &auth)],
            BODY,
        )
        .await
        {
            Ok(r) if r.status == 200 => {
                seen.ok += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => {
                seen.failures
                    .push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
            }
            Err(e) => {
                let refused = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
                if refused {
                    break;
                }
                seen.failures.push(format!("{e:#}"));
            }
        }
    }
    seen
}

/// Item 9: SIGTERM while 8 clients each open a new connection per request. Every connection
/// the kernel accepted before the front's listener closed is served; a client may only see
/// its connect refused afterwards. Run several times: the race it guards is narrow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_every_connection_the_kernel_accepted() {
    for round in 0..4 {
        let mut sys = TestSystem::start(SystemOptions::default()).await;
        let answered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(new_connection_per_request(
                    sys.front,
                    answered.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        eventually("traffic to flow", Duration::from_secs(15), || {
            let n = answered.load(Ordering::Relaxed);
            async move { (n >= 40).then_some(()) }
        })
        .await;
        sys.signal(Signal::SIGTERM);
        let status = sys.wait_exit(Duration::from_secs(20)).await;
        // Every client ends on its own once connects are refused; `stop` is the backstop
        // for a client stuck in a connect the kernel never answers.
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                stop.store(true, Ordering::Relaxed);
            })
        };
        let mut total = Seen::default();
        for c in clients {
            let seen = c.await.unwrap();
            total.ok += seen.ok;
            total.failures.extend(seen.failures);
        }
        stopper.abort();
        eprintln!(
            "round {round}: {} answered, {} failed, exit {:?}",
            total.ok,
            total.failures.len(),
            status.code()
        );
        assert!(
            total.failures.is_empty(),
            "round {round}: {} clients saw failures: {:?}",
            total.failures.len(),
            total.failures
        );
        assert_eq!(status.code(), Some(0), "{}", sys.logs());
    }
}

/// A merge into session `S` with idempotency key `key`: its status.
async fn merge_status(sys: &TestSystem, key: &str) -> (u16, String) {
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    let r = request(
        sys.front,
        Method::POST,
        "/v1/tests/sessions/S/results",
        &[("authorization", &auth), ("idempotency-key", key)],
        format!(r#"{{"changes":[{{"op":"set","path":"/{key}","value":1}}],"_sync_meta":{{"vector_clock":{{}}}}}}"#),
    )
    .await
    .unwrap();
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

/// The SQLite file deleted under a running system (attack round 7: merges kept answering 200
/// into the deleted file, a restarted worker opened a new empty one beside it, and after a
/// restart every write was gone): the workers notice, refuse every merge (never a 200 that
/// cannot survive) and leave rotation; the log says what to do.
#[tokio::test]
async fn a_deleted_sqlite_file_is_noticed_and_nothing_more_is_acknowledged() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    assert_eq!(merge_status(&sys, "before").await.0, 200);
    let data = sys.dir.join("data");
    for entry in std::fs::read_dir(&data).expect("the data dir") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("firemode.sqlite3") {
            std::fs::remove_file(&path).expect("delete the database file");
        }
    }
    for i in 0..20 {
        let (status, body) = merge_status(&sys, &format!("after-{i}")).await;
        assert_eq!(status, 503, "a merge after the deletion: {body}");
    }
    eventually(
        "the log names the deleted file",
        Duration::from_secs(10),
        || async { (!lines_with(&sys, "was deleted or replaced").is_empty()).then_some(()) },
    )
    .await;
}
