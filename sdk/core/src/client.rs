//! The service-facing API: `send`, `emit`, `request`, written once over the transport SPI.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::Instrument;
use url::Url;

use crate::codec::{Decode, Encode};
use crate::correlator::{Accept, Correlator, Sink, WaiterGuard, await_reply};
use crate::envelope::{CorrelationId, Envelope, IdHash, header};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{CallMetrics, InFlight};
use crate::serve::ServiceControl;
use crate::stats::{Counters, Stats};
use crate::trace::{self, call_span};
use crate::transport::{Route, SubscribeOptions, Subscription, Transport};

/// Client-wide settings.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Default time a `send` or `request` may take; becomes the message's deadline. Default 5 s.
    pub timeout: Duration,
    /// Largest encoded payload this client sends, in bytes (`None`: the transport's limit).
    pub max_payload: Option<usize>,
    /// How long [`Client::shutdown`] waits for in-flight handlers. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(5),
            max_payload: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl ClientConfig {
    /// URL query keys read by the client whatever the transport.
    pub const URL_KEYS: &'static [&'static str] = &["timeout_ms"];

    /// Reads the client's keys from a URL's query (`?timeout_ms=500`).
    ///
    /// # Errors
    /// `InvalidConfig` for a value that is not a positive number.
    pub fn from_url(url: &Url) -> Result<Self> {
        let mut cfg = ClientConfig::default();
        for (k, v) in url.query_pairs() {
            if k == "timeout_ms" {
                let ms: u64 = v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    Error::invalid_config(
                        "core",
                        format!(
                            "`timeout_ms` must be a positive number of milliseconds, got `{v}`"
                        ),
                    )
                })?;
                cfg.timeout = Duration::from_millis(ms);
            }
        }
        Ok(cfg)
    }

    /// Sets the default timeout.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Sets the client's payload limit.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// Sets how long shutdown waits for in-flight handlers.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }
}

/// Per-call settings for `send`, `emit` and `request`.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Overrides the client's default timeout.
    pub timeout: Option<Duration>,
    /// Ordering key: messages with the same key are handled in order where the transport can.
    pub key: Option<String>,
    /// Extra headers.
    pub headers: BTreeMap<String, String>,
    /// The message being handled that causes this one: its id becomes the causation id, its
    /// trace context is carried on, and its deadline bounds this call's.
    pub(crate) parent: Option<Parent>,
}

#[derive(Debug, Clone)]
pub(crate) struct Parent {
    id: crate::MessageId,
    deadline: Option<SystemTime>,
    trace: Vec<(String, String)>,
}

impl CallOptions {
    /// Default options.
    pub fn new() -> Self {
        CallOptions::default()
    }

    /// Sets the timeout of this call.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Sets the ordering key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Marks the call as caused by `parent` (a message being handled): causation id, trace
    /// context and deadline travel on.
    pub fn caused_by(mut self, parent: &Envelope) -> Self {
        let trace = [header::TRACEPARENT, header::TRACESTATE]
            .iter()
            .filter_map(|h| parent.headers.get(*h).map(|v| ((*h).to_owned(), v.clone())))
            .collect();
        self.parent = Some(Parent {
            id: parent.id,
            deadline: parent.deadline,
            trace,
        });
        self
    }
}

/// Checks a pattern: dot-separated segments of letters, digits, `-` and `_`, at most 200 bytes.
///
/// # Errors
/// `InvalidConfig` saying what is wrong.
pub fn validate_pattern(pattern: &str) -> Result<()> {
    /// The bytes a segment may hold: ASCII letters and digits, `-` and `_`.
    const SEGMENT_BYTE: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
            b += 1;
        }
        t
    };
    // One pass over the bytes for the usual, valid pattern; the checks below name the fault.
    let bytes = pattern.as_bytes();
    let mut after_dot = true;
    let mut valid = !bytes.is_empty() && bytes.len() <= 200;
    for &b in bytes {
        let dot = b == b'.';
        valid &= SEGMENT_BYTE[usize::from(b)] || (dot && !after_dot);
        after_dot = dot;
    }
    if valid && !after_dot {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(Error::invalid_config(
            "core",
            format!("invalid pattern `{pattern}`: {why}"),
        ))
    };
    if pattern.is_empty() {
        return bad("it is empty");
    }
    if pattern.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    for seg in pattern.split('.') {
        if seg.is_empty() {
            return bad("it has an empty segment (leading, trailing or double dot)");
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return bad(&format!(
                "`{}` is not allowed (use letters, digits, `-`, `_`, and `.` between segments)",
                c.escape_default()
            ));
        }
    }
    // Not reached: the pass above accepts exactly what these checks accept.
    Ok(())
}

