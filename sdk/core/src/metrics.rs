//! Metrics through the `metrics` facade. Install a recorder before connecting (for example
//! `metrics-exporter-prometheus`; the gateway serves one with `--metrics-listen`), and these
//! are recorded; without one they cost next to nothing (every handle is registered once, per
//! client or per handler, and records into nothing).
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `switchboard_messages_sent_total` | counter | `transport`, `call` (`send`, `request`, `emit`) | calls made |
//! | `switchboard_calls_failed_total` | counter | `transport`, `call`, `error` (the error kind) | calls that ended in an error |
//! | `switchboard_send_duration_seconds` | histogram | `transport` | `send` round trips, failed ones included |
//! | `switchboard_sends_in_flight` | gauge | `transport` | `send` calls waiting for their reply |
//! | `switchboard_messages_received_total` | counter | `transport`, `pattern`, `kind` (`request`, `event`) | deliveries taken by a handler |
//! | `switchboard_messages_handled_total` | counter | the same | handler runs that succeeded |
//! | `switchboard_messages_failed_total` | counter | the same | handler runs that failed (errors, panics, undecodable payloads) |
//! | `switchboard_messages_retried_total` | counter | the same | deliveries handed back for another attempt |
//! | `switchboard_messages_dead_lettered_total` | counter | the same | messages sent to the dead-letter destination |
//! | `switchboard_messages_expired_total` | counter | the same | messages dropped unhandled past their deadline |
//! | `switchboard_duplicates_dropped_total` | counter | the same | duplicates an idempotent consumer dropped |
//! | `switchboard_handle_duration_seconds` | histogram | the same | handler run time |
//!
//! The resilience policies add `switchboard_policy_retries_total`,
//! `switchboard_policy_rejected_total` (label `by`), `switchboard_policy_fallbacks_total` and
//! the gauge `switchboard_circuit_state` (0 closed, 1 open, 2 half-open), each labelled with
//! the `pattern`.

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// A client's call metrics, registered once.
pub(crate) struct CallMetrics {
    transport: &'static str,
    pub(crate) sent: Counter,
    pub(crate) requested: Counter,
    pub(crate) emitted: Counter,
    pub(crate) send_seconds: Histogram,
    pub(crate) sends_in_flight: Gauge,
}

impl CallMetrics {
    pub(crate) fn new(transport: &'static str) -> Self {
        let sent = |call: &'static str| counter!("switchboard_messages_sent_total", "transport" => transport, "call" => call);
        CallMetrics {
            transport,
            sent: sent("send"),
            requested: sent("request"),
            emitted: sent("emit"),
            send_seconds: histogram!("switchboard_send_duration_seconds", "transport" => transport),
            sends_in_flight: gauge!("switchboard_sends_in_flight", "transport" => transport),
        }
    }

    /// Counts a failed call (a rare path: registered when it happens).
    pub(crate) fn failed(&self, call: &'static str, error: &crate::Error) {
        counter!(
            "switchboard_calls_failed_total",
            "transport" => self.transport,
            "call" => call,
            "error" => error.kind().as_str(),
        )
        .increment(1);
    }
}

/// Keeps a `send` counted in flight until it ends, however it ends.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A handler's metrics, registered once when it starts.
pub(crate) struct HandlerMetrics {
    pub(crate) received: Counter,
    pub(crate) handled: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) expired: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) seconds: Histogram,
}

impl HandlerMetrics {
    pub(crate) fn new(transport: &'static str, pattern: &str, kind: &'static str) -> Self {
        let labels = [
            ("transport", transport.to_owned()),
            ("pattern", pattern.to_owned()),
            ("kind", kind.to_owned()),
        ];
        let c = |name: &'static str| counter!(name, &labels);
        HandlerMetrics {
            received: c("switchboard_messages_received_total"),
            handled: c("switchboard_messages_handled_total"),
            failed: c("switchboard_messages_failed_total"),
            retried: c("switchboard_messages_retried_total"),
            dead_lettered: c("switchboard_messages_dead_lettered_total"),
            expired: c("switchboard_messages_expired_total"),
            duplicates: c("switchboard_duplicates_dropped_total"),
            seconds: histogram!("switchboard_handle_duration_seconds", &labels),
        }
    }
}
