//! `Store::wait_for_change` on both backends, with two handles on one database standing
//! for two hosts (PostgreSQL) or two sync processes on one file (SQLite).
//!
//! Nothing here sleeps and hopes: tests wait for the events themselves (a waiter's
//! answer, the registry's counters, a marker notification), with long deadlines only as
//! guards against a hang.

#[path = "support/pg.rs"]
mod pg;
#[path = "support/options.rs"]
mod store_options;
use store_options::options;

use firemode_store::{
    IdempotencyKey, MergeOutcome, MergeStep, Reads, RowChanges, Store, WatchStats, WATCH_CHANNEL,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Far enough never to be reached by a passing test; only a broken wake-up gets there.
const GUARD: Duration = Duration::from_secs(30);

/// A name no other test (or run) uses.
pub fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:x}_{:x}_{:x}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A tenant as the sync worker names them: arbitrary Unicode, a few hundred bytes.
fn tenant() -> String {
    format!("org:Üñí-東京-{}", "x".repeat(300))
}

/// Two handles on one database, as two hosts or processes would have.
struct Pair {
    a: Store,
    b: Store,
    /// PostgreSQL: where to open raw connections.
    url: Option<String>,
    _db: Option<pg::PgDatabase>,
    dir: PathBuf,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn pair(db: Option<pg::PgDatabase>) -> Pair {
    let dir = std::env::temp_dir().join(format!("fm-watch-{}", unique()));
    let url = db.as_ref().map(|db| db.url.clone());
    let opts = options(url.as_deref().unwrap_or(""), &dir);
    let a = Store::open(&opts).unwrap();
    let b = Store::open(&opts).unwrap();
    a.migrate().await.unwrap();
    Pair {
        a,
        b,
        url,
        _db: db,
        dir,
    }
}

async fn sqlite_pair() -> Pair {
    pair(None).await
}

async fn pg_pair() -> Option<Pair> {
    Some(pair(Some(pg::pg_database().await?)).await)
}

/// One applied batch on the session.
async fn merge(store: &Store, tenant: &str, session_id: &str) {
    let key = unique();
    let idem = IdempotencyKey {
        subject: "tester".into(),
        key: key.clone(),
        request_hash: key.clone(),
        legacy_request_hash: None,
    };
    let outcome = store
        .merge_session(
            tenant,
            session_id,
            idem,
            Duration::from_secs(3600),
            Reads::default(),
            Box::new(move |_| MergeStep {
                changes: Some(RowChanges {
                    head: format!("{{\"batch\":\"{key}\"}}"),
                    base: None,
                    upserts: Vec::new(),
                    deletes: Vec::new(),
                    stamps: Vec::new(),
                    stamps_below: Default::default(),
                }),
                status: 200,
                body: "{}".into(),
                remember: true,
                journal: Vec::new(),
                compact: false,
            }),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, MergeOutcome::Ran(_)), "{outcome:?}");
}