pub(crate) struct Inner {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) config: ClientConfig,
    pub(crate) id: String,
    correlator: OnceCell<Arc<Correlator>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) services: Mutex<Vec<ServiceControl>>,
    max_payload: usize,
    pub(crate) metrics: CallMetrics,
}

/// A connection to a transport, through which a service sends, emits, requests and serves.
///
/// Cheap to clone; clones share the connection. Build one with `switchboard::connect(url)` or
/// [`Client::new`].
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("transport", &self.inner.transport)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client over `transport`.
    pub fn new(transport: impl Transport, config: ClientConfig) -> Self {
        Client::from_arc(Arc::new(transport), config)
    }

    /// A client over a shared transport.
    pub fn from_arc(transport: Arc<dyn Transport>, config: ClientConfig) -> Self {
        let cap = transport.capabilities().max_payload;
        let max_payload = config.max_payload.map_or(cap, |m| m.min(cap));
        let metrics = CallMetrics::new(transport.name());
        Client {
            inner: Arc::new(Inner {
                transport,
                config,
                id: uuid::Uuid::now_v7().simple().to_string(),
                correlator: OnceCell::new(),
                counters: Arc::new(Counters::default()),
                services: Mutex::new(Vec::new()),
                max_payload,
                metrics,
            }),
        }
    }

    /// The transport underneath (for its name and capabilities).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A snapshot of this client's counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.counters.snapshot();
        if let Some(r) = self.inner.transport.requester() {
            stats.late_replies += r.late_replies().unwrap_or(0);
        }
        stats
    }

    /// Requests of this client still waiting for a reply (via `request` or a correlated `send`).
    pub fn requests_in_flight(&self) -> usize {
        self.inner.correlator.get().map_or(0, |c| c.in_flight())
    }

    fn adapter(&self) -> &'static str {
        self.inner.transport.name()
    }

    /// Builds the envelope for a call: validates the pattern, encodes the body, applies the
    /// options, checks the size.
    pub(crate) fn envelope<T: Encode + ?Sized>(
        &self,
        pattern: &str,
        body: &T,
        opts: &CallOptions,
    ) -> Result<Envelope> {
        validate_pattern(pattern)?;
        let (payload, ct) = body.encode()?;
        self.check_size(payload.len())?;
        let mut env = Envelope::new(pattern, payload).with_content_type(ct);
        env.key = opts.key.clone();
        if let Some(p) = &opts.parent {
            env.causation_id = Some(p.id);
            for (k, v) in &p.trace {
                env.headers.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in &opts.headers {
            env.headers.insert(k.clone(), v.clone());
        }
        Ok(env)
    }

    /// The request envelope `send_with` would send: the pattern checked, the body encoded and
    /// its size checked, the options applied (key, headers, parent) and the deadline set (the
    /// call's timeout, else `default_timeout`, else the client's, from now, bounded by the
    /// parent's deadline); with that deadline as an [`Instant`]. For layers that send through
    /// [`Client::send_envelope`] themselves, such as the resilience policies.
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed pattern, `Codec`, `PayloadTooLarge`.
    pub fn request_envelope<T: Encode + ?Sized>(
        &self,
        pattern: &str,
        body: &T,
        opts: &CallOptions,
        default_timeout: Option<Duration>,
    ) -> Result<(Envelope, Instant)> {
        let mut env = self.envelope(pattern, body, opts)?;
        let timeout = opts
            .timeout
            .or(default_timeout)
            .unwrap_or(self.inner.config.timeout);
        let (deadline, wall, _) = self.deadline_after(timeout, opts);
        env.deadline = Some(wall);
        Ok((env, deadline))
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len > self.inner.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                self.adapter(),
                format!(
                    "payload of {len} bytes exceeds the limit of {} bytes",
                    self.inner.max_payload
                ),
            ));
        }
        Ok(())
    }

    /// The deadline of a call: now + timeout, bounded by the parent's deadline.
    fn deadline(&self, opts: &CallOptions) -> (Instant, SystemTime, Duration) {
        self.deadline_after(opts.timeout.unwrap_or(self.inner.config.timeout), opts)
    }

    /// Now + `timeout`, bounded by the parent's deadline, each clock read once.
    fn deadline_after(
        &self,
        mut timeout: Duration,
        opts: &CallOptions,
    ) -> (Instant, SystemTime, Duration) {
        let (now, wall) = (Instant::now(), SystemTime::now());
        if let Some(parent_deadline) = opts.parent.as_ref().and_then(|p| p.deadline) {
            timeout = timeout.min(
                parent_deadline
                    .duration_since(wall)
                    .unwrap_or(Duration::ZERO),
            );
        }
        (now + timeout, wall + timeout, timeout)
    }

    async fn correlator(&self) -> Result<&Arc<Correlator>> {
        if let Some(c) = self.inner.correlator.get() {
            return Ok(c);
        }
        // Boxed: the start-up future is large, and inlining it would make every call's
        // future (moved on each poll setup) as large.
        self.inner
            .correlator
            .get_or_try_init(|| {
                Box::pin(Correlator::start(
                    &self.inner.transport,
                    &self.inner.id,
                    self.inner.counters.clone(),
                ))
            })
            .await
    }

    /// Sends a request to `pattern` and waits for the reply, bounded by the client's default
    /// timeout (which travels with the request as its deadline).
    ///
    /// ```
    /// # use switchboard_core::{Client, ClientConfig, HandlerError, memory::*};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> switchboard_core::Result<()> {
    /// # let bus = MemoryConfig::default().bus("doc-send");
    /// # let service = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
    /// # let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    /// service
    ///     .handle("users.get", |id: u64, _ctx| async move {
    ///         if id == 0 {
    ///             return Err(HandlerError::new("not_found", "no user 0"));
    ///         }
    ///         Ok(format!("user-{id}"))
    ///     })
    ///     .await?;
    /// let name: String = client.send("users.get", &7u64).await?;
    /// assert_eq!(name, "user-7");
    /// let err = client.send::<_, String>("users.get", &0u64).await.unwrap_err();
    /// assert_eq!((err.kind(), err.code()), (switchboard_core::ErrorKind::Handler, "not_found"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Timeout` at the deadline; `NoResponder` if nobody serves the pattern (where the
    /// transport can tell); `Handler` with the responder's code if its handler failed; `Codec`
    /// if the request or reply does not encode or decode; `PayloadTooLarge`; `InvalidConfig`
    /// for a malformed pattern; transport errors.
    pub async fn send<Req, Resp>(&self, pattern: &str, req: &Req) -> Result<Resp>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        self.send_with(pattern, req, &CallOptions::default()).await
    }

    /// [`Client::send`] with per-call options (timeout, key, headers, parent).
    ///
    /// # Errors
    /// As [`Client::send`].
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
        let mut env = self.envelope(pattern, req, opts)?;
        let (deadline, wall, timeout) = self.deadline(opts);
        env.deadline = Some(wall);
        let span = call_span!("send", pattern, env);
        trace::inject(&span, &mut env.headers);
        let reply = self
            .traced_round_trip(pattern, env, deadline, timeout, span)
            .await?;
        decode_reply(reply, self.adapter()).inspect_err(|e| self.inner.metrics.failed("send", e))
    }

    /// Sends a request already in envelope form (pattern, payload, content type, headers, ids
    /// as given) and returns the reply envelope as it came, its `error` included rather than
    /// turned into an `Err`: for bridges that relay messages built elsewhere, such as the gRPC
    /// gateway. The pattern and size are checked as [`Client::send`] checks them; the deadline
    /// is the earlier of the envelope's own and `timeout` (or the client's default timeout)
    /// from now.
    ///
    /// # Errors
    /// As [`Client::send`], except a failed handler's error, which is the reply's `error`.
    pub fn send_envelope(
        &self,
        mut env: Envelope,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Envelope>> + Send + '_ {
        // Checked and prepared here, not in the future: the future returned holds the
        // envelope only until its first poll moves it into the transport's (boxed) call, and
        // stays small wherever a bridge moves it (inside its own per-call future).
        let checked =
            validate_pattern(&env.pattern).and_then(|()| self.check_size(env.payload.len()));
        if let Err(e) = checked {
            return futures::future::Either::Left(std::future::ready(Err(e)));
        }
        let timeout = timeout.unwrap_or(self.inner.config.timeout);
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let (mut deadline, mut wall, mut timeout) = (now + timeout, now_wall + timeout, timeout);
        if let Some(own) = env.deadline.filter(|own| *own < wall) {
            let left = own.duration_since(now_wall).unwrap_or(Duration::ZERO);
            (deadline, wall, timeout) = (now + left, own, left);
        }
        env.deadline = Some(wall);
        let span = call_span!("send", env.pattern, env);
        trace::inject(&span, &mut env.headers);
        // The call borrows the pattern: a copy of it lives in the future beside the envelope.
        let pattern = env.pattern.clone();
        futures::future::Either::Right(async move {
            self.traced_round_trip(&pattern, env, deadline, timeout, span)
                .await
        })
    }

    /// Publishes an envelope built elsewhere to `route` (an event, a request carrying its own
    /// `reply_to`, a reply, a dead letter), checked as the typed calls check theirs: the
    /// pattern of a pattern route, and the size. For bridges such as the gRPC gateway.
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed pattern, `PayloadTooLarge`, transport errors.
    pub async fn publish_envelope(&self, route: Route<'_>, env: Envelope) -> Result<()> {
        if !matches!(route, Route::Reply(_)) {
            validate_pattern(route.name())?;
        }
        self.check_size(env.payload.len())?;
        let m = &self.inner.metrics;
        let call = match route {
            Route::Event(_) => Some(("emit", &self.inner.counters.emitted, &m.emitted)),
            Route::Request(_) => Some(("request", &self.inner.counters.requested, &m.requested)),
            Route::Reply(_) | Route::DeadLetter(_) => None,
        };
        let published = self.inner.transport.publish(route, env).await;
        if let (Err(e), Some((call, ..))) = (&published, call) {
            m.failed(call, e);
        }
        published?;
        if let Some((_, counter, metric)) = call {
            Counters::inc(counter);
            metric.increment(1);
        }
        Ok(())
    }

    /// The request-reply round trip of `send`, counted and timed.
    /// [`Client::round_trip`] in `span` when tracing is on: the call is started inside the
    /// span as well as polled in it.
    fn traced_round_trip<'a>(
        &'a self,
        pattern: &'a str,
        env: Envelope,
        deadline: Instant,
        timeout: Duration,
        span: tracing::Span,
    ) -> impl Future<Output = Result<Envelope>> + Send + 'a {
        if span.is_disabled() {
            futures::future::Either::Left(self.round_trip(pattern, env, deadline, timeout))
        } else {
            let call = span.in_scope(|| self.round_trip(pattern, env, deadline, timeout));
            futures::future::Either::Right(call.instrument(span))
        }
    }

    /// A `send`'s exchange with its metrics. The transport's call is made before the future
    /// is returned: the envelope moves once, into the call (which the transport boxes), and
    /// the future, held inside each caller's own, carries only that box. Every layer an
    /// envelope passes by value in an `async fn` keeps room for it in its future, and moves
    /// it as it starts.
    fn round_trip<'a>(
        &'a self,
        pattern: &'a str,
        mut env: Envelope,
        deadline: Instant,
        timeout: Duration,
    ) -> impl Future<Output = Result<Envelope>> + Send + 'a {
        let m = &self.inner.metrics;
        m.sent.increment(1);
        let in_flight = InFlight::enter(&m.sends_in_flight);
        let started = Instant::now();
        Counters::inc(&self.inner.counters.sent);
        let requester = self.inner.transport.requester();
        let native = requester.is_some();
        let call: Pin<Box<dyn Future<Output = Result<Envelope>> + Send + 'a>> = match requester {
            Some(r) => {
                env.correlation_id
                    .get_or_insert(CorrelationId::from(env.id));
                r.call(pattern, env, deadline)
            }
            // The correlator's future is large: boxed, it costs one allocation per call on the
            // transports that take this path, beside a round trip over a broker.
            None => Box::pin(async move {
                let c = self.correlator().await?;
                c.call(
                    self.inner.transport.as_ref(),
                    pattern,
                    env,
                    deadline,
                    timeout,
                )
                .await
            }),
        };
        async move {
            let _in_flight = in_flight;
            let reply = call.await.map_err(|e| {
                // The requester only knows the deadline; the caller asked for a timeout.
                if native && e.kind() == ErrorKind::Timeout {
                    Error::timeout(e.adapter(), timeout)
                } else {
                    e
                }
            });
            m.send_seconds.record(started.elapsed());
            if let Err(e) = &reply {
                m.failed("send", e);
            }
            reply
        }
    }

    /// Emits an event to `pattern`: every consumer group subscribed gets it, one member per
    /// group. Returns once the transport accepted it.
    ///
    /// ```
    /// # use switchboard_core::{Client, ClientConfig, HandlerError, memory::*};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> switchboard_core::Result<()> {
    /// # let bus = MemoryConfig::default().bus("doc-emit");
    /// # let service = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
    /// # let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// service
    ///     .on_event("orders.placed", "billing", move |order: u64, _ctx| {
    ///         let tx = tx.clone();
    ///         async move { tx.send(order).map_err(|_| HandlerError::new("gone", "receiver dropped")) }
    ///     })
    ///     .await?;
    /// client.emit("orders.placed", &42u64).await?;
    /// assert_eq!(rx.recv().await, Some(42));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Codec`, `PayloadTooLarge`, `InvalidConfig` for a malformed pattern, transport errors
    /// (`Connection`, `Rejected`, `Closed`).
    pub async fn emit<E: Encode + Sync + ?Sized>(&self, pattern: &str, event: &E) -> Result<()> {
        self.emit_with(pattern, event, &CallOptions::default())
            .await
    }

    /// [`Client::emit`] with per-call options (key, headers, parent). A timeout, if set,
    /// becomes the event's deadline: handlers that get it later drop it unhandled.
    ///
    /// # Errors
    /// As [`Client::emit`].
    pub async fn emit_with<E: Encode + Sync + ?Sized>(
        &self,
        pattern: &str,
        event: &E,
        opts: &CallOptions,
    ) -> Result<()> {
        let mut env = self.envelope(pattern, event, opts)?;
        if opts.timeout.is_some() {
            env.deadline = Some(self.deadline(opts).1);
        }
        let span = call_span!("emit", pattern, env);
        trace::inject(&span, &mut env.headers);
        self.inner
            .transport
            .publish(Route::Event(pattern), env)
            .instrument(span)
            .await
            .inspect_err(|e| self.inner.metrics.failed("emit", e))?;
        Counters::inc(&self.inner.counters.emitted);
        self.inner.metrics.emitted.increment(1);
        Ok(())
    }

    /// Sends a request and returns at once (once the transport has it in order, see
    /// [`crate::transport::Publisher::enqueue`]) with a handle that carries the correlation id. Await the handle now or later; the reply is matched on this
    /// client's one reply channel. A reply that arrives after the deadline is dropped and
    /// counted in [`Stats::late_replies`]. Dropping the handle abandons the request.
    ///
    /// ```
    /// # use switchboard_core::{Client, ClientConfig, HandlerError, memory::*};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> switchboard_core::Result<()> {
    /// # let bus = MemoryConfig::default().bus("doc-request");
    /// # let service = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
    /// # let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    /// service
    ///     .handle("math.square", |n: u64, _ctx| async move { Ok::<_, HandlerError>(n * n) })
    ///     .await?;
    /// let pending = client.request::<_, u64>("math.square", &12u64).await?;
    /// println!("waiting for {}", pending.correlation_id());
    /// assert_eq!(pending.await?, 144);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Those of [`Client::send`] that happen before the reply: encoding, size, pattern,
    /// `NoResponder` where detectable, transport errors. A refusal the transport reports only
    /// after taking the request (a broker that does not acknowledge it) is the handle's
    /// error instead.
    pub async fn request<Req, Resp>(&self, pattern: &str, req: &Req) -> Result<PendingReply<Resp>>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        self.request_with(pattern, req, &CallOptions::default())
            .await
    }

    /// [`Client::request`] with per-call options.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn request_with<Req, Resp>(
        &self,
        pattern: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<PendingReply<Resp>>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        let mut env = self.envelope(pattern, req, opts)?;
        let (deadline, wall, timeout) = self.deadline(opts);
        env.deadline = Some(wall);
        let span = call_span!("request", pattern, env);
        trace::inject(&span, &mut env.headers);
        let c = self.correlator().await?;
        let (tx, rx) = oneshot::channel();
        let id = c
            .submit(
                self.inner.transport.as_ref(),
                pattern,
                env,
                deadline,
                timeout,
                Sink::Once(tx),
                Accept::Enqueued,
            )
            .instrument(span)
            .await
            .inspect_err(|e| self.inner.metrics.failed("request", e))?;
        let guard = c.guard(id);
        Counters::inc(&self.inner.counters.requested);
        self.inner.metrics.requested.increment(1);
        Ok(PendingReply {
            id,
            rx,
            deadline,
            timeout,
            adapter: self.adapter(),
            _guard: guard,
            _resp: PhantomData,
        })
    }

    /// A stream that yields the replies of the requests made through it, in the order they
    /// arrive, each with its correlation id: for callers with thousands of requests in flight
    /// who would rather not hold a handle per request.
    ///
    /// ```
    /// # use switchboard_core::{Client, ClientConfig, HandlerError, memory::*};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> switchboard_core::Result<()> {
    /// # let bus = MemoryConfig::default().bus("doc-reply-stream");
    /// # let service = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
    /// # let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    /// use futures::StreamExt;
    /// service
    ///     .handle("math.square", |n: u64, _ctx| async move { Ok::<_, HandlerError>(n * n) })
    ///     .await?;
    /// let mut replies = client.reply_stream::<u64>().await?;
    /// for n in 0..100u64 {
    ///     replies.request("math.square", &n).await?;
    /// }
    /// let mut total = 0;
    /// while let Some((_correlation_id, reply)) = replies.next().await {
    ///     total += reply?;
    /// }
    /// assert_eq!(total, (0..100u64).map(|n| n * n).sum::<u64>());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Transport errors opening the client's reply channel.
    pub async fn reply_stream<Resp: Decode>(&self) -> Result<ReplyStream<Resp>> {
        let correlator = self.correlator().await?.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(ReplyStream {
            client: self.clone(),
            correlator,
            tx,
            rx,
            timers: DelayQueue::new(),
            keys: HashMap::default(),
            _resp: PhantomData,
        })
    }

    /// Subscribes to the dead letters of `pattern`, as raw deliveries (acknowledge each one you
    /// have dealt with). The headers say why each was dead-lettered (`docs/wire.md`).
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed pattern; transport errors.
    pub async fn dead_letters(&self, pattern: &str) -> Result<Subscription> {
        validate_pattern(pattern)?;
        self.inner
            .transport
            .subscribe(Route::DeadLetter(pattern), SubscribeOptions::default())
            .await
    }

    /// Stops every handler started through this client (they finish what they hold and
    /// acknowledge nothing unfinished), waits up to the drain timeout, then closes the
    /// transport. Requests still waiting fail with `Closed`.
    ///
    /// # Errors
    /// Transport errors while closing.
    pub async fn shutdown(&self) -> Result<()> {
        let services: Vec<ServiceControl> = std::mem::take(
            &mut *self
                .inner
                .services
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for s in &services {
            s.stop();
        }
        // Drained side by side: each may end with its transport's finishing work (a commit).
        let drain = futures::future::join_all(services.iter().map(ServiceControl::drained));
        if tokio::time::timeout(self.inner.config.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown: handlers still running after the drain timeout; their messages stay unacknowledged"
            );
        }
        self.inner.transport.close().await
    }
}

