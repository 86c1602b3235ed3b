//! # switchboard-resilience
//!
//! Caller-side policies around `send` and `request`, the same on every transport (they sit
//! above the transport SPI): a timeout that becomes the message's deadline, retries with
//! exponential backoff and jitter (transient errors only, never past the deadline), a circuit
//! breaker, a bulkhead, load shedding and a fallback. A pattern's policies are built once, on
//! its first call, and run in a fixed order: fallback, load shedding, bulkhead, retry, circuit
//! breaker, attempt. [`Resilient`] is also a `tower::Service<Envelope>`, for code that composes
//! tower layers of its own around it.
//!
//! Set them in code or read them from a TOML file ([`Policies::from_toml`]); wrap a client in
//! [`Resilient`] and call it as the client. Re-exported by `switchboard` as
//! `switchboard::resilience`.
//!
//! ```
//! use std::time::Duration;
//! use switchboard_core::{Client, ClientConfig, HandlerError, memory::*};
//! use switchboard_resilience::{CircuitBreaker, Fallback, Policies, Policy, Resilient, Retry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchboard_core::Result<()> {
//! # let bus = MemoryConfig::default().bus("resilience-doc");
//! # let service = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
//! # let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
//! service
//!     .handle("prices.get", |_sku: String, _ctx| async move {
//!         Err::<u64, _>(HandlerError::new("unavailable", "the price list is reloading"))
//!     })
//!     .await?;
//! let policies = Policies::new().pattern(
//!     "prices.get",
//!     Policy::new()
//!         .timeout(Duration::from_secs(2))
//!         .retry(Retry::attempts(3))
//!         .circuit_breaker(CircuitBreaker::new())
//!         .fallback(Fallback::value(&0u64)?),
//! );
//! let prices = Resilient::new(client, policies)?;
//! let price: u64 = prices.send("prices.get", "sku-1").await?;
//! assert_eq!(price, 0); // three attempts failed; the fallback answered
//! # Ok(()) }
//! ```

mod breaker;
mod events;
mod policy;
#[cfg(feature = "redis")]
mod redis_store;
mod stack;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use switchboard_core::{
    CallOptions, Client, CorrelationId, Decode, Encode, Envelope, Error, ErrorKind, Result,
};
use tokio::time::Instant;
use tracing::Instrument;

pub use events::{CircuitState, PolicyEvent, Rejection};
pub use policy::{
    Bulkhead, CircuitBreaker, Fallback, Listener, LoadShed, Policies, Policy, Retry, UNAVAILABLE,
    Window,
};
#[cfg(feature = "redis")]
pub use redis_store::RedisIdempotencyStore;
use stack::{Call, Stack};

/// Awaits a call's future in its `call` span; bare when no subscriber wants the span, since
/// wrapping moves the future into the wrapper, a copy of the whole call's future.
macro_rules! in_call_span {
    ($fut:expr, $pattern:expr) => {{
        let span = call_span($pattern);
        if span.is_disabled() {
            $fut.await
        } else {
            $fut.instrument(span).await
        }
    }};
}

/// The options of a call made without any.
static NO_OPTIONS: std::sync::LazyLock<CallOptions> =
    std::sync::LazyLock::new(CallOptions::default);

/// The name errors raised by the policies carry as their adapter.
pub const NAME: &str = "policy";

/// A client whose `send` and `request` go through policies. Cheap to clone; clones share the
/// policies' state (breakers, bulkheads).
#[derive(Clone)]
pub struct Resilient {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    policies: Policies,
    events: events::Events,
    /// Each pattern's policies, built on its first call. Looked up on every call: hashed
    /// with foldhash rather than SipHash (pattern names are not attacker-chosen keys here;
    /// they come from the caller's own code).
    stacks: DashMap<String, Option<Arc<Stack>>, foldhash::fast::RandomState>,
}

impl fmt::Debug for Resilient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilient")
            .field("client", &self.inner.client)
            .field("policies", &self.inner.policies)
            .finish_non_exhaustive()
    }
}

