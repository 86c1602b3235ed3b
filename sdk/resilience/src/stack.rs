//! A pattern's policies, built once and run per call.
//!
//! Outermost first: fallback, load shedding, bulkhead, retry, circuit breaker, one attempt.
//! Admission (shedding, the bulkhead) happens once per call, so a call that is retrying keeps
//! its place rather than queueing again, and a shed call fails at once instead of being
//! retried; every attempt passes the breaker, so each outcome is recorded and an open circuit
//! stops the retries.
//!
//! The layers run in one async function over the call rather than as a stack of tower
//! services. The first version stacked tower's `Retry`, `LoadShed` and `ConcurrencyLimit`
//! with services of ours (bulkhead, breaker, fallback, attempt); measured with
//! `switchboard-bench --transport policies` at `4cf1abb`, it ran `send` at 0.58× the plain client's
//! throughput. The costs were structural: the boxed stack was cloned for every call (one
//! reference count per layer and an allocation), every layer boxed its future and moved the
//! request into it, tower's `Retry` cloned every request before its first attempt, and
//! `LoadShed` takes its permit in `poll_ready` on that fresh clone. Here the call lives once,
//! on the caller's own future, nothing is boxed, the request is copied only when another
//! attempt may follow, shedding is one atomic counter, and the state (breaker, bulkhead,
//! shedding counter) is borrowed from the pattern's stack. Code composing tower layers can
//! still wrap the whole: [`crate::Resilient`] is a `tower::Service<Envelope>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::{Client, Envelope, Error, ErrorKind, MessageId, Result};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::NAME;
use crate::breaker::{Admission, Breaker};
use crate::events::{CircuitState, Events, PolicyEvent, Rejection};
use crate::policy::{self, Fallback, Policy, UNAVAILABLE};

/// One call on its way through a pattern's policies.
#[derive(Debug)]
pub(crate) struct Call {
    /// The request; its `deadline` is the call's.
    pub(crate) envelope: Envelope,
    /// When the call gives up, all attempts included.
    pub(crate) deadline: Instant,
}

/// One attempt through `client`, bounded by `left`: a reply that carries a handler's error
/// becomes that error, so every policy sees failures alike. (The policies' own loop does the
/// same inline, one async level fewer.)
pub(crate) async fn attempt_once(
    client: &Client,
    envelope: Envelope,
    left: Duration,
) -> Result<Envelope> {
    if left.is_zero() {
        return Err(too_late());
    }
    reply_result(client, client.send_envelope(envelope, Some(left)).await?)
}

/// The error of an attempt whose time ran out before it could start.
fn too_late() -> Error {
    Error::new(
        ErrorKind::Timeout,
        NAME,
        "the deadline passed before the attempt could start",
    )
}

/// A reply, or the handler's error it carries.
fn reply_result(client: &Client, reply: Envelope) -> Result<Envelope> {
    match reply.error {
        Some(e) => {
            Err(Error::new(e.kind(), client.transport().name(), e.message).with_code(e.code))
        }
        None => Ok(reply),
    }
}

/// The bulkhead's places and queue, shared by every call of its pattern.
///
/// Written here rather than taken from a crate: tower's `ConcurrencyLimit` queues without
/// bound, its `Buffer` bounds the queue but runs a task per service, and the bulkhead crates
/// at hand bound the wait by time only; this one bounds the queue by length and the wait by
/// the call's own deadline.
#[derive(Debug)]
struct Places {
    places: Semaphore,
    max_concurrent: usize,
    waiting: AtomicUsize,
    max_queue: usize,
}

/// Load shedding: calls in flight, and how many may be.
#[derive(Debug)]
struct Shed {
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

/// Takes one from a counter when dropped, however the call ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pattern's policies, built.
pub(crate) struct Stack {
    client: Client,
    pattern: Arc<str>,
    events: Events,
    /// Error codes of handlers that count as transient.
    codes: Vec<String>,
    pub(crate) timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    retry: Option<policy::Retry>,
    breaker: Option<Breaker>,
    bulkhead: Option<Places>,
    shed: Option<Shed>,
    fallback: Option<Fallback>,
}

impl Stack {
    /// Builds the policies of `pattern` around `client`.
    pub(crate) fn build(client: &Client, pattern: &str, policy: &Policy, events: &Events) -> Self {
        let pattern: Arc<str> = pattern.into();
        Stack {
            client: client.clone(),
            events: events.clone(),
            codes: policy
                .transient_codes
                .clone()
                .unwrap_or_else(|| vec![UNAVAILABLE.to_owned()]),
            timeout: policy.timeout,
            attempt_timeout: policy.attempt_timeout,
            retry: policy.retry.clone(),
            breaker: policy
                .circuit_breaker
                .as_ref()
                .map(|b| Breaker::new(b.clone(), pattern.clone(), events.clone())),
            bulkhead: policy.bulkhead.as_ref().map(|b| Places {
                places: Semaphore::new(b.max_concurrent),
                max_concurrent: b.max_concurrent,
                waiting: AtomicUsize::new(0),
                max_queue: b.max_queue,
            }),
            shed: policy.load_shed.as_ref().map(|l| Shed {
                in_flight: AtomicUsize::new(0),
                max_in_flight: l.max_in_flight,
            }),
            fallback: policy.fallback.clone(),
            pattern,
        }
    }