fn decode_reply<Resp: Decode>(reply: Envelope, adapter: &'static str) -> Result<Resp> {
    if let Some(e) = reply.error {
        let kind = e.kind();
        return Err(Error::new(kind, adapter, e.message).with_code(e.code));
    }
    Resp::decode(reply.content_type.as_deref(), reply.payload)
}

/// A request in flight: await it (now or later) for the reply.
pub struct PendingReply<Resp> {
    id: CorrelationId,
    rx: oneshot::Receiver<Result<Envelope>>,
    deadline: Instant,
    timeout: Duration,
    adapter: &'static str,
    _guard: WaiterGuard,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp> fmt::Debug for PendingReply<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingReply")
            .field("correlation_id", &self.id)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<Resp: Decode> PendingReply<Resp> {
    /// The correlation id the reply will carry.
    pub fn correlation_id(&self) -> CorrelationId {
        self.id
    }

    /// When the request stops waiting.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waits for the reply. A reply that arrived in time is returned even when awaited after
    /// the deadline.
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn reply(self) -> Result<Resp> {
        let PendingReply {
            rx,
            deadline,
            timeout,
            adapter,
            _guard,
            ..
        } = self;
        let env = await_reply(rx, deadline, timeout, adapter).await?;
        decode_reply(env, adapter)
    }
}

impl<Resp: Decode> IntoFuture for PendingReply<Resp> {
    type Output = Result<Resp>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Resp>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.reply())
    }
}

