//! JWT authentication at the front: every failure is a 401 problem, never a pass.

use firemode_tests::{request, token, token_with, SystemOptions, TestSystem, TEST_SECRET};
use http::Method;

const BODY: &str = r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#;

#[tokio::test]
async fn every_auth_failure_is_a_401_problem() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let expired = token_with("tech-1", None, -3600, TEST_SECRET.as_bytes());
    let wrong_key = token_with(
        "tech-1",
        None,
        3600,
        b"another-secret-another-secret-0123456",
    );
    // {"alg":"none"} with a valid-looking payload and no signature.
    let alg_none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
    let no_sub = {
        let claims = serde_json::json!({"exp": 4102444800u64});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &serde_json::json!({"sub": "x", "exp": 4102444800u64}),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        (
            "not bearer",
            Some(format!("Basic {}", token("tech-1", None))),
        ),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("wrong key", Some(format!("Bearer {wrong_key}"))),
        ("garbage", Some("Bearer not.a.jwt".into())),
        ("empty", Some("Bearer ".into())),
        ("no sub", Some(format!("Bearer {no_sub}"))),
        ("other algorithm", Some(format!("Bearer {hs512}"))),
    ];
    for (name, auth) in cases {
        let mut headers = vec![];
        if let Some(a) = auth.as_deref() {
            headers.push(("authorization", a));
        }
        let r = request(sys.front, Method::POST, "/v1/classify", &headers, BODY)
            .await
            .unwrap();
        assert_eq!(
            r.status,
            401,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.problem(401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{name}");
    }
    // And the same request with a good token passes.
    let good = sys
        .post("/v1/classify", &token("tech-1", None), BODY)
        .await
        .unwrap();
    assert_eq!(good.status, 200);
}

#[tokio::test]
async fn token_command_mints_with_the_generated_secret() {
    use std::os::unix::fs::PermissionsExt;
    // No jwt_secret configured: the first start generates one into data_dir.
    let sys = TestSystem::start(SystemOptions {
        set: vec![("auth.jwt_secret", "".into())],
        ..SystemOptions::default()
    })
    .await;
    let secret = sys.dir.join("data/jwt_secret");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the generated secret must be private");

    let out = std::process::Command::new(firemode_tests::bin_dir().join("firemode"))
        .args([
            "token", "--sub", "tech-9", "--org", "acme", "--ttl", "10m", "--config",
        ])
        .arg(&sys.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).unwrap();
    let r = sys.post("/v1/classify", minted.trim(), BODY).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A token signed with the test secret is now wrong.
    let r = sys
        .post("/v1/classify", &token("tech-1", None), BODY)
        .await
        .unwrap();
    r.problem(401);
}