    /// The state of the pattern's breaker, if it has one.
    pub(crate) fn circuit_state(&self) -> Option<CircuitState> {
        self.breaker.as_ref().map(|b| b.state())
    }

    /// Calls running in and waiting for the pattern's bulkhead, if it has one.
    pub(crate) fn bulkhead_usage(&self) -> Option<(usize, usize)> {
        self.bulkhead.as_ref().map(|b| {
            (
                b.max_concurrent - b.places.available_permits(),
                b.waiting.load(Ordering::Acquire),
            )
        })
    }

    /// Runs `call` through the policies: shedding and the bulkhead admit it once; then
    /// attempts, each through the breaker, until one succeeds, the error is not transient,
    /// the attempts are spent, or the next would start after the deadline; the fallback
    /// answers for what failed. Each attempt is a message of its own (its reply is matched by
    /// its id); the causation id and the trace headers stay the call's.
    ///
    /// One function rather than one per layer: an attempt's future holds the client's, some
    /// kilobytes, and every async level holding it would copy it as the call moves
    /// (measured: most of what the policies cost).
    pub(crate) async fn call(&self, call: Call) -> Result<Envelope> {
        let Call {
            mut envelope,
            deadline,
        } = call;
        let request_id = envelope.id;
        let _shed = match &self.shed {
            None => None,
            Some(shed) => match self.shed(shed) {
                Ok(leave) => Some(leave),
                Err(e) => return self.fall_back(e, request_id),
            },
        };
        let _place = match &self.bulkhead {
            None => None,
            Some(places) => match self.place(places, deadline).await {
                Ok(place) => Some(place),
                Err(e) => return self.fall_back(e, request_id),
            },
        };
        let max_attempts = self.retry.as_ref().map_or(1, |r| r.max_attempts);
        let mut attempt = 1;
        loop {
            let last = attempt >= max_attempts;
            let admission = match self.admit() {
                Ok(admission) => admission,
                Err(e) => return self.fall_back(e, request_id),
            };
            let now = Instant::now();
            let until = self
                .attempt_timeout
                .map_or(deadline, |t| deadline.min(now + t));
            if envelope.pattern.is_empty() {
                // A retry: the copy kept for it left the pattern out.
                envelope.pattern = self.pattern.to_string();
            }
            // The request is copied only when another attempt may follow, and the copy kept
            // leaves out the pattern (the stack knows it), so a call answered at once
            // allocates nothing for its retries.
            let sent = if last {
                std::mem::replace(
                    &mut envelope,
                    Envelope::with_id(request_id, String::new(), Bytes::new()),
                )
            } else {
                let pattern = std::mem::take(&mut envelope.pattern);
                let mut sent = Envelope::clone(&envelope);
                sent.pattern = pattern;
                sent
            };
            let left = until.saturating_duration_since(now);
            let out = if left.is_zero() {
                Err(too_late())
            } else {
                match self.client.send_envelope(sent, Some(left)).await {
                    Ok(reply) => reply_result(&self.client, reply),
                    Err(e) => Err(e),
                }
            };
            let e = match out {
                Ok(reply) => {
                    if let Some(mut admission) = admission {
                        admission.record(false);
                    }
                    return Ok(reply);
                }
                Err(e) => e,
            };
            let transient = self.transient(&e);
            if let Some(mut admission) = admission {
                admission.record(transient);
            }
            let Some(retry) = self.retry.as_ref().filter(|_| transient) else {
                return self.fall_back(e, request_id);
            };
            if last {
                self.exhausted(attempt, "no attempts left");
                return self.fall_back(e, request_id);
            }
            let delay = retry.backoff.delay(attempt);
            let at = Instant::now() + delay;
            if at >= deadline {
                self.exhausted(attempt, "the next attempt would start after the deadline");
                return self.fall_back(e, request_id);
            }
            self.events.emit(PolicyEvent::Retrying {
                pattern: self.pattern.to_string(),
                attempt,
                delay,
                kind: e.kind(),
                error: e.to_string(),
            });
            tokio::time::sleep_until(at).await;
            // The timer may wake late: a retry that would start with no time left ends the
            // call with the service's last error, not with a timeout of its own making.
            if Instant::now() >= deadline {
                self.exhausted(attempt, "the deadline passed while waiting to retry");
                return self.fall_back(e, request_id);
            }
            attempt += 1;
            envelope.id = MessageId::new();
        }
    }