impl Resilient {
    /// `client` with `policies`.
    ///
    /// # Errors
    /// `InvalidConfig` if a policy is invalid ([`Policies::validate`]).
    pub fn new(client: Client, policies: Policies) -> Result<Self> {
        policies.validate()?;
        let events = events::Events::new(policies.listeners.clone());
        Ok(Resilient {
            inner: Arc::new(Inner {
                client,
                policies,
                events,
                stacks: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            }),
        })
    }

    /// The client underneath (its calls bypass the policies).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The state of `pattern`'s circuit breaker: `None` if it has none or has not been
    /// called yet.
    pub fn circuit_state(&self, pattern: &str) -> Option<CircuitState> {
        self.inner
            .stacks
            .get(pattern)
            .and_then(|s| s.as_ref().and_then(|s| s.circuit_state()))
    }

    /// Calls of `pattern` running in its bulkhead and waiting for a place: `None` if it has
    /// no bulkhead or has not been called yet.
    pub fn bulkhead_usage(&self, pattern: &str) -> Option<BulkheadUsage> {
        let stack = self.inner.stacks.get(pattern)?.clone()?;
        let (running, waiting) = stack.bulkhead_usage()?;
        Some(BulkheadUsage { running, waiting })
    }

    /// The built policies of `pattern` (`None`: it has none, calls go straight through).
    fn stack(&self, pattern: &str) -> Result<Option<Arc<Stack>>> {
        if let Some(s) = self.inner.stacks.get(pattern) {
            return Ok(s.clone());
        }
        switchboard_core::validate_pattern(pattern)?;
        let policy = self.inner.policies.policy_for(pattern);
        let built = if policy.is_empty() {
            None
        } else {
            Some(Arc::new(Stack::build(
                &self.inner.client,
                pattern,
                &policy,
                &self.inner.events,
            )))
        };
        Ok(self
            .inner
            .stacks
            .entry(pattern.to_owned())
            .or_insert(built)
            .clone())
    }

    /// [`Client::send`] through the pattern's policies.
    ///
    /// # Errors
    /// As [`Client::send`], and: `Overloaded` when shed or the bulkhead is full,
    /// `CircuitOpen` when the breaker is open, `Timeout` when the call's deadline passed
    /// (waiting for a place included). After retries, the last attempt's error. With a
    /// fallback, only errors that are not transient.
    pub fn send<'a, Req, Resp>(
        &'a self,
        pattern: &'a str,
        req: &'a Req,
    ) -> impl Future<Output = Result<Resp>> + 'a
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode + 'a,
    {
        // `send_with`'s future itself, not one around it: each async level copies the
        // future it awaits as it starts.
        self.send_with(pattern, req, &NO_OPTIONS)
    }

    /// [`Resilient::send`] with per-call options. The call's own timeout, if set, wins over
    /// the policy's.
    ///
    /// # Errors
    /// As [`Resilient::send`].
    pub async fn send_with<Req, Resp>(
        &self,
        pattern: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<Resp>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        let Some(stack) = self.stack(pattern)? else {
            // Boxed: the client's future is some kilobytes, and held inline it would make
            // this one as large for patterns with policies too, to be copied as it moves.
            return Box::pin(self.inner.client.send_with(pattern, req, opts)).await;
        };
        let call = self.call(&stack, pattern, req, opts)?;
        let reply = in_call_span!(stack.call(call), pattern)?;
        Resp::decode(reply.content_type.as_deref(), reply.payload)
    }

    /// [`Client::request`] through the pattern's policies: returns at once with a handle
    /// carrying the first attempt's correlation id, while the policies run the call in a task
    /// of their own (retries are new messages with ids of their own). Dropping the handle
    /// abandons the call.
    ///
    /// # Errors
    /// Those of [`Client::request`] found before sending (pattern, encoding, size); the rest,
    /// policy rejections included, are the handle's.
    pub async fn request<Req, Resp>(&self, pattern: &str, req: &Req) -> Result<ResilientReply<Resp>>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        self.request_with(pattern, req, &CallOptions::default())
            .await
    }

    /// [`Resilient::request`] with per-call options.
    ///
    /// # Errors
    /// As [`Resilient::request`].
    pub async fn request_with<Req, Resp>(
        &self,
        pattern: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<ResilientReply<Resp>>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        let Some(stack) = self.stack(pattern)? else {
            let pending = self
                .inner
                .client
                .request_with::<Req, Resp>(pattern, req, opts)
                .await?;
            let id = pending.correlation_id();
            return Ok(ResilientReply {
                id,
                reply: Box::pin(pending.into_future()),
                _resp: PhantomData,
            });
        };
        let call = self.call(&stack, pattern, req, opts)?;
        let id = CorrelationId::from(call.envelope.id);
        let task =
            tokio::spawn(async move { stack.call(call).await }.instrument(call_span(pattern)));
        let mut abort = AbortOnDrop(task);
        let reply = Box::pin(async move {
            let reply = match (&mut abort.0).await {
                Ok(r) => r?,
                Err(e) => {
                    return Err(
                        Error::new(ErrorKind::Other, NAME, "the call's task ended").with_source(e)
                    );
                }
            };
            Resp::decode(reply.content_type.as_deref(), reply.payload)
        });
        Ok(ResilientReply {
            id,
            reply,
            _resp: PhantomData,
        })
    }

    /// Builds the call: the request envelope with the deadline of the call's own timeout, or
    /// else the policy's, or else the client's.
    fn call<Req: Encode + ?Sized>(
        &self,
        stack: &Stack,
        pattern: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<Call> {
        let (envelope, deadline) =
            self.inner
                .client
                .request_envelope(pattern, req, opts, stack.timeout)?;
        Ok(Call { envelope, deadline })
    }

    /// Sends an envelope built elsewhere through its pattern's policies, as
    /// [`Client::send_envelope`] does without them; a handler's error is returned as `Err`.
    ///
    /// # Errors
    /// As [`Resilient::send`].
    pub async fn send_envelope(&self, envelope: Envelope) -> Result<Envelope> {
        let pattern = envelope.pattern.clone();
        let client = &self.inner.client;
        let Some(stack) = self.stack(&pattern)? else {
            let left = time_left(&envelope, client.config().timeout);
            return Box::pin(stack::attempt_once(client, envelope, left)).await;
        };
        let timeout = stack.timeout.unwrap_or(client.config().timeout);
        let call = Call {
            deadline: deadline_of(&envelope, timeout),
            envelope,
        };
        in_call_span!(stack.call(call), &pattern)
    }
}

