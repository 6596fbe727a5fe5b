//! The one-shot commands the supervisor runs through this binary because it does not link
//! the store: `--check-store` (for `firemode check-config --connect`) and `--backup FILE`
//! (for `firemode backup FILE`). Each reads the effective config as JSON on stdin, prints a
//! summary on stdout (exit 0) or what is wrong on stderr (exit 1 or 2).

use firemode_config::Config;
use firemode_store::backup::{backup_sqlite, BackupError};
use std::process::ExitCode;
use std::time::Duration;

/// A one-shot command named by the first argument, if it names one.
pub enum Command {
    CheckStore,
    /// The file to write, if the command line names one.
    Backup(Option<String>),
}

impl Command {
    /// The command the arguments (without the program name) ask for; `None` for a worker.
    pub fn from_args(mut args: impl Iterator<Item = String>) -> Option<Command> {
        match args.next().as_deref() {
            Some("--check-store") => Some(Command::CheckStore),
            Some("--backup") => Some(Command::Backup(args.next())),
            _ => None,
        }
    }

    /// Runs the command to completion.
    pub fn run(self) -> ExitCode {
        match self {
            Command::CheckStore => check_store(),
            Command::Backup(dest) => backup(dest),
        }
    }
}

/// The effective config a one-shot command gets on stdin from `firemode`.
fn config_from_stdin(what: &str) -> Result<Config, ExitCode> {
    use std::io::Read as _;
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("firemode-sync {what}: cannot read the config on stdin: {e}");
        return Err(ExitCode::from(2));
    }
    Config::from_json(&text).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// `firemode-sync --backup FILE`, run by `firemode backup FILE`: an online copy of the
/// embedded SQLite store.
fn backup(dest: Option<String>) -> ExitCode {
    let Some(dest) = dest else {
        eprintln!("firemode-sync --backup: name the file to write");
        return ExitCode::from(2);
    };
    let config = match config_from_stdin("--backup") {
        Ok(c) => c,
        Err(code) => return code,
    };
    match backup_sqlite(
        &config.database.url,
        &config.data_dir,
        std::path::Path::new(&dest),
    ) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e @ BackupError::Failed { .. }) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `firemode-sync --check-store`, run by `firemode check-config --connect`: connects once,
/// reads the schema version, prints a summary (exit 0) or what is wrong (stderr, exit 2).
fn check_store() -> ExitCode {
    let config = match config_from_stdin("--check-store") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("firemode-sync --check-store: cannot start the async runtime");
        return ExitCode::from(1);
    };
    let checking = firemode_store::check::check_connection(
        &config.database.url,
        &config.data_dir,
        Duration::from_secs(5),
    );
    match runtime.block_on(checking) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("{problem}");
            ExitCode::from(2)
        }
    }
}
