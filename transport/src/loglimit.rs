//! A budget of log lines per second, for lines a misbehaving peer can cause once per
//! connection: a storm of such peers must not flood the log, nor cost a line each.

use std::time::{Duration, Instant};

/// Lets at most `lines_per_s_max` lines through in each one-second window and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    lines_per_s_max: u32,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter that lets `lines_per_s_max` lines a second through (at least one).
    pub fn new(lines_per_s_max: u32) -> Self {
        Self { lines_per_s_max: lines_per_s_max.max(1), window_start: None, logged: 0, suppressed: 0 }
    }

    /// Whether a line may be logged at `now`. `Some(n)` says yes, and that `n` lines were
    /// held back since the last one that went (the caller says so in its line); `None` says no.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self.window_start.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if fresh {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged >= self.lines_per_s_max {
            self.suppressed += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_the_budget_through_then_counts_what_it_held_back() {
        let mut limiter = LogLimiter::new(3);
        let t0 = Instant::now();
        let first: Vec<_> = (0..10).map(|i| limiter.admit(t0 + Duration::from_millis(i))).collect();
        assert_eq!(first[..3], [Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none));
        assert_eq!(limiter.admit(t0 + Duration::from_millis(1000)), Some(7), "the next window reports the held lines");
        assert_eq!(limiter.admit(t0 + Duration::from_millis(1001)), Some(0));
    }

    #[test]
    fn a_zero_budget_still_lets_one_line_a_second_through() {
        let mut limiter = LogLimiter::new(0);
        let t0 = Instant::now();
        assert_eq!(limiter.admit(t0), Some(0));
        assert_eq!(limiter.admit(t0), None);
        assert_eq!(limiter.admit(t0 + Duration::from_secs(2)), Some(1));
    }
}
