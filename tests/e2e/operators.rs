//! What an operator meets first (issue #13 items 2-5): a config file the service user cannot
//! read, misspelt keys and bad `FIREMODE_*` values, relative paths in a file that lives
//! elsewhere, `check-config` finding what would fail at start (with `--connect`: the store),
//! `DATABASE_URL` on PostgreSQL, and two supervisors started on one runtime dir.

use firemode_tests::{
    bin_dir, eventually, pg_database, request, token, SystemOptions, TestSystem, TEST_SECRET,
};
use http::Method;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The uid an unprivileged run uses when the tests run as root (nobody).
const NOBODY: u32 = 65534;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-op-{tag}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `firemode ARGS` with none of our own FIREMODE_*, PORT or DATABASE_URL, as nobody when the
/// tests run as root (so file modes mean something).
fn firemode(args: &[&str], unprivileged: bool) -> Command {
    let bin = bin_dir().join("firemode");
    let mut cmd = if unprivileged && is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FIREMODE_") || k == "PORT" || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn an_unreadable_config_file_names_the_file_the_uid_and_the_fix_with_exit_2() {
    let dir = temp_dir("unreadable");
    let file = dir.join("firemode.toml");
    std::fs::write(&file, "[workers.sync]\ninstances = 1\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    if !is_root() {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = firemode(&["--config", file.to_str().unwrap()], true)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let uid = if is_root() {
        NOBODY
    } else {
        nix::unistd::geteuid().as_raw()
    };
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(&format!("uid {uid}")), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("chmod 0644"), "{err}");
    assert!(
        !err.contains("fix the key"),
        "the hint must not point at a key: {err}"
    );
    assert!(!err.contains("(top level)"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

fn check_config(toml: &str, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let dir = temp_dir("check");
    let file = dir.join("firemode.toml");
    std::fs::write(&file, toml).unwrap();
    let mut args = vec!["check-config", "--config", file.to_str().unwrap()];
    args.extend(extra);
    let out = firemode(&args, false)
        .envs(env.iter().copied())
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
    out
}

#[test]
fn an_unknown_key_is_named_once_and_env_errors_name_their_variable() {
    let out = check_config("[supervisor]\ndrain_timout = \"3s\"\n", &[], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config error: supervisor.drain_timout: unknown key"),
        "{err}"
    );
    assert!(!err.contains("drain_timout.drain_timout"), "{err}");

    for (var, value, key) in [
        // figment's own error (not a duration) and one of our validations (not an address).
        (
            "FIREMODE_SUPERVISOR__DRAIN_TIMEOUT",
            "abc",
            "supervisor.drain_timeout",
        ),
        ("FIREMODE_SERVER__LISTEN", "nowhere", "server.listen"),
        (
            "FIREMODE_SUPERVISOR__DRAIN_TIMOUT",
            "3s",
            "supervisor.drain_timout",
        ),
    ] {
        let out = check_config("", &[(var, value)], &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        assert!(
            err.contains(&format!("{var}=\"{value}\": {key}: ")),
            "{var}: {err}"
        );
    }
    // A secret's variable is named, its value never printed.
    let out = check_config(
        "",
        &[("FIREMODE_AUTH__JWT_SECRET", "short-secret-xyz")],
        &[],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("FIREMODE_AUTH__JWT_SECRET"), "{err}");
    assert!(!err.contains("short-secret-xyz"), "{err}");
}

/// A supervisor started by hand (its own cwd), its listeners read from its JSON log.
struct Started {
    child: Child,
    admin: SocketAddr,
}

impl Started {
    fn spawn(cwd: &Path, config: &Path, env: &[(&str, &str)]) -> Started {
        let mut child = firemode(&["--config", config.to_str().unwrap()], false)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["message"] == "listening" && v["listener"] == "admin" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or("").to_string());
                }
            }
        });
        let admin = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("firemode did not report its admin listener"))
            .parse()
            .unwrap();
        Started { child, admin }
    }

    async fn ready(&self) {
        let admin = self.admin;
        eventually("/readyz 200", Duration::from_secs(30), || async move {
            request(admin, Method::GET, "/readyz", &[], "")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
    }

    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let child = &mut self.child;
        eventually("firemode to exit", Duration::from_secs(30), || {
            let exited = child.try_wait().ok().flatten().is_some();
            async move { exited.then_some(()) }
        })
        .await;
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn relative_paths_in_a_file_resolve_against_its_directory_and_env_paths_against_the_cwd() {
    let srv = temp_dir("srv");
    let cwd = temp_dir("cwd");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../config/catalog.json"),
        srv.join("my-catalog.json"),
    )
    .unwrap();
    let config = srv.join("fm.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"./data\"\n\
             [server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [supervisor]\nruntime_dir = \"run\"\nhealth_interval = \"100ms\"\n\
             [workers.classify]\ninstances = 1\n[workers.sync]\ninstances = 1\n\
             [catalog]\nfile = \"my-catalog.json\"\n\
             [auth]\njwt_secret = \"{TEST_SECRET}\"\n\
             [telemetry]\nlog_format = \"json\"\n"
        ),
    )
    .unwrap();
    // The config named relative to a different current directory, as `../srv/fm.toml`.
    let relative = PathBuf::from("..")
        .join(srv.file_name().unwrap())
        .join("fm.toml");
    let sys = Started::spawn(&cwd, &relative, &[]);
    // Ready means the classify workers found my-catalog.json beside fm.toml.
    sys.ready().await;
    assert!(
        srv.join("data/firemode.sqlite3").is_file(),
        "the store beside fm.toml"
    );
    assert!(
        srv.join("run/supervisor.lock").is_file(),
        "the runtime dir beside fm.toml"
    );
    let in_cwd: Vec<_> = std::fs::read_dir(&cwd).unwrap().flatten().collect();
    assert!(in_cwd.is_empty(), "nothing in the cwd: {in_cwd:?}");
    sys.stop().await;

    // From the environment, a relative path is the cwd's, as on any command line.
    let sys = Started::spawn(&cwd, &relative, &[("FIREMODE_DATA_DIR", "env-data")]);
    sys.ready().await;
    assert!(cwd.join("env-data/firemode.sqlite3").is_file());
    sys.stop().await;
    let _ = std::fs::remove_dir_all(srv);
    let _ = std::fs::remove_dir_all(cwd);
}