/// As a tower service, a `Resilient` takes request envelopes and answers with reply
/// envelopes, as [`Resilient::send_envelope`] does: for code that composes tower layers of its
/// own (rate limits, metrics) around the policies.
impl tower::Service<Envelope> for Resilient {
    type Response = Envelope;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Envelope>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send_envelope(envelope).await })
    }
}

/// The span of a call through the policies: its attempts' `send` spans are its children, so
/// retries stay in the caller's trace.
fn call_span(pattern: &str) -> tracing::Span {
    tracing::info_span!(target: "switchboard", "call", pattern = %pattern, otel.kind = "internal")
}

/// What a bulkhead holds at one moment.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkheadUsage {
    /// Calls holding a place.
    pub running: usize,
    /// Calls waiting for one.
    pub waiting: usize,
}

/// The earlier of the envelope's deadline and `timeout` from now.
fn deadline_of(envelope: &Envelope, timeout: Duration) -> Instant {
    Instant::now() + time_left(envelope, timeout)
}

/// The earlier of the envelope's time left and `timeout`.
fn time_left(envelope: &Envelope, timeout: Duration) -> Duration {
    envelope
        .time_left()
        .map_or(timeout, |left| left.min(timeout))
}

/// Aborts the call's task when the handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A call made with [`Resilient::request`]: await it for the reply.
pub struct ResilientReply<Resp> {
    id: CorrelationId,
    reply: Pin<Box<dyn Future<Output = Result<Resp>> + Send>>,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp> fmt::Debug for ResilientReply<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientReply")
            .field("correlation_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<Resp> ResilientReply<Resp> {
    /// The correlation id of the first attempt.
    pub fn correlation_id(&self) -> CorrelationId {
        self.id
    }
}

impl<Resp: Decode> IntoFuture for ResilientReply<Resp> {
    type Output = Result<Resp>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Resp>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        self.reply
    }
}
