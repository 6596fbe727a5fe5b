//! What each signal means to the supervisor, in one place.
//!
//! | signal  | meaning                                                        |
//! |---------|----------------------------------------------------------------|
//! | SIGTERM | graceful drain, then exit 0                                    |
//! | SIGINT  | the same (Ctrl-C on a terminal)                                |
//! | SIGHUP  | reload (logged and ignored until rolling restarts land)        |

use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Interrupt,
    Reload,
}

/// Waits for the next signal the supervisor acts on.
pub async fn next_signal() -> std::io::Result<StopSignal> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::select! {
        _ = term.recv() => StopSignal::Terminate,
        _ = int.recv() => StopSignal::Interrupt,
        _ = hup.recv() => StopSignal::Reload,
    })
}