/// Starts a second supervisor on `sys`'s config; its exit code and stderr. One that keeps
/// running fails the test (and is killed).
async fn second_supervisor(sys: &TestSystem) -> (Option<i32>, String) {
    let mut second = firemode(&["--config", sys.config_path.to_str().unwrap()], false)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while second.try_wait().ok().flatten().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second supervisor on the same runtime dir kept running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = second.wait_with_output().unwrap();
    (out.status.code(), text(&out.stderr))
}

#[tokio::test]
async fn a_second_supervisor_on_the_same_runtime_dir_exits_2_and_leaves_the_first_serving() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let before = sys.worker_pids().await;
    let (code, err) = second_supervisor(&sys).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("supervisor.runtime_dir"), "{err}");
    assert!(err.contains(&format!("pid {}", sys.pid())), "{err}");
    // The first one's sockets are untouched: its workers answer, none was replaced.
    let auth = format!("Bearer {}", token("op", Some("acme")));
    for _ in 0..5 {
        let r = request(
            sys.front,
            Method::POST,
            "/v1/classify",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", text(&r.body));
    }
    assert_eq!(sys.worker_pids().await, before);
    let ready = sys.admin_get("/readyz").await;
    assert_eq!(ready.status, 200);
}

#[tokio::test]
async fn a_runtime_dir_deleted_under_a_supervisor_comes_back_locked() {
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        ..SystemOptions::default()
    })
    .await;
    let run = sys.dir.join("run");
    std::fs::remove_dir_all(&run).unwrap();
    // The supervisor recreates the dir when it replaces its (now unreachable) workers.
    let lock = run.join("supervisor.lock");
    let pid = sys.pid().to_string();
    eventually(
        "the lock file back in the runtime dir",
        Duration::from_secs(30),
        || {
            let back = std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid);
            async move { back.then_some(()) }
        },
    )
    .await;
    let (code, err) = second_supervisor(&sys).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
}

