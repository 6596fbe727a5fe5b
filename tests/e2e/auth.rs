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

/// Algorithm confusion: with RS256 configured, a token "signed" HS256 using the RSA public
/// key as the HMAC secret must be refused; a real RS256 token passes.
#[tokio::test]
async fn an_rs256_public_key_presented_as_an_hs256_secret_is_refused() {
    let dir = std::env::temp_dir().join(format!("fm-rsa-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let gen = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .output();
    let Ok(gen) = gen else {
        assert!(std::env::var_os("CI").is_none(), "openssl is needed in CI");
        eprintln!("\n!!! SKIPPING: openssl not installed\n");
        return;
    };
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let out = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sys = TestSystem::start(SystemOptions {
        set: vec![
            ("auth.algorithm", "RS256".into()),
            ("auth.jwt_secret", "".into()),
            ("auth.public_key_file", public.display().to_string().into()),
        ],
        ..SystemOptions::default()
    })
    .await;
    let claims = serde_json::json!({"sub": "mallory", "exp": 4102444800u64});
    let public_pem = std::fs::read(&public).unwrap();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    sys.post("/v1/classify", &confused, BODY)
        .await
        .unwrap()
        .problem(401);
    let genuine = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &serde_json::json!({"sub": "tech-1", "exp": 4102444800u64}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        sys.post("/v1/classify", &genuine, BODY)
            .await
            .unwrap()
            .status,
        200
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Secrets stay secret: not in any log line, and the files that hold them are private.
#[tokio::test]
async fn secrets_never_reach_the_logs_and_their_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let sys = TestSystem::start(SystemOptions::default()).await;
    for _ in 0..3 {
        let ok = sys.post("/v1/classify", &token("t", None), BODY).await;
        assert_eq!(ok.unwrap().status, 200);
        let refused = sys.post("/v1/classify", "not-a-token", BODY).await;
        refused.unwrap().problem(401);
    }
    let logs = sys.logs();
    assert!(
        !logs.contains(TEST_SECRET),
        "the JWT secret appeared in the log"
    );
    // The effective config handed to workers (it may hold a database password) is 0600,
    // and the runtime directory holding it and the sockets is 0700.
    let run = sys.dir.join("run");
    assert_eq!(
        std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let configs: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("worker-config"))
        .collect();
    assert!(!configs.is_empty());
    for c in configs {
        assert_eq!(c.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }
}

/// `firemode token` never creates a key: with no secret yet (or a --config pointing at the
/// wrong place), it fails with a message instead of minting tokens the server will refuse.
#[tokio::test]
async fn token_command_never_creates_a_secret() {
    let dir = std::env::temp_dir().join(format!("fm-token-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("firemode.toml");
    std::fs::write(&config, format!("data_dir = \"{}/data\"\n", dir.display())).unwrap();
    let out = std::process::Command::new(firemode_tests::bin_dir().join("firemode"))
        .args(["token", "--sub", "tech-9", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "minted without a key");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no signing key"), "{stderr}");
    assert!(
        !dir.join("data/jwt_secret").exists(),
        "token created a secret"
    );
    let _ = std::fs::remove_dir_all(dir);
}
