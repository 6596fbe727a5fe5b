//! What one small write over a large subtree costs the sync worker (attack round 7: a
//! 155-byte `set /items {}` over 100,000 paths grew the worker by 104 MiB on SQLite, 78 MiB
//! on PostgreSQL). Such a write drops every register below it, so its work grows with what it
//! drops; its memory should stay a small multiple of those registers.

use crate::hostile_sync::{batch, ok, post, proc_kib, set, start, sync_pid};
use firemode_tests::{pg_database, token, TestSystem};
use serde_json::json;

/// Paths under `/items` before the wipe.
const PATHS: usize = 80_000;
/// Paths a filling batch sets.
const FILL_BATCH: usize = 500;

/// Fills `/items` with [`PATHS`] paths, then one `set /items {}` from another tablet drops them
/// all. The merge held the session twice (the registers as loaded and a copy to find what
/// changed), every path parsed twice (the map's key and the register's own), beside the rows'
/// text: ~1.8 KB a path (release build, 100,000 paths: +178 MiB). Now one copy, paths shared,
/// rows dropped as they parse, the rare remembered key boxed: ~0.55 KB a path (+44–47 MiB
/// here; 77–84 with the paths parsed twice and the key inline).
async fn check_a_wipe_costs_a_bounded_multiple_of_its_subtree(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    // The filling tablet leaves its own entry out of its clock: the worker numbers its batches.
    let mut clock = json!({});
    for (n, start) in (0..PATHS).step_by(FILL_BATCH).enumerate() {
        let changes = (start..start + FILL_BATCH)
            .map(|i| set(&format!("/items/IT-{i:05}/status"), json!("ok")))
            .collect();
        let fill = batch("fill", json!({}), changes);
        let answer = ok(&post(f, &t, "WIPE", &format!("fill-{n}"), &fill).await);
        assert_eq!(answer["applied"], FILL_BATCH, "{answer}");
        clock = answer["vector_clock"].clone();
    }
    let pid = sync_pid(sys).await;
    let before = proc_kib(pid, "VmRSS");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let wipe = batch("wiper", clock, vec![set("/items", json!({}))]);
    let answer = ok(&post(f, &t, "WIPE", "wipe", &wipe).await);
    assert_eq!(answer["applied"], 1, "{answer}");
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("set /items over {PATHS} paths: peak RSS +{growth_kib} KiB");
    let session =
        crate::hostile_sync::call(f, http::Method::GET, &t, "/v1/tests/sessions/WIPE", &[]).await;
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
