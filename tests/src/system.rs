//! A whole FireMode system under test: the real `firemode` binary with a config in a
//! temporary directory, its log captured, its listeners discovered from its log.

use crate::{eventually, request, Reply, TEST_SECRET};
use http::Method;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use toml::Value;

static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Where `firemode` and the worker binaries are; builds them once per test process.
pub fn bin_dir() -> &'static Path {
    BIN_DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("FM_TEST_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--bins"])
            .current_dir(&workspace)
            .status()
            .expect("running cargo build for the binaries under test");
        assert!(status.success(), "cargo build --workspace --bins failed");
        // target/debug/deps/e2e-<hash> → target/debug
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent()
            .and_then(Path::parent)
            .expect("test executable inside target/<profile>/deps")
            .to_path_buf()
    })
}

/// What a test varies in the config; everything else is a fast, local default.
pub struct SystemOptions {
    pub classify_instances: i64,
    pub sync_instances: i64,
    /// PostgreSQL URL; `None` for the embedded SQLite store.
    pub database_url: Option<String>,
    /// Extra settings as (dotted key, value), applied last.
    pub set: Vec<(&'static str, Value)>,
    /// Extra environment for the supervisor.
    pub env: Vec<(String, String)>,
    /// Wait for `/readyz` before returning.
    pub wait_ready: bool,
    /// A program (and its arguments) that runs `firemode --config FILE` for us, e.g.
    /// `systemd-socket-activate -l ADDR`.
    pub wrapper: Vec<String>,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            classify_instances: 2,
            sync_instances: 1,
            database_url: None,
            set: Vec::new(),
            env: Vec::new(),
            wait_ready: true,
            wrapper: Vec::new(),
        }
    }
}

pub struct TestSystem {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub front: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    launch: Launch,
}

fn set_path(table: &mut toml::Table, dotted: &str, value: Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table on the way");
    }
    t.insert(last.to_string(), value);
}

impl TestSystem {
    /// A system on a throwaway PostgreSQL database of its own, dropped after the system;
    /// `None` when no server is reachable outside CI (after `pg_database`'s loud skip).
    pub async fn start_on_postgres(opts: SystemOptions) -> Option<(crate::PgDatabase, TestSystem)> {
        let db = crate::pg_database().await?;
        let sys = TestSystem::start(SystemOptions {
            database_url: Some(db.url.clone()),
            ..opts
        })
        .await;
        Some((db, sys))
    }