    /// The breaker's admission of one attempt (`None`: no breaker), or `CircuitOpen`.
    fn admit(&self) -> Result<Option<Admission<'_>>> {
        let Some(breaker) = &self.breaker else {
            return Ok(None);
        };
        match breaker.admit() {
            Some(admission) => Ok(Some(admission)),
            None => {
                self.events.emit(PolicyEvent::Rejected {
                    pattern: self.pattern.to_string(),
                    by: Rejection::CircuitOpen,
                });
                Err(Error::new(
                    ErrorKind::CircuitOpen,
                    NAME,
                    format!("the circuit breaker of `{}` is open", self.pattern),
                ))
            }
        }
    }

    /// The fallback's answer when the call failed with a transient error, was shed, or found
    /// its circuit open; else the error. Written here: tower has no fallback layer, and the
    /// breaker's own covers only an open circuit.
    fn fall_back(&self, e: Error, request_id: MessageId) -> Result<Envelope> {
        let Some(fallback) = &self.fallback else {
            return Err(e);
        };
        if !(policy::is_transient(&e, &self.codes) || e.kind() == ErrorKind::CircuitOpen) {
            return Err(e);
        }
        let (payload, content_type) = match fallback {
            Fallback::Value {
                payload,
                content_type,
            } => (payload.clone(), content_type.clone()),
            Fallback::Function(f) => match f(&e) {
                Some(value) => value?,
                None => return Err(e),
            },
        };
        self.events.emit(PolicyEvent::FallbackUsed {
            pattern: self.pattern.to_string(),
            kind: e.kind(),
            error: e.to_string(),
        });
        let mut reply =
            Envelope::new(self.pattern.to_string(), payload).with_content_type(content_type);
        reply.correlation_id = Some(request_id.into());
        Ok(reply)
    }

    /// Counts the call in flight, or rejects it at once when the limit is reached.
    fn shed<'a>(&self, shed: &'a Shed) -> Result<Leave<'a>> {
        let before = shed.in_flight.fetch_add(1, Ordering::AcqRel);
        let leave = Leave(&shed.in_flight);
        if before >= shed.max_in_flight {
            self.events.emit(PolicyEvent::Rejected {
                pattern: self.pattern.to_string(),
                by: Rejection::LoadShed,
            });
            return Err(Error::new(
                ErrorKind::Overloaded,
                NAME,
                format!(
                    "shed: `{}` already has {} calls in flight",
                    self.pattern, shed.max_in_flight
                ),
            ));
        }
        Ok(leave)
    }

    /// A place in the bulkhead: at once if one is free, else after a wait in its bounded
    /// queue, never past the deadline.
    async fn place<'a>(
        &self,
        places: &'a Places,
        deadline: Instant,
    ) -> Result<SemaphorePermit<'a>> {
        if let Ok(place) = places.places.try_acquire() {
            return Ok(place);
        }
        let queued = places.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&places.waiting);
        let pattern = &self.pattern;
        if queued >= places.max_queue {
            self.events.emit(PolicyEvent::Rejected {
                pattern: pattern.to_string(),
                by: Rejection::Bulkhead,
            });
            return Err(Error::new(
                ErrorKind::Overloaded,
                NAME,
                format!(
                    "the bulkhead of `{pattern}` is full ({} running, {} waiting)",
                    places.max_concurrent, places.max_queue
                ),
            ));
        }
        match tokio::time::timeout_at(deadline, places.places.acquire()).await {
            Ok(Ok(place)) => Ok(place),
            Ok(Err(_)) => Err(Error::closed(NAME)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                NAME,
                format!("waited for a place in the bulkhead of `{pattern}` until the deadline"),
            )),
        }
    }
    fn exhausted(&self, attempts: u32, reason: &'static str) {
        self.events.emit(PolicyEvent::RetriesExhausted {
            pattern: self.pattern.to_string(),
            attempts,
            reason,
        });
    }

    fn transient(&self, e: &Error) -> bool {
        policy::is_transient(e, &self.codes)
    }
}
