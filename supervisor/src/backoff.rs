//! When to restart a stopped instance: `min(max, initial · 2^attempts)`, jittered, with the
//! attempt counter reset once an instance has stayed ready for `reset_after`.
//!
//! Pure: the jitter draw and the clock readings are passed in, so the schedule is tested
//! without processes (and [`RestartPolicy`] on tokio's paused clock).

use firemode_config::Backoff;
use std::time::Duration;
use tokio::time::Instant;

/// Jitter spreads restarts of many instances: the delay is scaled by a factor in
/// `[1 - JITTER, 1 + JITTER)`, then capped at `max`.
pub const JITTER: f64 = 0.2;

/// The delay before restart number `attempt + 1` (attempt 0 is the first restart).
/// `jitter` is a uniform draw from `[0, 1)`.
pub fn restart_delay(cfg: &Backoff, attempt: u32, jitter: f64) -> Duration {
    let initial = cfg.initial.get();
    let max = cfg.max.get();
    // 2^attempt without overflow: past 2^32 every sane `initial` is above any `max`.
    let factor = 2u32.checked_pow(attempt.min(32)).unwrap_or(u32::MAX);
    let base = initial.checked_mul(factor).unwrap_or(max).min(max);
    let scale = 1.0 - JITTER + 2.0 * JITTER * jitter.clamp(0.0, 1.0);
    base.mul_f64(scale).min(max)
}

/// The restart bookkeeping of one instance.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    cfg: Backoff,
    attempts: u32,
    ready_since: Option<Instant>,
}

impl RestartPolicy {
    pub fn new(cfg: Backoff) -> Self {
        Self {
            cfg,
            attempts: 0,
            ready_since: None,
        }
    }

    /// The instance passed its health check (the first time since it started).
    pub fn mark_ready(&mut self, now: Instant) {
        self.ready_since.get_or_insert(now);
    }

    /// The instance stopped (exited, or was killed as unhealthy): the delay before the next
    /// start. Healthy uptime of at least `reset_after` first resets the counter.
    pub fn on_stop(&mut self, now: Instant, jitter: f64) -> Duration {
        if let Some(since) = self.ready_since.take() {
            if now.saturating_duration_since(since) >= self.cfg.reset_after.get() {
                self.attempts = 0;
            }
        }
        let delay = restart_delay(&self.cfg, self.attempts, jitter);
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    /// Restarts in a row without a healthy stretch of `reset_after`.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A crash loop: three restarts or more in a row without a healthy stretch of
    /// `reset_after` (whatever the delay has reached).
    pub fn is_degraded(&self) -> bool {
        self.attempts >= 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firemode_config::HumanDuration;

    fn cfg() -> Backoff {
        Backoff {
            initial: HumanDuration::from_millis(100),
            max: HumanDuration::from_secs(60),
            reset_after: HumanDuration::from_secs(30),
        }
    }

    #[test]
    fn doubles_from_initial_and_caps_at_max() {
        let c = cfg();
        let mid = 0.5; // no jitter at the midpoint
        assert_eq!(restart_delay(&c, 0, mid), Duration::from_millis(100));
        assert_eq!(restart_delay(&c, 1, mid), Duration::from_millis(200));
        assert_eq!(restart_delay(&c, 5, mid), Duration::from_millis(3200));
        assert_eq!(restart_delay(&c, 10, mid), Duration::from_secs(60));
        assert_eq!(restart_delay(&c, 1000, mid), Duration::from_secs(60));
        assert_eq!(restart_delay(&c, u32::MAX, 0.99), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_bounds_and_never_exceeds_max() {
        let c = cfg();
        for attempt in 0..20 {
            let lo = restart_delay(&c, attempt, 0.0);
            let hi = restart_delay(&c, attempt, 0.999_999);
            let mid = restart_delay(&c, attempt, 0.5);
            assert!(lo <= mid && mid <= hi, "{attempt}: {lo:?} {mid:?} {hi:?}");
            assert!(hi <= c.max.get());
            assert!(lo >= mid.mul_f64(1.0 - JITTER - 1e-9));
        }
        // The first restart is fast whatever the draw.
        assert!(restart_delay(&c, 0, 0.999) < Duration::from_millis(150));
    }

    #[tokio::test(start_paused = true)]
    async fn counter_resets_only_after_healthy_uptime() {
        let mut p = RestartPolicy::new(cfg());
        // A crash loop: never ready, delays grow.
        let d1 = p.on_stop(Instant::now(), 0.5);
        tokio::time::advance(d1).await;
        let d2 = p.on_stop(Instant::now(), 0.5);
        tokio::time::advance(d2).await;
        let d3 = p.on_stop(Instant::now(), 0.5);
        assert_eq!([d1, d2, d3], [100, 200, 400].map(Duration::from_millis));
        assert!(p.is_degraded());

        // Ready, but not for long enough: the counter keeps growing.
        p.mark_ready(Instant::now());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(p.on_stop(Instant::now(), 0.5), Duration::from_millis(800));

        // Ready for reset_after: back to the initial delay.
        p.mark_ready(Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(p.on_stop(Instant::now(), 0.5), Duration::from_millis(100));
        assert_eq!(p.attempts(), 1);
        assert!(!p.is_degraded());
    }
}
