//! The service side: handlers for request patterns and for event patterns, written once over
//! the transport SPI.
//!
//! One consumer task per handler takes a delivery only when it has a free slot (bounded
//! concurrency), runs the handlers in hand concurrently inside that task with panics caught (no
//! task spawned per message), and settles each delivery by the outcome: ack on success; for events, nack with backoff until the attempts run out,
//! then the dead-letter destination with the reason. Requests whose deadline has passed are
//! dropped before their handler runs. Shutdown stops taking deliveries and waits for those in
//! hand; nothing unfinished is acknowledged.
//!
//! Where the transport offers it (the in-memory transport's requests), a request handler also
//! takes requests directly in the sender's own task while it has a free place: the same
//! handling, the same bound on concurrency, without the hand-over to the consumer task and back.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, Either, OptionFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::client::{CallOptions, Client, validate_pattern};
use crate::codec::{Decode, Encode};
use crate::envelope::{Envelope, ReplyError};
use crate::error::{Error, ErrorKind, HandlerError, Result};
use crate::idempotency::{self, Idempotency};
use crate::metrics::HandlerMetrics;
use crate::stats::Counters;
use crate::trace;
use crate::transport::{
    Acker, CloseSignal, Confirmation, Delivery, Direct, DirectRegistration, Route,
    SubscribeOptions, Subscription, owned,
};

/// Backoff between attempts: exponential from `initial`, capped at `max`, with jitter (each
/// delay drawn uniformly from its upper half, so retries of many messages spread out).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the second attempt. Default 100 ms.
    pub initial: Duration,
    /// Largest delay. Default 10 s.
    pub max: Duration,
    /// Growth factor per attempt. Default 2.
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// Exponential backoff from `initial`, capped at `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ..Default::default()
        }
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let full = self.initial.mul_f64(exp).min(self.max);
        let jitter = (uuid::Uuid::new_v4().as_u128() as u64 % 1_000) as f64 / 1_000.0;
        full.mul_f64(0.5 + 0.5 * jitter)
    }
}

/// How a handler consumes.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// Deliveries handled at once by this handler (also the transport prefetch). Default 32.
    ///
    /// They run concurrently inside one task, which suits handlers that wait on I/O; a handler
    /// with CPU-heavy work should move it to `tokio::task::spawn_blocking` or its own task.
    pub concurrency: usize,
    /// Attempts per event before it is dead-lettered (first delivery included). Default 5.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Drop duplicates by message id (event handlers only; see [`crate::idempotency`]).
    pub idempotency: Option<Idempotency>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            concurrency: 32,
            max_attempts: 5,
            backoff: Backoff::default(),
            idempotency: None,
        }
    }
}

impl HandlerOptions {
    /// Default options.
    pub fn new() -> Self {
        HandlerOptions::default()
    }

    /// Sets the concurrency (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets the attempts before dead-lettering (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the backoff.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Makes an event handler an idempotent consumer: a message it has handled (same group,
    /// pattern and message id) is acknowledged unhandled when it comes again within the
    /// window. For request handlers this is refused: a dropped duplicate request would get no
    /// reply.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use switchboard_core::{HandlerOptions, Idempotency};
    /// let opts = HandlerOptions::new()
    ///     .idempotent(Idempotency::in_memory(Duration::from_secs(3600), 100_000));
    /// ```
    pub fn idempotent(mut self, i: Idempotency) -> Self {
        self.idempotency = Some(i);
        self
    }
}

/// What a handler sees besides the decoded message: its metadata, the attempt, and the client
/// to make further calls with (use [`Context::options`] so causation, trace and deadline
/// travel on).
#[derive(Debug, Clone)]
pub struct Context {
    envelope: Arc<Envelope>,
    attempt: u32,
    client: Client,
}

impl Context {
    /// The message as received (payload included).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Which delivery this is (1 = first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The client the handler was registered on.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Call options for a call caused by this message: causation id, trace context and
    /// deadline travel on.
    pub fn options(&self) -> CallOptions {
        CallOptions::new().caused_by(&self.envelope)
    }

