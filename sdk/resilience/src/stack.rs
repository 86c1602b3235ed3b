//! The policies as tower services, stacked per pattern.
//!
//! Outermost first: fallback, load shedding, bulkhead, retry, circuit breaker, one attempt.
//! Admission (shedding, the bulkhead) happens once per call, so a call that is retrying keeps
//! its place rather than queueing again, and a shed call fails at once instead of being
//! retried; every attempt passes the breaker, so each outcome is recorded and an open circuit
//! stops the retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use switchboard_core::{Client, Envelope, Error, ErrorKind, MessageId, Result};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::util::{BoxCloneSyncService, Either};
use tower::{Service, ServiceExt};

use crate::NAME;
use crate::breaker::{Breaker, BreakerService};
use crate::events::{CircuitState, Events, PolicyEvent, Rejection};
use crate::policy::{self, Fallback, Policy, UNAVAILABLE};

/// One call on its way through a pattern's policies.
#[derive(Clone, Debug)]
pub struct Call {
    /// The request; its `deadline` is the call's.
    pub envelope: Envelope,
    /// When the call gives up, all attempts included.
    pub deadline: Instant,
    /// Which attempt this is (1 = the first).
    pub attempt: u32,
}

/// The innermost service: one attempt, sent through the client. A reply that carries a
/// handler's error becomes that error, so every policy sees failures alike.
#[derive(Clone, Debug)]
pub struct Attempt {
    client: Client,
    attempt_timeout: Option<Duration>,
}

impl Attempt {
    /// Attempts through `client`, each bounded by `attempt_timeout` as well as the call's
    /// deadline.
    pub fn new(client: Client, attempt_timeout: Option<Duration>) -> Self {
        Attempt {
            client,
            attempt_timeout,
        }
    }
}

impl Service<Call> for Attempt {
    type Response = Envelope;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Envelope>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let client = self.client.clone();
        let attempt_timeout = self.attempt_timeout;
        Box::pin(async move {
            let Call {
                mut envelope,
                deadline,
                attempt,
            } = call;
            let now = Instant::now();
            let until = attempt_timeout.map_or(deadline, |t| deadline.min(now + t));
            let left = until.saturating_duration_since(now);
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    NAME,
                    "the deadline passed before the attempt could start",
                ));
            }
            if attempt > 1 {
                // Each attempt is a message of its own (its reply is matched by its id); the
                // causation id and the trace headers stay those of the call.
                envelope.id = MessageId::new();
            }
            let reply = client.send_envelope(envelope, Some(left)).await?;
            match reply.error {
                Some(e) => {
                    Err(Error::new(e.kind(), client.transport().name(), e.message)
                        .with_code(e.code))
                }
                None => Ok(reply),
            }
        })
    }
}

/// Retries transient failures while attempts are left and the next one can start before the
/// deadline (tower's retry, with this decision and the consumer side's backoff).
#[derive(Clone)]
struct RetryTransient {
    retry: policy::Retry,
    codes: Arc<[String]>,
    pattern: Arc<str>,
    events: Events,
}

impl tower::retry::Policy<Call, Envelope, Error> for RetryTransient {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, req: &mut Call, result: &mut Result<Envelope>) -> Option<Self::Future> {
        let Err(e) = result else {
            return None;
        };
        if !policy::is_transient(e, &self.codes) {
            return None;
        }
        let stop = |reason| {
            self.events.emit(PolicyEvent::RetriesExhausted {
                pattern: self.pattern.to_string(),
                attempts: req.attempt,
                reason,
            });
        };
        if req.attempt >= self.retry.max_attempts {
            stop("no attempts left");
            return None;
        }
        let delay = self.retry.backoff.delay(req.attempt);
        let at = Instant::now() + delay;
        if at >= req.deadline {
            stop("the next attempt would start after the deadline");
            return None;
        }
        self.events.emit(PolicyEvent::Retrying {
            pattern: self.pattern.to_string(),
            attempt: req.attempt,
            delay,
            kind: e.kind(),
            error: e.to_string(),
        });
        req.attempt += 1;
        Some(tokio::time::sleep_until(at))
    }

    fn clone_request(&mut self, req: &Call) -> Option<Call> {
        Some(req.clone())
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
    places: Arc<Semaphore>,
    max_concurrent: usize,
    waiting: AtomicUsize,
    max_queue: usize,
}

#[derive(Clone)]
struct BulkheadService<S> {
    inner: S,
    places: Arc<Places>,
    pattern: Arc<str>,
    events: Events,
}

impl<S> Service<Call> for BulkheadService<S>
where
    S: Service<Call, Response = Envelope, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Envelope;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Envelope>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        // The inner service is made ready once a place is had, in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let mut inner = self.inner.clone();
        let places = self.places.clone();
        let pattern = self.pattern.clone();
        let events = self.events.clone();
        Box::pin(async move {
            let place = match places.places.clone().try_acquire_owned() {
                Ok(place) => place,
                Err(_) => {
                    /// Leaves the queue however the wait ends.
                    struct Leave<'a>(&'a AtomicUsize);
                    impl Drop for Leave<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    let queued = places.waiting.fetch_add(1, Ordering::AcqRel);
                    let _leave = Leave(&places.waiting);
                    if queued >= places.max_queue {
                        events.emit(PolicyEvent::Rejected {
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
                    match tokio::time::timeout_at(
                        call.deadline,
                        places.places.clone().acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(place)) => place,
                        Ok(Err(_)) => return Err(Error::closed(NAME)),
                        Err(_) => {
                            return Err(Error::new(
                                ErrorKind::Timeout,
                                NAME,
                                format!(
                                    "waited for a place in the bulkhead of `{pattern}` until the deadline"
                                ),
                            ));
                        }
                    }
                }
            };
            let out = inner.ready().await?.call(call).await;
            drop(place);
            out
        })
    }
}