#[test]
fn check_config_finds_a_missing_or_invalid_catalog_and_missing_or_non_executable_commands() {
    let dir = temp_dir("cmds");
    let script = dir.join("worker.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let toml = format!(
        "data_dir = \"{d}/data\"\n[supervisor]\nruntime_dir = \"{d}/run\"\n\
         [catalog]\nfile = \"{d}/no-such-catalog.json\"\n\
         [workers.classify]\ncommand = \"{d}/no-such-worker\"\n\
         [workers.sync]\ncommand = \"{s}\"\n",
        d = dir.display(),
        s = script.display()
    );
    // As nobody when root: root may execute a file without an x bit for its owner.
    std::fs::write(dir.join("fm.toml"), &toml).unwrap();
    let out = firemode(
        &[
            "check-config",
            "--config",
            dir.join("fm.toml").to_str().unwrap(),
        ],
        true,
    )
    .output()
    .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("catalog.file:") && err.contains("no-such-catalog.json"),
        "{err}"
    );
    assert!(
        err.contains("workers.classify.command:") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        err.contains("workers.sync.command:") && err.contains("not executable"),
        "{err}"
    );
    // A catalog that exists but is not one (the classify workers would crash-loop on it).
    std::fs::write(dir.join("bad-catalog.json"), r#"{"version":"x"}"#).unwrap();
    let out = check_config(
        &format!(
            "data_dir = \"{d}/data\"\n[supervisor]\nruntime_dir = \"{d}/run\"\n\
             [catalog]\nfile = \"{d}/bad-catalog.json\"\n",
            d = dir.display()
        ),
        &[],
        &[],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("catalog.file:") && err.contains("not a valid catalog"),
        "{err}"
    );
    // The same file with the defaults (the binaries beside firemode) passes.
    let out = check_config(
        &format!(
            "data_dir = \"{d}/data\"\n[supervisor]\nruntime_dir = \"{d}/run\"\n",
            d = dir.display()
        ),
        &[],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_finds_data_and_runtime_dirs_it_cannot_write() {
    let dir = temp_dir("dirs");
    let locked = dir.join("locked");
    std::fs::create_dir_all(locked.join("existing")).unwrap();
    for d in [&locked, &locked.join("existing")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    std::fs::write(
        dir.join("fm.toml"),
        format!(
            "data_dir = \"{l}/existing\"\n[supervisor]\nruntime_dir = \"{l}/new/run\"\n",
            l = locked.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(dir.join("fm.toml"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = firemode(
        &[
            "check-config",
            "--config",
            dir.join("fm.toml").to_str().unwrap(),
        ],
        true,
    )
    .output()
    .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("data_dir:") && err.contains("not writable"),
        "{err}"
    );
    assert!(
        err.contains("supervisor.runtime_dir:") && err.contains("cannot be created"),
        "{err}"
    );
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn check_config_connect_tells_refused_auth_missing_database_and_newer_schema_apart() {
    let Some(db) = pg_database().await else {
        return;
    };
    let connect = |url: &str| {
        let dir = temp_dir("connect");
        let toml = format!(
            "data_dir = \"{d}/data\"\n[supervisor]\nruntime_dir = \"{d}/run\"\n",
            d = dir.display()
        );
        let out = check_config(&toml, &[("DATABASE_URL", url)], &["--connect"]);
        let _ = std::fs::remove_dir_all(dir);
        (out.status.code(), text(&out.stderr))
    };
    let (code, err) = connect(&db.url);
    assert_eq!(code, Some(0), "a fresh database is fine: {err}");
    assert!(err.contains("no schema yet"), "{err}");

    // Port 1 on loopback: nothing listens there.
    let (code, err) = connect("host=127.0.0.1 port=1 user=postgres dbname=postgres");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("connection refused"), "{err}");

    let (code, err) = connect(&with_param(&db.url, "user", "fm_no_such_role"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("authentication failed"), "{err}");

    let (code, err) = connect(&with_param(&db.url, "dbname", "fm_no_such_database"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("database missing"), "{err}");

    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE TABLE firemode_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
             INSERT INTO firemode_schema VALUES (1, 0), (999, 0);",
        )
        .await
        .unwrap();
    let (code, err) = connect(&db.url);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("schema is newer than this binary"), "{err}");
    assert!(err.contains("999"), "{err}");
}

/// A key=value connection string with `key` replaced.
fn with_param(url: &str, key: &str, value: &str) -> String {
    let mut parts: Vec<String> = url
        .split_whitespace()
        .filter(|p| !p.starts_with(&format!("{key}=")))
        .map(str::to_string)
        .collect();
    parts.push(format!("{key}={value}"));
    parts.join(" ")
}

#[tokio::test]
async fn database_url_makes_the_system_use_postgresql_when_database_url_is_not_set() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = TestSystem::start(SystemOptions {
        classify_instances: 1,
        env: vec![("DATABASE_URL".into(), db.url.clone())],
        ..SystemOptions::default()
    })
    .await;
    let auth = format!("Bearer {}", token("op", Some("acme")));
    let r = request(
        sys.front,
        Method::POST,
        "/v1/tests/sessions/replit-1/results",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("idempotency-key", "k-1"),
        ],
        r#"{"changes":[{"op":"set","path":"/test","value":"data"}],"_sync_meta":{"vector_clock":{}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r.body));
    // The store is that PostgreSQL database (migrated, holding the session), not SQLite.
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let migrations: i64 = client
        .query_one("SELECT count(*) FROM firemode_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert!(migrations > 0);
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tables > 1);
    assert!(!sys.dir.join("data/firemode.sqlite3").exists());
    let r = request(
        sys.front,
        Method::GET,
        "/v1/tests/sessions/replit-1",
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.json()["document"]["test"], "data", "{}", text(&r.body));
}

#[test]
fn every_path_like_key_in_a_file_resolves_against_the_file_from_any_cwd() {
    let srv = temp_dir("paths");
    let cwd = temp_dir("paths-cwd");
    std::fs::create_dir_all(srv.join("keys")).unwrap();
    std::fs::create_dir_all(srv.join("bin")).unwrap();
    std::fs::write(srv.join("keys/pub.pem"), "not checked here\n").unwrap();
    std::fs::write(srv.join("bin/worker"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        srv.join("bin/worker"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../config/catalog.json"),
        srv.join("catalog.json"),
    )
    .unwrap();
    std::fs::write(
        srv.join("fm.toml"),
        "data_dir = \"state/data\"\n\
         [supervisor]\nruntime_dir = \"./state/run\"\n\
         [workers.classify]\ncommand = \"./bin/worker\"\n\
         [workers.sync]\ncommand = \"bin/worker\"\n\
         [catalog]\nfile = \"catalog.json\"\n\
         [auth]\nalgorithm = \"EdDSA\"\npublic_key_file = \"keys/pub.pem\"\n",
    )
    .unwrap();
    let config = PathBuf::from("..")
        .join(srv.file_name().unwrap())
        .join("fm.toml");
    let out = firemode(
        &["check-config", "--config", config.to_str().unwrap()],
        false,
    )
    .current_dir(&cwd)
    .output()
    .unwrap();
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    let base = config.parent().unwrap().display().to_string();
    for line in [
        format!("data_dir = \"{base}/state/data\""),
        format!("runtime_dir = \"{base}/state/run\""),
        format!("command = \"{base}/bin/worker\""),
        format!("file = \"{base}/catalog.json\""),
        format!("public_key_file = \"{base}/keys/pub.pem\""),
    ] {
        assert!(stdout.contains(&line), "{line} in:\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(srv);
    let _ = std::fs::remove_dir_all(cwd);
}
