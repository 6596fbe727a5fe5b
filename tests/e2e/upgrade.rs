//! Upgrades: migrations are forward-only, and a binary refuses a schema newer than it knows
//! (a newer release migrated the database) instead of serving on it — also from memory.

use firemode_store::{Store, StoreError, StoreOptions};
use firemode_tests::{eventually, pg_database, SystemOptions, TestSystem};
use std::time::Duration;

async fn mark_newer(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO firemode_schema (version, applied_at) VALUES (999, 0)",
            &[],
        )
        .await
        .expect("a newer release's migration");
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let Some(db) = pg_database().await else {
        return;
    };
    let store = Store::open(&StoreOptions {
        url: db.url.clone(),
        pool_size: 2,
        data_dir: std::env::temp_dir(),
        connect_timeout: Duration::from_secs(5),
        lock_timeout: Duration::from_secs(5),
    })
    .expect("store");
    store.migrate().await.expect("first migration");
    mark_newer(&db.url).await;
    match store.migrate().await {
        Err(e @ StoreError::SchemaTooNew { found: 999, .. }) => {
            assert!(e.to_string().contains("newer"), "{e}");
        }
        other => panic!("migrated onto a newer schema: {other:?}"),
    }

    // The whole system: no kind becomes ready (classify would otherwise serve its catalog
    // from memory), and the log says why at error level.
    let sys = TestSystem::start(SystemOptions {
        database_url: Some(db.url.clone()),
        wait_ready: false,
        ..SystemOptions::default()
    })
    .await;
    eventually(
        "the refusal in the log",
        Duration::from_secs(20),
        || async {
            let logs = sys.logs();
            let refused = logs
                .lines()
                .any(|l| l.contains("\"level\":\"ERROR\"") && l.contains("newer than this binary"));
            refused.then_some(())
        },
    )
    .await;
    for kind in ["classify", "sync"] {
        for i in sys.instances(kind).await {
            assert_ne!(i["state"], "ready", "{kind} serves on a newer schema: {i}");
        }
    }
    assert_eq!(sys.admin_get("/readyz").await.status, 503);
}
