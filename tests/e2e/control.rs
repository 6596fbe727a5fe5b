//! `firemode status` and `firemode reload` against a running supervisor: the table an
//! operator reads, and a reload whose exit status tells the truth (systemd's `ExecReload=`).

use firemode_tests::{bin_dir, SystemOptions, TestSystem};
use std::collections::HashSet;
use std::process::Output;

/// Runs `firemode <args> --config <the system's file> --admin-listen <its admin address>`.
fn firemode(sys: &TestSystem, args: &[&str]) -> Output {
    std::process::Command::new(bin_dir().join("firemode"))
        .args(args)
        .arg("--config")
        .arg(&sys.config_path)
        .arg("--admin-listen")
        .arg(sys.admin.to_string())
        .output()
        .unwrap()
}

/// The pids of the instances in rotation (not the ones a reload is still draining).
async fn pids(sys: &TestSystem) -> HashSet<u64> {
    let mut all = HashSet::new();
    for kind in ["classify", "sync"] {
        for i in sys.instances(kind).await {
            if i["state"] != "draining" && i["state"] != "stopped" {
                all.insert(i["pid"].as_u64().expect("a pid"));
            }
        }
    }
    all
}

#[tokio::test]
async fn status_prints_every_instance_with_memory_and_uptime() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    // Readiness needs one instance per kind; the table is checked with all of them up.
    sys.wait_all_ready().await;
    let out = firemode(&sys, &["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("KIND") && lines[0].contains("MEMORY") && lines[0].contains("UPTIME"),
        "{table}"
    );
    // One row per instance: 2 classify + 1 sync, each with its pid and a memory figure.
    assert_eq!(lines.len(), 4, "{table}");
    for pid in pids(&sys).await {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().any(|cell| cell == pid.to_string()))
            .unwrap_or_else(|| panic!("no row for pid {pid}:\n{table}"));
        assert!(row.contains("ready") && row.contains("MiB"), "{row}");
    }
    // Nobody listening: exit 1 with a message naming the address.
    let out = std::process::Command::new(bin_dir().join("firemode"))
        .args(["status", "--admin-listen", "127.0.0.1:1", "--config"])
        .arg(&sys.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
}

#[tokio::test]
async fn reload_exits_with_the_outcome() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    // Applied: every instance replaced, exit 0.
    let before = pids(&sys).await;
    let out = firemode(&sys, &["reload"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = pids(&sys).await;
    assert!(before.is_disjoint(&after), "{before:?} -> {after:?}");
    assert_eq!(after.len(), 3, "{after:?}");

    // Refused: a change that needs a restart. Exit 2, the reason, nothing replaced.
    sys.rewrite_config(vec![("server.listen", "127.0.0.1:1".into())]);
    let out = firemode(&sys, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("server.listen") && stderr.contains("restart"),
        "{stderr}"
    );
    assert_eq!(
        pids(&sys).await,
        after,
        "a refused reload replaced instances"
    );

    // Refused: the file emptied (the CLI reads it as defaults, the supervisor refuses it).
    std::fs::write(&sys.config_path, "").unwrap();
    let out = firemode(&sys, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert_eq!(pids(&sys).await, after);
}

#[test]
fn the_unit_reloads_with_the_command_that_reports_the_outcome() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/firemode.service"),
    )
    .unwrap();
    let reload = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("ExecReload=");
    assert!(
        reload.contains("/firemode reload")
            && reload.contains("--config /etc/firemode/firemode.toml"),
        "{reload}"
    );
}

/// The commands find the running supervisor through the address it recorded in its runtime
/// dir: with `server.admin_listen` at port 0, and after it was changed in the file (a reload
/// must then say why it is refused, not fail to connect).
#[tokio::test]
async fn the_commands_find_the_supervisor_without_being_told_where() {
    let sys = TestSystem::start(SystemOptions::default()).await;
    let bare = |args: &[&str]| {
        std::process::Command::new(bin_dir().join("firemode"))
            .args(args)
            .arg("--config")
            .arg(&sys.config_path)
            .output()
            .unwrap()
    };
    let out = bare(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sys.rewrite_config(vec![("server.admin_listen", "127.0.0.1:1".into())]);
    let out = bare(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("server.admin_listen"), "{stderr}");
}