    /// `send` on behalf of this message (see [`Context::options`]).
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn send<Req, Resp>(&self, pattern: &str, req: &Req) -> Result<Resp>
    where
        Req: Encode + Sync + ?Sized,
        Resp: Decode,
    {
        self.client.send_with(pattern, req, &self.options()).await
    }

    /// `emit` on behalf of this message (see [`Context::options`]).
    ///
    /// # Errors
    /// As [`Client::emit`].
    pub async fn emit<E: Encode + Sync + ?Sized>(&self, pattern: &str, event: &E) -> Result<()> {
        self.client.emit_with(pattern, event, &self.options()).await
    }
}

enum Failure {
    /// The payload did not decode: retrying cannot help.
    Codec(String),
    Handler(HandlerError),
    Panic(String),
}

impl Failure {
    fn reason(&self) -> String {
        match self {
            Failure::Codec(m) => format!("codec: {m}"),
            Failure::Handler(e) => format!("handler error `{}`: {}", e.code, e.message),
            Failure::Panic(m) => format!("handler panicked: {m}"),
        }
    }

    fn reply_error(&self) -> ReplyError {
        let (code, message) = match self {
            Failure::Codec(m) => ("codec".to_owned(), m.clone()),
            Failure::Handler(e) => (e.code.clone(), e.message.clone()),
            Failure::Panic(m) => ("panic".to_owned(), format!("handler panicked: {m}")),
        };
        ReplyError { code, message }
    }
}