    pub async fn start(opts: SystemOptions) -> TestSystem {
        let dir = std::env::temp_dir().join(format!("fm-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut config = toml::Table::new();
        let d = dir.display();
        for (k, v) in [
            ("data_dir", Value::from(format!("{d}/data"))),
            ("server.listen", "127.0.0.1:0".into()),
            ("server.admin_listen", "127.0.0.1:0".into()),
            ("server.queue_timeout", "3s".into()),
            ("server.request_timeout", "10s".into()),
            ("supervisor.runtime_dir", format!("{d}/run").into()),
            ("supervisor.drain_timeout", "10s".into()),
            ("supervisor.health_interval", "100ms".into()),
            ("supervisor.health_timeout", "1s".into()),
            ("supervisor.backoff.initial", "50ms".into()),
            ("supervisor.backoff.max", "2s".into()),
            ("supervisor.backoff.reset_after", "5s".into()),
            ("workers.classify.instances", opts.classify_instances.into()),
            ("workers.sync.instances", opts.sync_instances.into()),
            ("database.pool_size", 4.into()),
            ("auth.jwt_secret", TEST_SECRET.into()),
            ("telemetry.log_format", "json".into()),
        ] {
            set_path(&mut config, k, v);
        }
        if let Some(url) = &opts.database_url {
            set_path(&mut config, "database.url", url.clone().into());
        }
        for (k, v) in opts.set {
            set_path(&mut config, k, v);
        }
        let config_path = dir.join("firemode.toml");
        std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("config");

        let launch = Launch {
            wrapper: opts.wrapper,
            env: opts.env,
        };
        let (child, logs, front, admin) = launch.spawn(&config_path).await;
        let sys = TestSystem {
            dir,
            config_path,
            front,
            admin,
            child,
            logs,
            launch,
        };
        if opts.wait_ready {
            sys.wait_ready().await;
        }
        sys
    }

    pub async fn wait_ready(&self) {
        let admin = self.admin;
        eventually(
            "/readyz to answer 200",
            Duration::from_secs(30),
            || async move {
                request(admin, Method::GET, "/readyz", &[], "")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await;
    }

    /// Waits until every instance is ready (`/readyz` needs only one per kind).
    pub async fn wait_all_ready(&self) {
        eventually("every instance ready", Duration::from_secs(30), || async {
            let status = self.admin_get("/status").await.json();
            let all = status["instances"].as_array()?;
            all.iter().all(|i| i["state"] == "ready").then_some(())
        })
        .await;
    }

    /// Rewrites the config file (for a reload).
    pub fn rewrite_config(&self, set: Vec<(&'static str, Value)>) {
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        let mut config: toml::Table = toml::from_str(&text).expect("config parses");
        for (k, v) in set {
            set_path(&mut config, k, v);
        }
        std::fs::write(&self.config_path, toml::to_string(&config).expect("toml")).expect("config");
    }

    /// Starts the supervisor again after it exited, with the same config file, on the
    /// addresses it listened on before (a restart of the same host).
    pub async fn start_again(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "start_again needs the previous supervisor to have exited"
        );
        let (front, admin) = (self.front.to_string(), self.admin.to_string());
        self.rewrite_config(vec![
            ("server.listen", front.into()),
            ("server.admin_listen", admin.into()),
        ]);
        let (child, logs, front, admin) = self.launch.spawn(&self.config_path).await;
        let earlier = self.logs();
        if let Ok(mut l) = logs.lock() {
            l.insert(0, format!("{earlier}\n---- started again ----"));
        }
        (self.child, self.logs, self.front, self.admin) = (child, logs, front, admin);
        self.wait_ready().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        request(self.admin, Method::GET, path, &[], "")
            .await
            .expect("admin request")
    }

    /// `/status` instances of one kind.
    pub async fn instances(&self, kind: &str) -> Vec<serde_json::Value> {
        let status = self.admin_get("/status").await.json();
        status["instances"]
            .as_array()
            .expect("instances array")
            .iter()
            .filter(|i| i["kind"] == kind)
            .cloned()
            .collect()
    }

    /// The sum over every series of the metric `name` in the admin `/metrics` (the
    /// supervisor's and every worker's), e.g. a gauge per sync instance.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let metrics = self.admin_get("/metrics").await;
        String::from_utf8_lossy(&metrics.body)
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Every worker pid currently known to `/status`.
    pub async fn worker_pids(&self) -> Vec<u32> {
        let status = self.admin_get("/status").await.json();
        status["instances"]
            .as_array()
            .expect("instances array")
            .iter()
            .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    pub async fn post(&self, path: &str, token: &str, body: &str) -> anyhow::Result<Reply> {
        let auth = format!("Bearer {token}");
        request(
            self.front,
            Method::POST,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the supervisor to exit (polling; no sleep-and-hope).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "firemode did not exit within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- firemode log ({}) ----\n{}",
                self.dir.display(),
                self.logs()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the supervisor process is started, kept so [`TestSystem::start_again`] starts it the
/// same way.
struct Launch {
    wrapper: Vec<String>,
    env: Vec<(String, String)>,
}

type Logs = Arc<Mutex<Vec<String>>>;

impl Launch {
    /// Spawns `firemode --config FILE`, captures its log, and waits for both listeners.
    async fn spawn(&self, config_path: &Path) -> (Child, Logs, SocketAddr, SocketAddr) {
        let bin = bin_dir().join("firemode");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info");
        for (k, _) in std::env::vars() {
            if k.starts_with("FIREMODE_") || k == "PORT" || k == "DATABASE_URL" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));

        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let addr = v["addr"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok());
                        let name = v["listener"].as_str().unwrap_or("").to_string();
                        if let Some(addr) = addr {
                            let _ = tx.send((name, addr));
                        }
                    }
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut front = None;
        let mut admin = None;
        while front.is_none() || admin.is_none() {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some((name, addr))) if name == "front" => front = Some(addr),
                Ok(Some((name, addr))) if name == "admin" => admin = Some(addr),
                Ok(Some(_)) => {}
                _ => {
                    let _ = child.kill();
                    let logs = logs.lock().map(|l| l.join("\n")).unwrap_or_default();
                    panic!("firemode did not report its listeners; log:\n{logs}");
                }
            }
        }
        (child, logs, front.expect("front"), admin.expect("admin"))
    }
}
