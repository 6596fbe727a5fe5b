//! The supervisor's own log output: pretty on a terminal, JSON otherwise (or as
//! `telemetry.log_format` says). Worker lines join the same stream, in the same style, via
//! `child_log`; the subscriber itself (and span export) is set up by
//! `firemode_telemetry::traces`.

use firemode_config::LogFormat;
use firemode_telemetry::traces::LogStyle;
use std::io::IsTerminal;

/// The style for both the supervisor's lines and its workers' (`child_log`).
pub fn style(format: LogFormat) -> LogStyle {
    match format {
        LogFormat::Json => LogStyle::Json,
        LogFormat::Pretty => LogStyle::Pretty,
        LogFormat::Auto if std::io::stderr().is_terminal() => LogStyle::Pretty,
        LogFormat::Auto => LogStyle::Json,
    }
}
