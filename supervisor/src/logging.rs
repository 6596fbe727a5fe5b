//! The supervisor's own log output: pretty on a terminal, JSON otherwise (or as
//! `telemetry.log_format` says). Worker lines join the same stream via `child_log`.

use crate::child_log::Style;
use firemode_config::LogFormat;
use std::io::IsTerminal;

pub fn style(format: LogFormat) -> Style {
    match format {
        LogFormat::Json => Style::Json,
        LogFormat::Pretty => Style::Pretty,
        LogFormat::Auto if std::io::stderr().is_terminal() => Style::Pretty,
        LogFormat::Auto => Style::Json,
    }
}

pub fn init(style: Style) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match style {
        Style::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        Style::Pretty => builder.try_init(),
    };
}
