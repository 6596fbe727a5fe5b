//! The store contract, run against both backends.

use firemode_catalog::Catalog;
use firemode_store::{Store, StoreError, StoreOptions};
use firemode_tests::pg_database;
use std::time::Duration;

fn options(url: &str, dir: &std::path::Path) -> StoreOptions {
    StoreOptions {
        url: url.to_string(),
        pool_size: 4,
        data_dir: dir.to_path_buf(),
        connect_timeout: Duration::from_secs(5),
        lock_timeout: Duration::from_secs(5),
    }
}

async fn check_contract(store: &Store) {
    // Migrations are idempotent, also when run concurrently.
    let (a, b) = tokio::join!(store.migrate(), store.migrate());
    a.unwrap();
    b.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();

    assert_eq!(store.current_catalog_version().await.unwrap(), None);
    let sample = Catalog::from_json(firemode_catalog::SAMPLE).unwrap();
    store.install_catalog(&sample).await.unwrap();
    store.install_catalog(&sample).await.unwrap(); // again: a no-op
    assert_eq!(
        store.current_catalog_version().await.unwrap().as_deref(),
        Some(sample.version.as_str())
    );
    let stored = store.current_catalog().await.unwrap().unwrap();
    assert_eq!(stored.catalog, sample);

    // The same version with other contents is refused, and changes nothing.
    let mut changed = sample.clone();
    changed.items[0].description.push_str(" (edited)");
    assert!(matches!(
        store.install_catalog(&changed).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.current_catalog().await.unwrap().unwrap().catalog,
        sample
    );

    // A new version becomes current.
    changed.version = "local-2".into();
    store.install_catalog(&changed).await.unwrap();
    let current = store.current_catalog().await.unwrap().unwrap();
    assert_eq!(current.version, "local-2");
    assert_eq!(current.catalog, changed);
}

#[tokio::test]
async fn store_contract_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("fm-store-{:08x}", rand::random::<u32>()));
    let store = Store::open(&options("", &dir)).unwrap();
    check_contract(&store).await;
    // A second handle (another process, in production) sees the same data.
    let other = Store::open(&options("", &dir)).unwrap();
    assert_eq!(
        other.current_catalog_version().await.unwrap().as_deref(),
        Some("local-2")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn store_contract_on_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let dir = std::env::temp_dir();
    let store = Store::open(&options(&db.url, &dir)).unwrap();
    check_contract(&store).await;
    let other = Store::open(&options(&db.url, &dir)).unwrap();
    assert_eq!(
        other.current_catalog_version().await.unwrap().as_deref(),
        Some("local-2")
    );
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable_not_a_crash() {
    let dir = std::env::temp_dir();
    // Port 1 on loopback: nothing listens there.
    let store = Store::open(&options("host=127.0.0.1 port=1 user=x dbname=x", &dir)).unwrap();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        Store::open(&options("postgres://[bad", &dir)),
        Err(StoreError::Config(_))
    ));
}
