//! What each signal means to the supervisor, in one place. The handlers are registered once
//! at start, so a signal that arrives while the supervisor is busy (e.g. reloading) is kept.
//!
//! | signal  | meaning                                                             |
//! |---------|---------------------------------------------------------------------|
//! | SIGTERM | graceful drain, then exit 0                                         |
//! | SIGINT  | the same (Ctrl-C on a terminal)                                     |
//! | SIGHUP  | reload: re-read and validate the config, then a rolling restart     |

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorSignal {
    Terminate,
    Interrupt,
    Reload,
}

pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal the supervisor acts on.
    pub async fn next(&mut self) -> SupervisorSignal {
        tokio::select! {
            _ = self.term.recv() => SupervisorSignal::Terminate,
            _ = self.int.recv() => SupervisorSignal::Interrupt,
            _ = self.hup.recv() => SupervisorSignal::Reload,
        }
    }
}
