//! The circuit breaker kept for each analyzer: a pure state machine, driven by the dispatcher with
//! the outcomes of batches and health probes and the current time, so tests drive it directly.
//!
//! ```text
//!   closed ──failure_threshold batch failures in a row, or a failed health probe──▶ open
//!   open ──recovery_timeout elapsed──▶ half-open
//!   half-open ──half_open_successes successes (batches or probes)──▶ closed
//!   half-open ──one failure (batch or probe)──▶ open (for another recovery_timeout)
//! ```
//! Closed lets all traffic through; open lets none; half-open lets a trickle through (the
//! dispatcher gives it one record at a time). A success in closed resets the failure count.
//!
//! What a transition means for routing (requeueing to the others on open, a fresh start of the
//! weighted share on close) is the dispatcher's business; this module only says when.

use std::time::{Duration, Instant};

/// Thresholds (from `BreakerSettings`).
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub recovery_timeout: Duration,
    pub half_open_successes: u32,
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// No traffic until `until`, then half-open.
    Open {
        until: Instant,
    },
    /// Trial traffic; `successes` so far.
    HalfOpen {
        successes: u32,
    },
}

impl State {
    /// `closed`, `open` or `half_open`: how `/health` and the metrics name it.
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }

    /// The code kept in `AnalyzerView::breaker` (index into [`STATE_NAMES`]).
    pub fn code(&self) -> u8 {
        match self {
            State::Closed => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }
}

/// Names of the states, indexed by [`State::code`].
pub const STATE_NAMES: [&str; 3] = ["closed", "open", "half_open"];

/// A change of state, for the dispatcher to act on and log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: &'static str,
    pub to: State,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
    consecutive_failures: u32,
    /// Bumped by every transition. The dispatcher tags each batch with the epoch it was sent in
    /// and feeds the breaker only outcomes of the current epoch: a late answer to a batch sent
    /// before the breaker opened must not close (or reopen) it in half-open.
    epoch: u64,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: State::Closed,
            consecutive_failures: 0,
            epoch: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Failures since the last success (batches and probes).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Closed or half-open: the analyzer may get traffic.
    pub fn allows_traffic(&self) -> bool {
        !matches!(self.state, State::Open { .. })
    }

    /// While open: how long until it goes half-open and traffic is tried again.
    pub fn next_probe_in(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// When [`Breaker::poll`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// A health probe answered 2xx. It counts towards closing a half-open breaker, nothing else:
    /// an analyzer whose `/health` answers while its `/analyze` fails must still open.
    pub fn on_probe_success(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::HalfOpen { .. } => self.on_success(now),
            State::Closed | State::Open { .. } => None,
        }
    }

    /// A batch acknowledged.
    pub fn on_success(&mut self, _now: Instant) -> Option<Transition> {
        if !matches!(self.state, State::Open { .. }) {
            self.consecutive_failures = 0;
        }
        match self.state {
            State::HalfOpen { successes } if successes + 1 >= self.cfg.half_open_successes => {
                self.go(State::Closed)
            }
            State::HalfOpen { successes } => {
                self.state = State::HalfOpen {
                    successes: successes + 1,
                };
                None
            }
            // A success while open is a late answer to a batch sent before it opened: the timer
            // still decides when to try again.
            State::Closed | State::Open { .. } => None,
        }
    }

    /// A batch failed after its retries.
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            State::Closed if self.consecutive_failures >= self.cfg.failure_threshold => {
                self.open(now)
            }
            State::HalfOpen { .. } => self.open(now),
            State::Closed | State::Open { .. } => None,
        }
    }

    /// A health probe failed: the analyzer says (or shows) it is down, so it opens at once.
    pub fn on_probe_failure(&mut self, now: Instant) -> Option<Transition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            State::Closed | State::HalfOpen { .. } => self.open(now),
            State::Open { .. } => None,
        }
    }

    /// Move from open to half-open once the recovery timeout has elapsed.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Open { until } if now >= until => self.go(State::HalfOpen { successes: 0 }),
            _ => None,
        }
    }

    fn open(&mut self, now: Instant) -> Option<Transition> {
        self.go(State::Open {
            until: now + self.cfg.recovery_timeout,
        })
    }

    fn go(&mut self, to: State) -> Option<Transition> {
        let from = self.state.name();
        self.state = to;
        self.epoch += 1;
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        recovery_timeout: Duration::from_secs(2),
        half_open_successes: 2,
    };

    fn names(t: Option<Transition>) -> Option<(&'static str, &'static str)> {
        t.map(|t| (t.from, t.to.name()))
    }

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row_and_a_success_resets_the_count() {
        let now = Instant::now();
        let mut b = Breaker::new(CFG);
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.on_success(now), None, "a success resets the count");
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.on_failure(now), None);
        assert!(b.allows_traffic());
        assert_eq!(names(b.on_failure(now)), Some(("closed", "open")));
        assert!(!b.allows_traffic());
        assert_eq!(b.next_probe_in(now), Some(Duration::from_secs(2)));
    }

    #[test]
    fn goes_half_open_after_the_recovery_timeout_and_closes_after_enough_successes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CFG);
        assert_eq!(names(b.on_probe_failure(t0)), Some(("closed", "open")));
        assert_eq!(b.poll(t0 + Duration::from_millis(1999)), None);
        assert_eq!(
            b.next_probe_in(t0 + Duration::from_millis(1500)),
            Some(Duration::from_millis(500))
        );
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(names(b.poll(t1)), Some(("open", "half_open")));
        assert!(b.allows_traffic());
        assert_eq!(b.on_success(t1), None, "one of two");
        assert_eq!(names(b.on_success(t1)), Some(("half_open", "closed")));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn one_failure_in_half_open_opens_it_again_for_a_full_timeout() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CFG);
        b.on_probe_failure(t0);
        let t1 = t0 + Duration::from_secs(3);
        b.poll(t1);
        b.on_success(t1);
        assert_eq!(names(b.on_failure(t1)), Some(("half_open", "open")));
        assert_eq!(b.deadline(), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        b.poll(t2);
        assert_eq!(names(b.on_probe_failure(t2)), Some(("half_open", "open")));
    }

    #[test]
    fn probe_successes_close_a_half_open_breaker_but_do_not_hide_batch_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CFG);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.on_probe_success(t0), None);
        assert_eq!(
            b.consecutive_failures(),
            2,
            "a probe does not reset batch failures"
        );
        assert_eq!(names(b.on_failure(t0)), Some(("closed", "open")));
        let epoch = b.epoch();
        let t1 = t0 + Duration::from_secs(2);
        b.poll(t1);
        assert!(b.epoch() > epoch, "every transition starts an epoch");
        assert_eq!(b.on_probe_success(t1), None);
        assert_eq!(names(b.on_probe_success(t1)), Some(("half_open", "closed")));
    }

    #[test]
    fn while_open_nothing_but_the_timer_changes_the_state() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CFG);
        b.on_probe_failure(t0);
        assert_eq!(b.on_success(t0), None, "a late answer does not close it");
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_probe_failure(t0), None);
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_secs(2)),
            "not pushed back"
        );
        assert!(!b.allows_traffic());
    }
}
