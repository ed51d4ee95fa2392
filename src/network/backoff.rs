//! Backing off from a peer that does not answer, shared by every caller that talks to it.
//!
//! openraft retries replication as soon as a session fails and sends a heartbeat every interval, and
//! its own backoff waits inside the request stream, which raftkv's transport polls only once the call
//! is already being made; so against a dead peer each failure was followed at once by the next
//! connection attempt and a WARN line, thousands a second. Here every stream to a peer that has failed
//! waits out an exponential delay, capped so that a peer that comes back is caught up within about a
//! second, before it even tries to connect; one success clears it. Votes are not delayed: they are rare
//! and an election must not wait on a guess about a peer.
//!
//! The failures are reported here, once when a peer goes down, then at most once per
//! [`REPORT_EVERY`], and once when it answers again; openraft's per-heartbeat warning is filtered out
//! in the binary's log setup.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// The first delay after a failure. Small, so one lost answer on a busy machine costs little.
const FIRST_DELAY: Duration = Duration::from_millis(20);
/// The longest delay: how late, at worst, a peer that came back is tried again.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// How often a peer that stays down is reported again.
const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct PeerHealth {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Failures since the last success.
    failures: u32,
    /// No attempt before this, unless the caller does not wait (votes).
    down_until: Option<Instant>,
    /// The first failure since the last success.
    down_since: Option<Instant>,
    last_report: Option<Instant>,
}

/// The delay after `failures` consecutive failures: doubling from [`FIRST_DELAY`] up to [`MAX_DELAY`].
pub fn delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

impl PeerHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long a caller must wait before it tries the peer. The caller that finds the delay over
    /// is the one that tries; the next window starts at once, so callers arriving meanwhile wait
    /// for that attempt's outcome instead of all trying together.
    pub fn wait(&self) -> Duration {
        let now = Instant::now();
        let mut s = self.state();
        match s.down_until {
            None => Duration::ZERO,
            Some(until) if now >= until => {
                s.down_until = Some(now + delay(s.failures));
                Duration::ZERO
            }
            Some(until) => until - now,
        }
    }

    /// True while the peer has failed and not yet answered again.
    pub fn is_down(&self) -> bool {
        self.state().failures > 0
    }

    pub fn succeeded(&self, target: NodeId) {
        let mut s = self.state();
        if s.failures == 0 {
            return;
        }
        let down_for = s.down_since.map(|t| t.elapsed()).unwrap_or_default();
        tracing::info!(
            peer = target,
            failed_attempts = s.failures,
            ?down_for,
            "peer answers again"
        );
        *s = State::default();
    }

    pub fn failed(&self, target: NodeId, error: &dyn Display) {
        metrics::counter!(crate::telemetry::names::PEER_SENT_FAILURES, "to" => target.to_string())
            .increment(1);
        let now = Instant::now();
        let mut s = self.state();
        s.failures = s.failures.saturating_add(1);
        s.down_until = Some(now + delay(s.failures));
        let down_since = *s.down_since.get_or_insert(now);
        let due = s
            .last_report
            .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
        if due {
            s.last_report = Some(now);
            if s.failures == 1 {
                tracing::warn!(
                    peer = target,
                    %error,
                    max_delay = ?MAX_DELAY,
                    "peer does not answer; backing off (reported again every {REPORT_EVERY:?} while it lasts)"
                );
            } else {
                tracing::warn!(
                    peer = target,
                    %error,
                    failed_attempts = s.failures,
                    down_for = ?now.duration_since(down_since),
                    "peer still does not answer"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        assert_eq!(delay(0), Duration::ZERO);
        assert_eq!(delay(1), FIRST_DELAY);
        assert_eq!(delay(2), FIRST_DELAY * 2);
        assert_eq!(delay(3), FIRST_DELAY * 4);
        assert_eq!(delay(40), MAX_DELAY);
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn a_failure_delays_callers_and_a_success_clears_it() {
        let h = PeerHealth::default();
        assert_eq!(h.wait(), Duration::ZERO);
        for _ in 0..10 {
            h.failed(2, &"refused");
        }
        assert!(h.is_down());
        let w = h.wait();
        assert!(w > Duration::ZERO && w <= MAX_DELAY, "{w:?}");
        h.succeeded(2);
        assert!(!h.is_down());
        assert_eq!(h.wait(), Duration::ZERO);
    }

    #[test]
    fn only_one_caller_tries_when_the_delay_is_over() {
        let h = PeerHealth::default();
        h.failed(2, &"refused");
        std::thread::sleep(FIRST_DELAY + Duration::from_millis(5));
        assert_eq!(h.wait(), Duration::ZERO, "the first caller tries");
        assert!(h.wait() > Duration::ZERO, "the next waits for its outcome");
    }
}
