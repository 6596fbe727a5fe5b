//! `firemode`: the command line. Thin glue over the `firemode` library.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use firemode_config::{config_file, load, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc rather than glibc malloc: the request path allocates per request (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "firemode",
    version = firemode_telemetry::build_info::VERSION_LINE,
    about = "FireMode: supervisor and front for the classify and sync workers"
)]
struct Cli {
    /// Config file (default: /etc/firemode/firemode.toml when it exists, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Front listen address (overrides server.listen and PORT).
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin listen address (overrides server.admin_listen).
    #[arg(long, global = true, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Data directory (overrides data_dir).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor, the front and the workers (the default).
    Run,
    /// Print the effective config (secrets redacted) and check files, worker commands and
    /// directories; exit 2 on any error.
    CheckConfig {
        /// Also connect to the store: reachable, login, database present, schema known.
        #[arg(long)]
        connect: bool,
    },
    /// Print what the config implies: restart timeline, failure detection, stop budget.
    Plan,
    /// Show the running supervisor's instances as a table (via server.admin_listen).
    /// Exit 0 when every kind has a ready instance, 3 when not, 1 when unreachable.
    Status,
    /// Ask the running supervisor to reload its config (a rolling restart) and wait for the
    /// outcome: exit 0 when applied, 2 when the new config was refused, 1 when the roll
    /// failed or the supervisor is unreachable.
    Reload {
        /// How long to wait for the reload to settle.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Copy the embedded SQLite store to FILE while the system runs (online backup; never
    /// overwrites). PostgreSQL stores are backed up with pg_dump.
    Backup {
        /// Where to write the copy.
        file: PathBuf,
    },
    /// Print a signed JWT for the configured key.
    Token {
        /// The `sub` claim (who the token is for).
        #[arg(long)]
        sub: String,
        /// The `org` claim (tenant).
        #[arg(long)]
        org: Option<String>,
        /// Lifetime, e.g. "1h", "30m", "7d".
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli_admin = cli.admin_listen.clone();
    let overrides = Overrides {
        listen: cli.listen.clone(),
        admin_listen: cli.admin_listen.clone(),
        data_dir: cli.data_dir.clone(),
    };
    let file = config_file(cli.config.as_deref());
    let config = match load(file.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            if !e.is_about_the_file() {
                eprintln!(
                    "firemode: fix the key named above (file: {})",
                    file.as_ref()
                        .map(|f| f.display().to_string())
                        .unwrap_or_else(|| "none, built-in defaults".into())
                );
            }
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { connect } => check_config(&config, connect),
        Command::Plan => {
            print!("{}", firemode::plan::render(&config));
            ExitCode::SUCCESS
        }
        Command::Status => status(&admin_address(&cli_admin, &config)),
        Command::Reload { timeout } => reload(&admin_address(&cli_admin, &config), timeout),
        Command::Backup { file } => match firemode::backup::run(&config, &file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(failed) => {
                eprintln!("firemode backup: {}", failed.message);
                ExitCode::from(failed.exit)
            }
        },
        Command::Token { sub, org, ttl } => {
            match firemode::auth::mint(&config, &sub, org.as_deref(), ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("firemode token: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run => run(config, file, overrides),
    }
}

/// `firemode status`: exit 0 when every kind has a ready instance, 3 when not, 1 when the
/// supervisor is unreachable.
fn status(admin: &str) -> ExitCode {
    match firemode::control::status(admin, Duration::from_secs(10)) {
        Ok((table, ready)) => {
            print!("{table}");
            if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("firemode status: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `firemode reload`: exit 0 when applied, 2 when refused, 1 when the roll failed or the
/// supervisor is unreachable.
fn reload(admin: &str, timeout: Duration) -> ExitCode {
    use firemode::control::ReloadOutcome;
    match firemode::control::reload(admin, timeout) {
        Ok(ReloadOutcome::Applied) => {
            println!("reloaded: every instance runs the new configuration");
            ExitCode::SUCCESS
        }
        Ok(ReloadOutcome::Refused(why)) => {
            eprintln!("firemode reload: refused, the running configuration stays in force: {why}");
            ExitCode::from(2)
        }
        Ok(ReloadOutcome::Failed(why)) => {
            eprintln!("firemode reload: the roll failed: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("firemode reload: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `firemode run` (the default): exit 0 when everything drained cleanly; 1 when not, or
/// when the system failed at run time; 2 when the runtime dir is locked by another
/// supervisor.
fn run(config: firemode_config::Config, file: Option<PathBuf>, overrides: Overrides) -> ExitCode {
    // Before anything touches the runtime dir (stale sockets are removed at start).
    let _lock = match firemode::runtime_dir::lock(&config.supervisor.runtime_dir) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("firemode: {e}");
            return ExitCode::from(2);
        }
    };
    let style = firemode::logging::style(config.telemetry.log_format);
    // Blocking threads serve file I/O (spilled answers); a few keep a burst of large
    // answers from spawning hundreds of threads, each with its own stack and heap.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firemode: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let source = firemode::run::ConfigSource { file, overrides };
    let outcome = runtime.block_on(async {
        let _telemetry = firemode_telemetry::traces::init(
            style,
            &config.telemetry.otlp_endpoint,
            firemode_telemetry::traces::ServiceIdentity {
                kind: "",
                instance_id: format!("supervisor-{}", std::process::id()),
            },
        );
        let outcome = firemode::run::run(config, source, style).await;
        if let Err(e) = &outcome {
            tracing::error!(error = %format!("{e:#}"), "firemode failed");
        }
        outcome
    });
    // Tasks still running (after a second stop signal: the drain) are dropped with their
    // workers (kill_on_drop); a blocking file operation gets a moment, not forever.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(_) => ExitCode::from(1),
    }
}

/// `firemode check-config [--connect]`: the effective config on stdout, problems on stderr.
fn check_config(config: &firemode_config::Config, connect: bool) -> ExitCode {
    use firemode::preflight;
    print!("{}", config.redacted().to_toml());
    let mut findings = preflight::check(config);
    if connect {
        match preflight::connect(config) {
            Ok(summary) => eprintln!("firemode check-config: {summary}"),
            Err(f) => findings.push(f),
        }
    }
    if findings.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &findings {
        eprintln!("{f}");
    }
    ExitCode::from(2)
}

/// Where the running supervisor's admin listener is: `--admin-listen`, else the address it
/// recorded in its runtime dir, else `server.admin_listen`.
fn admin_address(flag: &Option<String>, config: &firemode_config::Config) -> String {
    flag.clone()
        .or_else(|| firemode::runtime_dir::read_admin_addr(&config.supervisor.runtime_dir))
        .unwrap_or_else(|| config.server.admin_listen.clone())
}
