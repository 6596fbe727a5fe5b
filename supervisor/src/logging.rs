//! The supervisor's own log output: pretty on a terminal, JSON otherwise (or as
//! `telemetry.log_format` says). Worker lines join the same stream via `child_log`; the
//! subscriber itself (and span export) is set up by `firemode_telemetry::traces`.

use crate::child_log::Style;
use firemode_config::LogFormat;
use firemode_telemetry::traces::LogStyle;
use std::io::IsTerminal;

pub fn style(format: LogFormat) -> Style {
    match format {
        LogFormat::Json => Style::Json,
        LogFormat::Pretty => Style::Pretty,
        LogFormat::Auto if std::io::stderr().is_terminal() => Style::Pretty,
        LogFormat::Auto => Style::Json,
    }
}

pub fn log_style(style: Style) -> LogStyle {
    match style {
        Style::Json => LogStyle::Json,
        Style::Pretty => LogStyle::Pretty,
    }
}
