//! The SQLite wake-up of a process's own merges, with the poll for other processes turned
//! off (an hour), so only the kick after commit can wake a waiter: a lost kick shows as a
//! waiter that times out instead of being covered by the next poll.

use super::{Hub, Source};
use crate::{IdempotencyKey, Inner, MergeOutcome, MergeStep, Store, StoreOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const GUARD: Duration = Duration::from_secs(30);

fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A SQLite store whose watch never polls.
async fn store_without_poll() -> (Store, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("fm-watch-unit-{}", unique()));
    let sqlite = crate::sqlite::SqliteStore::open(&StoreOptions {
        url: String::new(),
        pool_size: 4,
        data_dir: dir.clone(),
        connect_timeout: Duration::from_secs(5),
        lock_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let watch = Hub::new(Source::Sqlite(sqlite.clone()), Duration::from_secs(3600));
    let store = Store {
        inner: Inner::Sqlite(sqlite),
        watch,
    };
    store.migrate().await.unwrap();
    (store, dir)
}

async fn merge(store: &Store, session_id: &str, new_state: Option<String>) {
    let key = unique();
    let idem = IdempotencyKey {
        subject: "tester".into(),
        key: key.clone(),
        request_hash: key,
        legacy_request_hash: None,
    };
    let changes = new_state.map(|head| firemode_merge::RowChanges {
        head,
        base: None,
        upserts: Vec::new(),
        deletes: Vec::new(),
        stamps: Vec::new(),
        stamps_below: Default::default(),
    });
    let step = move |_: Option<crate::SessionRows>| MergeStep {
        changes,
        status: 200,
        body: "{}".into(),
        remember: true,
        journal: Vec::new(),
        compact: false,
    };
    let outcome = store
        .merge_session(
            "t",
            session_id,
            idem,
            Duration::from_secs(60),
            crate::Reads::default(),
            Box::new(step),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, MergeOutcome::Ran(_)));
}

async fn registered(store: &Store, waiters: usize) {
    let give_up = Instant::now() + GUARD;
    while store.watch_stats().waiters < waiters || store.watch_stats().version_reads == 0 {
        assert!(Instant::now() < give_up, "{:?}", store.watch_stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_merges_wake_at_once_and_race_free() {
    let (store, dir) = store_without_poll().await;
    for round in 0..300 {
        let seen = store.session_version("t", "s").await.unwrap();
        let (changed, ()) = tokio::join!(
            store.wait_for_change("t", "s", seen, Instant::now() + GUARD),
            merge(&store, "s", Some(format!("{{\"round\":{round}}}"))),
        );
        assert!(changed.unwrap(), "round {round}: the merge's kick was lost");
    }
    assert_eq!(store.watch_stats().sessions, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_cost_one_read_and_a_no_op_merge_wakes_none() {
    let (store, dir) = store_without_poll().await;
    merge(&store, "s", Some("{}".into())).await;
    let deadline = Instant::now() + GUARD;
    let waiters: Vec<_> = (0..1000)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.wait_for_change("t", "s", 1, deadline).await })
        })
        .collect();
    registered(&store, 1000).await;
    // A merge that changes nothing (a replayed batch) does not kick.
    merge(&store, "s", None).await;
    let before = store.watch_stats();
    merge(&store, "s", Some("{\"a\":1}".into())).await;
    for waiter in waiters {
        assert!(waiter.await.unwrap().unwrap());
    }
    let after = store.watch_stats();
    assert_eq!(
        after.version_reads - before.version_reads,
        1,
        "one shared read for 1,000 waiters"
    );
    assert_eq!(before.version_reads, 1, "the no-op merge read nothing");
    assert_eq!(after.sessions, 0, "the entry left with its last waiter");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiter_bound_is_enforced_and_released() {
    let (store, dir) = store_without_poll().await;
    store
        .watch
        .waiters
        .store(super::MAX_WAITERS as u64, Ordering::Relaxed);
    let refused = store
        .wait_for_change("t", "s", 0, Instant::now() + GUARD)
        .await;
    assert!(
        matches!(refused, Err(crate::StoreError::Busy(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.watch_stats().sessions,
        0,
        "a refused waiter leaves nothing"
    );
    assert_eq!(store.watch_stats().version_reads, 0);
    store.watch.waiters.store(0, Ordering::Relaxed);
    let changed = store
        .wait_for_change("t", "s", 0, Instant::now() + Duration::from_millis(50))
        .await;
    assert!(!changed.unwrap());
    let stats = store.watch_stats();
    assert_eq!((stats.sessions, stats.waiters), (0, 0), "{stats:?}");
    let _ = std::fs::remove_dir_all(dir);
}
