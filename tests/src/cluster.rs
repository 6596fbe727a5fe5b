//! A throwaway PostgreSQL cluster of a test's own (initdb + pg_ctl, as the `postgres` user,
//! since PostgreSQL refuses root), so a test can stop and start the database under load
//! without touching the shared server.

use std::path::PathBuf;
use std::process::Command;

pub struct ThrowawayCluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

fn as_postgres(program: &std::path::Path) -> Command {
    let mut c = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.env_remove("PGDATA");
    c
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn pg_bin() -> Option<PathBuf> {
    let root = std::path::Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|v| v.join("bin"))
        .filter(|b| b.join("initdb").exists())
}

impl ThrowawayCluster {
    /// Creates and starts a cluster on a free port, or `None` (after a loud message) when
    /// PostgreSQL's server binaries are not installed outside CI.
    pub fn start() -> Option<ThrowawayCluster> {
        let Some(bin) = pg_bin() else {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL server binaries (initdb, pg_ctl) are required in CI");
            }
            eprintln!("\n!!! SKIPPING: no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)\n");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("fm-pg-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if nix::unistd::geteuid().is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "chown the cluster dir to postgres"
            );
        }
        let out = as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = ThrowawayCluster { dir, bin, port: 0 };
        // A port free a moment ago may be taken by the time the server binds it (other
        // tests bind 127.0.0.1:0 too): then another port.
        for attempt in 1..=5 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return Some(cluster),
                Err(why) if why.contains("could not bind") && attempt < 5 => continue,
                Err(why) => panic!("pg_ctl start: {why}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    fn pg_ctl_start(&self) {
        if let Err(why) = self.try_start() {
            panic!("pg_ctl start: {why}");
        }
    }

    /// Starts the server on `self.port`; on failure, pg_ctl's words and the server log.
    fn try_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(&log)
            .args(["-w", "start"])
            .output()
            .expect("pg_ctl start");
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{}; server log:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    /// Stops the server (fast: clients are disconnected).
    pub fn stop(&self) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn restart(&self) {
        self.pg_ctl_start();
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
