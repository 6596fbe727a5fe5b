//! What operators look for (issue #13, item 6): `--version` with the git commit on every
//! binary, a startup line saying which build and which config run, `firemode_build_info`
//! and `process_*` series for the supervisor and every worker, counters present at 0 from
//! the start, per-slot gauges that do not outlive a slot, and the optional access log.

use firemode_tests::{bin_dir, eventually, request, token, SystemOptions, TestSystem};
use http::Method;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The commit the binaries must report: what `telemetry/build.rs` computes.
fn expected_commit() -> String {
    if let Some(c) = std::env::var("FIREMODE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        return c.trim().to_string();
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".to_string(),
    }
}

/// One sample of a Prometheus text scrape: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a scrape (label values here hold no `,` or `"`).
fn samples(scrape: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The samples of `name` from the workers of `kind` (the merge labels them with `kind` and
/// `instance`), or with `None` the supervisor's own (no `instance` label).
fn of<'a>(all: &'a [Sample], name: &str, kind: Option<&str>) -> Vec<&'a Sample> {
    all.iter()
        .filter(|s| s.name == name)
        .filter(|s| match kind {
            // Worker series carry both `kind` and `instance` (added by the merge).
            Some(k) => {
                s.labels.get("kind").map(String::as_str) == Some(k)
                    && s.labels.contains_key("instance")
            }
            None => !s.labels.contains_key("instance"),
        })
        .collect()
}

async fn scrape(sys: &TestSystem) -> Vec<Sample> {
    let r = sys.admin_get("/metrics").await;
    assert_eq!(r.status, 200);
    samples(&String::from_utf8_lossy(&r.body))
}

/// JSON log lines whose `message` is `message`.
fn log_lines(sys: &TestSystem, message: &str) -> Vec<serde_json::Value> {
    sys.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

#[test]
fn version_shows_the_version_and_commit_on_all_three_binaries() {
    let commit = expected_commit();
    for bin in ["firemode", "firemode-classify", "firemode-sync"] {
        let out = std::process::Command::new(bin_dir().join(bin))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("running {bin} --version: {e}"));
        assert!(out.status.success(), "{bin} --version failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("{bin} {} (commit {commit})", env!("CARGO_PKG_VERSION"));
        assert_eq!(text.trim(), want, "{bin} --version");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_has_build_info_and_process_series_for_the_supervisor_and_each_worker_kind() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        sync_instances: 1,
        set: vec![("workers.sync.max_rss", "1GiB".into())],
        ..SystemOptions::default()
    })
    .await;
    let commit = expected_commit();
    // Workers are scraped once they run; wait until both kinds answered.
    let all = eventually(
        "both worker kinds in the scrape",
        Duration::from_secs(20),
        || async {
            let all = scrape(&sys).await;
            let both = ["classify", "sync"]
                .iter()
                .all(|k| !of(&all, "firemode_build_info", Some(k)).is_empty());
            both.then_some(all)
        },
    )
    .await;
    for kind in [None, Some("classify"), Some("sync")] {
        let info = of(&all, "firemode_build_info", kind);
        assert_eq!(info.len(), 1, "one firemode_build_info for {kind:?}");
        assert_eq!(info[0].value, 1.0);
        assert_eq!(info[0].labels["commit"], commit, "{kind:?}");
        assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
        let rss = of(&all, "process_resident_memory_bytes", kind);
        assert_eq!(
            rss.len(),
            1,
            "one process_resident_memory_bytes for {kind:?}"
        );
        // Between 1 MiB and 4 GiB: a real RSS, not a placeholder.
        assert!(
            rss[0].value > 1_048_576.0 && rss[0].value < 4.0 * 1_073_741_824.0,
            "RSS of {kind:?}: {}",
            rss[0].value
        );
        for name in [
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert_eq!(of(&all, name, kind).len(), 1, "{name} for {kind:?}");
        }
        let start = of(&all, "process_start_time_seconds", kind)[0].value;
        let now = firemode_tests::unix_now() as f64;
        assert!(
            start > now - 3600.0 && start <= now + 5.0,
            "start time {start} vs now {now}"
        );
        // Counters an alert's increase() needs from 0: present before any event.
        let failures = of(&all, "firemode_span_export_failures_total", kind);
        assert_eq!(failures.len(), 1, "span export failures for {kind:?}");
        assert_eq!(failures[0].value, 0.0);
    }
    // The process series are the processes': the supervisor's RSS is its own.
    let supervisor_pid = sys.pid();
    let fds = std::fs::read_dir(format!("/proc/{supervisor_pid}/fd"))
        .unwrap()
        .count() as f64;
    let scraped_fds = of(&all, "process_open_fds", None)[0].value;
    assert!(
        (scraped_fds - fds).abs() < 50.0,
        "supervisor fds: scraped {scraped_fds}, /proc says {fds}"
    );
    for kind in ["classify", "sync"] {
        let poison = all
            .iter()
            .filter(|s| s.name == "firemode_poison_requests_total")
            .find(|s| s.labels.get("kind").map(String::as_str) == Some(kind))
            .unwrap_or_else(|| panic!("firemode_poison_requests_total{{kind={kind}}} at 0"));
        assert_eq!(poison.value, 0.0);
    }
    // Each kind's max_rss beside its workers' RSS (0: no limit).
    for (kind, limit) in [("classify", 0.0), ("sync", 1_073_741_824.0)] {
        let max_rss = all
            .iter()
            .filter(|s| s.name == "firemode_worker_max_rss_bytes")
            .find(|s| s.labels.get("kind").map(String::as_str) == Some(kind))
            .unwrap_or_else(|| panic!("firemode_worker_max_rss_bytes{{kind={kind}}}"));
        assert_eq!(max_rss.value, limit, "{kind}");
    }

    // The startup lines: which build runs, with which config.
    let started = log_lines(&sys, "firemode starting");
    assert_eq!(started.len(), 1, "{}", sys.logs());
    assert_eq!(started[0]["commit"], commit.as_str());
    assert_eq!(started[0]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        Path::new(started[0]["config"].as_str().unwrap()),
        sys.config_path
    );
    let workers = log_lines(&sys, "worker starting");
    assert!(workers.len() >= 2, "{}", sys.logs());
    for w in workers {
        assert_eq!(w["commit"], commit.as_str(), "{w}");
    }
}