type Outcome = std::result::Result<Option<(Bytes, Cow<'static, str>)>, Failure>;

/// What an idempotent consumer's claim found.
enum Claim {
    /// Handle it.
    Go,
    /// Handled or being handled already: drop it.
    Duplicate,
    /// The store did not answer: hand it back.
    Unreachable,
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Event,
}

/// A registered handler; `shutdown` stops it gracefully. Dropping the handle leaves the handler
/// running until [`Client::shutdown`].
pub struct Service {
    pattern: String,
    control: ServiceControl,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("pattern", &self.pattern)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Stops and drains one consumer loop; kept by the client too, for `Client::shutdown`.
#[derive(Clone)]
pub(crate) struct ServiceControl {
    cancel: CloseSignal,
    tracker: TaskTracker,
    in_flight: Arc<AtomicUsize>,
    /// The subscription's finishing work, run once after the drain.
    finish: Arc<Finish>,
}

/// A subscription's finishing work ([`Subscription::with_finish`]): run by the first graceful
/// stop that finds the service drained; any other waits for the same run.
#[derive(Default)]
struct Finish {
    work: Mutex<Option<BoxFuture<'static, ()>>>,
    done: tokio::sync::OnceCell<()>,
}

impl ServiceControl {
    pub(crate) fn stop(&self) {
        self.cancel.close();
    }

    /// Whether nothing of the service is left to run or finish.
    pub(crate) fn ended(&self) -> bool {
        self.tracker.is_empty()
            && self
                .finish
                .work
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
    }

    pub(crate) async fn drained(&self) {
        self.tracker.wait().await;
        self.finish
            .done
            .get_or_init(|| async {
                let work = self
                    .finish
                    .work
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(work) = work {
                    work.await;
                }
            })
            .await;
    }
}

impl Service {
    /// The pattern it serves.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Deliveries being handled right now.
    pub fn in_flight(&self) -> usize {
        self.control.in_flight.load(Ordering::Acquire)
    }

    /// Stops taking deliveries and waits for the handlers in progress to finish and settle
    /// theirs. Deliveries not yet taken stay with the transport for other members (or the next
    /// start).
    pub async fn shutdown(self) {
        self.control.stop();
        self.control.drained().await;
    }
}

impl Client {
    /// Serves requests on `pattern`: the handler's return value is the reply; an `Err` reaches
    /// the caller as a `Handler` error with its code. All handlers of a pattern compete for
    /// its requests.
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed pattern; transport errors while subscribing.
    pub async fn handle<Req, Resp, F, Fut>(&self, pattern: &str, handler: F) -> Result<Service>
    where
        Req: Decode,
        Resp: Encode + Send + 'static,
        F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, HandlerError>> + Send + 'static,
    {
        self.handle_with(pattern, HandlerOptions::default(), handler)
            .await
    }

    /// [`Client::handle`] with options (concurrency).
    ///
    /// # Errors
    /// As [`Client::handle`].
    pub async fn handle_with<Req, Resp, F, Fut>(
        &self,
        pattern: &str,
        opts: HandlerOptions,
        handler: F,
    ) -> Result<Service>
    where
        Req: Decode,
        Resp: Encode + Send + 'static,
        F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, HandlerError>> + Send + 'static,
    {
        validate_pattern(pattern)?;
        if opts.idempotency.is_some() {
            return Err(Error::invalid_config(
                "core",
                "idempotent consumers are for event handlers: a request dropped as a duplicate would get no reply",
            ));
        }
        let sub = self
            .inner
            .transport
            .subscribe(
                Route::Request(pattern),
                SubscribeOptions::default().prefetch(opts.concurrency),
            )
            .await?;
        let handler = Typed::<Req, Resp, F>::new(handler, true);
        Ok(self.start(pattern, Kind::Request, None, opts, sub, handler))
    }

    /// Handles events on `pattern` as a member of consumer `group`: every group gets each
    /// event, one member per group handles it. An `Err` or a panic leads to redelivery with
    /// backoff, then to the dead-letter destination after the attempts run out; an event whose
    /// payload does not decode goes there at once.
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed pattern or group; transport errors while subscribing.
    pub async fn on_event<E, F, Fut>(
        &self,
        pattern: &str,
        group: &str,
        handler: F,
    ) -> Result<Service>
    where
        E: Decode,
        F: Fn(E, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.on_event_with(pattern, group, HandlerOptions::default(), handler)
            .await
    }

    /// [`Client::on_event`] with options (concurrency, attempts, backoff).
    ///
    /// # Errors
    /// As [`Client::on_event`].
    pub async fn on_event_with<E, F, Fut>(
        &self,
        pattern: &str,
        group: &str,
        opts: HandlerOptions,
        handler: F,
    ) -> Result<Service>
    where
        E: Decode,
        F: Fn(E, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        validate_pattern(pattern)?;
        validate_pattern(group).map_err(|_| {
            Error::invalid_config(
                "core",
                format!("invalid group `{group}`: use letters, digits, `-`, `_` and `.`"),
            )
        })?;
        let sub = self
            .inner
            .transport
            .subscribe(
                Route::Event(pattern),
                SubscribeOptions::group(group).prefetch(opts.concurrency),
            )
            .await?;
        let handler = Typed::<E, (), F>::new(handler, false);
        Ok(self.start(
            pattern,
            Kind::Event,
            Some(group.to_owned()),
            opts,
            sub,
            handler,
        ))
    }

    fn start<H: Handle>(
        &self,
        pattern: &str,
        kind: Kind,
        group: Option<String>,
        opts: HandlerOptions,
        mut sub: Subscription,
        handler: H,
    ) -> Service {
        let control = ServiceControl {
            cancel: CloseSignal::new(),
            tracker: TaskTracker::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            finish: Arc::new(Finish {
                work: Mutex::new(sub.take_finish()),
                done: tokio::sync::OnceCell::new(),
            }),
        };
        let worker = Arc::new(Worker {
            client: self.clone(),
            pattern: pattern.to_owned(),
            kind,
            group,
            opts,
            handler,
            places: Places::default(),
            tracker: control.tracker.clone(),
            metrics: HandlerMetrics::new(
                self.inner.transport.name(),
                pattern,
                if kind == Kind::Request {
                    "request"
                } else {
                    "event"
                },
            ),
        });
        let direct = match (kind, sub.direct()) {
            (Kind::Request, Some(slot)) => Some(slot.register(Arc::new(DirectWorker {
                worker: worker.clone(),
                control: control.clone(),
            }))),
            _ => None,
        };
        let c = control.clone();
        control.tracker.spawn(consume(worker, sub, c, direct));
        control.tracker.close();
        let mut services = self
            .inner
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Services that have ended are forgotten here: a client whose handlers come and go
        // (a gateway's, one set per connected client) keeps only the live ones.
        services.retain(|s| !s.ended());
        services.push(control.clone());
        drop(services);
        Service {
            pattern: pattern.to_owned(),
            control,
        }
    }
}

/// A handler as the consumer loop calls it: decodes the input, runs the user's function with
/// its panics caught, encodes the output. Generic rather than boxed: each delivery's future
/// holds the user's future inline, one allocation instead of two and no dynamic call.
trait Handle: Send + Sync + 'static {
    fn handle(&self, ctx: Context) -> impl Future<Output = Outcome> + Send;
}

/// A user's handler function with its input and output types. With `reply`, the output is
/// encoded as the reply payload; without (event handlers), it is not encoded at all.
struct Typed<In, Out, F> {
    f: F,
    reply: bool,
    types: PhantomData<fn(In) -> Out>,
}

impl<In, Out, F> Typed<In, Out, F> {
    fn new(f: F, reply: bool) -> Self {
        Typed {
            f,
            reply,
            types: PhantomData,
        }
    }
}

impl<In, Out, F, Fut> Handle for Typed<In, Out, F>
where
    In: Decode + 'static,
    Out: Encode + Send + 'static,
    F: Fn(In, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Out, HandlerError>> + Send + 'static,
{
    async fn handle(&self, ctx: Context) -> Outcome {
        let env = &ctx.envelope;
        let input = In::decode(env.content_type.as_deref(), env.payload.clone())
            .map_err(|e| Failure::Codec(e.message().to_owned()))?;
        let out = AssertUnwindSafe((self.f)(input, ctx))
            .catch_unwind()
            .await
            .map_err(|p| Failure::Panic(panic_message(p)))?
            .map_err(Failure::Handler)?;
        if !self.reply {
            return Ok(None);
        }
        let encoded = out
            .encode()
            .map_err(|e| Failure::Handler(HandlerError::new("codec", e.message())))?;
        Ok(Some(encoded))
    }
}

struct Worker<H> {
    client: Client,
    pattern: String,
    kind: Kind,
    group: Option<String>,
    opts: HandlerOptions,
    handler: H,
    places: Places,
    /// The service's tasks: replies waiting for their acknowledgement are among them, so the
    /// drain waits for those too.
    tracker: TaskTracker,
    metrics: HandlerMetrics,
}

/// The handler's places (its concurrency), shared by the consumer task and the deliveries run
/// directly in their senders' tasks: a delivery is taken only with a place reserved for it.
#[derive(Default)]
struct Places {
    /// Places taken, reserved or in use.
    taken: AtomicUsize,
    /// Signalled when a delivery run directly gives its place back (the consumer task sees
    /// its own deliveries end).
    freed: tokio::sync::Notify,
}

impl Places {
    fn try_reserve(&self, limit: usize) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back, from the consumer task.
    fn release(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }

    /// Gives a place back from a delivery run directly, waking the consumer task if it waits
    /// for one.
    fn release_direct(&self) {
        self.release();
        self.freed.notify_one();
    }
}

/// A request handler as a direct consumer: the delivery runs in the sender's task, in a
/// place of the handler's, and the service's drain waits for it like for its own.
struct DirectWorker<H> {
    worker: Arc<Worker<H>>,
    control: ServiceControl,
}

impl<H: Handle> Direct for DirectWorker<H> {
    fn try_reserve(&self) -> bool {
        !self.control.cancel.is_closed()
            && self.worker.places.try_reserve(self.worker.opts.concurrency)
    }

    fn run(self: Arc<Self>, delivery: Delivery) -> BoxFuture<'static, ()> {
        let token = self.control.tracker.token();
        self.control.in_flight.fetch_add(1, Ordering::AcqRel);
        Box::pin(async move {
            // Given back however the handling ends (finished, or dropped unfinished).
            struct Give<'a, H>(&'a DirectWorker<H>);
            impl<H> Drop for Give<'_, H> {
                fn drop(&mut self) {
                    self.0.control.in_flight.fetch_sub(1, Ordering::AcqRel);
                    self.0.worker.places.release_direct();
                }
            }
            let _give = Give(&self);
            self.worker.process(delivery).await;
            drop(token);
        })
    }
}