/// Answers with the fallback when the call fails with a transient error, is shed, or finds its
/// circuit open. Written here: tower has no fallback layer, and the breaker's own covers only
/// an open circuit.
#[derive(Clone)]
struct FallbackService<S> {
    inner: S,
    fallback: Fallback,
    codes: Arc<[String]>,
    pattern: Arc<str>,
    events: Events,
}

impl<S> Service<Call> for FallbackService<S>
where
    S: Service<Call, Response = Envelope, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Envelope;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Envelope>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let request_id = call.envelope.id;
        let outcome = self.inner.call(call);
        let (fallback, codes) = (self.fallback.clone(), self.codes.clone());
        let (pattern, events) = (self.pattern.clone(), self.events.clone());
        Box::pin(async move {
            let e = match outcome.await {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if !(policy::is_transient(&e, &codes) || e.kind() == ErrorKind::CircuitOpen) {
                return Err(e);
            }
            let value = match &fallback {
                Fallback::Value {
                    payload,
                    content_type,
                } => Ok((payload.clone(), content_type.clone())),
                Fallback::Function(f) => match f(&e) {
                    Some(value) => value,
                    None => return Err(e),
                },
            };
            let (payload, content_type) = value?;
            events.emit(PolicyEvent::FallbackUsed {
                pattern: pattern.to_string(),
                kind: e.kind(),
                error: e.to_string(),
            });
            let mut reply =
                Envelope::new(pattern.to_string(), payload).with_content_type(content_type);
            reply.correlation_id = Some(request_id.into());
            Ok(reply)
        })
    }
}

/// A pattern's policies, built.
pub(crate) struct Stack {
    pub(crate) service: BoxCloneSyncService<Call, Envelope, Error>,
    pub(crate) timeout: Option<Duration>,
    breaker: Option<Arc<Breaker>>,
    bulkhead: Option<Arc<Places>>,
}

impl Stack {
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
}

/// Builds the policies of `pattern` around `client`.
pub(crate) fn build(
    client: &Client,
    pattern: &str,
    policy: &Policy,
    events: &Events,
) -> Result<Stack> {
    let codes: Arc<[String]> = policy
        .transient_codes
        .clone()
        .unwrap_or_else(|| vec![UNAVAILABLE.to_owned()])
        .into();
    let pattern: Arc<str> = pattern.into();
    let attempt = Attempt::new(client.clone(), policy.attempt_timeout);

    let breaker_state = policy
        .circuit_breaker
        .as_ref()
        .map(|b| Arc::new(Breaker::new(b.clone(), pattern.clone(), events.clone())));
    let breaker = match &breaker_state {
        None => Either::Right(attempt),
        Some(b) => Either::Left(BreakerService {
            inner: attempt,
            breaker: b.clone(),
            codes: codes.clone(),
        }),
    };

    let retry = match &policy.retry {
        None => Either::Right(breaker),
        Some(r) => Either::Left(tower::retry::Retry::new(
            RetryTransient {
                retry: r.clone(),
                codes: codes.clone(),
                pattern: pattern.clone(),
                events: events.clone(),
            },
            breaker,
        )),
    };

    let places = policy.bulkhead.as_ref().map(|b| {
        Arc::new(Places {
            places: Arc::new(Semaphore::new(b.max_concurrent)),
            max_concurrent: b.max_concurrent,
            waiting: AtomicUsize::new(0),
            max_queue: b.max_queue,
        })
    });
    let bulkhead = match &places {
        None => Either::Right(retry),
        Some(places) => Either::Left(BulkheadService {
            inner: retry,
            places: places.clone(),
            pattern: pattern.clone(),
            events: events.clone(),
        }),
    };

    let shed = match &policy.load_shed {
        None => Either::Right(bulkhead),
        Some(l) => {
            let (p, ev, limit) = (pattern.clone(), events.clone(), l.max_in_flight);
            let service = tower::load_shed::LoadShed::new(tower::limit::ConcurrencyLimit::new(
                bulkhead,
                l.max_in_flight,
            ))
            .map_err(move |e: tower::BoxError| match e.downcast::<Error>() {
                Ok(e) => *e,
                Err(_) => {
                    // The only other error of LoadShed: its `Overloaded`.
                    ev.emit(PolicyEvent::Rejected {
                        pattern: p.to_string(),
                        by: Rejection::LoadShed,
                    });
                    Error::new(
                        ErrorKind::Overloaded,
                        NAME,
                        format!("shed: `{p}` already has {limit} calls in flight"),
                    )
                }
            });
            Either::Left(service)
        }
    };

    let service = match &policy.fallback {
        None => BoxCloneSyncService::new(shed),
        Some(f) => BoxCloneSyncService::new(FallbackService {
            inner: shed,
            fallback: f.clone(),
            codes,
            pattern,
            events: events.clone(),
        }),
    };
    Ok(Stack {
        service,
        timeout: policy.timeout,
        breaker: breaker_state,
        bulkhead: places,
    })
}