/// Waits (bounded by [`GUARD`]) until the handle's counters satisfy `cond`.
async fn until(store: &Store, what: &str, cond: impl Fn(&WatchStats) -> bool) -> WatchStats {
    let give_up = Instant::now() + GUARD;
    loop {
        let stats = store.watch_stats();
        if cond(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < give_up,
            "never reached: {what} ({stats:?})"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Spawns a waiter on `store` and returns once it is registered and its session's first
/// read is done (or under way), so what follows happens while it waits.
async fn waiting(
    store: &Store,
    tenant: &str,
    session_id: &str,
    seen: i64,
) -> tokio::task::JoinHandle<bool> {
    let before = store.watch_stats();
    let (s, t, id) = (store.clone(), tenant.to_string(), session_id.to_string());
    let task = tokio::spawn(async move {
        s.wait_for_change(&t, &id, seen, Instant::now() + GUARD)
            .await
            .unwrap()
    });
    until(store, "the waiter registered", |s| {
        s.waiters > before.waiters && s.version_reads > before.version_reads
    })
    .await;
    task
}

async fn wakes_on_a_merge_through_another_handle(p: &Pair) {
    let (tenant, session) = (tenant(), unique());
    assert_eq!(p.a.session_version(&tenant, &session).await.unwrap(), 0);
    let waiter = waiting(&p.a, &tenant, &session, 0).await;
    merge(&p.b, &tenant, &session).await;
    let merged = Instant::now();
    assert!(
        waiter.await.unwrap(),
        "woken by the merge, not the deadline"
    );
    eprintln!("woken {:?} after the merge", merged.elapsed());
    assert_eq!(p.a.session_version(&tenant, &session).await.unwrap(), 1);

    // And again on a session that exists, from the version just seen.
    let waiter = waiting(&p.a, &tenant, &session, 1).await;
    merge(&p.b, &tenant, &session).await;
    assert!(waiter.await.unwrap());
    until(&p.a, "every waiter gone", |s| {
        s.waiters == 0 && s.sessions == 0
    })
    .await;
}

async fn an_old_version_returns_at_once_and_a_current_one_times_out(p: &Pair) {
    let (tenant, session) = (tenant(), unique());
    merge(&p.b, &tenant, &session).await;
    merge(&p.b, &tenant, &session).await;
    let started = Instant::now();
    let deadline = started + GUARD;
    assert!(p
        .a
        .wait_for_change(&tenant, &session, 1, deadline)
        .await
        .unwrap());
    assert!(p
        .a
        .wait_for_change(&tenant, &session, 0, deadline)
        .await
        .unwrap());
    assert!(started.elapsed() < GUARD / 2, "{:?}", started.elapsed());

    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let changed =
        p.a.wait_for_change(&tenant, &session, 2, started + wait)
            .await
            .unwrap();
    assert!(!changed, "nothing was merged");
    assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
    // A deadline already past answers at once.
    let changed =
        p.a.wait_for_change(&tenant, &session, 2, Instant::now())
            .await
            .unwrap();
    assert!(!changed);
    assert_eq!(p.a.watch_stats().waiters, 0, "nothing left registered");
    assert_eq!(p.a.watch_stats().sessions, 0);
}

/// 1,000 waiters on one session all wake on one merge; the store work that merge causes
/// does not grow with them: returns the version reads it took.
async fn a_thousand_waiters_wake_on_one_merge(p: &Pair, through: &Store) -> u64 {
    let (tenant, session) = (tenant(), unique());
    merge(&p.b, &tenant, &session).await;
    let deadline = Instant::now() + GUARD;
    let waiters: Vec<_> = (0..1000)
        .map(|_| {
            let (s, t, id) = (p.a.clone(), tenant.clone(), session.clone());
            tokio::spawn(async move { s.wait_for_change(&t, &id, 1, deadline).await.unwrap() })
        })
        .collect();
    let before = until(&p.a, "1,000 waiters on one session", |s| {
        s.waiters == 1000 && s.sessions == 1 && s.version_reads > 0
    })
    .await;
    merge(through, &tenant, &session).await;
    for waiter in waiters {
        assert!(waiter.await.unwrap(), "every waiter woken by the merge");
    }
    let after = p.a.watch_stats();
    until(&p.a, "the session's entry removed", |s| {
        s.waiters == 0 && s.sessions == 0
    })
    .await;
    after.version_reads - before.version_reads
}

/// A merge racing a waiter's arrival is never missed: each round reads the version, then
/// starts a waiter from it and a merge at the same moment. Half the rounds keep another
/// waiter on the session (one that never wakes), so new waiters join a live entry with
/// a version read before the merge.
async fn no_lost_wake_up_when_a_merge_races_the_subscription(p: &Pair, rounds: usize) {
    let (tenant, session) = (tenant(), unique());
    let mut anchor = None;
    for round in 0..rounds {
        if round == rounds / 2 {
            let (s, t, id) = (p.a.clone(), tenant.clone(), session.clone());
            anchor = Some(tokio::spawn(async move {
                s.wait_for_change(&t, &id, i64::MAX, Instant::now() + GUARD * 4)
                    .await
            }));
        }
        let seen = p.a.session_version(&tenant, &session).await.unwrap();
        let through = if round % 2 == 0 { &p.a } else { &p.b };
        let started = Instant::now();
        let (changed, ()) = tokio::join!(
            p.a.wait_for_change(&tenant, &session, seen, started + GUARD),
            merge(through, &tenant, &session),
        );
        assert!(
            changed.unwrap(),
            "round {round}: the racing merge was missed"
        );
    }
    if let Some(anchor) = anchor {
        anchor.abort();
    }
    until(&p.a, "the session's entry removed", |s| s.sessions == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_waiter_wakes_on_a_merge_by_another_process() {
    wakes_on_a_merge_through_another_handle(&sqlite_pair().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiter_wakes_on_a_merge_by_another_host() {
    let Some(p) = pg_pair().await else { return };
    wakes_on_a_merge_through_another_handle(&p).await;
    assert_eq!(p.a.watch_stats().listener_connects, 1);
    assert_eq!(
        p.b.watch_stats().listener_connects,
        0,
        "a store that never waited never listens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_old_version_returns_at_once_and_current_times_out() {
    an_old_version_returns_at_once_and_a_current_one_times_out(&sqlite_pair().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_old_version_returns_at_once_and_current_times_out() {
    let Some(p) = pg_pair().await else { return };
    an_old_version_returns_at_once_and_a_current_one_times_out(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_thousand_waiters_share_one_check() {
    let p = sqlite_pair().await;
    // Another process's merge is found by the session's one shared poll (every 100 ms):
    // reads grow with the time the wake takes, never with the waiters.
    let reads = a_thousand_waiters_wake_on_one_merge(&p, &p.b).await;
    assert!(reads < 200, "{reads} version reads for 1,000 waiters");
    // A merge of this process wakes them at once: one read (plus a poll that may fall in).
    let reads = a_thousand_waiters_wake_on_one_merge(&p, &p.a).await;
    assert!(reads < 200, "{reads} version reads for 1,000 waiters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_thousand_waiters_one_notify_one_read() {
    let Some(p) = pg_pair().await else { return };
    let url = p.url.clone().unwrap();
    // A raw listener of our own counts what merges send.
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {WATCH_CHANNEL}"))
        .await
        .unwrap();
    // The session's first merge (no waiter yet) notifies too.
    let reads = a_thousand_waiters_wake_on_one_merge(&p, &p.b).await;
    assert!(reads <= 3, "{reads} version reads for 1,000 waiters");
    // Notifications arrive in commit order: all the merges' are in before our marker.
    client
        .batch_execute(&format!("NOTIFY {WATCH_CHANNEL}, 'marker'"))
        .await
        .unwrap();
    let mut sent = Vec::new();
    loop {
        let note = tokio::time::timeout(GUARD, notes.recv())
            .await
            .expect("the marker notification arrives")
            .expect("the listener runs");
        if note == "marker" {
            break;
        }
        sent.push(note);
    }
    assert_eq!(
        sent.len(),
        2,
        "one NOTIFY per merge, whatever the waiters: {sent:?}"
    );
    assert_eq!(sent[0], sent[1], "both name the same session");
    assert_eq!(sent[0].len(), 32, "a digest, not the tenant: {:?}", sent[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_no_lost_wake_up_under_racing_merges() {
    no_lost_wake_up_when_a_merge_races_the_subscription(&sqlite_pair().await, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_no_lost_wake_up_under_racing_merges() {
    let Some(p) = pg_pair().await else { return };
    no_lost_wake_up_when_a_merge_races_the_subscription(&p, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listener_reconnects_and_wakes_waiters() {
    let Some(p) = pg_pair().await else { return };
    let (tenant, session) = (tenant(), unique());
    let waiter = waiting(&p.a, &tenant, &session, 0).await;
    until(&p.a, "the listener up", |s| s.listener_connects == 1).await;
    // Cut the listening connection; merge at once, likely before it is back: that
    // notification is lost, and the reconnect must make the waiter re-read.
    let url = p.url.clone().unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let killed = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'firemode-watch' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1, "one listening connection per store");
    merge(&p.b, &tenant, &session).await;
    assert!(waiter.await.unwrap(), "woken after the reconnect");
    until(&p.a, "the listener back", |s| s.listener_connects == 2).await;
    // And it listens again: a new waiter hears the next merge.
    let waiter = waiting(&p.a, &tenant, &session, 1).await;
    merge(&p.b, &tenant, &session).await;
    assert!(waiter.await.unwrap());
}
