//! What the policies did, as events for listeners and for logs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::ErrorKind;

use crate::policy::Listener;

/// A circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; outcomes are recorded.
    Closed,
    /// Calls fail at once.
    Open,
    /// A few probes go through; their outcome closes or reopens the circuit.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which policy turned a call away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The circuit was open.
    CircuitOpen,
    /// The bulkhead's places and queue were full.
    Bulkhead,
    /// Load shedding: too many calls in flight.
    LoadShed,
}

impl Rejection {
    /// `circuit_open`, `bulkhead` or `load_shed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::CircuitOpen => "circuit_open",
            Rejection::Bulkhead => "bulkhead",
            Rejection::LoadShed => "load_shed",
        }
    }
}

/// Something a policy did.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyEvent {
    /// An attempt failed with a transient error; another follows after `delay`.
    Retrying {
        /// The call's pattern.
        pattern: String,
        /// The attempt that failed (1 = the first).
        attempt: u32,
        /// The wait before the next attempt.
        delay: Duration,
        /// What the failed attempt ended with.
        kind: ErrorKind,
        /// Its message.
        error: String,
    },
    /// No further attempt: the next would not start before the call's deadline, or the
    /// attempts ran out.
    RetriesExhausted {
        /// The call's pattern.
        pattern: String,
        /// Attempts made.
        attempts: u32,
        /// Why no more.
        reason: &'static str,
    },
    /// A circuit breaker changed state.
    CircuitStateChanged {
        /// The pattern it guards.
        pattern: String,
        /// The state it left.
        from: CircuitState,
        /// The state it entered.
        to: CircuitState,
    },
    /// A call was turned away without being sent.
    Rejected {
        /// The call's pattern.
        pattern: String,
        /// By which policy.
        by: Rejection,
    },
    /// A call failed and its fallback answered instead.
    FallbackUsed {
        /// The call's pattern.
        pattern: String,
        /// What the call failed with.
        kind: ErrorKind,
        /// Its message.
        error: String,
    },
}

impl fmt::Display for PolicyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyEvent::Retrying {
                pattern,
                attempt,
                delay,
                error,
                ..
            } => write!(
                f,
                "retry    {pattern}: attempt {attempt} failed ({error}); next in {}ms",
                delay.as_millis()
            ),
            PolicyEvent::RetriesExhausted {
                pattern,
                attempts,
                reason,
            } => write!(
                f,
                "retry    {pattern}: gave up after {attempts} attempt(s): {reason}"
            ),
            PolicyEvent::CircuitStateChanged { pattern, from, to } => {
                write!(f, "breaker  {pattern}: {from} -> {to}")
            }
            PolicyEvent::Rejected { pattern, by } => {
                write!(f, "rejected {pattern}: by {}", by.as_str())
            }
            PolicyEvent::FallbackUsed { pattern, error, .. } => {
                write!(f, "fallback {pattern}: answered instead of ({error})")
            }
        }
    }
}

/// The listeners of one client's policies.
#[derive(Clone, Default)]
pub(crate) struct Events {
    listeners: Arc<[Listener]>,
}

impl Events {
    pub(crate) fn new(listeners: Vec<Listener>) -> Self {
        Events {
            listeners: listeners.into(),
        }
    }

    /// Logs the event, counts it in the metrics and tells every listener.
    pub(crate) fn emit(&self, event: PolicyEvent) {
        record(&event);
        match &event {
            PolicyEvent::CircuitStateChanged { .. } | PolicyEvent::RetriesExhausted { .. } => {
                tracing::info!(target: "switchboard::resilience", "{event}");
            }
            _ => tracing::debug!(target: "switchboard::resilience", "{event}"),
        }
        for l in self.listeners.iter() {
            l(&event);
        }
    }
}

/// The event in the metrics (listed in `switchboard_core::metrics`). Registered per event: the
/// events are the rare path.
fn record(event: &PolicyEvent) {
    match event {
        PolicyEvent::Retrying { pattern, .. } => {
            metrics::counter!("switchboard_policy_retries_total", "pattern" => pattern.clone())
                .increment(1);
        }
        PolicyEvent::Rejected { pattern, by } => {
            metrics::counter!(
                "switchboard_policy_rejected_total",
                "pattern" => pattern.clone(),
                "by" => by.as_str(),
            )
            .increment(1);
        }
        PolicyEvent::FallbackUsed { pattern, .. } => {
            metrics::counter!("switchboard_policy_fallbacks_total", "pattern" => pattern.clone())
                .increment(1);
        }
        PolicyEvent::CircuitStateChanged { pattern, to, .. } => {
            let value = match to {
                CircuitState::Closed => 0.0,
                CircuitState::Open => 1.0,
                CircuitState::HalfOpen => 2.0,
            };
            metrics::gauge!("switchboard_circuit_state", "pattern" => pattern.clone()).set(value);
        }
        PolicyEvent::RetriesExhausted { .. } => {}
    }
}
