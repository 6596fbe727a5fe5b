//! `firemode check-config`: the effective config, secrets redacted, errors naming the key.

use firemode_tests::bin_dir;
use std::process::{Command, Output};

fn check_config(toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = std::env::temp_dir().join(format!("fm-cfg-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("firemode.toml");
    std::fs::write(&file, toml).unwrap();
    let mut cmd = Command::new(bin_dir().join("firemode"));
    cmd.arg("check-config").arg("--config").arg(&file);
    for (k, _) in std::env::vars() {
        if k.starts_with("FIREMODE_") || k == "PORT" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let out = check_config(
        "[server]\nlisten = \"127.0.0.1:8080\"\nlisen = \"x\"\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("server.lisen"), "{}", stderr(&out));

    let out = check_config("[workerz]\n", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("workerz"), "{}", stderr(&out));
}

#[test]
fn bad_values_name_the_key() {
    for (toml, key) in [
        (
            "[server]\nqueue_timeout = \"soon\"\n",
            "server.queue_timeout",
        ),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[workers.sync]\ninstances = 0\n", "workers.sync.instances"),
        (
            "[supervisor.backoff]\ninitial = \"2m\"\nmax = \"1m\"\n",
            "supervisor.backoff.initial",
        ),
        ("[auth]\nalgorithm = \"none\"\n", "auth.algorithm"),
        (
            "[telemetry]\nlog_format = \"xml\"\n",
            "telemetry.log_format",
        ),
        ("[database]\nurl = \"mysql://x\"\n", "database.url"),
    ] {
        let out = check_config(toml, &[]);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        assert!(stderr(&out).contains(key), "{key}: {}", stderr(&out));
    }
    let out = check_config("", &[("PORT", "eighty")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PORT"), "{}", stderr(&out));
}

#[test]
fn env_overrides_apply_and_secrets_are_redacted() {
    let secret = "a-very-secret-value-that-must-not-leak-0123";
    let out = check_config(
        "[database]\nurl = \"postgres://app:hunter2@db.internal/fm\"\n",
        &[
            ("FIREMODE_AUTH__JWT_SECRET", secret),
            ("FIREMODE_WORKERS__CLASSIFY__INSTANCES", "5"),
            ("FIREMODE_SERVER__QUEUE_TIMEOUT", "250ms"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        parsed["workers"]["classify"]["instances"].as_integer(),
        Some(5)
    );
    assert_eq!(parsed["server"]["queue_timeout"].as_str(), Some("250ms"));
}

#[test]
fn port_binds_every_interface() {
    let out = check_config(
        "[server]\nlisten = \"127.0.0.1:8080\"\n",
        &[("PORT", "3000")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let parsed: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(parsed["server"]["listen"].as_str(), Some("0.0.0.0:3000"));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/firemode.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let out = check_config(&text, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The config block of the product brief (design §4), copied as is into
/// `tests/fixtures/design-section-4.toml`: operators' files and outside tests use these
/// keys, so it must load. (Its paths are relative to the file, which check-config creates.)
#[test]
fn the_briefs_config_block_loads() {
    let brief = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/design-section-4.toml"),
    )
    .unwrap();
    let out = check_config(&brief, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for key in [
        "tombstone_retention",
        "conflict_retention",
        "access_log",
        "max_conflicts_reported",
    ] {
        assert!(printed.contains(key), "{key} missing from:\n{printed}");
    }
}