async fn consume<H: Handle>(
    worker: Arc<Worker<H>>,
    mut sub: Subscription,
    control: ServiceControl,
    direct: Option<DirectRegistration>,
) {
    // The deliveries in hand run concurrently inside this one task: no task spawned and no
    // cross-task wake-up per message. A handler with CPU-heavy work can spawn its own.
    // Each delivery's future is polled in a box (it must not move after its first poll); a
    // box whose future finished at that first poll is kept for the next delivery, so a
    // handler that never waits costs no allocation per delivery for it.
    let mut running = FuturesUnordered::new();
    let mut spare = None;
    let limit = worker.opts.concurrency;
    let places = &worker.places;
    let mut taking = true;
    // A place is reserved before a delivery is taken, so the deliveries run here and those
    // run directly in their senders' tasks never exceed the handler's concurrency together.
    let mut reserved = false;
    // The stop is checked as a flag each turn (no lock); its future, made once for the whole
    // loop, is polled last, so it only registers for a wake-up while nothing else is ready,
    // and only once for this task (not each time the loop goes idle).
    let mut cancelled = control.cancel.closed_registered();
    loop {
        if taking && control.cancel.is_closed() {
            taking = false;
        }
        if taking && !reserved {
            reserved = places.try_reserve(limit);
        }
        tokio::select! {
            biased;
            Some(_) = running.next(), if !running.is_empty() => {
                control.in_flight.fetch_sub(1, Ordering::AcqRel);
                places.release();
            }
            d = sub.next(), if taking && reserved => match d {
                Some(d) => {
                    reserved = false;
                    control.in_flight.fetch_add(1, Ordering::AcqRel);
                    // Polled once here first: a handler that finishes without waiting (and
                    // its reply, taken by the transport at once) never enters the set.
                    let handling = OptionFuture::from(Some(worker.process(d)));
                    let mut slot = match spare.take() {
                        Some(mut slot) => {
                            std::pin::Pin::set(&mut slot, handling);
                            slot
                        }
                        None => Box::pin(handling),
                    };
                    if futures::poll!(slot.as_mut()).is_pending() {
                        running.push(slot);
                    } else {
                        spare = Some(slot);
                        control.in_flight.fetch_sub(1, Ordering::AcqRel);
                        places.release();
                    }
                }
                None => {
                    if !control.cancel.is_closed() {
                        tracing::warn!(pattern = %worker.pattern, "subscription ended by the transport; handler stopped");
                    }
                    taking = false;
                }
            },
            // All places are taken (some by deliveries run directly): wait for one.
            _ = places.freed.notified(), if taking && !reserved => {}
            _ = &mut cancelled, if taking => taking = false,
            else => {}
        }
        if !taking && running.is_empty() {
            break;
        }
    }
    if reserved {
        places.release();
    }
    // No more direct deliveries; those already running hold the service's drain open.
    drop(direct);
}

