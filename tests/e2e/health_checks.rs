//! The health checks' verdicts against a worker whose checks fail on purpose: a gate in
//! front of its socket holds every `GET /healthz` unanswered and passes everything else
//! through, so "the checks fail" and "the requests are answered" are both certain, not a
//! matter of load.

use crate::supervision::load;
use firemode_tests::{eventually, SystemOptions, TestSystem};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The one classify instance's socket in the system's runtime dir.
fn classify_socket(sys: &TestSystem) -> PathBuf {
    let run = sys.dir.join("run");
    std::fs::read_dir(&run)
        .expect("the runtime dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("classify-") && n.ends_with(".sock"))
        })
        .expect("a classify socket")
}

/// Moves the worker's socket aside and listens at its path: a connection whose request head
/// asks for `/healthz` is held open unanswered (the supervisor's check times out); any other
/// is relayed to the worker. Returns how many checks it held.
fn gate_health_checks(socket: &Path) -> Arc<std::sync::atomic::AtomicUsize> {
    let real = socket.with_extension("real");
    std::fs::rename(socket, &real).expect("move the worker's socket aside");
    let gate = UnixListener::bind(socket).expect("listen at the worker's socket path");
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = held.clone();
    tokio::spawn(async move {
        let mut unanswered = Vec::new();
        while let Ok((mut conn, _)) = gate.accept().await {
            let mut head = vec![0u8; 16];
            if conn.read_exact(&mut head).await.is_err() {
                continue;
            }
            if head.starts_with(b"GET /healthz") {
                counted.fetch_add(1, Ordering::Relaxed);
                unanswered.push(conn);
                continue;
            }
            let real = real.clone();
            tokio::spawn(async move {
                let Ok(mut worker) = UnixStream::connect(&real).await else {
                    return;
                };
                if worker.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut worker).await;
                }
            });
        }
    });
    held
}

async fn classify_pid(sys: &TestSystem) -> Option<u64> {
    sys.instances("classify").await.first()?["pid"].as_u64()
}

/// An instance whose health checks all fail but which keeps completing answers is busy, not
/// hung: it is not killed however many checks fail. Once it stops answering, the same failed
/// checks kill it at `unhealthy_threshold`. (Before this test, only a heavy-load test touched
/// the rule, and it passed with the rule disabled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_answers_is_not_killed_for_failed_checks() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        set: vec![
            ("supervisor.health_interval", "200ms".into()),
            ("supervisor.health_timeout", "100ms".into()),
            ("supervisor.unhealthy_threshold", 3.into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    sys.wait_all_ready().await;
    let pid = classify_pid(&sys).await.expect("a classify pid");
    let held = gate_health_checks(&classify_socket(&sys));

    // Answering: three seconds, fifteen checks, every one failing.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, client) = load(&sys, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = client.await.expect("the client");
    assert!(errors.is_empty(), "requests failed: {errors:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 0);
    let checks = held.load(Ordering::Relaxed);
    assert!(checks >= 6, "only {checks} checks held");
    assert_eq!(
        classify_pid(&sys).await,
        Some(pid),
        "an answering instance was killed after {checks} failed checks:\n{}",
        sys.logs()
    );
    assert!(sys
        .logs()
        .contains("health check failed, but the instance is answering requests: alive"));

    // Silent: the failed checks now count, and the third in a row kills it.
    eventually(
        "the silent instance killed",
        Duration::from_secs(10),
        || {
            let sys = &sys;
            async move { (classify_pid(sys).await != Some(pid)).then_some(()) }
        },
    )
    .await;
}
