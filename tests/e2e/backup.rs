//! `firemode backup FILE`: an online copy of the SQLite store taken while clients write, that
//! a new system started on it serves unchanged; never an overwrite; PostgreSQL is refused
//! with the pg_dump hint.

use firemode_tests::{bin_dir, request, token, SystemOptions, TestSystem};
use http::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

async fn write(front: std::net::SocketAddr, tok: &str, session: &str, n: u64) -> u16 {
    let body = json!({"changes": [{"op": "set", "path": format!("/n{n}"), "value": n}],
                      "_sync_meta": {"vector_clock": {"tab": n}, "replica_id": "tab"}});
    request(
        front,
        Method::POST,
        &format!("/v1/tests/sessions/{session}/results"),
        &[
            ("authorization", &format!("Bearer {tok}")),
            ("idempotency-key", &format!("{session}-{n}")),
        ],
        body.to_string(),
    )
    .await
    .map(|r| r.status.as_u16())
    .unwrap_or(0)
}

async fn document(front: std::net::SocketAddr, tok: &str, session: &str) -> Value {
    let r = request(
        front,
        Method::GET,
        &format!("/v1/tests/sessions/{session}"),
        &[("authorization", &format!("Bearer {tok}"))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    r.json()
}

fn backup(sys: &TestSystem, file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(bin_dir().join("firemode"))
        .arg("backup")
        .arg(file)
        .arg("--config")
        .arg(&sys.config_path)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_restores_into_a_working_system() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let t = token("tech-1", Some("acme"));
    for n in 1..=5 {
        assert_eq!(write(sys.front, &t, "DONE", n).await, 200);
    }
    let before = document(sys.front, &t, "DONE").await;

    // A writer keeps going while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, t, front) = (stop.clone(), t.clone(), sys.front);
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                assert_eq!(write(front, &t, "LIVE", n).await, 200, "write {n}");
            }
            n
        })
    };
    while document(sys.front, &t, "LIVE").await["vector_clock"]["tab"]
        .as_u64()
        .unwrap_or(0)
        < 3
    {
        tokio::task::yield_now().await;
    }
    let acked_before_backup = document(sys.front, &t, "LIVE").await["vector_clock"]["tab"]
        .as_u64()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("fm-backup-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(dir.join("restored")).unwrap();
    let file = dir.join("restored/firemode.sqlite3");
    let out = backup(&sys, &file);
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("backed up 2 sessions"), "{summary}");
    assert!(written >= acked_before_backup);

    // Private, like the store it copies (the data dir FireMode made is 0700).
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600, "the backup is readable by others");
    assert_eq!(
        mode(&sys.dir.join("data")),
        0o700,
        "the data dir is open to others"
    );

    // Never overwrites.
    let again = backup(&sys, &file);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // A new system on the copy serves what was written before the backup.
    let restored = TestSystem::start(SystemOptions {
        set: vec![(
            "data_dir",
            dir.join("restored").display().to_string().into(),
        )],
        ..SystemOptions::default()
    })
    .await;
    assert_eq!(document(restored.front, &t, "DONE").await, before);
    let live = document(restored.front, &t, "LIVE").await;
    let kept = live["vector_clock"]["tab"].as_u64().unwrap();
    assert!(
        (acked_before_backup..=written).contains(&kept),
        "the copy holds {kept} writes; {acked_before_backup} were acknowledged before it began, {written} by its end"
    );
    for n in 1..=kept {
        assert_eq!(live["document"][format!("n{n}")], n, "{live}");
    }
    // And takes new writes where the copy left off.
    assert_eq!(write(restored.front, &t, "LIVE", kept + 1).await, 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_postgresql_store_is_pointed_at_pg_dump() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    let file = sys.dir.join("never.sqlite3");
    let out = backup(&sys, &file);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));
    assert!(!file.exists());
}
