//! Under systemd, stderr is the journal: every line starts with its syslog priority (design
//! §5), the supervisor's own lines and the worker lines it re-emits alike, and nothing carries
//! terminal colours. When `JOURNAL_STREAM` names another file, no prefix.

use firemode_tests::{bin_dir, eventually, TEST_SECRET};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `firemode` with stderr in `log` and `JOURNAL_STREAM` as `stream` gives it for the
/// log file's (dev, inode), until the log holds an error line or a worker line; then SIGTERM.
async fn run_with_stderr_in(dir: &Path, stream: impl Fn(u64, u64) -> String) -> String {
    let log_path = dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let d = dir.display();
    // One classify instance that cannot start (an error line), one sync that runs (its own
    // lines come back through the supervisor).
    let config = format!(
        r#"data_dir = "{d}/data"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[supervisor]
runtime_dir = "{d}/run"
[supervisor.backoff]
initial = "50ms"
max = "200ms"
[workers.classify]
instances = 1
command = "{d}/no-such-worker"
[workers.sync]
instances = 1
[auth]
jwt_secret = "{TEST_SECRET}"
[telemetry]
log_format = "pretty"
"#
    );
    let config_path = dir.join("firemode.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(bin_dir().join("firemode"))
        .arg("--config")
        .arg(&config_path)
        .env("JOURNAL_STREAM", stream(meta.dev(), meta.ino()))
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    eventually(
        "an error line and a worker line in the log",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let done = text.contains("no-such-worker") && text.contains("sync[0]");
            async move { done.then_some(()) }
        },
    )
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = child.wait();
    std::fs::read_to_string(&log_path).unwrap()
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-journal-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn lines_carry_syslog_priorities_when_stderr_is_the_journal() {
    let dir = temp_dir();
    let log = run_with_stderr_in(&dir, |dev, ino| format!("{dev}:{ino}")).await;
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let prefixed = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .any(|p| line.starts_with(p));
        assert!(prefixed, "a line without a priority prefix: {line:?}");
        assert!(
            !line.contains('\u{1b}'),
            "terminal colours in the journal: {line:?}"
        );
    }
    // The spawn failure is an error; the worker's own info lines keep their level.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<3>") && l.contains("no-such-worker")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("sync[0]")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn no_prefix_when_journal_stream_names_another_file() {
    let dir = temp_dir();
    let log = run_with_stderr_in(&dir, |dev, ino| format!("{dev}:{}", ino + 1)).await;
    for line in log.lines().filter(|l| !l.is_empty()) {
        assert!(
            !line.starts_with('<'),
            "prefixed outside the journal: {line:?}"
        );
        assert!(!line.contains('\u{1b}'), "colours in a file: {line:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
