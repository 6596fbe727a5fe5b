//! The README's systemd install, followed as the service runs it: the shipped config
//! installed with the documented mode, the unit's `Environment=` lines, its working
//! directory and `ExecStart=`, as an unprivileged uid (the unit's `DynamicUser=`), with the
//! state and runtime directories owned by that uid as systemd makes them. No systemd here,
//! so the test plays systemd's part; `RestartPreventExitStatus=2` is checked against the
//! exit status of a config error.

use firemode_tests::{bin_dir, request, Reply};
use http::Method;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The uid and gid the service runs as (nobody: what a dynamic user is to the files).
const UID: u32 = 65534;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `name=value` of every `Environment=` line of the unit.
fn unit_environment(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// `install -D -m MODE` with root as the owner, as the README's step does.
fn install(from: &Path, to: &Path, mode: u32) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory systemd would create for the service: owned by its user, mode 0700.
fn service_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(path, Some(UID), Some(UID)).unwrap();
}

/// A command run as the service's user with the unit's environment, paths under `root`.
fn as_service(root: &Path, unit: &str, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".into(),
    ])
    .arg(program)
    .current_dir(root.join(unit_value(unit, "WorkingDirectory").trim_start_matches('/')));
    for (k, v) in unit_environment(unit) {
        let v = if v.starts_with('/') {
            root.join(v.trim_start_matches('/')).display().to_string()
        } else {
            v
        };
        cmd.env(k, v);
    }
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS");
    cmd
}

#[tokio::test]
async fn the_documented_systemd_install_starts_as_an_unprivileged_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("!!! not root: cannot play systemd's part (chown to the service user); skipped");
        return;
    }
    let unit = std::fs::read_to_string(repo().join("systemd/firemode.service")).unwrap();
    assert!(
        unit.contains("RestartPreventExitStatus=2"),
        "config errors (exit 2) must not restart-loop"
    );
    let root = std::env::temp_dir().join(format!("fm-install-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The README's step, with the file and the mode it gives:
    // `sudo install -D -m MODE systemd/firemode.toml /etc/firemode/firemode.toml`
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (mode, source) = readme
        .lines()
        .find_map(|l| {
            let rest = l.split("install -D -m ").nth(1)?;
            let rest = rest.strip_suffix(" /etc/firemode/firemode.toml")?;
            rest.split_once(' ')
        })
        .expect("the README installs a config to /etc/firemode/firemode.toml");
    let mode = u32::from_str_radix(mode, 8).expect("an octal mode");
    let config = root.join("etc/firemode/firemode.toml");
    install(&repo().join(source), &config, mode);
    // The installed config names the unit's directories; here they live under `root`.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("\"/var/lib/firemode/data\"") && text.contains("\"/run/firemode\""),
        "the systemd config names the unit's state and runtime directories:\n{text}"
    );
    let moved = text
        .replace(
            "\"/var/lib/firemode",
            &format!("\"{}/var/lib/firemode", root.display()),
        )
        .replace(
            "\"/run/firemode",
            &format!("\"{}/run/firemode", root.display()),
        );
    std::fs::write(&config, moved).unwrap();
    // systemd: StateDirectory=firemode, RuntimeDirectory=firemode, for the dynamic user.
    std::fs::create_dir_all(root.join("var/lib")).unwrap();
    service_dir(&root.join("var/lib/firemode"));
    std::fs::create_dir_all(root.join("run")).unwrap();
    service_dir(&root.join("run/firemode"));

    let (front, admin) = (free_port(), free_port());
    let firemode = bin_dir().join("firemode");
    let mut service = as_service(&root, &unit, &firemode);
    service
        .arg("--config")
        .arg(&config)
        .env("FIREMODE_SERVER__LISTEN", format!("127.0.0.1:{front}"))
        .env(
            "FIREMODE_SERVER__ADMIN_LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = service.spawn().unwrap();
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log);
            panic!("the installed service exited with {status}:\n{log}");
        }
        let r: Option<Reply> = request(admin_addr, Method::GET, "/readyz", &[], "")
            .await
            .ok();
        if r.is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the installed service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator mints a token as the service user, with the same config.
    let minted = as_service(&root, &unit, &firemode)
        .args(["token", "--sub", "tech-1", "--org", "acme", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let r = request(
        format!("127.0.0.1:{front}").parse().unwrap(),
        Method::POST,
        "/v1/classify",
        &[("authorization", &auth)],
        r#"{"item_code":"FE-DCP","observed_condition":"pressure_low"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Data went to the state directory, owned by the service user.
    let secret = root.join("var/lib/firemode/data/jwt_secret");
    assert!(
        secret.exists(),
        "the generated secret is not in the state directory"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a clean drain exits 0");
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test]
async fn a_config_error_exits_2_which_the_unit_does_not_restart() {
    let unit = std::fs::read_to_string(repo().join("systemd/firemode.service")).unwrap();
    let prevent = unit_value(&unit, "RestartPreventExitStatus");
    let dir = std::env::temp_dir().join(format!("fm-exit2-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("firemode.toml");
    std::fs::write(&config, "[supervisor]\ndrain_timout = \"5s\"\n").unwrap();
    let out = Command::new(bin_dir().join("firemode"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let code = out.status.code().unwrap();
    assert_eq!(code, 2, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        prevent.split_whitespace().any(|c| c == code.to_string()),
        "RestartPreventExitStatus={prevent} does not stop restarts on exit {code}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