impl<H: Handle> Worker<H> {
    fn counters(&self) -> &Counters {
        &self.client.inner.counters
    }

    /// Handles one delivery. The delivery is taken apart before the future is built, so the
    /// future (allocated for every delivery) holds its parts, the envelope shared with the
    /// handler's context.
    fn process(&self, delivery: Delivery) -> impl Future<Output = ()> + Send + '_ {
        let (env, attempt, malformed, acker) = delivery.into_parts();
        // Its parent is the trace context the message carries, not whatever span is current
        // where the delivery happens to run (a sender's own task, on the in-memory transport).
        let span = tracing::info_span!(
            target: "switchboard",
            parent: None,
            "handle",
            pattern = %self.pattern,
            group = self.group.as_deref().unwrap_or(""),
            message_id = %env.id,
            attempt,
            otel.kind = if self.kind == Kind::Request { "server" } else { "consumer" },
        );
        if span.is_disabled() {
            Either::Left(self.run(env, attempt, malformed, acker))
        } else {
            // Boxed: only a traced delivery pays for the larger future.
            trace::continue_from(&span, &env.headers);
            Either::Right(Box::pin(
                self.run(env, attempt, malformed, acker).instrument(span),
            ))
        }
    }

    async fn run(
        &self,
        env: Arc<Envelope>,
        attempt: u32,
        malformed: Option<String>,
        acker: Box<dyn Acker>,
    ) {
        self.metrics.received.increment(1);
        if let Some(reason) = malformed {
            tracing::warn!(pattern = %self.pattern, %reason, "malformed message");
            match self.kind {
                Kind::Request => {
                    self.reply(env, Err(Failure::Codec(reason))).await;
                    ack(acker).await;
                }
                // Rare paths are boxed so every delivery's future stays small.
                Kind::Event => {
                    let reason = format!("malformed: {reason}");
                    Box::pin(self.dead_letter(owned(env), attempt, &reason, acker)).await
                }
            }
            return;
        }
        if env.is_expired() {
            Counters::inc(&self.counters().expired_dropped);
            self.metrics.expired.increment(1);
            tracing::debug!(pattern = %self.pattern, id = %env.id, "deadline passed; dropped unhandled");
            ack(acker).await;
            return;
        }
        // An idempotent consumer claims the message first (boxed: only they pay for it).
        let idempotent = self.kind == Kind::Event && self.opts.idempotency.is_some();
        if idempotent {
            match Box::pin(self.claim(&env)).await {
                Claim::Go => {}
                Claim::Duplicate => {
                    ack(acker).await;
                    return;
                }
                Claim::Unreachable => {
                    settle(acker.nack(self.opts.backoff.delay(attempt)).await);
                    return;
                }
            }
        }
        let ctx = Context {
            envelope: env.clone(),
            attempt,
            client: self.client.clone(),
        };
        // The handler runs in this task, its panics caught by `Typed::handle`.
        let started = std::time::Instant::now();
        let outcome = self.handler.handle(ctx).await;
        self.metrics.seconds.record(started.elapsed());
        if idempotent {
            Box::pin(self.remember(&env, outcome.is_ok())).await;
        }
        match (self.kind, outcome) {
            (_, Ok(out)) => {
                Counters::inc(&self.counters().handled);
                self.metrics.handled.increment(1);
                if self.kind == Kind::Request {
                    self.reply(env, Ok(out)).await;
                }
                ack(acker).await;
            }
            (Kind::Request, Err(f)) => {
                Counters::inc(&self.counters().failed);
                self.metrics.failed.increment(1);
                self.reply(env, Err(f)).await;
                ack(acker).await;
            }
            (Kind::Event, Err(f @ Failure::Codec(_))) => {
                Counters::inc(&self.counters().failed);
                self.metrics.failed.increment(1);
                Box::pin(self.dead_letter(owned(env), attempt, &f.reason(), acker)).await;
            }
            (Kind::Event, Err(f)) => {
                Counters::inc(&self.counters().failed);
                self.metrics.failed.increment(1);
                let reason = f.reason();
                let can_retry = self.client.transport().capabilities().redelivery_on_nack;
                if attempt < self.opts.max_attempts && can_retry {
                    tracing::debug!(pattern = %self.pattern, attempt, %reason, "handler failed; will retry");
                    Counters::inc(&self.counters().retried);
                    self.metrics.retried.increment(1);
                    settle(acker.nack(self.opts.backoff.delay(attempt)).await);
                } else {
                    Box::pin(self.dead_letter(owned(env), attempt, &reason, acker)).await;
                }
            }
        }
    }

    /// The idempotency settings and the key of `env`, for an idempotent consumer.
    fn idempotency_key(&self, env: &Envelope) -> Option<(&Idempotency, String)> {
        let idem = self.opts.idempotency.as_ref()?;
        Some((
            idem,
            idempotency::key(self.group.as_deref(), &self.pattern, &env.id),
        ))
    }

    /// Claims an event's key in the idempotency store.
    async fn claim(&self, env: &Envelope) -> Claim {
        let Some((idem, key)) = self.idempotency_key(env) else {
            return Claim::Go;
        };
        match idem.store.claim(&key, idem.claim_ttl).await {
            Ok(true) => Claim::Go,
            Ok(false) => {
                Counters::inc(&self.counters().duplicates_dropped);
                self.metrics.duplicates.increment(1);
                tracing::debug!(pattern = %self.pattern, id = %env.id, "duplicate dropped");
                Claim::Duplicate
            }
            Err(e) => {
                tracing::warn!(pattern = %self.pattern, error = %e, "idempotency store unreachable; handing the message back");
                Claim::Unreachable
            }
        }
    }

    /// Marks a claimed key handled, or gives the claim up after a failure (so the
    /// redelivery runs).
    async fn remember(&self, env: &Envelope, handled: bool) {
        let Some((idem, key)) = self.idempotency_key(env) else {
            return;
        };
        let recorded = if handled {
            idem.store.complete(&key, idem.window).await
        } else {
            idem.store.release(&key).await
        };
        if let Err(e) = recorded {
            tracing::warn!(pattern = %self.pattern, error = %e, "could not update the idempotency store");
        }
    }

    /// Publishes the reply to `req`, if it has a reply address. Small enough to run inline in
    /// every request's future: the reply envelope is built outside it and goes straight into
    /// the transport's own (boxed) enqueue; the rare failure is handled in a boxed future.
    ///
    /// The handler's place is given back once the transport has the reply in order
    /// ([`crate::transport::Publisher::enqueue`]): where its acknowledgement takes
    /// milliseconds (a batching producer), waiting for it would hold the place that long. The
    /// acknowledgement is awaited in a task of the service's own (the drain waits for it); a
    /// refusal there is logged, as one here is.
    async fn reply(&self, req: Arc<Envelope>, out: Outcome) {
        let Some(to) = req.reply_to.clone() else {
            return;
        };
        let (id, correlation) = (req.id, req.correlation_id);
        match self.enqueue_reply(req, &to, out).await {
            Ok(confirmation) => {
                if let Some(outcome) = confirmation.into_pending() {
                    let pattern = self.pattern.clone();
                    self.tracker.spawn(async move {
                        if let Err(e) = outcome.await {
                            tracing::warn!(%pattern, error = %e, "could not send a reply");
                        }
                    });
                }
            }
            Err(e) => Box::pin(self.reply_failed(id, correlation, &to, e)).await,
        }
    }

    fn enqueue_reply<'a>(
        &'a self,
        req: Arc<Envelope>,
        to: &'a str,
        out: Outcome,
    ) -> BoxFuture<'a, Result<Confirmation>> {
        // By now the handler's context is gone (unless the handler kept a clone of it): the
        // request's pattern and trace headers move into the reply rather than being copied.
        let reply_with = |payload: Bytes| match Arc::try_unwrap(req) {
            Ok(req) => req.into_reply(payload),
            Err(shared) => Envelope::reply_to(&shared, payload),
        };
        let mut reply = match out {
            Ok(Some((payload, ct))) => reply_with(payload).with_content_type(ct),
            Ok(None) => reply_with(Bytes::new()),
            Err(f) => {
                let mut r = reply_with(Bytes::new());
                r.error = Some(f.reply_error());
                r
            }
        };
        let span = tracing::info_span!(target: "switchboard", "reply", pattern = %self.pattern);
        if span.is_disabled() {
            return self.client.transport().enqueue(Route::Reply(to), reply);
        }
        trace::inject(&span, &mut reply.headers);
        Box::pin(
            self.client
                .transport()
                .enqueue(Route::Reply(to), reply)
                .instrument(span),
        )
    }

    /// A reply the transport did not take: one too large is replaced by an error reply
    /// that says so (the caller learns at once rather than at its deadline); others are
    /// logged. The request was moved into the failed reply, so this one is built from its
    /// ids and this handler's pattern (without trace headers: a rare path).
    async fn reply_failed(
        &self,
        id: crate::MessageId,
        correlation: Option<crate::CorrelationId>,
        to: &str,
        e: Error,
    ) {
        if e.kind() != ErrorKind::PayloadTooLarge {
            tracing::warn!(pattern = %self.pattern, error = %e, "could not send a reply");
            return;
        }
        let mut request = Envelope::new(self.pattern.clone(), Bytes::new());
        request.id = id;
        request.correlation_id = correlation;
        request.reply_to = Some(to.to_owned());
        let mut r = request.into_reply(Bytes::new());
        r.error = Some(ReplyError {
            code: ErrorKind::PayloadTooLarge.as_str().to_owned(),
            message: format!("the reply is too large: {}", e.message()),
        });
        if let Err(e) = self.client.transport().publish(Route::Reply(to), r).await {
            tracing::warn!(pattern = %self.pattern, error = %e, "could not send a reply");
        }
    }

    /// Sends the message to the pattern's dead-letter destination, then acknowledges it. If
    /// the dead letter cannot be sent, the message is handed back instead: never lost.
    async fn dead_letter(
        &self,
        mut env: Envelope,
        attempt: u32,
        reason: &str,
        acker: Box<dyn Acker>,
    ) {
        tracing::warn!(pattern = %self.pattern, id = %env.id, attempt, %reason, "dead-lettering");
        env.mark_dead_letter(&self.pattern, self.group.as_deref(), attempt, reason);
        match self
            .client
            .transport()
            .publish(Route::DeadLetter(&self.pattern), env)
            .await
        {
            Ok(()) => {
                Counters::inc(&self.counters().dead_lettered);
                self.metrics.dead_lettered.increment(1);
                ack(acker).await;
            }
            Err(e) => {
                tracing::error!(pattern = %self.pattern, error = %e, "dead letter not accepted; handing the message back");
                settle(acker.nack(self.opts.backoff.delay(attempt)).await);
            }
        }
    }
}

