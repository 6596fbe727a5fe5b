//! `POST /v1/classify` through the front, on both stores.

use firemode_tests::{request, token, SystemOptions, TestSystem};
use http::Method;

const CLASSIFY: &str = "/v1/classify";

async fn check_classify_contract(sys: &TestSystem) {
    let t = token("tech-1", Some("acme"));

    // A known rule: 200 with every field of the contract.
    let r = sys
        .post(
            CLASSIFY,
            &t,
            r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["item_code"], "FE-DCP");
    assert_eq!(v["observed_condition"], "pressure_low");
    assert_eq!(v["classification"], "critical_defect");
    assert!(v["description"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v["action"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["catalog_version"], "as1851-2012-sample-2");
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));

    // Every rule of the shipped catalog answers as the catalog says: all of them, every field.
    let catalog = firemode_catalog::Catalog::from_json(firemode_catalog::SAMPLE).unwrap();
    let mut checked = 0;
    for item in &catalog.items {
        for c in &item.conditions {
            let body = serde_json::json!({"item_code": item.item_code, "observed_condition": c.observed_condition});
            let r = sys.post(CLASSIFY, &t, &body.to_string()).await.unwrap();
            assert_eq!(r.status, 200, "{body}");
            let v = r.json();
            assert_eq!(v["item_code"], item.item_code.as_str(), "{body}");
            assert_eq!(
                v["observed_condition"],
                c.observed_condition.as_str(),
                "{body}"
            );
            assert_eq!(
                v["classification"],
                serde_json::to_value(c.classification).unwrap(),
                "{body}"
            );
            assert_eq!(v["description"], c.description.as_str(), "{body}");
            assert_eq!(v["action"], c.action.as_str(), "{body}");
            checked += 1;
        }
    }
    assert!(checked >= 60, "the shipped catalog has {checked} rules");
    // The original clients' request, unchanged (an alias of FE-DCP).
    let r = sys
        .post(
            CLASSIFY,
            &t,
            r#"{"item_code": "AS1851-2012-FE-01", "observed_condition": "pressure_low"}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["item_code"], "AS1851-2012-FE-01");
    assert_eq!(r.json()["classification"], "critical_defect");

    // Unknown item: 404.
    let r = sys
        .post(
            CLASSIFY,
            &t,
            r#"{"item_code":"NOPE-1","observed_condition":"pressure_low"}"#,
        )
        .await
        .unwrap();
    let p = r.problem(404);
    assert!(p["detail"].as_str().unwrap().contains("NOPE-1"));

    // Unknown condition for a known item: 422 listing the allowed ones.
    let r = sys
        .post(
            CLASSIFY,
            &t,
            r#"{"item_code":"FE-DCP","observed_condition":"on_fire"}"#,
        )
        .await
        .unwrap();
    let p = r.problem(422);
    let allowed: Vec<&str> = p["allowed_conditions"]
        .as_array()
        .expect("allowed_conditions")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(allowed.contains(&"pressure_low"), "{allowed:?}");

    // Bad bodies: 400, never 500.
    for body in [
        "",
        "not json",
        "[]",
        "42",
        r#"{"item_code":"FE-DCP"}"#,
        r#"{"observed_condition":"pressure_low"}"#,
        r#"{"item_code":7,"observed_condition":"pressure_low"}"#,
        r#"{"item_code":"FE-DCP","observed_condition":null}"#,
        "{\"item_code\":\"\u{0}\"",
    ] {
        let r = sys.post(CLASSIFY, &t, body).await.unwrap();
        r.problem(400);
    }
    let auth = format!("Bearer {t}");
    let r = request(
        sys.front,
        Method::POST,
        CLASSIFY,
        &[("authorization", &auth)],
        vec![0xff, 0xfe, 0x00],
    )
    .await
    .unwrap();
    r.problem(400);
}

#[tokio::test]
async fn classify_contract_on_sqlite() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    check_classify_contract(&sys).await;
    // The embedded store is a file in data_dir.
    assert!(sys.dir.join("data/firemode.sqlite3").exists());
}

#[tokio::test]
async fn classify_contract_on_postgres() {
    let Some((_db, sys)) = TestSystem::start_on_postgres(SystemOptions::default()).await else {
        return;
    };
    check_classify_contract(&sys).await;
    assert!(!sys.dir.join("data/firemode.sqlite3").exists());
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let t = format!("Bearer {}", token("tech-1", None));
    let body = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;
    let r = request(
        sys.front,
        Method::POST,
        CLASSIFY,
        &[("authorization", &t), ("x-request-id", "client-req-42")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(r.header("x-request-id"), Some("client-req-42"));
    // Not sane (spaces): replaced.
    let r = request(
        sys.front,
        Method::POST,
        CLASSIFY,
        &[("authorization", &t), ("x-request-id", "has spaces in it")],
        body,
    )
    .await
    .unwrap();
    let id = r.header("x-request-id").unwrap();
    assert_ne!(id, "has spaces in it");
    assert!(!id.is_empty());
    // Errors carry one too.
    let r = request(sys.front, Method::GET, "/nowhere", &[], "")
        .await
        .unwrap();
    r.problem(404);
    assert!(r.header("x-request-id").is_some());
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let sys = TestSystem::start(SystemOptions {
        set: vec![("server.max_body_bytes", 1024.into())],
        ..SystemOptions::default()
    })
    .await;
    let t = token("tech-1", None);
    let big = format!(
        r#"{{"item_code":"FE-DCP","observed_condition":"pressure_low","pad":"{}"}}"#,
        "x".repeat(2000)
    );
    sys.post(CLASSIFY, &t, &big).await.unwrap().problem(413);
    // Just under the limit still works.
    let ok = sys
        .post(
            CLASSIFY,
            &t,
            r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
        )
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}
