//! The circuit breaker.
//!
//! Written here rather than taken from a crate. The tower breaker at hand
//! (`tower-resilience-circuitbreaker` 0.14) was tried first and set aside: its count window is
//! not rolling (it counts every call since the last state change, so a long healthy run
//! hides a later outage: after 10,000 successes, 10,000 failures in a row are needed to reach
//! 50 %), its time window keeps one record per call (a million records for ten seconds at
//! 100,000 calls a second), and it takes two async locks per call. This one keeps a rolling
//! window of fixed size (the last N outcomes as a ring, or ten time buckets), admits calls
//! to a closed circuit without a lock (an atomic holds the closed state's epoch), takes one
//! short synchronous lock per outcome (and per admission while open or half-open), and gives
//! a probe's place back if its call is dropped before it ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{CircuitState, Events, PolicyEvent};
use crate::policy::{CircuitBreaker, Window};

/// The outcomes a breaker's failure rate is computed over.
enum Outcomes {
    /// The last `len` outcomes, `true` for a failure.
    Calls {
        ring: VecDeque<bool>,
        len: usize,
        failures: usize,
    },
    /// Calls and failures per bucket of `bucket` length; ten buckets make the window.
    Time {
        bucket: Duration,
        start: Instant,
        /// `(bucket number, calls, failures)`.
        buckets: Box<[(u64, u64, u64); BUCKETS]>,
    },
}

const BUCKETS: usize = 10;

impl Outcomes {
    fn new(window: Window) -> Self {
        match window {
            Window::Calls(len) => Outcomes::Calls {
                ring: VecDeque::with_capacity(len),
                len,
                failures: 0,
            },
            Window::Time(d) => Outcomes::Time {
                bucket: (d / BUCKETS as u32).max(Duration::from_millis(1)),
                start: Instant::now(),
                buckets: Box::new([(u64::MAX, 0, 0); BUCKETS]),
            },
        }
    }

    /// Adds an outcome; returns the calls and failures now in the window. Only a time window
    /// reads the clock.
    fn add(&mut self, failure: bool) -> (u64, u64) {
        match self {
            Outcomes::Calls {
                ring,
                len,
                failures,
            } => {
                if ring.len() == *len && ring.pop_front() == Some(true) {
                    *failures -= 1;
                }
                ring.push_back(failure);
                *failures += usize::from(failure);
                (ring.len() as u64, *failures as u64)
            }
            Outcomes::Time {
                bucket,
                start,
                buckets,
            } => {
                let n = bucket_number(*start, *bucket, Instant::now());
                let b = &mut buckets[(n % BUCKETS as u64) as usize];
                if b.0 != n {
                    *b = (n, 0, 0);
                }
                b.1 += 1;
                b.2 += u64::from(failure);
                buckets
                    .iter()
                    .filter(|b| b.0 != u64::MAX && b.0 + (BUCKETS as u64) > n)
                    .fold((0, 0), |(c, f), b| (c + b.1, f + b.2))
            }
        }
    }

    fn clear(&mut self) {
        match self {
            Outcomes::Calls { ring, failures, .. } => {
                ring.clear();
                *failures = 0;
            }
            Outcomes::Time { buckets, .. } => **buckets = [(u64::MAX, 0, 0); BUCKETS],
        }
    }
}

fn bucket_number(start: Instant, bucket: Duration, now: Instant) -> u64 {
    (now.saturating_duration_since(start).as_nanos() / bucket.as_nanos().max(1)) as u64
}

struct State {
    state: CircuitState,
    /// Changes with every transition: an outcome counts only in the state it was admitted in.
    epoch: u64,
    opened_at: Instant,
    outcomes: Outcomes,
    /// Half-open: probes let through, and probes that succeeded.
    probes: usize,
    probe_successes: usize,
}

/// One pattern's breaker.
pub(crate) struct Breaker {
    config: CircuitBreaker,
    state: Mutex<State>,
    /// The epoch while the circuit is closed, [`NOT_CLOSED`] otherwise: a closed circuit
    /// admits without the lock.
    closed_epoch: AtomicU64,
    pattern: Arc<str>,
    events: Events,
}

