//! Repair throttle: repairs run at once up to a burst per window; past it each further repair
//! waits an exponentially growing delay, so we never fight another agent in a tight loop.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Throttle settings.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Repairs allowed without delay within `window`.
    pub burst: usize,
    /// The sliding window.
    pub window: Duration,
    /// First delay once the burst is spent.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            burst: 5,
            window: Duration::from_secs(30),
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Throttle state (pure: the caller passes the clock).
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    recent: VecDeque<Instant>,
    backoff: Duration,
}

impl Throttle {
    /// A fresh throttle.
    pub fn new(cfg: ThrottleConfig) -> Self {
        Throttle {
            cfg,
            recent: VecDeque::new(),
            backoff: cfg.base,
        }
    }

    /// How long a repair wanted at `now` must wait; records the repair at its run time.
    pub fn delay(&mut self, now: Instant) -> Duration {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.cfg.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() < self.cfg.burst {
            if self.recent.is_empty() {
                self.backoff = self.cfg.base;
            }
            self.recent.push_back(now);
            return Duration::ZERO;
        }
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.max);
        self.recent.push_back(now + d);
        d
    }

    /// Repairs recorded in the current window.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_exponential_then_reset() {
        let cfg = ThrottleConfig {
            burst: 3,
            window: Duration::from_secs(10),
            base: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        let mut t = Throttle::new(cfg);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(t.delay(t0 + Duration::from_millis(i)), Duration::ZERO);
        }
        let ds: Vec<u64> = (0..4)
            .map(|i| t.delay(t0 + Duration::from_millis(10 + i)).as_secs())
            .collect();
        assert_eq!(ds, vec![1, 2, 4, 4]);
        // After a quiet window everything is forgiven.
        assert_eq!(t.delay(t0 + Duration::from_secs(60)), Duration::ZERO);
        assert_eq!(t.recent(), 1);
    }
}
