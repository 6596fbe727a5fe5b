//! `firemode plan`: what the supervisor will do, computed from the config alone — each
//! kind's restart timeline, failure detection, and the stop-time budget — so an operator
//! sees it before it happens. Pure text rendering over [`restart_delay`].

use crate::backoff::{restart_delay, JITTER};
use firemode_config::{Config, HumanDuration, KILL_GRACE};
use std::fmt::Write as _;
use std::time::Duration;

fn d(x: Duration) -> HumanDuration {
    // Millisecond precision reads better than humantime's nanoseconds.
    HumanDuration(Duration::from_millis(x.as_millis() as u64))
}

pub fn render(config: &Config) -> String {
    let mut out = String::new();
    workers(&mut out, config);
    restart_timeline(&mut out, config);
    failures(&mut out, config);
    stop_budget(&mut out, config);
    out
}

fn workers(out: &mut String, config: &Config) {
    let _ = writeln!(out, "Workers");
    for (kind, w) in [
        ("classify", &config.workers.classify),
        ("sync", &config.workers.sync),
    ] {
        let program = if w.command.is_empty() {
            format!("firemode-{kind} beside firemode")
        } else {
            w.command.clone()
        };
        let _ = writeln!(out, "  {kind:<9} {} instance(s), {program}", w.instances);
    }
}

fn restart_timeline(out: &mut String, config: &Config) {
    let b = &config.supervisor.backoff;
    let _ = writeln!(
        out,
        "\nRestart timeline (every kind; supervisor.backoff: initial {}, max {}, jitter ±{:.0}%)",
        b.initial,
        b.max,
        JITTER * 100.0
    );
    let mut elapsed = Duration::ZERO;
    let mut attempt = 0u32;
    loop {
        let mid = restart_delay(b, attempt, 0.5);
        let lo = restart_delay(b, attempt, 0.0);
        let hi = restart_delay(b, attempt, 0.999_999);
        elapsed += mid;
        let capped = mid >= b.max.get();
        let _ = writeln!(
            out,
            "  restart {:>2}{} after {:<10} ({} – {}), {} after the first crash",
            attempt + 1,
            if capped { "+" } else { " " },
            d(mid).to_string(),
            d(lo),
            d(hi),
            d(elapsed)
        );
        if capped || attempt >= 30 {
            break;
        }
        attempt += 1;
    }
    let _ = writeln!(
        out,
        "  a crash loop stays at the cap and shows as degraded from restart 3 on;\n  the counter starts over after {} of healthy uptime (supervisor.backoff.reset_after)",
        b.reset_after
    );
}

/// Health checks, and what requests see while a kind has no ready instance.
fn failures(out: &mut String, config: &Config) {
    let sup = &config.supervisor;
    let detect = sup.health_interval.get() * sup.unhealthy_threshold + sup.health_timeout.get();
    let _ = writeln!(
        out,
        "\nHealth\n  GET /healthz every {} (timeout {}); {} failures in a row → restart (detected within about {})\n  a new instance must pass its first check within {} (supervisor.start_timeout)",
        sup.health_interval, sup.health_timeout, sup.unhealthy_threshold, d(detect), sup.start_timeout
    );
    let _ = writeln!(
        out,
        "\nRequests while a kind has no ready instance\n  wait up to {} (server.queue_timeout), then 503 with Retry-After; a request may take {} in all (server.request_timeout)",
        config.server.queue_timeout, config.server.request_timeout
    );
}

fn stop_budget(out: &mut String, config: &Config) {
    let sup = &config.supervisor;
    let drain = sup.drain_timeout.get();
    let needed = drain + KILL_GRACE;
    let budget = sup.stop_timeout.get();
    let _ = writeln!(
        out,
        "\nStop (SIGTERM) budget: supervisor.stop_timeout {} (set TimeoutStopSec= to the same)\n  front and workers drain: up to {} (supervisor.drain_timeout), then SIGKILL\n  kill grace:              {}\n  total:                   {} — {}",
        sup.stop_timeout,
        sup.drain_timeout,
        HumanDuration(KILL_GRACE),
        HumanDuration(needed),
        if needed <= budget {
            format!("fits, {} to spare", HumanDuration(budget - needed))
        } else {
            format!("DOES NOT FIT, {} over", HumanDuration(needed - budget))
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_reads_right() {
        let text = render(&Config::default());
        assert!(text.contains("restart  1  after 100ms"), "{text}");
        assert!(text.contains("restart  2  after 200ms"), "{text}");
        assert!(text.contains("after 1m "), "{text}");
        assert!(text.contains("restart 11+"), "{text}");
        assert!(text.contains("fits, 55s to spare"), "{text}");
        assert!(text.contains("classify  2 instance(s)"), "{text}");
    }
}
