//! What large work costs the sync worker's memory: one small write over a large subtree
//! (attack round 7: a 155-byte `set /items {}` over 100,000 paths grew the worker by 104 MiB
//! on SQLite, 78 MiB on PostgreSQL; such a write drops every register below it, so its work
//! grows with what it drops, and its memory should stay a small multiple of those registers),
//! and what the worker keeps once a large read is over.

use crate::hostile_sync::{batch, call, ok, post, proc_kib, set, start, sync_pid};
use firemode_tests::{eventually, pg_database, token, TestSystem};
use http::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// Paths under `/items` before the wipe.
const PATHS: usize = 80_000;
/// Paths a filling batch sets.
const FILL_BATCH: usize = 500;

/// Sets [`PATHS`] paths under `/items` of `session` in batches of [`FILL_BATCH`]; the clock.
async fn fill(sys: &TestSystem, t: &str, session: &str) -> Value {
    let mut clock = json!({});
    for (n, start) in (0..PATHS).step_by(FILL_BATCH).enumerate() {
        let changes = (start..start + FILL_BATCH)
            .map(|i| set(&format!("/items/IT-{i:05}/status"), json!("ok")))
            .collect();
        // The filling tablet leaves its own entry out of its clock: the worker numbers them.
        let fill = batch("fill", json!({}), changes);
        let answer = ok(&post(sys.front, t, session, &format!("fill-{n}"), &fill).await);
        assert_eq!(answer["applied"], FILL_BATCH, "{answer}");
        clock = answer["vector_clock"].clone();
    }
    clock
}

/// Fills `/items` with [`PATHS`] paths, then one `set /items {}` from another tablet drops them
/// all. The merge held the session twice (the registers as loaded and a copy to find what
/// changed), every path parsed twice (the map's key and the register's own), beside the rows'
/// text: ~1.8 KB a path (release build, 100,000 paths: +178 MiB). Now one copy, paths shared,
/// rows dropped as they parse, the rare remembered key boxed: ~0.55 KB a path (+44–47 MiB
/// here; 77–84 with the paths parsed twice and the key inline).
async fn check_a_wipe_costs_a_bounded_multiple_of_its_subtree(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let clock = fill(sys, &t, "WIPE").await;
    let pid = sync_pid(sys).await;
    let before = proc_kib(pid, "VmRSS");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let wipe = batch("wiper", clock, vec![set("/items", json!({}))]);
    let answer = ok(&post(f, &t, "WIPE", "wipe", &wipe).await);
    assert_eq!(answer["applied"], 1, "{answer}");
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("set /items over {PATHS} paths: peak RSS +{growth_kib} KiB");
    let session = call(f, Method::GET, &t, "/v1/tests/sessions/WIPE", &[]).await;
    assert_eq!(ok(&session)["document"], json!({"items": {}}));
    assert!(
        growth_kib < 60 * 1024,
        "one set over {PATHS} paths grew the worker's peak RSS by {growth_kib} KiB"
    );
}

#[tokio::test]
async fn a_wipe_costs_a_bounded_multiple_of_its_subtree_sqlite() {
    let sys = start(None, vec![]).await;
    check_a_wipe_costs_a_bounded_multiple_of_its_subtree(&sys).await;
}

#[tokio::test]
async fn a_wipe_costs_a_bounded_multiple_of_its_subtree_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_a_wipe_costs_a_bounded_multiple_of_its_subtree(&sys).await;
}

/// After a whole read of [`PATHS`] paths the worker's RSS goes back near where it was within a
/// few seconds: glibc kept the freed heap in its arenas (release build, 100,000 paths: 15 →
/// 105 MiB, and 105 MiB from then on) until the worker asked for the free pages back once
/// large work had stopped (`memory.rs`: 105 → 41 MiB). The store does not matter here.
#[tokio::test]
async fn a_large_read_gives_its_memory_back() {
    let sys = start(None, vec![]).await;
    let t = token("tab-a", Some("acme"));
    fill(&sys, &t, "BIG").await;
    let pid = sync_pid(&sys).await;
    let before = proc_kib(pid, "VmRSS");
    let read = call(sys.front, Method::GET, &t, "/v1/tests/sessions/BIG", &[]).await;
    assert_eq!(
        ok(&read)["document"]["items"].as_object().map(|o| o.len()),
        Some(PATHS)
    );
    let during = proc_kib(pid, "VmRSS");
    eprintln!("whole read of {PATHS} paths: RSS {before} KiB before, {during} KiB after");
    let settled = eventually(
        "the worker's RSS back near its level before the read",
        Duration::from_secs(10),
        || async {
            let now = proc_kib(pid, "VmRSS");
            (now < before + 20 * 1024).then_some(now)
        },
    )
    .await;
    eprintln!("... and {settled} KiB once settled");
}