/// Replies of many requests as one stream: `(correlation id, reply or error)`, in arrival
/// order, timeouts included. Yields `None` when no request made through it is outstanding.
pub struct ReplyStream<Resp> {
    client: Client,
    correlator: Arc<Correlator>,
    tx: mpsc::UnboundedSender<(CorrelationId, Result<Envelope>)>,
    rx: mpsc::UnboundedReceiver<(CorrelationId, Result<Envelope>)>,
    timers: DelayQueue<CorrelationId>,
    /// Outstanding requests; `None` once the timer fired but the reply was already on its way.
    keys: HashMap<CorrelationId, Option<delay_queue::Key>, IdHash>,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp> fmt::Debug for ReplyStream<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream")
            .field("outstanding", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl<Resp: Decode> ReplyStream<Resp> {
    /// Sends a request whose reply this stream will yield; returns its correlation id once the
    /// transport accepted it.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn request<Req: Encode + Sync + ?Sized>(
        &mut self,
        pattern: &str,
        req: &Req,
    ) -> Result<CorrelationId> {
        self.request_with(pattern, req, &CallOptions::default())
            .await
    }

    /// [`ReplyStream::request`] with per-call options.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn request_with<Req: Encode + Sync + ?Sized>(
        &mut self,
        pattern: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<CorrelationId> {
        let client = &self.client;
        let mut env = client.envelope(pattern, req, opts)?;
        let (deadline, wall, timeout) = client.deadline(opts);
        env.deadline = Some(wall);
        let span = call_span!("request", pattern, env);
        trace::inject(&span, &mut env.headers);
        let id = self
            .correlator
            .submit(
                client.inner.transport.as_ref(),
                pattern,
                env,
                deadline,
                timeout,
                Sink::Stream(self.tx.clone()),
                Accept::Enqueued,
            )
            .instrument(span)
            .await
            .inspect_err(|e| client.inner.metrics.failed("request", e))?;
        // The stream owns the waiter from here: its timer, or its drop, removes it.
        Counters::inc(&client.inner.counters.requested);
        client.inner.metrics.requested.increment(1);
        let key = self.timers.insert_at(id, deadline);
        self.keys.insert(id, Some(key));
        Ok(id)
    }

    /// Requests sent through this stream whose reply has not been yielded yet.
    pub fn outstanding(&self) -> usize {
        self.keys.len()
    }
}

impl<Resp: Decode> Stream for ReplyStream<Resp> {
    type Item = (CorrelationId, Result<Resp>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(Some((id, r))) = this.rx.poll_recv(cx) {
                let Some(key) = this.keys.remove(&id) else {
                    continue;
                };
                if let Some(key) = key {
                    this.timers.remove(&key);
                }
                let adapter = this.client.adapter();
                return Poll::Ready(Some((id, r.and_then(|env| decode_reply(env, adapter)))));
            }
            if this.keys.is_empty() {
                return Poll::Ready(None);
            }
            match this.timers.poll_expired(cx) {
                Poll::Ready(Some(expired)) => {
                    let id = expired.into_inner();
                    // If the waiter is already gone, its reply (or late-reply error) is queued
                    // on the channel and is yielded from there.
                    if !this.correlator.cancel(&id) {
                        this.keys.insert(id, None);
                    } else {
                        this.keys.remove(&id);
                        let err = Error::new(
                            ErrorKind::Timeout,
                            this.correlator.adapter(),
                            "request timed out".to_owned(),
                        );
                        return Poll::Ready(Some((id, Err(err))));
                    }
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<Resp> Drop for ReplyStream<Resp> {
    fn drop(&mut self) {
        for id in self.keys.keys() {
            self.correlator.cancel(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_dot_separated_segments_of_safe_characters() {
        for good in ["a", "users.get", "a-b_c.D9", &"x".repeat(200)] {
            assert!(validate_pattern(good).is_ok(), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            (".a", "empty segment"),
            ("a.", "empty segment"),
            ("a..b", "empty segment"),
            ("has space", "` ` is not allowed"),
            ("a/b", "`/` is not allowed"),
            ("a.*", "`*` is not allowed"),
            ("ünï", "is not allowed"),
            (&"x".repeat(201), "longer than 200"),
        ] {
            let err = validate_pattern(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }
}
