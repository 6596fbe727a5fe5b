//! A hot session (design §3): merges of one session that arrive while another holds its lock
//! wait in the sync worker's queue and then share one transaction, each with its own answer,
//! idempotency record and journal entries — the same answers as one transaction each.

use firemode_merge::ReportLimits;
use firemode_store::{IdempotencyKey, MergeOutcome, Store, StoreOptions};
use firemode_sync::merge::{GroupMember, MergeInput};
use firemode_sync::merge_queue::{GroupSettings, MergeQueue, QueueStats};
use firemode_sync::request::{parse_batch, RequestContext};
use firemode_tests::{eventually, pg_database};
use std::sync::Arc;
use std::time::Duration;

const TENANT: &str = "org:acme";
const SESSION: &str = "HOT";

/// The session's advisory-lock key, as the store computes it.
fn lock_key() -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"firemode-session\0");
    h.update(TENANT.as_bytes());
    h.update([0]);
    h.update(SESSION.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn member(subject: &str, key: &str, body: &str) -> GroupMember {
    let ctx = RequestContext {
        subject,
        now_ms: firemode_tests::unix_now() as u64 * 1000,
        max_clock_skew: Duration::from_secs(300),
        max_changes: 100,
    };
    GroupMember {
        idem: IdempotencyKey {
            subject: subject.into(),
            key: key.into(),
            request_hash: format!("hash:{body}"),
            legacy_request_hash: None,
        },
        input: MergeInput {
            session_id: SESSION.into(),
            subject: subject.into(),
            batch: parse_batch(body.as_bytes(), &ctx).expect("batch"),
            limits: ReportLimits {
                max_conflicts: 10,
                max_bytes: 65_536,
            },
            request_id: key.into(),
            at_ms: ctx.now_ms,
            tombstone_retention_ms: 30 * 24 * 3600 * 1000,
        },
    }
}

fn set_body(path: &str) -> String {
    format!(r#"{{"changes":[{{"op":"set","path":"{path}","value":1}}]}}"#)
}

#[tokio::test]
async fn merges_waiting_for_a_hot_session_share_the_next_transaction() {
    let Some(db) = pg_database().await else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("fm-hot-{:08x}", rand::random::<u32>()));
    let store = Store::open(&StoreOptions {
        url: db.url.clone(),
        pool_size: 8,
        data_dir: dir.clone(),
        connect_timeout: Duration::from_secs(5),
        lock_timeout: Duration::from_secs(20),
    })
    .expect("open");
    store.migrate().await.expect("migrate");
    let queue = Arc::new(MergeQueue::default());
    let settings = GroupSettings {
        store: store.clone(),
        tenant: TENANT.into(),
        idempotency_ttl: Duration::from_secs(3600),
        whole_reads: Default::default(),
    };
    // Another host's merge holds the session's lock.
    let (holder, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    holder.batch_execute("BEGIN").await.expect("begin");
    holder
        .execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key()])
        .await
        .expect("lock");
    // 30 merges of two users' unnamed tablets, and one of them sent twice.
    let mut tasks = Vec::new();
    for i in 0..31 {
        let (queue, settings) = (queue.clone(), settings.clone());
        let subject = if i % 2 == 0 { "alice" } else { "bob" };
        let (key, path) = if i == 30 { (0, 0) } else { (i, i) };
        let member = member(
            if i == 30 { "alice" } else { subject },
            &format!("k{key}"),
            &set_body(&format!("/items/{path}")),
        );
        tasks.push(tokio::spawn(
            async move { queue.merge(settings, member).await },
        ));
    }
    // The first is in its transaction, waiting for the lock; the rest wait in the queue.
    eventually(
        "30 merges queued behind the first",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { (queue.waiting(TENANT, SESSION) == 30).then_some(()) }
        },
    )
    .await;
    holder.batch_execute("COMMIT").await.expect("release");
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("joins").expect("merged"));
    }
    // One transaction for the first, one for all that waited.
    assert_eq!(
        queue.stats(),
        QueueStats {
            groups: 2,
            merges: 31
        }
    );
    let statuses: Vec<u16> = answers
        .iter()
        .map(|answer| match answer {
            MergeOutcome::Ran(step) => step.status,
            MergeOutcome::Replay { status, .. } => *status,
            MergeOutcome::KeyReused => 422,
        })
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The key sent twice: merged once, answered twice alike.
    assert!(
        matches!(answers[30], MergeOutcome::Replay { .. }),
        "{:?}",
        answers[30]
    );
    let stored = store
        .session(TENANT, SESSION)
        .await
        .expect("read")
        .expect("exists");
    let state = firemode_merge::SessionState::from_rows(&stored.rows).expect("loads");
    assert_eq!(state.clock().get("alice"), Some(&15));
    assert_eq!(state.clock().get("bob"), Some(&15));
    let items = state.document()["items"].as_object().map(|o| o.len());
    assert_eq!(items, Some(30));
    // Each answer was recorded under its own key: a retry now replays it.
    let retry = queue
        .merge(settings.clone(), member("bob", "k1", &set_body("/items/1")))
        .await
        .expect("merged");
    assert!(
        matches!(retry, MergeOutcome::Replay { status: 200, .. }),
        "{retry:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
