//! Log lines for journald: when stderr is the journal, every line starts with its syslog
//! priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace), which journald
//! strips and records, so `journalctl -p err` finds the errors.
//!
//! Stderr is the journal when `JOURNAL_STREAM` (`<device>:<inode>`, set by systemd) names the
//! very file stderr is — not merely when the variable is set: a process whose stderr was
//! redirected elsewhere inherits the variable but must not prefix.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;

/// Whether this process's stderr is the journal (checked once).
pub fn stderr_is_journal() -> bool {
    static IS: OnceLock<bool> = OnceLock::new();
    *IS.get_or_init(|| {
        let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
            return false;
        };
        let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
            return false;
        };
        let Ok(meta) = std::fs::File::from(fd).metadata() else {
            return false;
        };
        names_file(&stream, meta.dev(), meta.ino())
    })
}

/// Whether a `JOURNAL_STREAM` value names the file with this device and inode.
fn names_file(stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = stream.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority prefix for a level.
pub fn prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// The prefix for a level written as text (`"ERROR"`, `"warn"`, …), as worker JSON lines
/// carry it; unknown text is info.
pub fn prefix_for_name(level: &str) -> &'static str {
    let level = match level.trim().to_ascii_uppercase().as_str() {
        "ERROR" => Level::ERROR,
        "WARN" | "WARNING" => Level::WARN,
        "DEBUG" => Level::DEBUG,
        "TRACE" => Level::TRACE,
        _ => Level::INFO,
    };
    prefix(level)
}

/// A `MakeWriter` for stderr that starts each event with its priority prefix when `enabled`.
/// The fmt layer writes each event with one `write_all`, so one event is one prefixed line.
pub struct Stderr {
    pub enabled: bool,
}

/// Writes one event to stderr, its prefix first.
pub struct PrefixedStderr {
    prefix: &'static str,
    started: bool,
}

impl Write for PrefixedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if !self.started {
            self.started = true;
            if !self.prefix.is_empty() {
                let mut line = Vec::with_capacity(self.prefix.len() + buf.len());
                line.extend_from_slice(self.prefix.as_bytes());
                line.extend_from_slice(buf);
                err.write_all(&line)?;
                return Ok(buf.len());
            }
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = PrefixedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        PrefixedStderr {
            prefix: "",
            started: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        PrefixedStderr {
            prefix: if self.enabled {
                prefix(*meta.level())
            } else {
                ""
            },
            started: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_the_file() {
        assert!(names_file("8:12345", 8, 12345));
        assert!(names_file("8:12345\n", 8, 12345));
        assert!(!names_file("8:12346", 8, 12345));
        assert!(!names_file("9:12345", 8, 12345));
        assert!(!names_file("", 8, 12345));
        assert!(!names_file("8", 8, 12345));
        assert!(!names_file("a:b", 8, 12345));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(prefix(Level::ERROR), "<3>");
        assert_eq!(prefix(Level::WARN), "<4>");
        assert_eq!(prefix(Level::INFO), "<6>");
        assert_eq!(prefix(Level::DEBUG), "<7>");
        assert_eq!(prefix_for_name("WARN"), "<4>");
        assert_eq!(prefix_for_name("error"), "<3>");
        assert_eq!(prefix_for_name("whatever"), "<6>");
    }
}