/// Sends SIGHUP and waits for one more "reload complete" line.
async fn reload(sys: &TestSystem) {
    let seen = log_lines(sys, "reload complete").len();
    sys.signal(Signal::SIGHUP);
    eventually("the reload to complete", Duration::from_secs(30), || {
        let n = log_lines(sys, "reload complete").len();
        async move { (n > seen).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_retired_by_scaling_down_does_not_stay_up_in_the_scrape() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 2,
        sync_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let up = |all: &[Sample]| -> f64 {
        all.iter()
            .filter(|s| s.name == "firemode_worker_up")
            .filter(|s| s.labels.get("kind").map(String::as_str) == Some("classify"))
            .map(|s| s.value)
            .sum()
    };
    eventually(
        "both classify slots up",
        Duration::from_secs(20),
        || async { (up(&scrape(&sys).await) == 2.0).then_some(()) },
    )
    .await;
    sys.rewrite_config(vec![("workers.classify.instances", 1.into())]);
    reload(&sys).await;
    eventually(
        "one classify slot up after scaling down",
        Duration::from_secs(20),
        || async { (sys.instances("classify").await.len() == 1).then_some(()) },
    )
    .await;
    let all = scrape(&sys).await;
    assert_eq!(
        up(&all),
        1.0,
        "the retired slot still counts as up: {:?}",
        all.iter()
            .filter(|s| s.name == "firemode_worker_up")
            .map(|s| (&s.labels, s.value))
            .collect::<Vec<_>>()
    );
    let backoff: f64 = all
        .iter()
        .filter(|s| s.name == "firemode_worker_backoff")
        .map(|s| s.value)
        .sum();
    assert_eq!(backoff, 0.0);
}

/// The access lines (target `firemode::access`) of one request id.
fn access_lines(sys: &TestSystem, request_id: &str) -> Vec<serde_json::Value> {
    log_lines(sys, "access")
        .into_iter()
        .filter(|v| v["target"] == "firemode::access" && v["request_id"] == request_id)
        .collect()
}

async fn classify(sys: &TestSystem, request_id: &str, auth: &str) -> u16 {
    let body = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;
    let r = request(
        sys.front,
        Method::POST,
        "/v1/classify",
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
            ("x-request-id", request_id),
        ],
        body,
    )
    .await
    .unwrap();
    r.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_is_off_by_default_and_a_reload_turns_it_on() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        sync_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let auth = format!("Bearer {}", token("tablet-1", Some("acme")));
    assert_eq!(classify(&sys, "access-off-1", &auth).await, 200);

    sys.rewrite_config(vec![("telemetry.access_log", true.into())]);
    reload(&sys).await;
    assert_eq!(classify(&sys, "access-on-1", &auth).await, 200);
    assert_eq!(classify(&sys, "access-on-401", "Bearer nope").await, 401);
    let session = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/secret-session-42",
        &[("authorization", &auth), ("x-request-id", "access-on-get")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(session.status, 200);

    let line = eventually("the access line", Duration::from_secs(10), || {
        let got = access_lines(&sys, "access-on-get");
        async move { got.into_iter().next() }
    })
    .await;
    // The log is one ordered stream: the lines before this one are all read by now.
    assert_eq!(line["method"], "GET");
    assert_eq!(
        line["route"], "/v1/tests/sessions/{id}",
        "a template, never the path"
    );
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert_eq!(line["bytes"], session.body.len() as u64, "{line}");

    let on = access_lines(&sys, "access-on-1");
    assert_eq!(on.len(), 1, "{}", sys.logs());
    assert_eq!(on[0]["method"], "POST");
    assert_eq!(on[0]["route"], "/v1/classify");
    assert_eq!(on[0]["status"], 200);
    assert_eq!(on[0]["level"], "INFO");
    let refused = access_lines(&sys, "access-on-401");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["status"], 401);
    assert!(
        access_lines(&sys, "access-off-1").is_empty(),
        "an access line while telemetry.access_log was off"
    );
}
