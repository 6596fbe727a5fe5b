//! Worker output into the supervisor's log stream: each line a worker writes to stdout or
//! stderr is re-emitted tagged with its kind and instance. Workers log JSON lines; in JSON
//! mode the supervisor adds its fields to the same object (no double encoding), in pretty
//! mode it prints them as one readable line.

use crate::instance::Kind;
use firemode_telemetry::traces::LogStyle as Style;
use serde_json::{Map, Value};
use std::io::Write as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Lines longer than this are split (a runaway worker must not exhaust the supervisor).
const MAX_LINE: usize = 64 * 1024;

/// Forwards every line of `stream` until it ends.
pub fn forward(
    stream: impl AsyncRead + Unpin + Send + 'static,
    style: Style,
    kind: Kind,
    instance: u32,
    pid: u32,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::with_capacity(512);
        loop {
            buf.clear();
            // Bounded: a longer line arrives as several.
            match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end();
                    if !line.is_empty() {
                        emit(style, kind, instance, pid, line);
                    }
                }
            }
        }
    });
}

fn emit(style: Style, kind: Kind, instance: u32, pid: u32, line: &str) {
    let mut obj = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => o,
        _ => {
            let mut o = Map::new();
            o.insert(
                "timestamp".into(),
                humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            );
            o.insert("level".into(), "INFO".into());
            o.insert("message".into(), line.into());
            o
        }
    };
    let level = match obj.get("level") {
        Some(Value::String(l)) => l.clone(),
        _ => String::new(),
    };
    let text = match style {
        Style::Json => {
            obj.insert("kind".into(), kind.name().into());
            obj.insert("instance".into(), instance.into());
            obj.insert("pid".into(), pid.into());
            let mut s = Value::Object(obj).to_string();
            s.push('\n');
            s
        }
        Style::Pretty => {
            let take = |o: &mut Map<String, Value>, k: &str| match o.remove(k) {
                Some(Value::String(s)) => s,
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let ts = take(&mut obj, "timestamp");
            let level = take(&mut obj, "level");
            let message = take(&mut obj, "message");
            obj.remove("target");
            let fields: Vec<String> = obj
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    v => format!("{k}={v}"),
                })
                .collect();
            format!(
                "{ts} {level:>5} {}[{instance}] {message} {}\n",
                kind.name(),
                fields.join(" ")
            )
        }
    };
    // Under journald the line starts with the worker's own level as a syslog priority.
    let text = if firemode_telemetry::journal::stderr_is_journal() {
        format!(
            "{}{text}",
            firemode_telemetry::journal::prefix_for_name(&level)
        )
    } else {
        text
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