/// Acknowledges a handled delivery (skipped where there is nothing to settle).
async fn ack(acker: Box<dyn Acker>) {
    if acker.settles() {
        settle(acker.ack().await);
    }
}

fn settle(r: Result<()>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not settle a delivery; the transport will deliver it again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(350));
        for _ in 0..50 {
            let d1 = b.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = b.delay(3);
            assert!(
                d3 >= Duration::from_millis(175) && d3 <= Duration::from_millis(350),
                "{d3:?}"
            );
            assert!(b.delay(40) <= Duration::from_millis(350));
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// Every delivery's future is boxed (and moved into the consumer's set if it waits); it must stay
    /// small (it was 1,464 bytes when it held the delivery and reply envelopes by value; 424
    /// in a debug build with the reply inline and `Error` one pointer wide; 464 with the
    /// reply's address and ids held across its publish, the request moved into the reply;
    /// 480 with a reply's content type a `Cow`, for payloads relayed with theirs; 496 with the
    /// reply enqueued, its confirmation the enqueue's output; 592 with the handler's run timed
    /// for the metrics (16), the idempotent consumer's claim and record (72, even boxed: the
    /// awaits of its arms), and the choice between a traced and an untraced run (8)).
    #[tokio::test]
    async fn the_per_delivery_future_stays_small() {
        let t = crate::memory::MemoryTransport::connect(crate::memory::MemoryConfig::default());
        let client = Client::new(t, crate::ClientConfig::default());
        let handler = Typed::<u32, u32, _>::new(|x: u32, _ctx| async move { Ok(x) }, true);
        let w = Worker {
            client,
            pattern: "p".into(),
            kind: Kind::Request,
            group: None,
            opts: HandlerOptions::default(),
            handler,
            places: Places::default(),
            tracker: TaskTracker::new(),
            metrics: HandlerMetrics::new("memory", "p", "request"),
        };
        let d = Delivery::new(
            Envelope::new("p", Bytes::new()),
            1,
            Box::new(crate::transport::NoAck),
        );
        let size = std::mem::size_of_val(&w.process(d));
        assert!(size <= 592, "the per-delivery future grew to {size} bytes");
    }
}