impl Breaker {
    pub(crate) fn new(config: CircuitBreaker, pattern: Arc<str>, events: Events) -> Self {
        Breaker {
            state: Mutex::new(State {
                state: CircuitState::Closed,
                epoch: 0,
                opened_at: Instant::now(),
                outcomes: Outcomes::new(config.window),
                probes: 0,
                probe_successes: 0,
            }),
            closed_epoch: AtomicU64::new(0),
            config,
            pattern,
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state (an open circuit whose reset time has come reads as open until a
    /// call probes it).
    pub(crate) fn state(&self) -> CircuitState {
        self.lock().state
    }

    /// Lets a call through, or not.
    pub(crate) fn admit(&self) -> Option<Admission<'_>> {
        let epoch = self.closed_epoch.load(Ordering::Acquire);
        if epoch != NOT_CLOSED {
            // A transition after this load makes the admission stale: its outcome will not
            // count, as for any call admitted just before a transition.
            return Some(Admission {
                breaker: self,
                epoch,
                probe: false,
                settled: false,
            });
        }
        let mut s = self.lock();
        let mut changed = None;
        if s.state == CircuitState::Open && s.opened_at.elapsed() >= self.config.open_for {
            changed = Some(self.transition(&mut s, CircuitState::HalfOpen));
        }
        let admitted = match s.state {
            CircuitState::Closed => Some(false),
            CircuitState::HalfOpen if s.probes < self.config.half_open_calls => {
                s.probes += 1;
                Some(true)
            }
            _ => None,
        };
        let epoch = s.epoch;
        drop(s);
        self.announce(changed);
        admitted.map(|probe| Admission {
            breaker: self,
            epoch,
            probe,
            settled: false,
        })
    }

    /// Records the outcome of an admitted call.
    fn record(&self, admission: &mut Admission<'_>, failure: bool) {
        admission.settled = true;
        let mut s = self.lock();
        if s.epoch != admission.epoch {
            return;
        }
        let changed = match s.state {
            CircuitState::Closed => {
                let (calls, failures) = s.outcomes.add(failure);
                let rate = failures as f64 / calls.max(1) as f64;
                (calls >= self.config.minimum_calls as u64 && rate >= self.config.failure_rate)
                    .then(|| self.transition(&mut s, CircuitState::Open))
            }
            CircuitState::HalfOpen if failure => Some(self.transition(&mut s, CircuitState::Open)),
            CircuitState::HalfOpen => {
                s.probe_successes += 1;
                (s.probe_successes >= self.config.half_open_calls)
                    .then(|| self.transition(&mut s, CircuitState::Closed))
            }
            CircuitState::Open => None,
        };
        drop(s);
        self.announce(changed);
    }

    /// A probe dropped before its outcome gives its place back.
    fn abandon(&self, admission: &Admission<'_>) {
        let mut s = self.lock();
        if admission.probe && s.epoch == admission.epoch && s.probes > 0 {
            s.probes -= 1;
        }
    }

    /// Tells the listeners of a transition, outside the lock.
    fn announce(&self, changed: Option<(CircuitState, CircuitState)>) {
        if let Some((from, to)) = changed {
            self.events.emit(PolicyEvent::CircuitStateChanged {
                pattern: self.pattern.to_string(),
                from,
                to,
            });
        }
    }
}

const NOT_CLOSED: u64 = u64::MAX;

impl Breaker {
    /// Moves to `to`, under the lock; returns the transition.
    fn transition(&self, s: &mut State, to: CircuitState) -> (CircuitState, CircuitState) {
        let from = std::mem::replace(&mut s.state, to);
        s.epoch += 1;
        s.probes = 0;
        s.probe_successes = 0;
        s.outcomes.clear();
        if to == CircuitState::Open {
            s.opened_at = Instant::now();
        }
        let closed_epoch = if to == CircuitState::Closed {
            s.epoch
        } else {
            NOT_CLOSED
        };
        self.closed_epoch.store(closed_epoch, Ordering::Release);
        (from, to)
    }
}

/// A call let through; its outcome is recorded once, or the admission given back if the call
/// is dropped first.
pub(crate) struct Admission<'a> {
    breaker: &'a Breaker,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl Admission<'_> {
    /// Records the call's outcome.
    pub(crate) fn record(&mut self, failure: bool) {
        let breaker = self.breaker;
        breaker.record(self, failure);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.abandon(self);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(window: Window, minimum_calls: usize) -> Arc<Breaker> {
        let config = CircuitBreaker::new()
            .window(window)
            .minimum_calls(minimum_calls)
            .failure_rate(0.5);
        Arc::new(Breaker::new(config, "p".into(), Events::default()))
    }

    fn call(b: &Arc<Breaker>, failure: bool) {
        b.admit().expect("admitted").record(failure);
    }

    #[test]
    fn the_count_window_rolls_so_a_long_healthy_run_does_not_hide_an_outage() {
        let b = breaker(Window::Calls(10), 10);
        for _ in 0..10_000 {
            call(&b, false);
        }
        for _ in 0..4 {
            call(&b, true);
        }
        assert_eq!(b.state(), CircuitState::Closed, "4 of the last 10 failed");
        call(&b, true);
        assert_eq!(b.state(), CircuitState::Open, "5 of the last 10 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_window_forgets_old_buckets() {
        let b = breaker(Window::Time(Duration::from_secs(10)), 4);
        for _ in 0..3 {
            call(&b, true);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // The three failures have left the window: one more is below the minimum volume.
        call(&b, true);
        assert_eq!(b.state(), CircuitState::Closed);
        for _ in 0..3 {
            call(&b, true);
        }
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_gives_its_place_back() {
        let b = breaker(Window::Calls(2), 2);
        call(&b, true);
        call(&b, true);
        assert_eq!(b.state(), CircuitState::Open);
        tokio::time::advance(CircuitBreaker::default().open_for).await;
        let probes: Vec<_> = (0..CircuitBreaker::default().half_open_calls)
            .map(|_| b.admit().expect("probe"))
            .collect();
        assert!(b.admit().is_none(), "no more probes than configured");
        drop(probes);
        assert!(b.admit().is_some(), "dropped probes freed their places");
    }
}
