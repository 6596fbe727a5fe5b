//! Operator commands against a running supervisor, over its admin listener:
//! `firemode status` (the instances as a table, like `supervisorctl status`) and
//! `firemode reload` (a rolling reload whose outcome becomes the exit status, so systemd's
//! `ExecReload=` reports the truth). Also the message a reload request is inside the
//! supervisor ([`ReloadRequest`]) and how a reload ended ([`ReloadOutcome`]).

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a reload ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// Every instance runs the new configuration.
    Applied,
    /// The new configuration was not taken (invalid, empty, or changing what needs a
    /// restart); the running one stays in force.
    Refused(String),
    /// The configuration was valid but the roll did not complete; instances not yet
    /// replaced keep the old configuration.
    Failed(String),
}

/// A reload asked for over the admin listener; the run loop answers on `reply` once the
/// reload (or the one already running, plus this one) has settled.
pub struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

/// One request to the admin listener at `addr`: status and body.
async fn admin_request(
    addr: &str,
    method: Method,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| {
            format!("cannot reach the admin listener at {addr} (server.admin_listen); is firemode running with this config?")
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr)
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| {
            format!(
                "no answer from {addr} within {}",
                humantime::format_duration(timeout)
            )
        })?
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Asks the supervisor at `admin` to reload and waits for the outcome.
pub fn reload(admin: &str, timeout: Duration) -> anyhow::Result<ReloadOutcome> {
    let (status, body) =
        runtime()?.block_on(admin_request(admin, Method::POST, "/reload", timeout))?;
    match serde_json::from_slice::<ReloadOutcome>(&body) {
        Ok(outcome) => Ok(outcome),
        Err(_) => bail!(
            "the admin listener answered {status}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

#[derive(Deserialize)]
struct Status {
    instances: Vec<InstanceRow>,
    ready: bool,
}

#[derive(Deserialize)]
struct InstanceRow {
    kind: String,
    instance: u32,
    pid: Option<u32>,
    state: String,
    restarts: u32,
    uptime_s: Option<f64>,
    last_exit: Option<String>,
    #[serde(default)]
    rss_bytes: Option<u64>,
    #[serde(default)]
    degraded: bool,
}

/// The instances of the supervisor at `admin` as a table, and whether every kind is ready.
pub fn status(admin: &str, timeout: Duration) -> anyhow::Result<(String, bool)> {
    let (code, body) =
        runtime()?.block_on(admin_request(admin, Method::GET, "/status", timeout))?;
    if !code.is_success() {
        bail!(
            "the admin listener answered {code}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let status: Status = serde_json::from_slice(&body).context("reading /status")?;
    Ok((render(&status.instances), status.ready))
}

fn render(rows: &[InstanceRow]) -> String {
    let mut table = vec![[
        "KIND",
        "INSTANCE",
        "STATE",
        "PID",
        "UPTIME",
        "MEMORY",
        "RESTARTS",
        "LAST EXIT",
    ]
    .map(String::from)];
    for r in rows {
        let state = if r.degraded {
            format!("{} (degraded)", r.state)
        } else {
            r.state.clone()
        };
        table.push([
            r.kind.clone(),
            r.instance.to_string(),
            state,
            r.pid.map_or("-".into(), |p| p.to_string()),
            r.uptime_s.map_or("-".into(), |s| {
                humantime::format_duration(Duration::from_secs(s as u64)).to_string()
            }),
            r.rss_bytes.map_or("-".into(), mib),
            r.restarts.to_string(),
            r.last_exit.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_shows_every_field() {
        let rows = vec![
            InstanceRow {
                kind: "classify".into(),
                instance: 0,
                pid: Some(4242),
                state: "ready".into(),
                restarts: 0,
                uptime_s: Some(3725.4),
                last_exit: None,
                rss_bytes: Some(12 * 1024 * 1024),
                degraded: false,
            },
            InstanceRow {
                kind: "sync".into(),
                instance: 1,
                pid: None,
                state: "backoff".into(),
                restarts: 7,
                uptime_s: None,
                last_exit: Some("exit status 1".into()),
                rss_bytes: None,
                degraded: true,
            },
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("KIND"));
        assert!(lines[1].contains("4242") && lines[1].contains("1h 2m 5s"));
        assert!(lines[1].contains("12.0 MiB"));
        assert!(lines[2].contains("backoff (degraded)") && lines[2].contains("exit status 1"));
        let state_col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][state_col..state_col + 5], "ready");
    }

    #[test]
    fn outcomes_cross_the_wire() {
        for o in [
            ReloadOutcome::Applied,
            ReloadOutcome::Refused("x".into()),
            ReloadOutcome::Failed("y".into()),
        ] {
            let text = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<ReloadOutcome>(&text).unwrap(), o);
        }
    }
}
